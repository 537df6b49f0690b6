// Shared helpers of every shardline kernel.
//
// The kernels include no system or toolkit header: half/bfloat16 conversions, tensor-core instructions and
// asynchronous copies are written as inline PTX. NVRTC then compiles them on a machine that has only the driver
// and libnvrtc (no CUDA toolkit headers), which is how a node without nvcc runs them. Target: sm_80 and newer.
//
// Activations are 16-bit (f16 or bf16) and always computed in f32 registers; a kernel is instantiated once per
// activation type through the tag types `ActF16` / `ActBF16`.
#pragma once

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float f32_inf() { return __int_as_float(0x7f800000); }

// ---------------------------------------------------------------------------------------------------------------
// 16-bit float conversions (round to nearest even, as the host `half` crate does).

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Activation tags: how a 16-bit activation converts to and from f32, and which tensor-core instruction takes it.
struct ActF16 {
    static constexpr bool IS_BF16 = false;
    static __device__ __forceinline__ float to_f32(u16 x) { return f16_to_f32(x); }
    static __device__ __forceinline__ u16 from_f32(float x) { return f32_to_f16(x); }
    // Two f32 into one 32-bit register: `lo` in the low half (lower address), `hi` in the high half.
    static __device__ __forceinline__ u32 pack2(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

struct ActBF16 {
    static constexpr bool IS_BF16 = true;
    static __device__ __forceinline__ float to_f32(u16 x) { return bf16_to_f32(x); }
    static __device__ __forceinline__ u16 from_f32(float x) { return f32_to_bf16(x); }
    static __device__ __forceinline__ u32 pack2(float lo, float hi) {
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

template <class A>
__device__ __forceinline__ void unpack2(u32 v, float& lo, float& hi) {
    lo = A::to_f32((u16)(v & 0xffffu));
    hi = A::to_f32((u16)(v >> 16));
}

// Eight 16-bit values in one 16-byte vector to f32.
template <class A>
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
    unpack2<A>(v.x, f[0], f[1]);
    unpack2<A>(v.y, f[2], f[3]);
    unpack2<A>(v.z, f[4], f[5]);
    unpack2<A>(v.w, f[6], f[7]);
}

template <class A>
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 v;
    v.x = A::pack2(f[0], f[1]);
    v.y = A::pack2(f[2], f[3]);
    v.z = A::pack2(f[4], f[5]);
    v.w = A::pack2(f[6], f[7]);
    return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Global memory access. These loads read data that no thread writes during the kernel, so they are not `volatile`:
// the compiler may merge repeated loads of the same address and schedule them early.

// 16-byte read-only load that is not kept in L1: weights are streamed once per step and would only evict the
// activations that every warp re-reads.
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// 16-byte read-only load through L1 (activations, re-read by many warps).
__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// 16-byte coherent load, for data the same kernel also writes (a residual updated in place). Written as PTX, not as
// `*(const uint4*)p`: with the f16 conversions' 16-bit asm operands, NVVM split such plain vector loads of f16 data
// into four 32-bit loads (scripts/sass-report shows the widths). Volatile, so it is never merged with or moved
// across another access of the same kernel (the written data must be re-read after the write).
__device__ __forceinline__ uint4 ld_global_v4(const void* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ u16 ld_nc_u16(const void* p) {
    u16 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_nc_u32(const void* p) {
    u32 v;
    asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u64 ld_nc_u64(const void* p) {
    u64 v;
    asm("ld.global.nc.u64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}

// The same loads as `asm volatile`, for a GEMV's prefetch: the compiler may not move a volatile asm into a branch,
// drop it or reorder it with another volatile asm, so the loads a kernel issues back to back stay back to back in
// the SASS (with plain asm, NVVM re-sinks them next to their uses to save registers, serialising the round trips).
__device__ __forceinline__ uint4 ld_stream_v4_ordered(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Zero-extended into a 32-bit register (16-bit registers cost ptxas a spill in one GEMV variant).
__device__ __forceinline__ u32 ld_nc_u16_ordered(const void* p) {
    u32 v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_nc_u32_ordered(const void* p) {
    u32 v;
    asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions. Fixed reduction trees only (no atomics on floats), so a kernel gives bit-identical results run to run.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds one float per warp (at least 32).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < nwarps; ++w) total += scratch[w];
    return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = -f32_inf();
    for (int w = 0; w < nwarps; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared memory, asynchronous copies and tensor-core fragments (sm_80).

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Copies 16 bytes global -> shared without passing through registers; `valid == false` writes zeros instead
// (the source is not read), which is how tiles are padded past the end of a matrix.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ void st_shared_v4(u32 addr, const uint4& v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// D (16x8, f32) += A (16x16, row-major) * B (16x8, column-major), operands f16 or bf16 per `A`.
//
// Fragment layout (g = lane / 4, c = lane % 4): a0 = A[g][2c..], a1 = A[g+8][2c..], a2 = A[g][2c+8..],
// a3 = A[g+8][2c+8..]; b0 = B[2c..][g], b1 = B[2c+8..][g]; d0,d1 = D[g][2c..], d2,d3 = D[g+8][2c..].
template <class A>
__device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b) {
    if (A::IS_BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// SwiGLU's gate activation (swiglu_* in elementwise.cu and the gemv_swiglu_* epilogues use this one definition, so
// the fused and the separate kernels round the same f32 values alike).
__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// The SwiGLU output of one element from the f32 sums of its gate and up rows, each first rounded to the activation
// type: exactly what the gate and up GEMVs would store and swiglu_* would compute from them.
template <class A>
__device__ __forceinline__ u16 swiglu_of_sums(float gate, float up) {
    return A::from_f32(silu(A::to_f32(A::from_f32(gate))) * A::to_f32(A::from_f32(up)));
}

// Both activation types, for one `extern "C"` entry point per type.
#define FOR_EACH_ACT(M) M(f16, ActF16) M(bf16, ActBF16)
