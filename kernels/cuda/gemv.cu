// Decode matrix-vector products: out[t, n] = sum_k x[t, k] * w[n, k] for a few rows t (the sessions of a decode
// batch) and weights in any format of weights.cuh, dequantised in registers.
//
// Launch: block 128 threads = 4 warps; each warp owns 2 consecutive output rows n and walks K in 16-byte weight
// chunks (lane-strided, so a warp reads 512 contiguous bytes of each row per step), accumulating every activation
// row t of its tile in f32; then one warp reduction per (n, t). grid = (ceil(N / 8), ceil(T / NT)); NT in
// {1, 2, 4, 8} is the number of activation rows that share one pass over the weights (several sessions per launch).
// The weights are read once per launch (per NT rows); the activations (a few KiB) are re-read from L1/L2.
//
// gemv_scalar_* is the fallback for plain weights whose K is not a multiple of the 16-byte chunk: one warp per
// row, one element per lane and step.
#include "common.cuh"
#include "weights.cuh"

#define GEMV_WARPS 4
#define GEMV_ROWS 2

template <class A, class W, int NT>
__device__ __forceinline__ void gemv_impl(const u8* __restrict__ qs, const u8* __restrict__ sc,
                                          const u16* __restrict__ x, u16* __restrict__ out, int N, int K, int T) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
    const int t0 = blockIdx.y * NT;
    if (n0 >= N) return;  // whole warps leave; the kernel has no block-wide barrier
    const int nt = min(NT, T - t0);
    const bool has1 = n0 + 1 < N;
    const long row0 = n0, row1 = has1 ? n0 + 1 : n0;
    const int chunks = K / W::CHUNK;
    float acc0[NT], acc1[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = 0.f;
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        const typename W::Chunk w0 = W::load_chunk(qs, sc, row0, c, K);
        const typename W::Chunk w1 = W::load_chunk(qs, sc, row1, c, K);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t < nt) {
                const u16* xp = x + (long)(t0 + t) * K + (long)c * W::CHUNK;
                acc0[t] += W::template dot<A>(w0, xp);
                acc1[t] += W::template dot<A>(w1, xp);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const float s0 = warp_sum(acc0[t]);
        const float s1 = warp_sum(acc1[t]);
        if (lane == 0 && t < nt) {
            u16* o = out + (long)(t0 + t) * N + n0;
            o[0] = A::from_f32(s0);
            if (has1) o[1] = A::from_f32(s1);
        }
    }
}

template <class A, class W>
__device__ __forceinline__ void gemv_scalar_impl(const u8* __restrict__ qs, const u8* __restrict__ sc,
                                                 const u16* __restrict__ x, u16* __restrict__ out, int N, int K,
                                                 int T) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * GEMV_WARPS + warp;
    const int t0 = blockIdx.y * 8;
    if (n >= N) return;
    const int nt = min(8, T - t0);
    float acc[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) acc[t] = 0.f;
    for (int k = lane; k < K; k += 32) {
        const float wv = W::load1(qs, sc, (long)n * K + k);
#pragma unroll
        for (int t = 0; t < 8; ++t)
            if (t < nt) acc[t] = fmaf(wv, A::to_f32(x[(long)(t0 + t) * K + k]), acc[t]);
    }
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        const float s = warp_sum(acc[t]);
        if (lane == 0 && t < nt) out[(long)(t0 + t) * N + n] = A::from_f32(s);
    }
}

#define GEMV_NT(act, A, wname, W, NT)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_##act##_##wname##_t##NT(                       \
        const u8* qs, const u8* sc, const u16* x, u16* out, int N, int K, int T) {                                   \
        gemv_impl<A, W, NT>(qs, sc, x, out, N, K, T);                                                                \
    }
#define GEMV(act, A, wname, W)                                                                                       \
    GEMV_NT(act, A, wname, W, 1) GEMV_NT(act, A, wname, W, 2) GEMV_NT(act, A, wname, W, 4)                           \
        GEMV_NT(act, A, wname, W, 8)
#define GEMV_SCALAR(act, A, wname, W)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_scalar_##act##_##wname(                        \
        const u8* qs, const u8* sc, const u16* x, u16* out, int N, int K, int T) {                                   \
        gemv_scalar_impl<A, W>(qs, sc, x, out, N, K, T);                                                             \
    }
#define GEMV_ACT(act, A)                                                                                             \
    FOR_EACH_WEIGHT(GEMV, act, A)                                                                                    \
    GEMV_SCALAR(act, A, f32, WF32) GEMV_SCALAR(act, A, f16, WF16) GEMV_SCALAR(act, A, bf16, WBF16)
FOR_EACH_ACT(GEMV_ACT)
