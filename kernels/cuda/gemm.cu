// Prefill matrix products on tensor cores: out[t, n] = sum_k x[t, k] * w[n, k], x: [T, K] activations, w: [N, K] in
// any format of weights.cuh / weights_q.cuh, out: [T, N]. docs/CUDA.md, "GEMM".
//
// Tiling: a block computes a BM x BN tile of out with WM x 4 warps of 64 x WN (4 x NI mma.sync m16n8k16, f32
// accumulate): `gemm_*` BM = 128 (8 warps, 256 threads), `gemm_small_*` BM = 64 (4 warps, 128 threads, for T <= 64);
// WN = 64, BN = 256 for same-type and plain weights, WN = 32, BN = 128 for the others (GemmNI below).
// K advances in k-tiles of BK = 32 through GEMM_STAGES = 4 stages of dynamic shared memory: while the tensor cores
// work on tile kt, tiles kt + 1 .. kt + 3 are in flight. Rows are 32 elements = 64 bytes = four 16-byte chunks,
// unpadded; chunk c of row r sits at chunk c ^ ((r >> 1) & 3) of its row (`gemm_swz`), so the 8 row addresses of each
// ldmatrix phase (8 consecutive rows, one chunk column) fall in 8 different 16-byte bank groups (conflict-free;
// proven on the host with the fill mapping and the fragment layout: kernels/src/cuda/gemm_plan.rs).
//
// How the weight tile is filled (MODE):
//   GEMM_DIRECT  weights of the activation type: cp.async, like the activation tile (16 bytes, zero-filled past edges);
//   GEMM_DEQ     f32, the other 16-bit type and the weights_q.cuh formats: fetched to registers before the math of
//                tile kt (loads in flight during it), dequantised in f32 (ggml's float order) and rounded to the
//                activation type into the stage of tile kt + 3 after it;
//   GEMM_SCALED  Q8_0, Q4_0, Q4_1 (blocks of 32 = one k-tile): the shared tile holds the integer codes (int8, q - 8,
//                the nibble q: exact in f16 and bf16) and the block's scale d (and Q4_1's m) per row; for each
//                (mi, ni) the k-tile's two mma steps go to a fresh 4-register sum t, and acc += d * t in f32; Q4_1
//                adds m * sum(x over the block) (an mma of x with a B fragment of ones). The product is then
//                sum_b d_b * sum(x q) (+ m_b * sum x) in f32, as the decode GEMV computes it: no weight is rounded
//                to 16 bits, so prefill and decode of a row agree up to f32 summation order.
//
// Split-K (gridDim.z > 1, `kts` k-tiles per split): each z writes f32 partial sums to ws[z][t][n]; gemv_reduce_*
// (gemv.cu) adds them in the order z = 0, 1, ... and rounds (deterministic). Chosen by the host (gemm_plan.rs) when
// the output tiles alone leave SMs idle.
//
// Requires K % 8 == 0 (the host falls back to the GEMV kernels otherwise), and K % 32 == 0 for GEMM_SCALED.
// grid = (ceil(N / BN), ceil(T / BM), splits); dynamic shared memory GEMM_SMEM_BYTES(BM, BN, MODE), set by the host.
#include "common.cuh"
#include "weights.cuh"
#include "weights_q.cuh"

#define GEMM_BK 32
// Stages: 4 (at most 96 KiB, under the 99 KiB a block may have on sm_86/sm_89).
#define GEMM_STAGES 4
#define GEMM_DIRECT 0
#define GEMM_DEQ 1
#define GEMM_SCALED 2

// Byte offset of 16-byte chunk `c` (0..3) of row `r` inside a tile of 64-byte rows.
__device__ __forceinline__ u32 gemm_swz(int r, int c) { return (u32)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4)); }

// Integer codes and scales of the 32-blocks of Q8_0 / Q4_0 / Q4_1, for GEMM_SCALED. `fetch` is W::fetch8 (raw
// bits only); `codes` writes the 8 codes as f32 (exact), `d`/`m` the block's scale and minimum.
template <class W>
struct Codes;
template <>
struct Codes<WQ8_0> {
    static constexpr bool MIN = false;
    static __device__ __forceinline__ void codes(const WQ8_0::Raw8& r, float* out) {
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = (float)(i8)((r.q >> (8 * i)) & 0xff);
    }
    static __device__ __forceinline__ float d(const WQ8_0::Raw8& r) { return f16_to_f32(r.d); }
    static __device__ __forceinline__ float m(const WQ8_0::Raw8&) { return 0.f; }
};
template <>
struct Codes<WQ4_0> {
    static constexpr bool MIN = false;
    static __device__ __forceinline__ void codes(const WQ4_0::Raw8& r, float* out) {
        nibbles8(r.q, r.high, out);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] -= 8.f;
    }
    static __device__ __forceinline__ float d(const WQ4_0::Raw8& r) { return f16_to_f32(r.d); }
    static __device__ __forceinline__ float m(const WQ4_0::Raw8&) { return 0.f; }
};
template <>
struct Codes<WQ4_1> {
    static constexpr bool MIN = true;
    static __device__ __forceinline__ void codes(const WQ4_1::Raw8& r, float* out) { nibbles8(r.q, r.high, out); }
    static __device__ __forceinline__ float d(const WQ4_1::Raw8& r) { return f16_to_f32((u16)(r.dm & 0xffff)); }
    static __device__ __forceinline__ float m(const WQ4_1::Raw8& r) { return f16_to_f32((u16)(r.dm >> 16)); }
};

// The weights_q.cuh formats (eight `load1` per 8 weights, 8 f32 per chunk and the decoding's temporaries) take the
// narrow warp tile: with 64 x 64 tiles their held loads spilled.
template <class W>
struct GemmNarrow {
    static constexpr bool value = false;
};
#define GEMM_NARROW(W)                                                                                               \
    template <>                                                                                                      \
    struct GemmNarrow<W> {                                                                                           \
        static constexpr bool value = true;                                                                          \
    };
GEMM_NARROW(WQ5_0)
GEMM_NARROW(WQ5_1)
GEMM_NARROW(WIQ4_NL)
GEMM_NARROW(WQ2_K)
GEMM_NARROW(WQ3_K)
GEMM_NARROW(WQ4_K)
GEMM_NARROW(WQ5_K)
GEMM_NARROW(WQ6_K)
GEMM_NARROW(WIQ4_XS)

// Columns of a warp tile: 64 (8 mma n-tiles, 128 accumulators) for the weights of the activation type and the plain
// weights converted in the fill; 32 (64 accumulators) for GEMM_SCALED, whose per-k-tile sums and scales need the
// registers, and for the weights_q.cuh formats (GemmNarrow), whose decoding does. A block is 4 warps wide, so its
// weight tile has GEMM_BN(NI) = 4 x 8 NI rows (256 or 128).
template <int MODE, class W>
struct GemmNI {
    static constexpr int value = (MODE == GEMM_DIRECT || (MODE == GEMM_DEQ && !GemmNarrow<W>::value)) ? 8 : 4;
};
#define GEMM_BN(NI) (32 * (NI))

// Bytes of dynamic shared memory: per stage the activation tile (BM rows) and weight tile (BN rows) of 64 bytes,
// and for GEMM_SCALED the per-row (d, m) of the weight tile.
#define GEMM_STAGE_BYTES(BM, BN, MODE) (((BM) + (BN)) * 64 + ((MODE) == GEMM_SCALED ? (BN) * 8 : 0))
#define GEMM_SMEM_BYTES(BM, BN, MODE) (GEMM_STAGES * GEMM_STAGE_BYTES(BM, BN, MODE))

template <class A, class W, int MODE, int WM>
__device__ __forceinline__ void gemm_impl(const u8* __restrict__ qs, const u8* __restrict__ sc,
                                          const u16* __restrict__ x, u16* __restrict__ out, float* __restrict__ ws,
                                          int T, int N, int K, int kts) {
    constexpr int NI = GemmNI<MODE, W>::value, WN = 8 * NI;
    constexpr int BM = 64 * WM, BN = GEMM_BN(NI), NTHR = WM * 4 * 32, S = GEMM_STAGES;
    constexpr int STAGE = GEMM_STAGE_BYTES(BM, BN, MODE);
    constexpr int A_PER = BM * 4 / NTHR, B_PER = BN * 4 / NTHR;  // 16-byte chunks per thread and tile
    extern __shared__ __align__(128) u8 gemm_smem[];
    const u32 base = smem_addr(gemm_smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * WN;
    const int KT = (K + GEMM_BK - 1) / GEMM_BK;
    const int kbeg = blockIdx.z * kts, kend = min(KT, kbeg + kts);
    // Stage s: [A tile BM x 64 B][B tile BN x 64 B][GEMM_SCALED: BN x (d, m) f32].
    auto sa = [&](int s) { return base + (u32)(s * STAGE); };
    auto sb = [&](int s) { return base + (u32)(s * STAGE + BM * 64); };
    auto ss = [&](int s) { return base + (u32)(s * STAGE + (BM + BN) * 64); };

    // Chunk i of a thread: id = tid + i * NTHR, row id >> 2, chunk id & 3 (a warp fills 8 whole rows, 512 bytes).
    auto load_a = [&](int s, int kt) {
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            const int id = tid + i * NTHR, r = id >> 2, c = id & 3;
            const int gm = m0 + r, gk = kt * GEMM_BK + c * 8;
            const bool ok = gm < T && gk < K;
            cp_async16(sa(s) + gemm_swz(r, c), x + (ok ? (long)gm * K + gk : 0), ok);
        }
    };
    auto load_b_async = [&](int s, int kt) {
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            const int id = tid + i * NTHR, r = id >> 2, c = id & 3;
            const int gn = n0 + r, gk = kt * GEMM_BK + c * 8;
            const bool ok = gn < N && gk < K;
            cp_async16(sb(s) + gemm_swz(r, c), (const u16*)qs + (ok ? (long)gn * K + gk : 0), ok);
        }
    };
    typename W::Raw8 raw[MODE == GEMM_DIRECT ? 1 : B_PER];
    bool raw_ok[MODE == GEMM_DIRECT ? 1 : B_PER];
    auto fetch_b = [&](int kt) {
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            const int id = tid + i * NTHR, r = id >> 2, c = id & 3;
            const int gn = n0 + r, gk = kt * GEMM_BK + c * 8;
            raw_ok[i] = gn < N && gk < K;
            if (raw_ok[i]) raw[i] = W::fetch8(qs, sc, (long)gn * K + gk);
        }
    };
    auto store_b = [&](int s) {
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            const int id = tid + i * NTHR, r = id >> 2, c = id & 3;
            float f[8];
            if (raw_ok[i]) {
                if constexpr (MODE == GEMM_SCALED)
                    Codes<W>::codes(raw[i], f);
                else
                    W::convert8(raw[i], f);
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = 0.f;
            }
            st_shared_v4(sb(s) + gemm_swz(r, c), pack8<A>(f));
            if constexpr (MODE == GEMM_SCALED) {
                if (c == 0) {
                    const float d = raw_ok[i] ? Codes<W>::d(raw[i]) : 0.f, m = raw_ok[i] ? Codes<W>::m(raw[i]) : 0.f;
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(ss(s) + r * 8), "f"(d), "f"(m));
                }
            }
        }
    };
    auto fill = [&](int s, int kt) {  // a whole stage at once (prologue)
        load_a(s, kt);
        if constexpr (MODE == GEMM_DIRECT) {
            load_b_async(s, kt);
        } else {
            fetch_b(kt);
            store_b(s);
        }
    };

    float acc[4][NI][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    // Prologue: tiles kbeg .. kbeg + S - 2, one commit group each (empty groups past the end keep the count).
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (kbeg + s < kend) fill(s, kbeg + s);
        cp_async_commit();
    }
    const int g = lane >> 2, c4 = lane & 3;
    for (int kt = kbeg; kt < kend; ++kt) {
        const int i = kt - kbeg, st = i % S, nx = kt + S - 1, snx = (i + S - 1) % S;
        cp_async_wait<S - 2>();  // tile kt has landed (this thread's copies) ...
        __syncthreads();         // ... everyone's; and stage snx (read at i - 1) is free
        const bool more = nx < kend;
        if (more) {
            load_a(snx, nx);
            if constexpr (MODE == GEMM_DIRECT)
                load_b_async(snx, nx);
            else
                fetch_b(nx);
        }
        cp_async_commit();
        // A fragment (mi, kk): rows wm + 16 mi + (lane & 15), chunk 2 kk + (lane >> 4). B fragment pair (nj, kk):
        // rows wn + 16 nj + (lane & 7) + 8 (lane >> 4), chunk 2 kk + ((lane >> 3) & 1).
        if constexpr (MODE != GEMM_SCALED) {
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
                u32 af[4][4], bfr[NI][2];
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
                    ldmatrix_x4(sa(st) + gemm_swz(wm + mi * 16 + (lane & 15), 2 * kk + (lane >> 4)), af[mi][0],
                                af[mi][1], af[mi][2], af[mi][3]);
#pragma unroll
                for (int nj = 0; nj < NI / 2; ++nj)
                    ldmatrix_x4(sb(st) + gemm_swz(wn + nj * 16 + (lane & 7) + (lane >> 4) * 8,
                                                  2 * kk + ((lane >> 3) & 1)),
                                bfr[2 * nj][0], bfr[2 * nj][1], bfr[2 * nj + 1][0], bfr[2 * nj + 1][1]);
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) mma_16816<A>(acc[mi][ni], af[mi], bfr[ni]);
            }
        } else {
            // Per (mi, ni): a fresh sum t over the k-tile's two k16 steps (the 32-block), multiplied by the column's
            // d in f32 and added to the accumulator (exact codes: no weight is rounded). Q4_1 also adds m * xs, xs =
            // the sum of x over the block for this thread's rows (g, g + 8 of each mi), from an mma with ones.
            u32 af[2][4][4];
#pragma unroll
            for (int kk = 0; kk < 2; ++kk)
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
                    ldmatrix_x4(sa(st) + gemm_swz(wm + mi * 16 + (lane & 15), 2 * kk + (lane >> 4)), af[kk][mi][0],
                                af[kk][mi][1], af[kk][mi][2], af[kk][mi][3]);
            float xs[4][2];
            if constexpr (Codes<W>::MIN) {
                const u32 one2 = A::pack2(1.f, 1.f);
                const u32 ones[2] = {one2, one2};
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) {
                    float t[4] = {0.f, 0.f, 0.f, 0.f};
                    mma_16816<A>(t, af[0][mi], ones);
                    mma_16816<A>(t, af[1][mi], ones);
                    xs[mi][0] = t[0], xs[mi][1] = t[2];
                }
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                u32 bfr[2][2][2];  // [kk][ni of the pair][reg]
#pragma unroll
                for (int kk = 0; kk < 2; ++kk)
                    ldmatrix_x4(sb(st) + gemm_swz(wn + nj * 16 + (lane & 7) + (lane >> 4) * 8,
                                                  2 * kk + ((lane >> 3) & 1)),
                                bfr[kk][0][0], bfr[kk][0][1], bfr[kk][1][0], bfr[kk][1][1]);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int ni = 2 * nj + h;
                    float d0, m0c, d1, m1c;  // (d, m) of columns 2 c4, 2 c4 + 1
                    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                                 : "=f"(d0), "=f"(m0c), "=f"(d1), "=f"(m1c)
                                 : "r"(ss(st) + (u32)((wn + ni * 8 + 2 * c4) * 8)));
#pragma unroll
                    for (int mi = 0; mi < 4; ++mi) {
                        float t[4] = {0.f, 0.f, 0.f, 0.f};
                        mma_16816<A>(t, af[0][mi], bfr[0][h]);
                        mma_16816<A>(t, af[1][mi], bfr[1][h]);
                        acc[mi][ni][0] = fmaf(d0, t[0], acc[mi][ni][0]);
                        acc[mi][ni][1] = fmaf(d1, t[1], acc[mi][ni][1]);
                        acc[mi][ni][2] = fmaf(d0, t[2], acc[mi][ni][2]);
                        acc[mi][ni][3] = fmaf(d1, t[3], acc[mi][ni][3]);
                        if constexpr (Codes<W>::MIN) {
                            acc[mi][ni][0] = fmaf(m0c, xs[mi][0], acc[mi][ni][0]);
                            acc[mi][ni][1] = fmaf(m1c, xs[mi][0], acc[mi][ni][1]);
                            acc[mi][ni][2] = fmaf(m0c, xs[mi][1], acc[mi][ni][2]);
                            acc[mi][ni][3] = fmaf(m1c, xs[mi][1], acc[mi][ni][3]);
                        }
                    }
                }
            }
        }
        if constexpr (MODE != GEMM_DIRECT) {
            if (more) store_b(snx);
        }
    }
    cp_async_wait<0>();

    // Epilogue: d0,d1 at (row g, cols 2c, 2c+1), d2,d3 at row g + 8; f32 partials when split.
    const bool split = gridDim.z > 1;
    float* wz = ws + (long)blockIdx.z * T * N;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + wm + mi * 16 + g + half * 8;
            if (m >= T) continue;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const int n = n0 + wn + ni * 8 + 2 * c4;
                const float v0 = acc[mi][ni][2 * half], v1 = acc[mi][ni][2 * half + 1];
                if (split) {
                    float* orow = wz + (long)m * N;
                    if (n < N) orow[n] = v0;
                    if (n + 1 < N) orow[n + 1] = v1;
                } else {
                    u16* orow = out + (long)m * N;
                    if (N % 2 == 0 && n + 1 < N) {
                        *(u32*)(orow + n) = A::pack2(v0, v1);
                    } else {
                        if (n < N) orow[n] = A::from_f32(v0);
                        if (n + 1 < N) orow[n + 1] = A::from_f32(v1);
                    }
                }
            }
        }
    }
}

// Registers: 128 accumulators per thread; one block of 8 warps (or two of 4) per SM, so up to 255 registers.
#define GEMM(act, A, wname, W, MODE)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 1) gemm_##act##_##wname(                                        \
        const u8* qs, const u8* sc, const u16* x, u16* out, float* ws, int T, int N, int K, int kts) {                \
        gemm_impl<A, W, MODE, 2>(qs, sc, x, out, ws, T, N, K, kts);                                                  \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(128, 1) gemm_small_##act##_##wname(                                  \
        const u8* qs, const u8* sc, const u16* x, u16* out, float* ws, int T, int N, int K, int kts) {                \
        gemm_impl<A, W, MODE, 1>(qs, sc, x, out, ws, T, N, K, kts);                                                  \
    }
GEMM(f16, ActF16, f16, WF16, GEMM_DIRECT)
GEMM(f16, ActF16, bf16, WBF16, GEMM_DEQ)
GEMM(f16, ActF16, f32, WF32, GEMM_DEQ)
GEMM(f16, ActF16, q8_0, WQ8_0, GEMM_SCALED)
GEMM(f16, ActF16, q4_0, WQ4_0, GEMM_SCALED)
GEMM(f16, ActF16, q4_1, WQ4_1, GEMM_SCALED)
#define GEMM_Q(act, A, wname, W) GEMM(act, A, wname, W, GEMM_DEQ)
FOR_EACH_QWEIGHT(GEMM_Q, f16, ActF16)
GEMM(bf16, ActBF16, bf16, WBF16, GEMM_DIRECT)
GEMM(bf16, ActBF16, f16, WF16, GEMM_DEQ)
GEMM(bf16, ActBF16, f32, WF32, GEMM_DEQ)
GEMM(bf16, ActBF16, q8_0, WQ8_0, GEMM_SCALED)
GEMM(bf16, ActBF16, q4_0, WQ4_0, GEMM_SCALED)
GEMM(bf16, ActBF16, q4_1, WQ4_1, GEMM_SCALED)
FOR_EACH_QWEIGHT(GEMM_Q, bf16, ActBF16)
