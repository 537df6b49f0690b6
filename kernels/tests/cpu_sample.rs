//! Sampling: greedy and top-k=1 are argmax, draws are a pure function of (seed, position), and the empirical
//! distribution follows the (tempered, truncated) softmax.

mod cpu_common;

use cpu_common::*;
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, KernelError, SamplingParams, Tensor};

fn logits(be: &CpuBackend, v: &[f32]) -> Tensor {
    be.upload_f32(&[1, v.len()], v).unwrap()
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
    let lse = max + v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    v.iter().map(|&x| x as f64 - lse).collect()
}

fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p, seed }
}

#[test]
fn greedy_is_argmax_with_exact_logprobs_and_top_list() {
    let mut rng = Rng::new(31);
    let be = CpuBackend::new(1);
    for vocab in [5, 1000, 49152] {
        let mut v = rng.vec(vocab, 6.0);
        let best = rng.below(vocab);
        v[best] = 7.0;
        let t = logits(&be, &v);
        let s = be.sample(&t, 0, &SamplingParams::GREEDY, 3, 4).unwrap();
        assert_eq!(s.token as usize, best);
        let lp = log_softmax(&v);
        assert!((s.logprob as f64 - lp[best]).abs() < 1e-5, "{} vs {}", s.logprob, lp[best]);
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
        assert_eq!(s.top.len(), 4.min(vocab));
        for (&(tok, l), &want) in s.top.iter().zip(&order) {
            assert_eq!(tok as usize, want);
            assert!((l as f64 - lp[want]).abs() < 1e-5);
        }
    }
}

/// The draw, its log-probability and the top list are the same bits at every SIMD level (the scalar code first),
/// for greedy and tempered draws, over vocabularies with a tail shorter than a vector and with ties at the top.
#[test]
fn every_simd_level_samples_the_same_bits() {
    use shardline_kernels::cpu::SimdLevel;
    let mut rng = Rng::new(33);
    for vocab in [1, 7, 1000, 49152, 49157] {
        let mut v = rng.vec(vocab, 6.0);
        if vocab > 10 {
            let top = v.iter().fold(f32::MIN, |m, &x| m.max(x));
            v[3] = top + 1.0;
            v[vocab - 2] = top + 1.0;
            v[vocab / 2] = -0.0;
        }
        for p in [SamplingParams::GREEDY, params(0.7, 0, 0.9, 5), params(1e-30, 0, 1.0, 1), params(1.3, 40, 1.0, 2)] {
            let mut first = None;
            for level in SimdLevel::ALL {
                let Some(be) = CpuBackend::with_simd(1, level) else { continue };
                let s = be.sample(&logits(&be, &v), 0, &p, 11, 5).unwrap();
                let got =
                    (s.token, s.logprob.to_bits(), s.top.iter().map(|&(t, l)| (t, l.to_bits())).collect::<Vec<_>>());
                match &first {
                    None => first = Some(got),
                    Some(f) => assert_eq!(f, &got, "{level:?}, vocab {vocab}, {p:?}"),
                }
            }
        }
    }
}

#[test]
fn ties_go_to_the_lowest_token_id() {
    let be = CpuBackend::new(1);
    let t = logits(&be, &[1.0, 3.0, 0.5, 3.0, 3.0]);
    assert_eq!(be.sample(&t, 0, &SamplingParams::GREEDY, 0, 0).unwrap().token, 1);
    let s = be.sample(&t, 0, &params(1.0, 1, 1.0, 9), 0, 3).unwrap();
    assert_eq!(s.token, 1);
    assert_eq!(s.top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3, 4]);
}

#[test]
fn top_k_one_is_argmax_for_any_seed_and_temperature() {
    let mut rng = Rng::new(32);
    let be = CpuBackend::new(1);
    let v = rng.vec(500, 2.0);
    let best = (0..500).max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a))).unwrap();
    let t = logits(&be, &v);
    for seed in 0..20 {
        for temperature in [0.3, 1.0, 5.0] {
            let s = be.sample(&t, 0, &params(temperature, 1, 1.0, seed), seed * 7, 0).unwrap();
            assert_eq!(s.token as usize, best);
        }
    }
}

#[test]
fn draws_are_a_pure_function_of_seed_and_position() {
    let mut rng = Rng::new(33);
    let be = CpuBackend::new(2);
    let v = rng.vec(2000, 1.0);
    let t = logits(&be, &v);
    let p = params(1.0, 0, 0.95, 42);
    for position in 0..20 {
        let a = be.sample(&t, 0, &p, position, 2).unwrap();
        let b = CpuBackend::new(1).sample(&t, 0, &p, position, 2).unwrap();
        assert_eq!(a, b);
    }
    let tokens = |seed: u64| -> Vec<u32> {
        (0..30).map(|pos| be.sample(&t, 0, &params(1.0, 0, 1.0, seed), pos, 0).unwrap().token).collect()
    };
    assert_ne!(tokens(1), tokens(2), "different seeds draw different sequences");
    let distinct: std::collections::BTreeSet<u32> = tokens(1).into_iter().collect();
    assert!(distinct.len() > 10, "a flat distribution gives varied tokens, got {}", distinct.len());
}

/// Draws `n` tokens at positions `0..n` and checks frequencies against `probs` with a 5-sigma binomial bound.
fn check_frequencies(be: &CpuBackend, v: &[f32], p: SamplingParams, probs: &[f64], n: u64) {
    let t = logits(be, v);
    let mut counts = vec![0u64; v.len()];
    for pos in 0..n {
        counts[be.sample(&t, 0, &p, pos, 0).unwrap().token as usize] += 1;
    }
    for (i, (&c, &pi)) in counts.iter().zip(probs).enumerate() {
        let f = c as f64 / n as f64;
        let sigma = (pi * (1.0 - pi) / n as f64).sqrt();
        assert!((f - pi).abs() <= 5.0 * sigma + 1e-9, "token {i}: frequency {f}, probability {pi} ({p:?})");
    }
}

#[test]
fn empirical_distribution_follows_the_softmax() {
    let be = CpuBackend::new(1);
    let v = [0.5f32, -1.0, 2.0, 0.0, 1.2, -0.3, 0.9, -2.5];
    for temperature in [1.0f32, 0.5, 2.0] {
        let scaled: Vec<f32> = v.iter().map(|x| x / temperature).collect();
        let probs: Vec<f64> = log_softmax(&scaled).iter().map(|l| l.exp()).collect();
        check_frequencies(&be, &v, params(temperature, 0, 1.0, 7), &probs, 40_000);
    }
}

#[test]
fn top_k_and_top_p_truncate_and_renormalise() {
    let be = CpuBackend::new(1);
    // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
    let probs = [0.5f64, 0.3, 0.15, 0.05];
    let v: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    // top_p 0.7: the smallest prefix reaching 0.7 is {0, 1}.
    check_frequencies(&be, &v, params(1.0, 0, 0.7, 3), &[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0], 20_000);
    // top_k 3.
    check_frequencies(&be, &v, params(1.0, 3, 1.0, 4), &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], 20_000);
    // top_k 3 then top_p 0.9 of the renormalised top 3: {0, 1, 2} (0.842 < 0.9).
    check_frequencies(&be, &v, params(1.0, 3, 0.9, 5), &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], 20_000);
    // The logprob stays the untempered one whatever the truncation.
    let s = be.sample(&logits(&be, &v), 0, &params(0.7, 2, 0.5, 1), 0, 0).unwrap();
    assert!((s.logprob as f64 - probs[s.token as usize].ln()).abs() < 1e-5);
}

#[test]
fn large_vocabularies_sample_valid_tokens_quickly() {
    let mut rng = Rng::new(34);
    let be = CpuBackend::new(1);
    let v = rng.vec(49152, 4.0);
    let t = logits(&be, &v);
    let lp = log_softmax(&v);
    for (k, p) in [(0, 1.0), (40, 0.9), (0, 0.95)] {
        for pos in 0..10 {
            let s = be.sample(&t, 0, &params(0.8, k, p, 11), pos, 5).unwrap();
            assert!((s.token as usize) < v.len());
            assert!((s.logprob as f64 - lp[s.token as usize]).abs() < 1e-4);
            if k > 0 {
                let rank = v.iter().filter(|&&x| x > v[s.token as usize]).count();
                assert!(rank < k, "token of rank {rank} with top_k {k}");
            }
        }
    }
}

#[test]
fn non_finite_logits_and_bad_parameters_are_errors() {
    let be = CpuBackend::new(1);
    // Partly NaN or infinite logits are refused (drawing among the finite rest used to hide a broken forward), for
    // greedy and sampled draws alike, with what was wrong.
    let nan = |e| matches!(e, KernelError::NonFiniteLogits { nan: 2, infinite: 0, vocab: 4, first: 0 });
    let t = logits(&be, &[f32::NAN, 1.0, f32::NAN, 0.5]);
    assert!(be.sample(&t, 0, &SamplingParams::GREEDY, 0, 0).is_err_and(nan));
    for pos in 0..5 {
        assert!(be.sample(&t, 0, &params(1.0, 0, 1.0, 1), pos, 0).is_err_and(nan));
    }
    for (row, first) in [([0.5, f32::INFINITY, 1.0, 0.0], 1), ([0.5, 1.0, 0.0, f32::NEG_INFINITY], 3)] {
        let e = be.sample(&logits(&be, &row), 0, &params(0.8, 40, 0.9, 3), 0, 2).unwrap_err();
        assert!(
            matches!(e, KernelError::NonFiniteLogits { nan: 0, infinite: 1, vocab: 4, first: f } if f == first),
            "{e}"
        );
    }
    // One bad logit in a large vocabulary is found too.
    let mut big = (0..49_152).map(|i| (i % 97) as f32 * 0.01).collect::<Vec<f32>>();
    big[40_001] = f32::NAN;
    let e = be.sample(&logits(&be, &big), 0, &SamplingParams::GREEDY, 0, 0).unwrap_err();
    assert!(matches!(e, KernelError::NonFiniteLogits { nan: 1, first: 40_001, .. }), "{e}");
    assert!(be.sample(&logits(&be, &[f32::NAN; 3]), 0, &SamplingParams::GREEDY, 0, 0).is_err());
    let ok = logits(&be, &[0.0, 1.0]);
    assert!(be.sample(&ok, 0, &params(1.0, 0, f32::NAN, 1), 0, 0).is_err(), "NaN top_p");
    for pos in 0..20 {
        assert_eq!(be.sample(&ok, 0, &params(1.0, 0, 0.0, 1), pos, 0).unwrap().token, 1, "top_p 0 keeps the best");
    }
    assert!(be.sample(&ok, 0, &params(f32::NAN, 0, 1.0, 1), 0, 0).is_err(), "NaN temperature");
    assert!(be.sample(&ok, 1, &SamplingParams::GREEDY, 0, 0).is_err(), "row past the logits");
    let two = be.upload_f32(&[2, 2], &[0.0, 1.0, 5.0, -1.0]).unwrap();
    assert_eq!(be.sample(&two, 1, &SamplingParams::GREEDY, 0, 0).unwrap().token, 0);
}
