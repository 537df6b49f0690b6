// Decode matrix-vector products: out[t, n] = sum_k x[t, k] * w[n, k] for a few rows t (the sessions of a decode
// batch) and plain weights (f32, f16, bf16), or one row of Q8_0/Q4_0/Q4_1 over a K too long for gemv_q8.cu's
// one-row kernel, dequantised in registers (every other quantised case runs on Q8 activations in gemv_q8.cu).
//
// Launch: block 128 threads = 4 warps; each warp owns GEMV_ROWS = 2 consecutive output rows n and walks K in 16-byte
// weight chunks (lane-strided, so a warp reads 512 contiguous bytes of each row per chunk step), accumulating every
// activation row t of its tile in f32; then one warp reduction per (n, t). grid = (ceil(N / 8), ceil(T / NT)); NT in
// {1, 2, 4, 8} is the number of activation rows that share one pass over the weights (several sessions per launch).
// The weights are read once per launch (per NT rows); the activations (a few KiB) are re-read from L1/L2.
// gemv_swiglu_*: the same kernel over the gate and up matrices at once (a warp's rows are gate row n and up row n),
// storing silu(gate) * up; grid = (ceil(N / 4), ceil(T / NT)).
//
// Loads in flight (docs/CUDA.md, "GEMV"): a decode GEMV has too few warps per SM to hide DRAM latency with one
// 16-byte load per lane, so the main loop is software-pipelined over groups of U = GemvUnroll<NT>::U chunk steps:
// while a lane computes group g, the GEMV_ROWS x U chunk loads of group g + 1 (8 independent 128-bit loads at
// NT = 1, 128 bytes per lane) are already in flight. The prefetch sits in its own block before the arithmetic and
// its results are used only in the next iteration, so neither NVVM nor ptxas can sink a load next to its use
// (both did with a plain unrolled loop, leaving 2-3 loads in flight). Activation rows past T are clamped to row
// T - 1 and their sums never stored, so the arithmetic has no branch. The last < U steps of a lane go through a
// guarded remainder loop. scripts/sass-report checks all this in the SASS and fails CI when it regresses.
//
// gemv_scalar_* is the fallback for plain weights whose K is not a multiple of the 16-byte chunk: one warp per
// row, one element per lane and step.
#include "common.cuh"
#include "weights.cuh"
#include "gemv_loop.cuh"

#define GEMV_WARPS 4
#define GEMV_ROWS 2

// Chunk steps per lane per pipelined group: 8 weight loads in flight at NT <= 2 (the decode case), 4 beyond,
// where each chunk is reused NT times and the activation registers grow.
template <int NT>
struct GemvUnroll {
    static constexpr int U = NT <= 2 ? 4 : 2;
};

// Sums one step (chunk c of both rows) into the accumulators of the NT activation rows.
template <class A, class W, int NT>
__device__ __forceinline__ void gemv_step(const typename W::Chunk& w0, const typename W::Chunk& w1,
                                          const u16* __restrict__ x, int c, int t0, int T, int K, float* acc0,
                                          float* acc1) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const int row = min(t0 + t, T - 1);  // rows past T repeat the last one; their sums are never stored
        const u16* xp = x + (long)row * K + (long)c * W::CHUNK;
        acc0[t] += W::template dot<A>(w0, xp);
        acc1[t] += W::template dot<A>(w1, xp);
    }
}

// SPLIT: split-K (gemv_splitk_*): block z covers chunks [z * cps, (z + 1) * cps) of every row and writes its f32
// partial sums to ws[z][t][n]; gemv_reduce_* adds the splits in order z = 0, 1, ... (deterministic). Used when the
// output is too short to put enough warps on every SM (docs/CUDA.md, "GEMV").
//
// GLU (gemv_swiglu_*, docs/CUDA.md "Fusion"): the warp's two rows are row n of the gate weights (qs, sc) and row n
// of the up weights (qs1, sc1), and it stores out[t, n] = silu(gate) * up, both sums rounded to the activation type
// first: the bits the gate GEMV, the up GEMV and swiglu_* would give, in one launch (a row's sum does not depend on
// which of a warp's two rows it is). A block covers GEMV_WARPS outputs; otherwise (qs1, sc1) = (qs, sc).
template <class A, class W, int NT, bool SPLIT, bool GLU = false>
__device__ __forceinline__ void gemv_impl(const u8* __restrict__ qs, const u8* __restrict__ sc,
                                          const u8* __restrict__ qs1, const u8* __restrict__ sc1,
                                          const u16* __restrict__ x, u16* __restrict__ out, float* __restrict__ ws,
                                          int N, int K, int T, int cps) {
    constexpr int U = GemvUnroll<NT>::U;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = GLU ? blockIdx.x * GEMV_WARPS + warp : (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
    const int t0 = blockIdx.y * NT;
    if (n0 >= N) return;  // whole warps leave; the kernel has no block-wide barrier
    const int nt = min(NT, T - t0);
    const bool has1 = n0 + 1 < N;
    const long row0 = n0, row1 = GLU ? n0 : has1 ? n0 + 1 : n0;
    const int lo = SPLIT ? (int)blockIdx.z * cps : 0;
    const int chunks = SPLIT ? min(K / W::CHUNK, lo + cps) : K / W::CHUNK;  // end of this block's chunk range
    float acc0[NT], acc1[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = 0.f;
    const int c = lo + lane;
    gemv_walk<U, typename W::Chunk>(
        c, chunks, [&](int ci) { return W::load_chunk(qs, sc, row0, ci, K); },
        [&](int ci) { return W::load_chunk(qs1, sc1, row1, ci, K); },
        [&](const typename W::Chunk& w0, const typename W::Chunk& w1, int cs) {
            gemv_step<A, W, NT>(w0, w1, x, cs, t0, T, K, acc0, acc1);
        });
    gemv_store<A, NT, SPLIT, GLU>(acc0, acc1, lane, nt, t0, T, N, n0, has1, out, ws);
}

// out[i] = sum over z of ws[z][i] for the TN = T * N outputs, in order z = 0 .. splits - 1. Grid-stride, block 256.
template <class A>
__device__ __forceinline__ void gemv_reduce_impl(const float* __restrict__ ws, u16* __restrict__ out, long tn,
                                                 int splits) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < tn; i += (long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int z = 0; z < splits; ++z) s += ws[(long)z * tn + i];
        out[i] = A::from_f32(s);
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
        gemv_impl<A, W, NT, false>(qs, sc, qs, sc, x, out, nullptr, N, K, T, 0);                                             \
    }
// gate|up GEMV with the SwiGLU epilogue: out[t, n] = silu(x[t] . gate[n]) * (x[t] . up[n]); grid (ceil(N / 4), ceil(T / NT)).
#define GEMV_SWIGLU_NT(act, A, wname, W, NT)                                                                         \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_swiglu_##act##_##wname##_t##NT(                \
        const u8* qg, const u8* sg, const u8* qu, const u8* su, const u16* x, u16* out, int N, int K, int T) {          \
        gemv_impl<A, W, NT, false, true>(qg, sg, qu, su, x, out, nullptr, N, K, T, 0);                               \
    }
// Split-K at NT = 1 only (one decode row: the case whose short outputs leave SMs idle).
#define GEMV_SPLITK(act, A, wname, W)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_splitk_##act##_##wname(                        \
        const u8* qs, const u8* sc, const u16* x, float* ws, int N, int K, int T, int cps) {                         \
        gemv_impl<A, W, 1, true>(qs, sc, qs, sc, x, nullptr, ws, N, K, T, cps);                                              \
    }
#define GEMV(act, A, wname, W)                                                                                       \
    GEMV_NT(act, A, wname, W, 1) GEMV_NT(act, A, wname, W, 2) GEMV_NT(act, A, wname, W, 4)                           \
        GEMV_NT(act, A, wname, W, 8) GEMV_SPLITK(act, A, wname, W) GEMV_SWIGLU_NT(act, A, wname, W, 1)                \
            GEMV_SWIGLU_NT(act, A, wname, W, 2) GEMV_SWIGLU_NT(act, A, wname, W, 4)                                  \
                GEMV_SWIGLU_NT(act, A, wname, W, 8)
#define GEMV_SCALAR(act, A, wname, W)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_scalar_##act##_##wname(                        \
        const u8* qs, const u8* sc, const u16* x, u16* out, int N, int K, int T) {                                   \
        gemv_scalar_impl<A, W>(qs, sc, x, out, N, K, T);                                                             \
    }
// Q8_0/Q4_0/Q4_1 keep a one-row GEMV (and split-K) here, on 16-bit activations, as the fallback for K ranges too
// long for the shared-memory quantisation of gemv_q8.cu's one-row dp4a kernels (gemv1q_impl; docs/CUDA.md,
// "Quantised GEMV"); T >= 2 runs gemv_q8.cu's dp4a kernels. Every other quantised format is in gemv_q8.cu only.
#define GEMV_T1(act, A, wname, W)                                                                                    \
    GEMV_NT(act, A, wname, W, 1) GEMV_SPLITK(act, A, wname, W) GEMV_SWIGLU_NT(act, A, wname, W, 1)
#define GEMV_ACT(act, A)                                                                                             \
    GEMV(act, A, f32, WF32) GEMV(act, A, f16, WF16) GEMV(act, A, bf16, WBF16) GEMV_T1(act, A, q8_0, WQ8_0)            \
        GEMV_T1(act, A, q4_0, WQ4_0) GEMV_T1(act, A, q4_1, WQ4_1)                                                    \
    extern "C" __global__ void __launch_bounds__(256) gemv_reduce_##act(const float* ws, u16* out, long tn,          \
                                                                        int splits) {                                \
        gemv_reduce_impl<A>(ws, out, tn, splits);                                                                    \
    }                                                                                                                \
    GEMV_SCALAR(act, A, f32, WF32) GEMV_SCALAR(act, A, f16, WF16) GEMV_SCALAR(act, A, bf16, WBF16)
FOR_EACH_ACT(GEMV_ACT)
