//! SmolLM2 against llama.cpp, an independent implementation (fixture made by scripts/make-reference.py from the
//! same GGUF): the same prompt tokens, teacher-forced top-1 agreement ≥ 95% over every position, and greedy
//! continuations identical for the first 8 tokens on at least 4 of 5 prompts. Near-ties may differ because llama.cpp
//! quantises activations differently; a real bug shows up as far lower agreement.
//!
//! Measured scale of that noise (2026-11-28): llama.cpp run with an f32 KV cache instead of its default f16 agrees
//! with its own fixture on 95.9% of positions (mean |logit diff| 0.144); shardline (f32 KV cache) agrees on 96.5%
//! (0.147). Our distance from llama.cpp is the distance of llama.cpp from itself under a different cache dtype.

mod llamacpp_fixture;

use std::sync::Arc;

use serde::Deserialize;
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, SamplingParams};
use shardline_node::engine::Engine;
use shardline_node::generate::GenerateParams;
use shardline_node::model::ShardOptions;
use shardline_node::test_models::model_for_tests;

#[derive(Deserialize)]
struct Positions {
    top_ids: Vec<Vec<u32>>,
    top_logits: Vec<Vec<f32>>,
}

type Fixture = llamacpp_fixture::Fixture<Positions>;

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llamacpp_smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture parses")
}

fn engine() -> Option<Engine> {
    let path = model_for_tests("engine_llamacpp")?;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(2));
    Some(Engine::load(&path, backend, &[], ShardOptions::default(), &mut |_, _| {}).expect("load SmolLM2"))
}

#[test]
fn prompts_tokenise_like_llama_cpp() {
    let Some(engine) = engine() else { return };
    for case in fixture().cases {
        let ours = engine.tokenizer().encode(&case.prompt, true).unwrap();
        assert_eq!(ours, case.prompt_tokens, "{}: prompt tokens differ", case.name);
    }
}

#[test]
fn teacher_forced_top1_agrees_with_llama_cpp() {
    let Some(engine) = engine() else { return };
    let backend = engine.pipeline().shards()[0].backend().clone();
    let (mut agree, mut total) = (0usize, 0usize);
    let mut abs_diff_sum = 0.0f64;
    for case in fixture().cases {
        let tokens: Vec<u32> = case.prompt_tokens.iter().chain(&case.continuation_tokens).copied().collect();
        let mut session = engine.pipeline().open_session(tokens.len()).unwrap();
        let logits = backend.download_f32(&session.forward(&tokens, true).unwrap()).unwrap();
        let vocab = logits.len() / tokens.len();
        let (mut case_agree, n) = (0usize, case.positions.top_ids.len());
        assert_eq!(n, tokens.len());
        for (i, (ids, vals)) in case.positions.top_ids.iter().zip(&case.positions.top_logits).enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let ours = row.iter().enumerate().fold(0, |b, (j, &v)| if v > row[b] { j } else { b });
            case_agree += usize::from(ours as u32 == ids[0]);
            abs_diff_sum += ids.iter().zip(vals).map(|(&id, &v)| (row[id as usize] - v).abs() as f64).sum::<f64>()
                / ids.len() as f64;
        }
        println!("{:>22}: top-1 agreement {case_agree}/{n}", case.name);
        agree += case_agree;
        total += n;
    }
    let rate = agree as f64 / total as f64;
    let mean_diff = abs_diff_sum / total as f64;
    println!(
        "overall top-1 agreement {agree}/{total} = {rate:.4}; mean |logit diff| on llama.cpp's top-5 {mean_diff:.4}"
    );
    assert!(rate >= 0.95, "top-1 agreement {rate} below 0.95");
    assert!(mean_diff < 0.5, "logits differ from llama.cpp by {mean_diff} on average");
}

#[test]
fn greedy_continuations_match_llama_cpp() {
    let Some(engine) = engine() else { return };
    // llama.cpp's reference continues through end tokens (the long prompt's first greedy token is `<|im_end|>`),
    // so the comparison does too: no stop tokens.
    let params = GenerateParams { max_tokens: 32, sampling: SamplingParams::GREEDY, ..GenerateParams::default() };
    let mut identical = 0;
    let cases = fixture().cases;
    for case in &cases {
        let out = engine.generate(&case.prompt_tokens, &params, &mut |_| true).unwrap();
        let same = out.tokens.iter().zip(&case.continuation_tokens).take_while(|(a, b)| a == b).count();
        println!("{:>22}: first {same} of 32 greedy tokens identical", case.name);
        identical += usize::from(same >= 8);
    }
    assert!(identical >= 4, "only {identical} of {} prompts agree on the first 8 greedy tokens", cases.len());
}
