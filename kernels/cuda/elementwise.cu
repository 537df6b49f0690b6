// Element-wise ops over n activations: swiglu (out = silu(gate) * up) and add (acc += x).
// Launch: grid-stride over 8-element chunks with 16-byte accesses (all activation buffers start 256-byte aligned),
// then a scalar tail for n % 8 elements. Block 256, grid sized by the host to cover the device once or twice.
#include "common.cuh"

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

template <class A>
__device__ __forceinline__ void swiglu_impl(const u16* __restrict__ gate, const u16* __restrict__ up,
                                            u16* __restrict__ out, long n) {
    const long chunks = n / 8;
    const long stride = (long)gridDim.x * blockDim.x;
    for (long c = (long)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += stride) {
        float g[8], u[8];
        unpack8<A>(ld_nc_v4(gate + 8 * c), g);
        unpack8<A>(ld_nc_v4(up + 8 * c), u);
#pragma unroll
        for (int i = 0; i < 8; ++i) g[i] = silu(g[i]) * u[i];
        *(uint4*)(out + 8 * c) = pack8<A>(g);
    }
    for (long e = chunks * 8 + (long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride)
        out[e] = A::from_f32(silu(A::to_f32(gate[e])) * A::to_f32(up[e]));
}

template <class A>
__device__ __forceinline__ void add_impl(u16* __restrict__ acc, const u16* __restrict__ x, long n) {
    const long chunks = n / 8;
    const long stride = (long)gridDim.x * blockDim.x;
    for (long c = (long)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += stride) {
        float a[8], b[8];
        unpack8<A>(ld_global_v4(acc + 8 * c), a);
        unpack8<A>(ld_nc_v4(x + 8 * c), b);
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] += b[i];
        *(uint4*)(acc + 8 * c) = pack8<A>(a);
    }
    for (long e = chunks * 8 + (long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride)
        acc[e] = A::from_f32(A::to_f32(acc[e]) + A::to_f32(x[e]));
}

#define ELEMENTWISE(act, A)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) swiglu_##act(const u16* gate, const u16* up, u16* out, long n) { \
        swiglu_impl<A>(gate, up, out, n);                                                                            \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) add_##act(u16* acc, const u16* x, long n) {                     \
        add_impl<A>(acc, x, n);                                                                                      \
    }
FOR_EACH_ACT(ELEMENTWISE)
