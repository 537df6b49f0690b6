//! SmolLM2 quantised with each llama.cpp preset (Q2_K … IQ4_XS, files made by `scripts/make-presets`) against
//! llama.cpp on the same file: identical prompt tokens; teacher-forced top-1 identical wherever llama.cpp's top-1/top-2
//! margin exceeds [`NEAR_TIE`], and identical on at least [`MIN_AGREEMENT`] of all positions (the target is 95%,
//! about where llama.cpp agrees with itself); the mean |difference| of the top-1 logit is printed. The compact fixtures (`tests/fixtures/llamacpp_presets/`) come
//! from `scripts/make-reference.py --all-presets`.
//!
//! The preset files are generated (about 1.5 GB together), not committed. A preset whose file or fixture is absent, or
//! whose file holds a tensor type this build cannot run yet, is reported as skipped with the reason; with
//! `SHARDLINE_REQUIRE_PRESETS=1` each of those is a failure instead (or with a list, `SHARDLINE_REQUIRE_PRESETS=Q4_K_M,Q6_K`,
//! for the presets it names; CI makes and requires a few).

mod llamacpp_fixture;

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DType};
use shardline_node::engine::Engine;
use shardline_node::model::ShardOptions;
use shardline_node::test_models::{PRESETS, preset_path, preset_required};

/// The target for teacher-forced top-1 agreement, printed against.
const TARGET_AGREEMENT: f64 = 0.95;
/// What is asserted: llama.cpp agrees with itself (token-by-token against batched evaluation of the same tokens) on
/// 95.6-98.3% of these positions depending on the preset, so a correct implementation lands around 95% too; 94% leaves
/// room for that noise while a real bug (a wrong kernel, a wrong layout) falls far below.
const MIN_AGREEMENT: f64 = 0.94;
/// A top-1/top-2 gap (logits) under which either side may pick either token: llama.cpp's own two evaluations of the
/// same tokens differ by up to 0.9-1.6 in a logit (`docs/REFERENCE.md`), and the largest margin at which we differ on
/// the Q4_0/Q4_1/Q8_0 presets is 0.50 (mean |top-1 logit difference| 0.15-0.16). A difference where llama.cpp's margin
/// is larger is a failure whatever the overall rate.
const NEAR_TIE: f32 = 1.0;

type Fixture = llamacpp_fixture::Fixture<Positions>;

/// llama.cpp's token-by-token evaluation of a case against its one-pass evaluation (`scripts/make-reference.py`).
#[derive(Deserialize)]
struct SelfConsistency {
    top1_agreement: f64,
}

#[derive(Deserialize)]
struct SelfCase {
    positions: Positions,
    llamacpp_self_consistency: Option<SelfConsistency>,
}

#[derive(Deserialize)]
struct SelfFixture {
    cases: Vec<SelfCase>,
}

/// The Wilson score interval (95%, z = 1.96) of `k` successes in `n` trials.
fn wilson(k: usize, n: usize) -> (f64, f64) {
    const Z: f64 = 1.959_964;
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let denom = 1.0 + Z * Z / n;
    let centre = (p + Z * Z / (2.0 * n)) / denom;
    let half = Z * (p * (1.0 - p) / n + Z * Z / (4.0 * n * n)).sqrt() / denom;
    (centre - half, centre + half)
}

/// The KV-cache dtypes to measure with: `SHARDLINE_KV_DTYPES=f32,f16` (a list), else the CPU backend's default.
fn kv_dtypes() -> Vec<Option<DType>> {
    match std::env::var("SHARDLINE_KV_DTYPES") {
        Ok(list) => list
            .split(',')
            .map(|d| match d.trim() {
                "f32" => Some(DType::F32),
                "f16" => Some(DType::F16),
                other => panic!("SHARDLINE_KV_DTYPES: unknown dtype {other:?} (f32 or f16)"),
            })
            .collect(),
        Err(_) => vec![None],
    }
}

#[test]
fn wilson_interval_matches_known_values() {
    // 95/100: the interval is about 0.888-0.978 (standard tables).
    let (lo, hi) = wilson(95, 100);
    assert!((lo - 0.8883).abs() < 1e-3 && (hi - 0.9785).abs() < 1e-3, "{lo} {hi}");
    let (lo, hi) = wilson(0, 10);
    assert!(lo.abs() < 1e-12 && (hi - 0.2775).abs() < 1e-3, "{lo} {hi}");
}

#[derive(Deserialize)]
struct Positions {
    top1_ids: Vec<u32>,
    top1_logits: Vec<f32>,
    top1_margins: Vec<f32>,
}

/// Prints why a preset is not compared, or fails when the preset is required.
fn skip(preset: &str, why: impl std::fmt::Display) {
    assert!(!preset_required(preset), "{preset}: SHARDLINE_REQUIRE_PRESETS names it but {why}");
    eprintln!("skipped preset {preset}: {why}");
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

#[test]
fn presets_agree_with_llama_cpp() {
    let mut compared = 0;
    'presets: for preset in PRESETS {
        let fixture_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/llamacpp_presets/{preset}.json"));
        let Ok(text) = std::fs::read_to_string(&fixture_path) else {
            skip(preset, format!("no fixture at {}", fixture_path.display()));
            continue;
        };
        let fx: Fixture = serde_json::from_str(&text).expect("fixture parses");
        let model = preset_path(preset);
        if !model.is_file() {
            skip(preset, format!("{} is absent; `scripts/make-presets` makes it", model.display()));
            continue;
        }
        match sha256_file(&model) {
            Ok(sha) if sha == fx.model.sha256 => {}
            Ok(_) => {
                skip(
                    preset,
                    format!("{} is not the file the fixture was made from (other llama.cpp?)", model.display()),
                );
                continue;
            }
            Err(e) => panic!("{preset}: reading {}: {e}", model.display()),
        }
        // llama.cpp's agreement with itself, pooled over the cases (token-by-token against batched).
        let own: SelfFixture = serde_json::from_str(&text).expect("fixture parses");
        let (mut self_agree, mut self_total) = (0.0f64, 0usize);
        for case in &own.cases {
            if let Some(sc) = &case.llamacpp_self_consistency {
                let n = case.positions.top1_ids.len();
                self_agree += (sc.top1_agreement * n as f64).round();
                self_total += n;
            }
        }
        for kv_dtype in kv_dtypes() {
            let mut cpu = CpuBackend::new(2);
            if let Some(d) = kv_dtype {
                cpu = cpu.with_kv_dtype(d).expect("f32 and f16 KV caches exist");
            }
            let kv_name = cpu.kv_dtype();
            let backend: Arc<dyn Backend> = Arc::new(cpu);
            let engine = match Engine::load(&model, backend.clone(), &[], ShardOptions::default(), &mut |_, _| {}) {
                Ok(e) => e,
                Err(e) => {
                    skip(preset, format!("this build cannot load it: {e}"));
                    continue 'presets;
                }
            };
            let (mut agree, mut total, mut diff_sum) = (0usize, 0usize, 0.0f64);
            // The largest llama.cpp top-1/top-2 margin at a position where our top-1 differs.
            let mut worst_margin = 0.0f32;
            // Where that is: case, position, llama.cpp's top-1 and ours.
            let mut worst_at = String::new();
            for case in &fx.cases {
                let ours = engine.tokenizer().encode(&case.prompt, true).unwrap();
                assert_eq!(ours, case.prompt_tokens, "{preset} {}: prompt tokens differ", case.name);
                let tokens: Vec<u32> = case.prompt_tokens.iter().chain(&case.continuation_tokens).copied().collect();
                let mut session = engine.pipeline().open_session(tokens.len()).unwrap();
                let logits = backend.download_f32(&session.forward(&tokens, true).unwrap()).unwrap();
                let vocab = logits.len() / tokens.len();
                assert_eq!(case.positions.top1_ids.len(), tokens.len());
                let p = &case.positions;
                for (i, ((&id, &logit), &margin)) in
                    p.top1_ids.iter().zip(&p.top1_logits).zip(&p.top1_margins).enumerate()
                {
                    let row = &logits[i * vocab..(i + 1) * vocab];
                    let ours = row.iter().enumerate().fold(0, |b, (j, &v)| if v > row[b] { j } else { b });
                    if ours as u32 == id {
                        agree += 1;
                    } else if margin > worst_margin {
                        worst_margin = margin;
                        worst_at =
                            format!("{} position {i} of {}: llama.cpp {id}, ours {ours}", case.name, tokens.len());
                    }
                    diff_sum += f64::from((row[id as usize] - logit).abs());
                    total += 1;
                }
            }
            let rate = agree as f64 / total as f64;
            let (lo, hi) = wilson(agree, total);
            let itself = if self_total > 0 {
                format!("{:.1}% over {self_total} positions", 100.0 * self_agree / self_total as f64)
            } else {
                "not recorded".into()
            };
            println!(
                "{preset:>7} (KV {kv_name}): top-1 agreement {agree}/{total} = {:.1}% (95% CI {:.1}-{:.1}%), mean |top-1 \
                 logit diff| {:.3}, largest llama.cpp margin where top-1 differs {worst_margin:.3}, llama.cpp vs itself \
                 {itself}",
                100.0 * rate,
                100.0 * lo,
                100.0 * hi,
                diff_sum / total as f64
            );
            assert!(
                worst_margin <= NEAR_TIE,
                "{preset}: top-1 differs where llama.cpp's margin is {worst_margin} ({worst_at}), over the near-tie bound \
                 {NEAR_TIE}"
            );
            assert!(rate >= MIN_AGREEMENT, "{preset}: top-1 agreement {rate:.4} below {MIN_AGREEMENT}");
            if rate < TARGET_AGREEMENT {
                println!("{preset:>7}: below the {TARGET_AGREEMENT} target (all differences at near-ties)");
            }
        }
        compared += 1;
    }
    println!("{compared} of {} presets compared with llama.cpp", PRESETS.len());
}
