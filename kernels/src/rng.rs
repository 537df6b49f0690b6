//! Counter-based randomness: the uniform draw for a sampled token is a pure function of `(seed, position)`, so a
//! session replayed on other stages or another device draws exactly the same numbers (see docs/ARCHITECTURE.md, determinism).
//! The same mixing function is implemented in the CUDA sampler.

/// SplitMix64 finaliser: a bijective 64-bit mixer with full avalanche.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seeded SplitMix64 stream: the one sequential generator of the project (test weights and inputs, synthetic
/// swarms in benches, routing tie-breaks). Sampling does not use it: a sampled token's draw is [`uniform`] of
/// `(seed, position)`, never a stream's state.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in [0, 1) with 53 bits of resolution.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`0` when `n == 0`); the modulo bias is below 2^-40 for the small `n` it serves.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Uniform in [0, 1) with 24 bits of resolution, from the seed and the token position.
pub fn uniform(seed: u64, position: u64) -> f32 {
    let z = mix64(seed ^ mix64(position.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_a_pure_function_of_seed_and_position() {
        assert_eq!(uniform(7, 3), uniform(7, 3));
        assert_ne!(uniform(7, 3), uniform(7, 4));
        assert_ne!(uniform(7, 3), uniform(8, 3));
        let mean: f32 = (0..10_000).map(|p| uniform(42, p)).sum::<f32>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        assert!((0..10_000).all(|p| (0.0..1.0).contains(&uniform(1, p))));
    }

    #[test]
    fn splitmix_stream_matches_the_reference_sequence() {
        // First outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert!((0..1000).all(|_| (0.0..1.0).contains(&r.unit_f64())));
        assert_eq!(r.below(0), 0);
    }
}
