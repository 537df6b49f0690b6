//! Test-only: the sampling semantics of kernels/cuda/sampling.cu written twice in Rust, once plainly (sort the
//! vocabulary, cut, walk) and once the way the kernels compute it (a histogram of the 16-bit logits, cuts found by
//! a prefix over 1024 groups of 64 bins and then within the group, ids by rank within a bin, fixed-point masses, no
//! sort), and checked against each other on random 16-bit logits with many ties; rows holding a NaN or an infinity
//! are refused by both (and by the CPU backend). The kernels
//! mirror `by_histogram` step by step; their agreement with the CPU backend is checked on a GPU by tests/parity.rs.

use crate::backend::SamplingParams;
use crate::rng::uniform;

fn order_key(x: f32) -> u32 {
    // NaN ranks as -inf and -0 as +0, as in the kernel and on the CPU.
    let x = if x.is_nan() { f32::NEG_INFINITY } else { x };
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
    let x_max = x[ranked[0] as usize].max(f32::NEG_INFINITY);
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

/// `key16` of sampling.cu for f16 bits: order-preserving, NaN as -inf, -0 as +0.
fn key16(h: u16) -> u32 {
    let mut h = h as u32;
    if h & 0x7fff > 0x7c00 {
        h = 0xfc00;
    }
    if h == 0x8000 {
        h = 0;
    }
    if h & 0x8000 != 0 { !h & 0xffff } else { h | 0x8000 }
}

fn key_value(k: u32) -> f32 {
    let h = if k & 0x8000 != 0 { k & 0x7fff } else { !k & 0xffff };
    half::f16::from_bits(h as u16).to_f32()
}

const BINS: usize = 65_536;
const GROUP: usize = 64;

/// Tokens of a bin that count: all above `lim.0`, the first `lim.1` of bin `lim.0`, none below.
type Limit = (u32, u32);
const ALL: Limit = (0, u32::MAX);

fn bin_weight(bin: u32, c: u32, by_mass: bool, lim: Limit, x_max: f32, inv_t: f32) -> u64 {
    if c == 0 {
        return 0;
    }
    if !by_mass {
        return c as u64;
    }
    let n = if bin > lim.0 {
        c
    } else if bin == lim.0 {
        c.min(lim.1)
    } else {
        0
    };
    n as u64 * mass(key_value(bin), x_max, inv_t)
}

/// The highest bin of group (thread) `t`; a group's bins are visited downwards (rank order).
fn hi_bin(t: usize) -> u32 {
    (BINS - 1 - GROUP * t) as u32
}

/// `find_bin`: the bin and the weight above it where the running weight first exceeds `target` (clamped below the
/// total), found over the 1024 group totals and then within the group, as the kernel does.
fn find_bin(hist: &[u32], target: u64, by_mass: bool, lim: Limit, x_max: f32, inv_t: f32) -> (u32, u64) {
    let groups: Vec<u64> = (0..BINS / GROUP)
        .map(|t| {
            (0..GROUP as u32)
                .map(|j| hi_bin(t) - j)
                .map(|b| bin_weight(b, hist[b as usize], by_mass, lim, x_max, inv_t))
                .sum()
        })
        .collect();
    let total = groups.iter().sum::<u64>().max(1);
    let target = target.min(total - 1);
    let (mut t, mut above, mut acc) = (0, 0, 0u64);
    for (i, &w) in groups.iter().enumerate() {
        if w > 0 && acc <= target && target < acc + w {
            (t, above) = (i, acc);
            break;
        }
        acc += w;
    }
    let mut acc = above;
    for j in 0..GROUP as u32 {
        let b = hi_bin(t) - j;
        let w = bin_weight(b, hist[b as usize], by_mass, lim, x_max, inv_t);
        if w > 0 && acc <= target && target < acc + w {
            return (b, acc);
        }
        acc += w;
    }
    (hi_bin(t), above)
}

/// The kernels `sample_hist` + `sample_pick`, on the host: (token, top ids), or `None` without a finite maximum.
fn by_histogram(h: &[u16], p: &SamplingParams, position: u64, n_top: usize) -> Option<(u32, Vec<u32>)> {
    // A NaN or an infinity anywhere refuses the row (the histogram pass counts them; `pick_impl` answers with them).
    if h.iter().any(|&b| b & 0x7fff >= 0x7c00) {
        return None;
    }
    let keys: Vec<u32> = h.iter().map(|&b| key16(b)).collect();
    let mut hist = vec![0u32; BINS];
    keys.iter().for_each(|&k| hist[k as usize] += 1);
    let max_key = *keys.iter().max()?;
    let x_max = key_value(max_key);
    if x_max.is_infinite() {
        return None;
    }
    let v = h.len();
    let (mut chosen_bin, mut chosen_j) = (max_key, 0u64);
    if p.temperature > 0.0 {
        let inv_t = 1.0 / p.temperature;
        let mut lim = ALL;
        if p.top_k > 0 && p.top_k < v {
            let (bin, above) = find_bin(&hist, p.top_k as u64 - 1, false, ALL, x_max, inv_t);
            lim = (bin, (p.top_k as u64 - above) as u32);
        }
        let total = |lim: Limit| -> u64 {
            (0..BINS as u32).map(|b| bin_weight(b, hist[b as usize], true, lim, x_max, inv_t)).sum()
        };
        if p.top_p < 1.0 {
            let z = total(lim);
            let want = (p.top_p.max(0.0) as f64 * z as f64).ceil();
            let target = if want < 1.0 { 0 } else { (want as u64 - 1).min(z - 1) };
            let (bin, above) = find_bin(&hist, target, true, lim, x_max, inv_t);
            lim = (bin, ((target - above) / mass(key_value(bin), x_max, inv_t) + 1) as u32);
        }
        let z = total(lim);
        let target = ((uniform(p.seed, position) as f64 * z as f64).floor() as u64).min(z - 1);
        let (bin, above) = find_bin(&hist, target, true, lim, x_max, inv_t);
        chosen_bin = bin;
        chosen_j = (target - above) / mass(key_value(bin), x_max, inv_t);
    }
    let token = keys.iter().enumerate().filter(|&(_, &k)| k == chosen_bin).nth(chosen_j as usize)?.0 as u32;
    let nt = n_top.min(256).min(v);
    let mut top = Vec::new();
    if nt > 0 {
        let (top_bin, above) = find_bin(&hist, nt as u64 - 1, false, ALL, x_max, 1.0);
        let top_r = nt as u64 - above;
        let mut in_bin = 0;
        let mut list: Vec<u64> = Vec::new();
        for (i, &k) in keys.iter().enumerate() {
            let mut keep = k > top_bin;
            if k == top_bin {
                keep = in_bin < top_r;
                in_bin += 1;
            }
            if keep {
                list.push(((k as u64) << 32) | (!(i as u32)) as u64);
            }
        }
        list.sort_unstable_by(|a, b| b.cmp(a));
        top = list.into_iter().map(|c| !(c as u32)).collect();
    }
    Some((token, top))
}

/// Random f16 logits: coarse ones have many exact ties; some -0, and with `specials` some NaN and -inf.
fn random_row(next: &mut impl FnMut() -> u64, v: usize, coarse: bool, specials: bool) -> Vec<u16> {
    (0..v)
        .map(|i| {
            let r = (next() >> 11) as f64 / (1u64 << 53) as f64;
            let val = (r as f32 - 0.5) * 20.0;
            let val = if coarse { (val * 2.0).round() / 2.0 } else { val };
            let val = if coarse && i % 5 == 1 { -0.0 } else { val };
            let val = match (specials, next() % 23) {
                (true, 0) => f32::NAN,
                (true, 1) => f32::NEG_INFINITY,
                _ => val,
            };
            half::f16::from_f32(val).to_bits()
        })
        .collect()
}

fn to_f32(h: &[u16]) -> Vec<f32> {
    h.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect()
}

#[test]
fn histogram_sampling_equals_sort_and_walk() {
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
        SamplingParams { temperature: 0.05, top_k: 300, top_p: 0.999, seed: 8 },
    ];
    for &v in &[1usize, 2, 7, 33, 300, 2049, 49_153] {
        for trial in 0..if v > 10_000 { 3 } else { 12 } {
            let h = random_row(&mut next, v, trial % 2 == 0, trial % 3 == 2);
            let x = to_f32(&h);
            for (pi, p) in params.iter().enumerate() {
                for position in [0u64, 17, 1 << 40] {
                    let n_top = [0, 1, 5, 8, 256][trial % 5];
                    let got = by_histogram(&h, p, position, n_top);
                    if x.iter().any(|v| !v.is_finite()) {
                        // Refused by the kernels and by the CPU backend alike, whatever the finite rest.
                        assert_eq!(got, None, "vocab {v}, trial {trial}: a non-finite logit");
                        let cpu = crate::cpu::sample::sample(false, &x, p, position, n_top);
                        assert!(
                            matches!(cpu, Err(crate::error::KernelError::NonFiniteLogits { .. })),
                            "CPU: vocab {v}, trial {trial}: {cpu:?}"
                        );
                        continue;
                    }
                    let want = by_sorting(&x, p, position, n_top.min(256));
                    assert_eq!(got, Some(want), "vocab {v}, trial {trial}, params #{pi}, position {position}");
                    // And the CPU backend (f64 sums of f32 weights, not fixed point) picks the same on these rows.
                    let cpu = crate::cpu::sample::sample(false, &x, p, position, n_top).expect("cpu sample");
                    let cpu_top: Vec<u32> = cpu.top.iter().map(|&(i, _)| i).collect();
                    assert_eq!(got, Some((cpu.token, cpu_top)), "CPU: vocab {v}, trial {trial}, params #{pi}");
                }
            }
        }
    }
}

#[test]
fn greedy_breaks_ties_toward_the_lower_id_and_top_k_one_is_greedy() {
    let x = [1.0f32, 3.0, -2.0, 3.0, 0.5];
    let greedy = SamplingParams::GREEDY;
    let h: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    assert_eq!(by_histogram(&h, &greedy, 0, 3), Some((1, vec![1, 3, 0])));
    for seed in 0..20 {
        let p = SamplingParams { temperature: 1.0, top_k: 1, top_p: 1.0, seed };
        assert_eq!(by_histogram(&h, &p, seed, 0).map(|r| r.0), Some(1));
    }
}

/// The kernels' semantics (`by_histogram`, which sampling.cu mirrors) agree with the CPU backend where they used to
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
                let h: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                let (token, top) = by_histogram(&h, p, position, x.len()).expect("a finite maximum");
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
