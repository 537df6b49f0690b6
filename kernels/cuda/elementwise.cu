// Element-wise ops over n activations: swiglu (out = silu(gate) * up), add (acc += x) and add_bias (x[r, c] +=
// bias[c] for rows of `width`, bias f32/f16/bf16 as the model file stores it).
// Launch: grid-stride over 8-element chunks with 16-byte accesses (all activation buffers start 256-byte aligned),
// then a scalar tail for n % 8 elements. Block 256, grid sized by the host to cover the device once or twice.
#include "common.cuh"
#include "weights.cuh"

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

// One element per thread, grid-stride: biases are added to a few projections per block, next to which this costs
// nothing worth vectorising.
template <class A, class W>
__device__ __forceinline__ void add_bias_impl(u16* __restrict__ x, const u8* __restrict__ bias, int width, long n) {
    const long stride = (long)gridDim.x * blockDim.x;
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride)
        x[e] = A::from_f32(A::to_f32(x[e]) + W::load1(bias, nullptr, e % width));
}

#define ADD_BIAS(act, A, wname, W)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                                                  \
        add_bias_##act##_##wname(u16* x, const u8* bias, int width, long n) {                                        \
        add_bias_impl<A, W>(x, bias, width, n);                                                                      \
    }
#define ADD_BIAS_ACT(act, A) ADD_BIAS(act, A, f32, WF32) ADD_BIAS(act, A, f16, WF16) ADD_BIAS(act, A, bf16, WBF16)
FOR_EACH_ACT(ADD_BIAS_ACT)
