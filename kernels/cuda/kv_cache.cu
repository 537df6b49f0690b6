// kv_store: row t of k and v ([T, width], width = n_kv_heads * head_dim) goes to token slot slots[t] of the paged
// caches ([n_slots, width]; slot = block * block_tokens + offset). Slots are checked against the pool on the host.
// Launch: grid (T), block 128; 16-byte copies when width % 8 == 0. The data is copied bit for bit, so one entry
// point serves both activation types.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128) kv_store_b16(u16* __restrict__ k_cache, u16* __restrict__ v_cache,
                                                             const u16* __restrict__ k, const u16* __restrict__ v,
                                                             const u32* __restrict__ slots, int width) {
    const long t = blockIdx.x;
    const long dst = (long)slots[t] * width, src = t * width;
    if (width % 8 == 0) {
        for (int e = threadIdx.x * 8; e < width; e += blockDim.x * 8) {
            *(uint4*)(k_cache + dst + e) = ld_nc_v4(k + src + e);
            *(uint4*)(v_cache + dst + e) = ld_nc_v4(v + src + e);
        }
    } else {
        for (int e = threadIdx.x; e < width; e += blockDim.x) {
            k_cache[dst + e] = k[src + e];
            v_cache[dst + e] = v[src + e];
        }
    }
}
