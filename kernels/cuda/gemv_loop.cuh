// The decode GEMV's pipelined walk over K and its epilogue, shared by gemv.cu (16-bit activations) and gemv_q8.cu
// (Q8 activations); each supplies how a chunk is loaded and how a step is summed.
#pragma once
#include "common.cuh"

// Walks this lane's chunk steps c, c + 32, ... (< chunks) of the warp's two rows: whole groups of U steps
// software-pipelined (the next group's 2 x U loads are issued before the current group's arithmetic and used only
// in the next iteration, so neither NVVM nor ptxas can sink a load next to its use; docs/CUDA.md "GEMV: loads in
// flight"), then the < U remaining steps one at a time. load0(c) / load1(c) load chunk c of row 0 / row 1;
// step(w0, w1, c) adds chunk c of both rows into the accumulators.
//
// pro() runs once, by every thread of the block, after the first group's loads are issued and before any step:
// gemv_q8.cu's one-row kernel quantises its activations into shared memory there (and waits at a barrier) while
// those loads travel.
template <int U, class Chunk, class Load0, class Load1, class Step, class Pro>
__device__ __forceinline__ void gemv_walk(int c, int chunks, const Load0& load0, const Load1& load1, const Step& step,
                                          const Pro& pro) {
    Chunk n0w[U], n1w[U];
    bool more = c + 32 * (U - 1) < chunks;
    if (more) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            n0w[u] = load0(c + 32 * u);
            n1w[u] = load1(c + 32 * u);
        }
    }
    pro();
    while (more) {
        Chunk w0[U], w1[U];
#pragma unroll
        for (int u = 0; u < U; ++u) w0[u] = n0w[u], w1[u] = n1w[u];
        const int cn = c + 32 * U;
        more = cn + 32 * (U - 1) < chunks;
        if (more) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                n0w[u] = load0(cn + 32 * u);
                n1w[u] = load1(cn + 32 * u);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) step(w0[u], w1[u], c + 32 * u);
        c = cn;
    }
    // Remainder: fewer than U steps left for this lane.
#pragma unroll 1
    for (; c < chunks; c += 32) {
        const Chunk w0 = load0(c);
        const Chunk w1 = load1(c);
        step(w0, w1, c);
    }
}

template <int U, class Chunk, class Load0, class Load1, class Step>
__device__ __forceinline__ void gemv_walk(int c, int chunks, const Load0& load0, const Load1& load1, const Step& step) {
    gemv_walk<U, Chunk>(c, chunks, load0, load1, step, [] {});
}

// The warp's results for activation rows t0 .. t0 + nt - 1: rows n0 and n0 + 1 (if has1) of out rounded to A; or
// (SPLIT) f32 partial sums of split blockIdx.z into ws[z][t][n]; or (GLU) output n0 = silu(gate) * up from the two
// sums rounded to A (swiglu_of_sums).
template <class A, int NT, bool SPLIT, bool GLU>
__device__ __forceinline__ void gemv_store(const float* acc0, const float* acc1, int lane, int nt, int t0, int T,
                                           int N, int n0, bool has1, u16* __restrict__ out, float* __restrict__ ws) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const float s0 = warp_sum(acc0[t]);
        const float s1 = warp_sum(acc1[t]);
        if (lane == 0 && t < nt) {
            if (GLU) {
                out[(long)(t0 + t) * N + n0] = swiglu_of_sums<A>(s0, s1);
            } else if (SPLIT) {
                float* o = ws + ((long)blockIdx.z * T + t0 + t) * N + n0;
                o[0] = s0;
                if (has1) o[1] = s1;
            } else {
                u16* o = out + (long)(t0 + t) * N + n0;
                o[0] = A::from_f32(s0);
                if (has1) o[1] = A::from_f32(s1);
            }
        }
    }
}
