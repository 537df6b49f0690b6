// Prefill GEMM on Hopper (sm_90a only): wgmma.mma_async fed by TMA. out[t, n] = sum_k x[t, k] * w[n, k] for
// activations x [T, K] and weights w [N, K] of the same 16-bit type (f16 or bf16), out [T, N]. docs/CUDA.md,
// "GEMM on Hopper (gemm_sm90.cu)". This module is compiled for `sm_90a` only (wgmma exists nowhere else); the host
// loads it on compute capability 9.0 devices, after a self-check against the mma.sync GEMM (gemm.cu).
//
// Block tile 128 x 256 (BM x BN), BK = 64 (one 128-byte swizzle atom per row), WG_STAGES = 4 stages of
// (128 + 256) x 128 B = 48 KiB in dynamic shared memory (192 KiB + 1 KiB of alignment slack).
// Warp-specialised, 3 warp groups (384 threads):
//   warp group 0, the producer: one thread waits until a stage is free (its `empty` mbarrier), arms its `full`
//     mbarrier with the stage's byte count (arrive.expect_tx) and issues two TMA copies (cp.async.bulk.tensor.2d:
//     the activation box 64 x 128 at (k0, m0) and the weight box 64 x 256 at (k0, n0)), which complete on `full`;
//     out-of-range rows and columns (T, N and K tails) are zero-filled by the TMA unit and still count their bytes.
//   warp groups 1 and 2, the consumers: rows 64 (g - 1) .. 64 g - 1 of the block, all 256 columns, 128 f32
//     accumulators per thread. Per k-tile: wait on `full`, 4 x wgmma.mma_async.m64n256k16 (k16 steps; both operands
//     read from shared memory through matrix descriptors), commit, wait until at most one group (this k-tile's) is
//     in flight, then release the previous k-tile's stage (each consumer warp's lane 0 arrives on its `empty`).
// Both tiles are K-major with the 128-byte swizzle the tensor map asks for: 16-byte chunk c of row r lands at chunk
// c ^ (r & 7) of its 128-byte row, 8-row groups 1024 B apart; the descriptors say the same (swizzle mode 1 = 128B,
// stride byte offset 1024, base offset 0 since every tile starts on a 1024-byte boundary), and the k16 step kk
// starts 32 kk bytes into the row: the unit applies the XOR to the address bits it computes, as the TMA did.
// (kernels/src/cuda/wgmma_plan.rs proves these on the host.)
// No split-K: the host uses this kernel only when the output tiles fill the SMs well (wgmma_plan.rs).
// grid = (ceil(N / 256), ceil(T / 128)); dynamic shared memory WG_SMEM_BYTES, set by the host.
#include "common.cuh"

#define WG_BM 128
#define WG_BN 256
#define WG_BK 64
#define WG_STAGES 4
#define WG_THREADS 384
#define WG_A_BYTES (WG_BM * WG_BK * 2)
#define WG_B_BYTES (WG_BN * WG_BK * 2)
#define WG_STAGE_BYTES (WG_A_BYTES + WG_B_BYTES)
#define WG_SMEM_BYTES (WG_STAGES * WG_STAGE_BYTES + 1024)

// A CUtensorMap (the driver's opaque 128-byte, 64-byte-aligned descriptor), passed by value as a __grid_constant__
// parameter so that its address is a kernel-parameter address the TMA unit may read.
struct __align__(64) TmaMap {
    u64 v[16];
};

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format" of wgmma): start address >> 4 in bits
// 0-13, leading byte offset >> 4 in 16-29 (unused for swizzled K-major layouts; 1 by convention), stride byte
// offset >> 4 in 32-45 (1024: the distance between 8-row groups), base offset 0 in 49-51, swizzle mode in 62-63
// (1 = 128-byte swizzle).
__device__ __forceinline__ u64 wg_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` of the barrier has completed (a fresh barrier counts the phase before
// its first, parity 1, as completed: the producer's first pass over the empty barriers does not wait). Bounded: a
// wait longer than WG_TIMEOUT_CYCLES (~1 s; a healthy pipeline waits microseconds) sets bit 0 of *status and gives
// up, and so does every later wait of this thread (`dead`), so that a kernel that would hang ends with its status
// set instead (the host's self-check reads it: docs/CUDA.md, "Self-check"). A fault would break the context; a
// hang would never return; this ends the kernel with wrong numbers and a flag.
#define WG_TIMEOUT_CYCLES (1ll << 31)
__device__ __forceinline__ u32 mbar_try(u32 bar, u32 parity) {
    u32 done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done;
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity, bool& dead, u32* status) {
    if (dead || mbar_try(bar, parity)) return;
    const long long t0 = clock64();
    while (!mbar_try(bar, parity)) {
        if (clock64() - t0 > WG_TIMEOUT_CYCLES) {
            dead = true;
            atomicOr(status, 1u);
            return;
        }
    }
}
// TMA: the box of `map` at coordinates (c0 = k, c1 = row) into shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            dst),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// D (64 x 256, f32, 128 registers per thread) += A (64 x 16 from descriptor da) * B (16 x 256 from db), both
// K-major (imm-trans 0), scale-d = 1 (accumulate; the accumulators start at zero). T is the PTX type of A and B
// (f16 or bf16); the statement uses d, da and db from where it stands.
#define WGMMA_M64N256K16(T) \
    asm volatile( \
        "{\n" \
        ".reg .pred p;\n" \
        "setp.ne.b32 p, 1, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." #T "." #T " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, " \
        "%128, %129, p, 1, 1, 0, 0;\n" \
        "}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
        : "l"(da), "l"(db) \
        : "memory")

template <class A>
struct Wgmma;
template <>
struct Wgmma<ActF16> {
    static __device__ __forceinline__ void mma(float* d, u64 da, u64 db) { WGMMA_M64N256K16(f16); }
};
template <>
struct Wgmma<ActBF16> {
    static __device__ __forceinline__ void mma(float* d, u64 da, u64 db) { WGMMA_M64N256K16(bf16); }
};
#undef WGMMA_M64N256K16

template <class A>
__device__ __forceinline__ void gemm_wgmma_impl(const TmaMap* ta, const TmaMap* tb, u16* __restrict__ out,
                                                u32* __restrict__ status, int T, int N, int K) {
    extern __shared__ __align__(1024) u8 wg_smem[];
    __shared__ __align__(8) u64 full_bar[WG_STAGES], empty_bar[WG_STAGES];
    // Tiles start on a 1024-byte boundary (the swizzle pattern repeats every 8 rows of 128 B).
    const u32 base = (smem_addr(wg_smem) + 1023u) & ~1023u;
    const u32 full0 = smem_addr(full_bar), empty0 = smem_addr(empty_bar);
    const int tid = threadIdx.x, wg = tid >> 7;
    const int m0 = blockIdx.y * WG_BM, n0 = blockIdx.x * WG_BN;
    const int KT = (K + WG_BK - 1) / WG_BK;
    bool dead = false;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < WG_STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);       // the producer's arrive.expect_tx (+ the TMA bytes)
            mbar_init(empty0 + 8 * s, 8);      // lane 0 of each of the 8 consumer warps
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: one thread issues every copy; the other 127 threads of the group have nothing to do.
        if (tid == 0) {
            for (int kt = 0; kt < KT; ++kt) {
                const int s = kt % WG_STAGES;
                const u32 round = (u32)(kt / WG_STAGES);
                mbar_wait(empty0 + 8 * s, (round & 1) ^ 1, dead, status);
                const u32 sa = base + (u32)(s * WG_STAGE_BYTES), sb = sa + WG_A_BYTES;
                mbar_expect_tx(full0 + 8 * s, WG_STAGE_BYTES);
                tma_load_2d(sa, ta, kt * WG_BK, m0, full0 + 8 * s);
                tma_load_2d(sb, tb, kt * WG_BK, n0, full0 + 8 * s);
            }
        }
        return;
    }

    // Consumers: warp group c = wg - 1 owns rows 64 c .. 64 c + 63 of the block tile.
    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % WG_STAGES;
        mbar_wait(full0 + 8 * s, (u32)(kt / WG_STAGES) & 1, dead, status);
        const u32 sa = base + (u32)(s * WG_STAGE_BYTES) + (u32)(c * 64 * 128), sb = base + (u32)(s * WG_STAGE_BYTES) + WG_A_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; ++kk) Wgmma<A>::mma(acc, wg_desc(sa + 32 * kk), wg_desc(sb + 32 * kk));
        wgmma_commit();
        // At most this k-tile's group still runs: the previous k-tile's stage is no longer read.
        wgmma_wait<1>();
        if (kt > 0) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty0 + 8 * ((kt - 1) % WG_STAGES));
        }
    }
    wgmma_wait<0>();

    // Epilogue: accumulator 4 j + e of warp w, lane l holds row 16 w + l / 4 (+ 8 for e >= 2), column
    // 8 j + 2 (l % 4) + (e & 1) of the warp group's 64 x 256 tile (the m16n8 accumulator layout, 32 times).
    const int g = lane >> 2, c4 = lane & 3;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int m = m0 + c * 64 + warp * 16 + g + half * 8;
        if (m >= T) continue;
        u16* orow = out + (long)m * N;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            const int n = n0 + j * 8 + 2 * c4;
            const float v0 = acc[4 * j + 2 * half], v1 = acc[4 * j + 2 * half + 1];
            if (N % 2 == 0 && n + 1 < N) {
                *(u32*)(orow + n) = A::pack2(v0, v1);
            } else {
                if (n < N) orow[n] = A::from_f32(v0);
                if (n + 1 < N) orow[n + 1] = A::from_f32(v1);
            }
        }
    }
}

// One block per SM (192 KiB of shared memory); 384 threads leave 168 registers per thread, enough for the
// consumers' 128 accumulators.
#define GEMM_WGMMA(act, A)                                                                                           \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                                      \
        gemm_wgmma_##act##_##act(const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb, u16* out,     \
                                 u32* status, int T, int N, int K) {                                                              \
        gemm_wgmma_impl<A>(&ta, &tb, out, status, T, N, K);                                                                  \
    }
GEMM_WGMMA(f16, ActF16)
GEMM_WGMMA(bf16, ActBF16)
