// Embedding gather: out[t, :] = table[ids[t], :] for a table in any weight format (weights.cuh), converted to the
// activation type. Launch: grid (T), block 128; each thread writes 8 elements per step with one 16-byte store
// when `width % 8 == 0`, else single elements. Token ids are checked against the vocabulary on the host.
#include "common.cuh"
#include "weights.cuh"
#include "weights_q.cuh"

template <class A, class W>
__device__ __forceinline__ void embedding_impl(const u32* __restrict__ ids, const u8* __restrict__ qs,
                                               const u8* __restrict__ sc, u16* __restrict__ out, int width) {
    const int t = blockIdx.x;
    const long base = (long)ids[t] * width;
    u16* row = out + (long)t * width;
    if (width % 8 == 0) {
        for (int k = threadIdx.x * 8; k < width; k += blockDim.x * 8) {
            float f[8];
            W::load8(qs, sc, base + k, f);
            *(uint4*)(row + k) = pack8<A>(f);
        }
    } else {
        for (int k = threadIdx.x; k < width; k += blockDim.x) row[k] = A::from_f32(W::load1(qs, sc, base + k));
    }
}

#define EMBEDDING(act, A, wname, W)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) embedding_##act##_##wname(                                      \
        const u32* ids, const u8* qs, const u8* sc, u16* out, int width) {                                             \
        embedding_impl<A, W>(ids, qs, sc, out, width);                                                               \
    }
#define EMBEDDING_ACT(act, A) FOR_EACH_WEIGHT(EMBEDDING, act, A) FOR_EACH_QWEIGHT(EMBEDDING, act, A)
FOR_EACH_ACT(EMBEDDING_ACT)
