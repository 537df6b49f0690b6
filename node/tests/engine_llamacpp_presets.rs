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
//!
//! `SHARDLINE_PRESET_ONLY=Q2_K,Q4_0` compares only the presets listed, `SHARDLINE_KV_DTYPES=f32,f16` measures each
//! with those CPU KV caches, and `SHARDLINE_AGREE_DUMP=FILE` appends a line per position for diagnosis
//! (`docs/REFERENCE.md`).

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

/// Positions where a difference above [`NEAR_TIE`] is explained and accepted: (preset, case, position, why). Each is
/// a position whose result depends chaotically on rounding, shown with an independent float64 forward of the same
/// quantised weights (`docs/REFERENCE.md`, "An ill-conditioned position"). They still count in the agreement rate.
const ILL_CONDITIONED: &[(&str, &str, usize, &str)] = &[
    (
        "Q4_0",
        "javascript_html",
        6,
        "a near-tie in exact arithmetic: the f64 forward's margin of 107 over 198 is 0.13; with rounding it ranges from \
         -0.4 (ours, f32 KV) through 1.0-1.3 (llama.cpp) to 1.4 (ours, f16 KV)",
    ),
    (
        "Q4_0",
        "javascript_html",
        7,
        "the logits after `<!doctype html>\\n` hang on the sign of one FFN gate in layer 11 (a 20-fold cancellation); \
         an f64 forward gives our token 44 without activation rounding and llama.cpp's 198 with its Q8_0 and f16 \
         rounding, and our own f16 KV cache gives 198 too (margin 4.5)",
    ),
];

/// `SHARDLINE_PRESET_ONLY=Q2_K,Q4_0`: compare only these presets (all by default).
fn preset_selected(preset: &str) -> bool {
    match std::env::var("SHARDLINE_PRESET_ONLY") {
        Ok(list) => list.split(',').any(|p| p.trim() == preset),
        Err(_) => true,
    }
}

/// The top two entries of a logit row: (id, logit) of the largest (smaller id on ties) and of the second.
fn top2(row: &[f32]) -> ((usize, f32), (usize, f32)) {
    let mut best = (0, f32::NEG_INFINITY);
    let mut second = (0, f32::NEG_INFINITY);
    for (j, &v) in row.iter().enumerate() {
        if v > best.1 {
            second = best;
            best = (j, v);
        } else if v > second.1 {
            second = (j, v);
        }
    }
    (best, second)
}

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
    // `SHARDLINE_AGREE_DUMP=FILE`: one tab-separated line per compared position (for diagnosis; appended).
    let mut dump = std::env::var_os("SHARDLINE_AGREE_DUMP").map(|path| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("dump file opens");
        writeln!(
            f,
            "preset\tkv\tcase\tposition\tllama_top1\tllama_logit\tllama_margin\tours_top1\tours_logit\tours_margin\tours_logit_of_llama_top1"
        )
        .unwrap();
        f
    });
    'presets: for preset in PRESETS {
        if !preset_selected(preset) {
            eprintln!("preset {preset} not compared: SHARDLINE_PRESET_ONLY leaves it out");
            continue;
        }
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
                    let ((ours, ours_logit), (_, second)) = top2(row);
                    if let Some(f) = dump.as_mut() {
                        use std::io::Write;
                        writeln!(
                            f,
                            "{preset}\t{kv_name}\t{}\t{i}\t{id}\t{logit}\t{margin}\t{ours}\t{ours_logit}\t{}\t{}",
                            case.name,
                            ours_logit - second,
                            row[id as usize]
                        )
                        .unwrap();
                    }
                    let accepted =
                        ILL_CONDITIONED.iter().find(|(p, c, at, _)| *p == preset && *c == case.name && *at == i);
                    if ours as u32 == id {
                        agree += 1;
                    } else if let Some((_, _, _, why)) = accepted {
                        println!(
                            "{preset:>7}: {} position {i} differs (llama.cpp {id}, margin {margin}; ours {ours}), accepted: {why}",
                            case.name
                        );
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
