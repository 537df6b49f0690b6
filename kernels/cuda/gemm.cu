// Prefill matrix products on tensor cores: out[t, n] = sum_k x[t, k] * w[n, k], x: [T, K] activations, w: [N, K] in
// any format of weights.cuh, out: [T, N].
//
// Tiling: a block of 256 threads (8 warps, 2 x 4) computes a 128 x 128 tile of out; each warp a 64 x 32 sub-tile as
// 4 x 4 mma.sync m16n8k16 (f32 accumulate). K advances in steps of 32 through a two-stage shared-memory pipeline:
// while the tensor cores work on stage s, stage s^1 is filled. Activation tiles, and weight tiles whose type is the
// activation type, are copied with cp.async (16 bytes, zero-filled past the edges); other weights (f32, the other
// 16-bit type, Q8_0, Q4_0, Q4_1) are fetched into registers before the math and dequantised into shared memory after
// it (the formats of weights_q.cuh element by element, in ggml's float order). Shared rows are padded to 40
// elements (80 bytes), which makes every ldmatrix conflict-free.
// Requires K % 8 == 0 (the host falls back to the GEMV kernels otherwise). grid = (ceil(N / 128), ceil(T / 128)).
#include "common.cuh"
#include "weights.cuh"
#include "weights_q.cuh"

#define GEMM_BM 128
#define GEMM_BN 128
#define GEMM_BK 32
#define GEMM_THREADS 256
#define GEMM_STRIDE (GEMM_BK + 8)

template <class A, class W, bool DIRECT>
__device__ __forceinline__ void gemm_impl(const u8* __restrict__ qs, const u8* __restrict__ sc,
                                          const u16* __restrict__ x, u16* __restrict__ out, int T, int N, int K) {
    __shared__ __align__(16) u16 sA[2][GEMM_BM * GEMM_STRIDE];
    __shared__ __align__(16) u16 sB[2][GEMM_BN * GEMM_STRIDE];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;

    // Each operand tile is 128 rows x 4 chunks of 8 elements = 512 chunks, two per thread.
    auto load_a = [&](int stage, int k0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int id = tid + i * GEMM_THREADS, r = id >> 2, kc = (id & 3) * 8;
            const int gm = m0 + r, gk = k0 + kc;
            const bool ok = gm < T && gk < K;
            const u16* src = x + (ok ? (long)gm * K + gk : 0);
            cp_async16(smem_addr(&sA[stage][r * GEMM_STRIDE + kc]), src, ok);
        }
    };
    auto load_b_async = [&](int stage, int k0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int id = tid + i * GEMM_THREADS, r = id >> 2, kc = (id & 3) * 8;
            const int gn = n0 + r, gk = k0 + kc;
            const bool ok = gn < N && gk < K;
            const u16* src = (const u16*)qs + (ok ? (long)gn * K + gk : 0);
            cp_async16(smem_addr(&sB[stage][r * GEMM_STRIDE + kc]), src, ok);
        }
    };
    typename W::Raw8 raw[2];
    bool raw_ok[2];
    auto fetch_b = [&](int k0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int id = tid + i * GEMM_THREADS, r = id >> 2, kc = (id & 3) * 8;
            const int gn = n0 + r, gk = k0 + kc;
            raw_ok[i] = gn < N && gk < K;
            if (raw_ok[i]) raw[i] = W::fetch8(qs, sc, (long)gn * K + gk);
        }
    };
    auto store_b = [&](int stage) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int id = tid + i * GEMM_THREADS, r = id >> 2, kc = (id & 3) * 8;
            float f[8];
            if (raw_ok[i]) {
                W::convert8(raw[i], f);
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = 0.f;
            }
            st_shared_v4(smem_addr(&sB[stage][r * GEMM_STRIDE + kc]), pack8<A>(f));
        }
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int KT = (K + GEMM_BK - 1) / GEMM_BK;
    load_a(0, 0);
    if (DIRECT) {
        load_b_async(0, 0);
    } else {
        fetch_b(0);
        store_b(0);
    }
    cp_async_commit();

    for (int kt = 0; kt < KT; ++kt) {
        const int st = kt & 1;
        const bool next = kt + 1 < KT;
        if (next) {
            load_a(st ^ 1, (kt + 1) * GEMM_BK);
            if (DIRECT)
                load_b_async(st ^ 1, (kt + 1) * GEMM_BK);
            else
                fetch_b((kt + 1) * GEMM_BK);
        }
        cp_async_commit();
        cp_async_wait<1>();  // every group but the one just issued: stage `st` has landed
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; kk += 16) {
            u32 af[4][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const int row = wm + mi * 16 + (lane & 15), col = kk + (lane >> 4) * 8;
                ldmatrix_x4(smem_addr(&sA[st][row * GEMM_STRIDE + col]), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
            }
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                const int row = wn + nj * 16 + (lane & 7) + (lane >> 4) * 8, col = kk + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(smem_addr(&sB[st][row * GEMM_STRIDE + col]), bfr[2 * nj][0], bfr[2 * nj][1],
                            bfr[2 * nj + 1][0], bfr[2 * nj + 1][1]);
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_16816<A>(acc[mi][ni], af[mi], bfr[ni]);
        }
        if (!DIRECT && next) store_b(st ^ 1);
        __syncthreads();
    }

    // Epilogue: d0,d1 at (row g, cols 2c, 2c+1), d2,d3 at row g + 8.
    const int g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + wm + mi * 16 + g + half * 8;
            if (m >= T) continue;
            u16* orow = out + (long)m * N;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int n = n0 + wn + ni * 8 + 2 * c;
                const float v0 = acc[mi][ni][2 * half], v1 = acc[mi][ni][2 * half + 1];
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

#define GEMM(act, A, wname, W, DIRECT)                                                                               \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_##act##_##wname(                                  \
        const u8* qs, const u8* sc, const u16* x, u16* out, int T, int N, int K) {                                   \
        gemm_impl<A, W, DIRECT>(qs, sc, x, out, T, N, K);                                                            \
    }
GEMM(f16, ActF16, f16, WF16, true)
GEMM(f16, ActF16, bf16, WBF16, false)
GEMM(f16, ActF16, f32, WF32, false)
GEMM(f16, ActF16, q8_0, WQ8_0, false)
GEMM(f16, ActF16, q4_0, WQ4_0, false)
GEMM(f16, ActF16, q4_1, WQ4_1, false)
#define GEMM_Q(act, A, wname, W) GEMM(act, A, wname, W, false)
FOR_EACH_QWEIGHT(GEMM_Q, f16, ActF16)
GEMM(bf16, ActBF16, bf16, WBF16, true)
GEMM(bf16, ActBF16, f16, WF16, false)
GEMM(bf16, ActBF16, f32, WF32, false)
GEMM(bf16, ActBF16, q8_0, WQ8_0, false)
GEMM(bf16, ActBF16, q4_0, WQ4_0, false)
GEMM(bf16, ActBF16, q4_1, WQ4_1, false)
FOR_EACH_QWEIGHT(GEMM_Q, bf16, ActBF16)
