// Sampling on the device: one block of 1024 threads reads one row of logits and writes back only the chosen token,
// its log-probability and the n_top most likely tokens with theirs (a few hundred bytes instead of the vocabulary).
//
// Semantics (shared with the host model in kernels/src/cuda/sampling.rs):
// - Rank: tokens by logit descending, ties by lower id first. Greedy (temperature <= 0) takes rank 0.
// - Otherwise, with w_i = exp((x_i - x_max) / temperature): keep the first top_k ranks (all when 0); of those keep
//   the shortest rank prefix whose w-mass reaches top_p of the kept mass (all when top_p >= 1); draw
//   u = uniform(seed, position) (kernels/src/rng.rs, recomputed here bit for bit) and take the first token of the
//   prefix, in rank order, at which the running w-mass exceeds u times the prefix mass.
// - logprob and the top list are under the unmodified distribution (temperature 1, whole vocabulary).
//
// No sort: the greedy token is a block-wide maximum of rank keys, and every other cut is found by a radix descent over the 64-bit rank key (order-preserving logit bits << 32 | ~id),
// 8 bits per pass, with 256-bin histograms of either token counts or masses. Masses are fixed-point integers
// (w * 2^40, summed in u64), so every sum and hence every choice is bit-identical from run to run.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_MAX_TOP 256

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// rng.rs `uniform`: 24 random bits in [0, 1).
__device__ __forceinline__ float uniform01(u64 seed, u64 position) {
    const u64 z = mix64(seed ^ mix64(position + 0x9e3779b97f4a7c15ull));
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

// Logit bits mapped so that unsigned order is float order; -0 ranks as +0 (the two are equal logits, so a tie
// between them goes to the lower id, as on the CPU).
__device__ __forceinline__ u32 order_key(float x) {
    const u32 b = x == 0.f ? 0u : __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Larger key = better rank.
__device__ __forceinline__ u64 rank_key(float x, u32 id) { return ((u64)order_key(x) << 32) | (u64)(~id); }

struct SampleShared {
    u64 hist[256];
    u64 prefix, above;
    u64 top[SAMPLE_MAX_TOP];
    u32 n_top_found;
    float red[32];
    u64 red64[32];
};

// Fixed-point mass of a token, w = exp((x - x_max) * inv_t) in (0, 1].
__device__ __forceinline__ u64 mass(float x, float x_max, float inv_t) {
    return (u64)(__expf((x - x_max) * inv_t) * 1099511627776.0f);  // 2^40
}

// NaN logits never win: they count as -inf (as on the CPU).
template <class A>
__device__ __forceinline__ float logit(const u16* row, int i) {
    const float x = A::to_f32(row[i]);
    return x != x ? -f32_inf() : x;
}

// Sum over the block of a per-thread u64 (every thread gets it).
__device__ __forceinline__ u64 block_sum_u64(u64 v, SampleShared& sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh.red64[threadIdx.x >> 5] = v;
    __syncthreads();
    u64 t = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += sh.red64[w];
    return t;
}

// Among tokens with rank key >= cut, the key of the token at which the running weight (rank order; weight 1 per
// token, or its mass) first exceeds `target`, i.e. above <= target < above + weight. `target` must be below the
// total weight of the set. Counts are aggregated per warp (lanes with the same bin add once), since most logits
// share the top key bits and would otherwise serialise on a few shared-memory counters.
template <class A>
__device__ u64 descend(const u16* row, int V, u64 cut, bool by_mass, float x_max, float inv_t, u64 target,
                       SampleShared& sh) {
    const int lane = threadIdx.x & 31;
    u64 prefix = 0, above = 0;
    for (int pass = 0; pass < 8; ++pass) {
        const int shift = 56 - 8 * pass;
        const u64 hi_mask = pass == 0 ? 0ull : (~0ull << (64 - 8 * pass));
        for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0;
        __syncthreads();
        // Warp-uniform trip count, so every lane reaches the warp-wide match below.
        for (int base = threadIdx.x - lane; base < V; base += blockDim.x) {
            const int i = base + lane;
            int bin = -1;
            float x = 0.f;
            if (i < V) {
                x = logit<A>(row, i);
                const u64 c = rank_key(x, (u32)i);
                if (c >= cut && (c & hi_mask) == prefix) bin = (int)((c >> shift) & 255);
            }
            if (by_mass) {
                if (bin >= 0) atomicAdd(&sh.hist[bin], mass(x, x_max, inv_t));
            } else {
                const unsigned group = __match_any_sync(FULL_MASK, bin);
                if (bin >= 0 && lane == __ffs(group) - 1) atomicAdd(&sh.hist[bin], (u64)__popc(group));
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int chosen = -1, last = -1;
            for (int b = 255; b >= 0; --b) {
                if (sh.hist[b] == 0) continue;
                last = b;
                if (above + sh.hist[b] > target) {
                    chosen = b;
                    break;
                }
                above += sh.hist[b];
            }
            if (chosen < 0) chosen = last;  // only if target was not below the total (rounding): the last token
            sh.prefix = prefix | ((u64)(chosen < 0 ? 0 : chosen) << shift);
            sh.above = above;
        }
        __syncthreads();
        prefix = sh.prefix;
        above = sh.above;
        __syncthreads();
    }
    return prefix;
}

// The best rank key of the row (the greedy token): one pass, a block-wide maximum.
template <class A>
__device__ u64 best_key(const u16* row, int V, SampleShared& sh) {
    u64 best = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const u64 c = rank_key(logit<A>(row, i), (u32)i);
        best = c > best ? c : best;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const u64 other = __shfl_xor_sync(FULL_MASK, best, o);
        best = other > best ? other : best;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh.red64[threadIdx.x >> 5] = best;
    __syncthreads();
    u64 m = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) m = sh.red64[w] > m ? sh.red64[w] : m;
    __syncthreads();
    return m;
}

template <class A>
__device__ u64 total_mass(const u16* row, int V, u64 cut, float x_max, float inv_t, SampleShared& sh) {
    u64 t = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float x = logit<A>(row, i);
        if (rank_key(x, (u32)i) >= cut) t += mass(x, x_max, inv_t);
    }
    return block_sum_u64(t, sh);
}

// out[0] = token (0xffffffff when the row has no finite maximum, out[1] then holds it), out[1] = logprob bits, out[2 + 2j] = j-th top token, out[3 + 2j] = its logprob bits.
template <class A>
__device__ void sample_impl(const u16* __restrict__ row, int V, float temperature, int top_k, float top_p, u64 seed,
                            u64 position, int n_top, u32* __restrict__ out) {
    __shared__ SampleShared sh;
    // Log-sum-exp at temperature 1 (fixed reduction order).
    float m = -f32_inf();
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, logit<A>(row, i));
    const float x_max = block_max(m, sh.red);
    if (x_max == f32_inf() || x_max == -f32_inf()) {  // no finite logit, or an infinite one: the host reports it
        if (threadIdx.x == 0) {
            out[0] = 0xffffffffu;
            out[1] = __float_as_uint(x_max);
        }
        return;
    }
    float s = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(logit<A>(row, i) - x_max);
    const float lse = x_max + logf(block_sum(s, sh.red));

    u64 chosen;
    if (!(temperature > 0.f)) {
        chosen = best_key<A>(row, V, sh);
    } else {
        const float inv_t = 1.f / temperature;
        u64 cut = 0;
        if (top_k > 0 && top_k < V) cut = descend<A>(row, V, 0, false, x_max, inv_t, (u64)(top_k - 1), sh);
        if (top_p < 1.f) {
            const u64 z = total_mass<A>(row, V, cut, x_max, inv_t, sh);
            const double want = ceil((double)fmaxf(top_p, 0.f) * (double)z);
            const u64 target = want < 1.0 ? 0ull : min((u64)want - 1ull, z - 1ull);
            cut = descend<A>(row, V, cut, true, x_max, inv_t, target, sh);
        }
        const u64 z = total_mass<A>(row, V, cut, x_max, inv_t, sh);
        const double u = (double)uniform01(seed, position);
        const u64 target = min((u64)floor(u * (double)z), z - 1ull);
        chosen = descend<A>(row, V, cut, true, x_max, inv_t, target, sh);
    }
    const u32 token = ~(u32)(chosen & 0xffffffffull);
    if (threadIdx.x == 0) {
        out[0] = token;
        out[1] = __float_as_uint(logit<A>(row, (int)token) - lse);
    }

    const int nt = min(min(n_top, SAMPLE_MAX_TOP), V);
    if (nt > 0) {
        const u64 cut = nt == 1 ? best_key<A>(row, V, sh) : descend<A>(row, V, 0, false, x_max, 1.f, (u64)(nt - 1), sh);
        if (threadIdx.x == 0) sh.n_top_found = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            const u64 c = rank_key(logit<A>(row, i), (u32)i);
            if (c >= cut) {
                const u32 at = atomicAdd(&sh.n_top_found, 1u);
                if (at < SAMPLE_MAX_TOP) sh.top[at] = c;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const int n = min((int)sh.n_top_found, nt);
            for (int a = 1; a < n; ++a) {  // insertion sort, descending: at most 256 entries
                const u64 v = sh.top[a];
                int b = a - 1;
                while (b >= 0 && sh.top[b] < v) {
                    sh.top[b + 1] = sh.top[b];
                    --b;
                }
                sh.top[b + 1] = v;
            }
            for (int j = 0; j < n; ++j) {
                const u32 id = ~(u32)(sh.top[j] & 0xffffffffull);
                out[2 + 2 * j] = id;
                out[3 + 2 * j] = __float_as_uint(logit<A>(row, (int)id) - lse);
            }
        }
    }
}

#define SAMPLE(act, A)                                                                                               \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                                       \
        sample_##act(const u16* row, int V, float temperature, int top_k, float top_p, u64 seed, u64 position,       \
                     int n_top, u32* out) {                                                                          \
        sample_impl<A>(row, V, temperature, top_k, top_p, seed, position, n_top, out);                               \
    }
FOR_EACH_ACT(SAMPLE)
