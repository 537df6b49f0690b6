//! Test-only: the sampling semantics of kernels/cuda/sampling.cu written twice in Rust, once plainly (sort the
//! vocabulary, cut, walk) and once the way the kernel computes it (radix descents over 64-bit rank keys with
//! fixed-point masses, no sort), and checked against each other on random logits with many ties. The CUDA kernel
//! mirrors `descend` line by line; its agreement with the CPU backend is checked on a GPU by tests/parity.rs.

use crate::backend::SamplingParams;
use crate::rng::uniform;

fn order_key(x: f32) -> u32 {
    // -0 ranks as +0, as in the kernel and on the CPU.
    let b = if x == 0.0 { 0 } else { x.to_bits() };
    if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 }
}

fn rank_key(x: f32, id: u32) -> u64 {
    ((order_key(x) as u64) << 32) | (!id) as u64
}

fn mass(x: f32, x_max: f32, inv_t: f32) -> u64 {
    (((x - x_max) * inv_t).exp() * (1u64 << 40) as f32) as u64
}

/// Plain statement of the semantics: (token, top ids).
fn by_sorting(x: &[f32], p: &SamplingParams, position: u64, n_top: usize) -> (u32, Vec<u32>) {
    let mut ranked: Vec<u32> = (0..x.len() as u32).collect();
    ranked.sort_by_key(|&i| std::cmp::Reverse(rank_key(x[i as usize], i)));
    let top = ranked[..n_top.min(x.len())].to_vec();
    if p.temperature <= 0.0 {
        return (ranked[0], top);
    }
    let x_max = x[ranked[0] as usize];
    let inv_t = 1.0 / p.temperature;
    let w = |i: u32| mass(x[i as usize], x_max, inv_t);
    let mut kept = if p.top_k > 0 { &ranked[..p.top_k.min(x.len())] } else { &ranked[..] };
    if p.top_p < 1.0 {
        let z: u64 = kept.iter().map(|&i| w(i)).sum();
        let want = (p.top_p.max(0.0) as f64 * z as f64).ceil() as u64;
        let mut cum = 0;
        let mut n = 0;
        for &i in kept {
            cum += w(i);
            n += 1;
            if cum >= want {
                break;
            }
        }
        kept = &kept[..n.max(1)];
    }
    let z: u64 = kept.iter().map(|&i| w(i)).sum();
    let target = ((uniform(p.seed, position) as f64 * z as f64).floor() as u64).min(z - 1);
    let mut cum = 0;
    for &i in kept {
        cum += w(i);
        if cum > target {
            return (i, top);
        }
    }
    (*kept.last().expect("at least one token is kept"), top)
}

/// The kernel's `descend`: the key of the token at which the running weight first exceeds `target`.
fn descend(x: &[f32], cut: u64, by_mass: bool, x_max: f32, inv_t: f32, target: u64) -> u64 {
    let (mut prefix, mut above) = (0u64, 0u64);
    for pass in 0..8 {
        let shift = 56 - 8 * pass;
        let hi_mask = if pass == 0 { 0 } else { !0u64 << (64 - 8 * pass) };
        let mut hist = [0u64; 256];
        for (i, &v) in x.iter().enumerate() {
            let c = rank_key(v, i as u32);
            if c < cut || (c & hi_mask) != prefix {
                continue;
            }
            hist[((c >> shift) & 255) as usize] += if by_mass { mass(v, x_max, inv_t) } else { 1 };
        }
        let (mut chosen, mut last) = (None, None);
        for b in (0..256).rev() {
            if hist[b] == 0 {
                continue;
            }
            last = Some(b);
            if above + hist[b] > target {
                chosen = Some(b);
                break;
            }
            above += hist[b];
        }
        prefix |= (chosen.or(last).unwrap_or(0) as u64) << shift;
    }
    prefix
}

fn total_mass(x: &[f32], cut: u64, x_max: f32, inv_t: f32) -> u64 {
    x.iter().enumerate().filter(|&(i, &v)| rank_key(v, i as u32) >= cut).map(|(_, &v)| mass(v, x_max, inv_t)).sum()
}

/// The kernel's `sample_impl`, on the host.
fn by_descent(x: &[f32], p: &SamplingParams, position: u64, n_top: usize) -> (u32, Vec<u32>) {
    let x_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let id = |c: u64| !(c as u32);
    let chosen = if p.temperature <= 0.0 {
        descend(x, 0, false, x_max, 1.0, 0)
    } else {
        let inv_t = 1.0 / p.temperature;
        let mut cut = 0;
        if p.top_k > 0 && p.top_k < x.len() {
            cut = descend(x, 0, false, x_max, inv_t, p.top_k as u64 - 1);
        }
        if p.top_p < 1.0 {
            let z = total_mass(x, cut, x_max, inv_t);
            let want = (p.top_p.max(0.0) as f64 * z as f64).ceil();
            let target = if want < 1.0 { 0 } else { (want as u64 - 1).min(z - 1) };
            cut = descend(x, cut, true, x_max, inv_t, target);
        }
        let z = total_mass(x, cut, x_max, inv_t);
        let target = ((uniform(p.seed, position) as f64 * z as f64).floor() as u64).min(z - 1);
        descend(x, cut, true, x_max, inv_t, target)
    };
    let nt = n_top.min(x.len());
    let mut top = Vec::new();
    if nt > 0 {
        let cut = descend(x, 0, false, x_max, 1.0, nt as u64 - 1);
        let mut keys: Vec<u64> =
            x.iter().enumerate().map(|(i, &v)| rank_key(v, i as u32)).filter(|&c| c >= cut).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        top = keys.into_iter().map(id).collect();
    }
    (id(chosen), top)
}

#[test]
fn radix_descent_sampling_equals_sort_and_walk() {
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state = crate::rng::mix64(state);
        state
    };
    let params = [
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 1 },
        SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 2 },
        SamplingParams { temperature: 0.7, top_k: 40, top_p: 1.0, seed: 3 },
        SamplingParams { temperature: 0.8, top_k: 0, top_p: 0.9, seed: 4 },
        SamplingParams { temperature: 1.3, top_k: 5, top_p: 0.5, seed: 5 },
        SamplingParams { temperature: 0.5, top_k: 1, top_p: 0.95, seed: 6 },
        SamplingParams { temperature: 2.0, top_k: 0, top_p: 0.0, seed: 7 },
    ];
    for &v in &[1usize, 2, 7, 33, 300, 2049] {
        for trial in 0..12 {
            // Coarse values: many exact ties, as with 16-bit logits; some negative zeros.
            let coarse = trial % 2 == 0;
            let x: Vec<f32> = (0..v)
                .map(|_| {
                    let r = (next() >> 11) as f64 / (1u64 << 53) as f64;
                    let val = (r as f32 - 0.5) * 20.0;
                    if coarse { (val * 2.0).round() / 2.0 } else { val }
                })
                .collect();
            for (pi, p) in params.iter().enumerate() {
                for position in [0u64, 17, 1 << 40] {
                    let n_top = (trial * 3) % 9;
                    let a = by_sorting(&x, p, position, n_top);
                    let b = by_descent(&x, p, position, n_top);
                    assert_eq!(a, b, "vocab {v}, trial {trial}, params #{pi}, position {position}");
                }
            }
        }
    }
}

#[test]
fn greedy_breaks_ties_toward_the_lower_id_and_top_k_one_is_greedy() {
    let x = [1.0f32, 3.0, -2.0, 3.0, 0.5];
    let greedy = SamplingParams::GREEDY;
    assert_eq!(by_descent(&x, &greedy, 0, 3), (1, vec![1, 3, 0]));
    for seed in 0..20 {
        let p = SamplingParams { temperature: 1.0, top_k: 1, top_p: 1.0, seed };
        assert_eq!(by_descent(&x, &p, seed, 0).0, 1);
    }
}

/// The kernel's semantics (`by_descent`, which sampling.cu mirrors) agree with the CPU backend where they used to
/// differ: a tie between -0 and +0 goes to the lower id in the greedy token and the top list alike, and top_p ≤ 0
/// keeps only the most likely token (the CUDA host side refused it).
#[test]
fn agrees_with_the_cpu_backend_on_signed_zero_ties_and_top_p_zero() {
    let cases: [&[f32]; 4] =
        [&[-1.0, -0.0, 0.0, -3.0], &[0.0, -0.0, -0.0, 0.0], &[-2.0, 0.0, -0.0, -2.0, -0.0], &[-0.0, -5.0, 0.0]];
    let params = [
        SamplingParams::GREEDY,
        SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.0, seed: 3 },
        SamplingParams { temperature: 0.7, top_k: 0, top_p: -0.5, seed: 4 },
        SamplingParams { temperature: 1.5, top_k: 1, top_p: 1.0, seed: 5 },
    ];
    for x in cases {
        for (pi, p) in params.iter().enumerate() {
            for position in [0u64, 5, 1 << 33] {
                let (token, top) = by_descent(x, p, position, x.len());
                let cpu = crate::cpu::sample::sample(false, x, p, position, x.len()).expect("cpu sample");
                let cpu_top: Vec<u32> = cpu.top.iter().map(|&(i, _)| i).collect();
                assert_eq!((token, &top), (cpu.token, &cpu_top), "logits {x:?}, params #{pi}, position {position}");
                // The first -0/+0 of the row in id order is the winner (every case has its maximum at 0).
                let first_zero = x.iter().position(|&v| v == 0.0).expect("a zero") as u32;
                assert_eq!(token, first_zero, "logits {x:?}, params #{pi}");
            }
        }
    }
}
