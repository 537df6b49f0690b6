//! `shardline generate --model X.gguf` on every llama.cpp quantisation preset of the default model (the files
//! `scripts/make-presets` makes: K-quants, IQ4, the 32-value types): each loads, answers greedily, and reports the
//! tokens it produced. Whether those tokens are the right ones is `node/tests/engine_llamacpp_presets.rs`'s job
//! (against llama.cpp on the same files); this is the operator's path through the CLI.

mod common;

use common::run;
use shardline_node::test_models::{PRESETS, preset_for_tests};

#[test]
fn generate_answers_on_every_preset_file() {
    let mut answered = Vec::new();
    for preset in PRESETS {
        let Some(model) = preset_for_tests("generate_answers_on_every_preset_file", preset) else { continue };
        let model = model.to_str().unwrap();
        let args =
            ["generate", "--model", model, "--prompt", "The capital of France is", "--max-tokens", "6", "--no-chat"];
        let (code, out, err, _) = run(&[&args[..], &["--json", "--temperature", "0", "--device", "cpu"]].concat());
        assert_eq!(code, 0, "{preset}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{preset}: {e}: {out}"));
        let tokens = v["tokens"].as_array().unwrap_or_else(|| panic!("{preset}: no tokens in {v}"));
        assert!(!tokens.is_empty(), "{preset}: generated nothing: {v}");
        let text = v["text"].as_str().unwrap_or_default();
        assert!(!text.trim().is_empty(), "{preset}: empty text: {v}");
        println!("{preset:>7}: {text:?}");
        answered.push(preset);
    }
    println!("answered on {} of {} presets: {answered:?}", answered.len(), PRESETS.len());
}
