// Decode GEMV for the quantised formats on Q8 activations: those of weights_q.cuh (Q5_0, Q5_1, IQ4_NL, Q2_K .. Q6_K,
// IQ4_XS) at every T, and Q8_0/Q4_0/Q4_1 at T >= 2; one row of Q8_0/Q4_0/Q4_1 by gemv1q_impl below, which quantises
// the row inside each block (no quantize_q8 launch; gemv.cu's 16-bit-activation kernel only when the block's K range
// would need more than 48 KiB of shared memory).
//
// A step first quantises its activation rows once (quantize_q8_*: per 32 values, int8 codes and a float4 meta
// {d, d * sum q[0..16], d, d * sum q[16..32]}, `d = amax / 127`, round half to even — the CPU's rule in
// kernels/src/cpu/dot/act.rs), so the GEMV multiplies integer weight codes with int8 activations by `dp4a` and
// applies the scales once per 16-32 weights; the sums give the minimums / code offsets (`- 32`, `- dmin * min`)
// without touching the weights again. No weight is converted to float and the activations are converted once per
// step, not once per pair of rows (docs/CUDA.md, "Quantised GEMV").
//
// Launch geometry and pipelining are those of gemv.cu: block 128 = 4 warps x 2 rows, lanes stride the row's
// chunks (a chunk is CHUNK weights: one 16-byte quant vector, two for Q5_K/Q6_K/Q3_K whose high bits live apart),
// the loads of the next group of U chunk steps are issued before the arithmetic of the current one (asm volatile
// loads, results used only in the next iteration), activation rows past T clamped to T - 1. U is chosen so that a
// lane has 8 (NT <= 2) or 4 (NT >= 4) 16-byte weight loads in flight. grid = (ceil(N / 8), ceil(T / NT)); split-K
// (gemvq_splitk_*, NT = 1) writes f32 partial sums that gemv.cu's gemv_reduce_* adds in split order.
#include "common.cuh"
#include "weights_q.cuh"
#include "gemv_loop.cuh"

#define GEMVQ_WARPS 4
#define GEMVQ_ROWS 2

// Quantises the 32 activations at x32: int8 codes (two 16-byte halves) and the meta {d, d * sum q[0..16], d,
// d * sum q[16..32]} with d = amax / 127 and q = round_half_even(x * 127 / amax) clamped to +-127 (the CPU's rule,
// kernels/src/cpu/dot/act.rs `quantize_block`). Both quantize_q8_* and the one-row kernels below use it, so they
// write the same bits.
template <class A>
__device__ __forceinline__ void quantize_block(const u16* __restrict__ x32, uint4& q0, uint4& q1, float4& m) {
    float v[32];
#pragma unroll
    for (int i = 0; i < 4; ++i) unpack8<A>(ld_nc_v4(x32 + 8 * i), v + 8 * i);
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(v[i]));
    const float d = amax / 127.f;
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    u32 w[8];
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        u32 word = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int q = max(-127, min(127, __float2int_rn(v[4 * i + j] * id)));
            word |= ((u32)q & 0xffu) << (8 * j);
            if (i < 4)
                s0 += q;
            else
                s1 += q;
        }
        w[i] = word;
    }
    q0 = make_uint4(w[0], w[1], w[2], w[3]);
    q1 = make_uint4(w[4], w[5], w[6], w[7]);
    m = make_float4(d, d * (float)s0, d, d * (float)s1);
}

// x: [rows][32 * nblocks / rows] activations, as `nblocks` consecutive 32-blocks; one thread per block.
template <class A>
__device__ __forceinline__ void quantize_q8_impl(const u16* __restrict__ x, i8* __restrict__ xq, float4* __restrict__ xm,
                                                 long nblocks) {
    const long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    uint4 q0, q1;
    float4 m;
    quantize_block<A>(x + b * 32, q0, q1, m);
    *(uint4*)(xq + b * 32) = q0;
    *(uint4*)(xq + b * 32 + 16) = q1;
    xm[b] = m;
}

// Chunk steps per pipelined group (weights_q.cuh: W::UD at NT <= 2, W::UQ beyond), and the launch bound's
// minimum blocks per SM (0: none).
template <class W, int NT>
struct GemvqUnroll {
    static constexpr int U = NT <= 2 ? W::UD : W::UQ;
    static constexpr int MINB = NT >= 4 ? W::MINB4 : 0;
};

template <class W, int NT>
__device__ __forceinline__ void gemvq_step(const typename W::Chunk& w0, const typename W::Chunk& w1,
                                           const i8* __restrict__ xq, const float4* __restrict__ xm, int c, int cc,
                                           int t0, int T, int K, float* acc0, float* acc1) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const int row = min(t0 + t, T - 1);  // rows past T repeat the last one; their sums are never stored
        const i8* xr = xq + (long)row * K;
        const float4* mr = xm + (long)row * (K / 32);
        acc0[t] += W::dot(w0, xr, mr, c, cc);
        acc1[t] += W::dot(w1, xr, mr, c, cc);
    }
}

// GLU (gemv_swiglu_*): row n of the gate weights (qs, sc) and row n of the up weights (qs1, sc1) in one warp, which
// stores silu(gate) * up from the two sums rounded to the activation type (as gemv.cu's GLU variant; docs/CUDA.md,
// "Fusion"). Otherwise (qs1, sc1) = (qs, sc).
template <class A, class W, int NT, bool SPLIT, bool GLU = false>
__device__ __forceinline__ void gemvq_impl(const u8* __restrict__ qs, const u8* __restrict__ sc,
                                           const u8* __restrict__ qs1, const u8* __restrict__ sc1,
                                           const i8* __restrict__ xq, const float4* __restrict__ xm,
                                           u16* __restrict__ out, float* __restrict__ ws, int N, int K, int T, int cps) {
    constexpr int U = GemvqUnroll<W, NT>::U;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = GLU ? blockIdx.x * GEMVQ_WARPS + warp : (blockIdx.x * GEMVQ_WARPS + warp) * GEMVQ_ROWS;
    const int t0 = blockIdx.y * NT;
    if (n0 >= N) return;  // whole warps leave; no block-wide barrier
    const int nt = min(NT, T - t0);
    const bool has1 = n0 + 1 < N;
    const long row0 = n0, row1 = GLU ? n0 : has1 ? n0 + 1 : n0;
    const int lo = SPLIT ? (int)blockIdx.z * cps : 0;  // a multiple of 32 * U, so of CPB
    const int chunks = SPLIT ? min(K / W::CHUNK, lo + cps) : K / W::CHUNK;
    float acc0[NT], acc1[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = 0.f;
    const int c = lo + lane;
    const int cc = c % W::CPB;  // the same on every step of this lane
    gemv_walk<U, typename W::Chunk>(
        c, chunks, [&](int ci) { return W::load_chunk(qs, sc, row0, ci, cc, K); },
        [&](int ci) { return W::load_chunk(qs1, sc1, row1, ci, cc, K); },
        [&](const typename W::Chunk& w0, const typename W::Chunk& w1, int cs) {
            gemvq_step<W, NT>(w0, w1, xq, xm, cs, cc, t0, T, K, acc0, acc1);
        });
    gemv_store<A, NT, SPLIT, GLU>(acc0, acc1, lane, nt, t0, T, N, n0, has1, out, ws);
}

// One activation row of Q8_0/Q4_0/Q4_1 (gemv_{act}_{w}_xs_t1, gemv_splitk_{act}_{w}_xs, gemv_swiglu_{act}_{w}_xs_t1):
// no quantize_q8 launch. Each block quantises the activations of the K range it reads (its split's, or the whole
// row) into dynamic shared memory, 48 bytes per 32 values laid out as [first 16-byte halves][second halves]
// [float4 metas] (a warp's 16-byte reads of consecutive blocks hit consecutive banks), with quantize_block, so the
// codes and metas are those quantize_q8_* would write; the first group of weight loads is issued before that work
// (gemv_walk's `pro`), so it overlaps the first DRAM round trip. Then the dp4a main loop of gemvq_impl with the
// activations read from shared memory (GQ8_0 / GQ4::dotx). Warps past N help quantise and reach the barrier on a
// clamped row, and store nothing. Dynamic shared memory: 48 * (chunks of the block) bytes; the host takes this path
// only while that is at most 48 KiB (ops.rs), else gemv.cu's kernel on 16-bit activations.
template <class A, class W, bool SPLIT, bool GLU = false>
__device__ __forceinline__ void gemv1q_impl(const u8* __restrict__ qs, const u8* __restrict__ sc,
                                            const u8* __restrict__ qs1, const u8* __restrict__ sc1,
                                            const u16* __restrict__ x, u16* __restrict__ out, float* __restrict__ ws,
                                            int N, int K, int cps) {
    extern __shared__ uint4 gemv1q_smem[];
    constexpr int U = W::UD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = GLU ? blockIdx.x * GEMVQ_WARPS + warp : (blockIdx.x * GEMVQ_WARPS + warp) * GEMVQ_ROWS;
    const bool live = n0 < N;
    const int nr = live ? n0 : N - 1;
    const bool has1 = n0 + 1 < N;
    const long row0 = nr, row1 = GLU ? nr : has1 ? nr + 1 : nr;
    const int lo = SPLIT ? (int)blockIdx.z * cps : 0;  // a multiple of 32 * U
    const int chunks = SPLIT ? min(K / W::CHUNK, lo + cps) : K / W::CHUNK;
    const int nb = chunks - lo;  // 32-blocks of activations this block reads
    uint4* sq0 = gemv1q_smem;
    uint4* sq1 = gemv1q_smem + nb;
    float4* smeta = (float4*)(gemv1q_smem + 2 * nb);
    float acc0[1] = {0.f}, acc1[1] = {0.f};
    const int c = lo + lane;
    gemv_walk<U, typename W::Chunk>(
        c, chunks, [&](int ci) { return W::load_chunk(qs, sc, row0, ci, 0, K); },
        [&](int ci) { return W::load_chunk(qs1, sc1, row1, ci, 0, K); },
        [&](const typename W::Chunk& w0, const typename W::Chunk& w1, int cs) {
            const int b = cs - lo;
            const uint4 x0 = sq0[b], x1 = sq1[b];
            const float4 m = smeta[b];
            acc0[0] += W::dotx(w0, x0, x1, m);
            acc1[0] += W::dotx(w1, x0, x1, m);
        },
        [&] {
            for (int b = threadIdx.x; b < nb; b += GEMVQ_WARPS * 32)
                quantize_block<A>(x + (long)(lo + b) * 32, sq0[b], sq1[b], smeta[b]);
            __syncthreads();
        });
    gemv_store<A, 1, SPLIT, GLU>(acc0, acc1, lane, live ? 1 : 0, 0, 1, N, n0, has1, out, ws);
}

#define GEMV1Q(act, A, wname, W)                                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMVQ_WARPS * 32) gemv_##act##_##wname##_xs_t1(                      \
        const u8* qs, const u8* sc, const u16* x, u16* out, int N, int K) {                                           \
        gemv1q_impl<A, W, false>(qs, sc, qs, sc, x, out, nullptr, N, K, 0);                                          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMVQ_WARPS * 32) gemv_splitk_##act##_##wname##_xs(                  \
        const u8* qs, const u8* sc, const u16* x, float* ws, int N, int K, int cps) {                                 \
        gemv1q_impl<A, W, true>(qs, sc, qs, sc, x, nullptr, ws, N, K, cps);                                          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMVQ_WARPS * 32) gemv_swiglu_##act##_##wname##_xs_t1(               \
        const u8* qg, const u8* sg, const u8* qu, const u8* su, const u16* x, u16* out, int N, int K) {               \
        gemv1q_impl<A, W, false, true>(qg, sg, qu, su, x, out, nullptr, N, K, 0);                                    \
    }

#define GEMVQ_NT(act, A, wname, W, NT)                                                                               \
    extern "C" __global__ void __launch_bounds__(GEMVQ_WARPS * 32, (GemvqUnroll<W, NT>::MINB))                     \
        gemv_##act##_##wname##_t##NT(                                                                             \
        const u8* qs, const u8* sc, const i8* xq, const float4* xm, u16* out, int N, int K, int T) {                  \
        gemvq_impl<A, W, NT, false>(qs, sc, qs, sc, xq, xm, out, nullptr, N, K, T, 0);                                       \
    }
// gate|up GEMV with the SwiGLU epilogue (one output row per warp): grid (ceil(N / 4), ceil(T / NT)).
#define GEMVQ_SWIGLU_NT(act, A, wname, W, NT)                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMVQ_WARPS * 32, (GemvqUnroll<W, NT>::MINB))                     \
        gemv_swiglu_##act##_##wname##_t##NT(const u8* qg, const u8* sg, const u8* qu, const u8* su, const i8* xq,     \
                                            const float4* xm, u16* out, int N, int K, int T) {                        \
        gemvq_impl<A, W, NT, false, true>(qg, sg, qu, su, xq, xm, out, nullptr, N, K, T, 0);                         \
    }
#define GEMVQ_SPLITK(act, A, wname, W)                                                                               \
    extern "C" __global__ void __launch_bounds__(GEMVQ_WARPS * 32) gemv_splitk_##act##_##wname(                       \
        const u8* qs, const u8* sc, const i8* xq, const float4* xm, float* ws, int N, int K, int T, int cps) {        \
        gemvq_impl<A, W, 1, true>(qs, sc, qs, sc, xq, xm, nullptr, ws, N, K, T, cps);                                        \
    }
#define GEMVQ(act, A, wname, W)                                                                                      \
    GEMVQ_NT(act, A, wname, W, 1) GEMVQ_NT(act, A, wname, W, 2) GEMVQ_NT(act, A, wname, W, 4)                        \
        GEMVQ_NT(act, A, wname, W, 8) GEMVQ_SPLITK(act, A, wname, W) GEMVQ_SWIGLU_NT(act, A, wname, W, 1)             \
            GEMVQ_SWIGLU_NT(act, A, wname, W, 2) GEMVQ_SWIGLU_NT(act, A, wname, W, 4)                                \
                GEMVQ_SWIGLU_NT(act, A, wname, W, 8)
// Q8_0/Q4_0/Q4_1: T >= 2 only (their one-row GEMV stays on 16-bit activations in gemv.cu).
#define GEMVQ_BATCH(act, A, wname, W)                                                                                \
    GEMVQ_NT(act, A, wname, W, 2) GEMVQ_NT(act, A, wname, W, 4) GEMVQ_NT(act, A, wname, W, 8)                        \
        GEMVQ_SWIGLU_NT(act, A, wname, W, 2) GEMVQ_SWIGLU_NT(act, A, wname, W, 4)                                    \
            GEMVQ_SWIGLU_NT(act, A, wname, W, 8)
#define GEMVQ_ACT(act, A)                                                                                            \
    FOR_EACH_QWEIGHT(GEMVQ, act, A)                                                                                  \
    GEMVQ_BATCH(act, A, q8_0, GQ8_0) GEMVQ_BATCH(act, A, q4_0, GQ4_0) GEMVQ_BATCH(act, A, q4_1, GQ4_1)               \
    GEMV1Q(act, A, q8_0, GQ8_0) GEMV1Q(act, A, q4_0, GQ4_0) GEMV1Q(act, A, q4_1, GQ4_1)                              \
    extern "C" __global__ void __launch_bounds__(128) quantize_q8_##act(const u16* x, i8* xq, float4* xm,            \
                                                                        long nblocks) {                              \
        quantize_q8_impl<A>(x, xq, xm, nblocks);                                                                     \
    }
FOR_EACH_ACT(GEMVQ_ACT)
