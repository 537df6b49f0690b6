//! `shardline generate --prompts-file`: several generations batched through one continuous-batching scheduler, each
//! printing exactly the tokens and text that `--prompt` alone prints for it — greedy and seeded sampling, with the
//! prompts running all at once or a few at a time (sessions joining as others finish), on one shard or two.

use std::path::Path;
use std::process::Command;

use shardline_node::test_models::{TinySpec, write_tiny_gguf};

/// Runs `shardline generate --model <model> <args> --json --device cpu` and returns its stdout lines as JSON.
fn generate(model: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    generate_with_stderr(model, args).0
}

fn generate_with_stderr(model: &Path, args: &[&str]) -> (Vec<serde_json::Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(["generate", "--json", "--device", "cpu", "--threads", "1", "--model"])
        .arg(model)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run shardline");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "shardline generate {args:?} failed: {stderr}");
    let lines = String::from_utf8(out.stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (lines, stderr.into_owned())
}

/// The fourth is longer than a step's token budget (128 rows), so the scheduler cuts it while the others decode.
const PROMPTS: [&str; 7] = [
    "hello world",
    "the cat sat on the mat and looked at the door for a long time",
    "a",
    LONG,
    "hello world",
    "one two three four five",
    "zebra quartz jumps",
];

/// About 170 tokens of the tiny model's byte-level vocabulary.
const LONG: &str = "the quick brown fox jumps over the lazy dog while the slow green turtle walks past the old red barn \
    and the small grey mouse hides under the wooden floor of the house";

#[test]
fn batched_generations_print_what_each_prompt_prints_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec::default(), &model).unwrap();
    let file = dir.path().join("prompts.txt");
    // A blank line is skipped.
    std::fs::write(&file, format!("{}\n\n{}\n", PROMPTS[..3].join("\n"), PROMPTS[3..].join("\n"))).unwrap();
    let file = file.to_str().unwrap();

    for sampling in [&["--temperature", "0"][..], &["--temperature", "0.9", "--top-k", "20", "--seed", "7"][..]] {
        let common: Vec<&str> = [&["--max-tokens", "12"][..], sampling].concat();
        let solo: Vec<serde_json::Value> =
            PROMPTS.iter().map(|p| generate(&model, &[&common[..], &["--prompt", p]].concat()).remove(0)).collect();
        for (extra, at_once) in [
            (&["--parallel", "6"][..], 6),
            (&["--parallel", "2"], 2),
            (&["--parallel", "3", "--shards", "0..1,1..2"], 3),
        ] {
            let (batched, stderr) =
                generate_with_stderr(&model, &[&common[..], &["--prompts-file", file], extra].concat());
            // The sessions really shared forwards: the first stage ran `at_once` of them in one.
            assert!(stderr.contains(&format!("up to {at_once} sessions in one")), "{stderr}");
            assert_eq!(batched.len(), PROMPTS.len(), "one line per prompt ({sampling:?} {extra:?})");
            for (i, (b, s)) in batched.iter().zip(&solo).enumerate() {
                assert_eq!(b["index"], i, "{extra:?}");
                assert_eq!(b["prompt_tokens"], s["prompt_tokens"], "prompt {i} {sampling:?} {extra:?}");
                assert_eq!(b["tokens"], s["tokens"], "prompt {i} {sampling:?} {extra:?}");
                assert_eq!(b["text"], s["text"], "prompt {i} {sampling:?} {extra:?}");
                assert!(!s["tokens"].as_array().unwrap().is_empty(), "prompt {i} generated nothing");
            }
        }
    }
}

#[test]
fn prompt_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec::default(), &model).unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shardline"))
            .args(["generate", "--device", "cpu", "--model"])
            .arg(&model)
            .args(args)
            .output()
            .expect("run shardline")
    };
    let out = run(&["--prompts-file", empty.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("holds no prompt"), "{stderr}");
    let missing = dir.path().join("missing.txt");
    let out = run(&["--prompts-file", missing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("missing.txt"), "{stderr}");
    let out = run(&["--prompt", "a", "--prompts-file", missing.to_str().unwrap()]);
    assert!(!out.status.success(), "--prompt and --prompts-file together are refused");
    let long = dir.path().join("long.txt");
    std::fs::write(&long, format!("hi\n{}\n", "word ".repeat(400))).unwrap();
    let out = run(&["--prompts-file", long.to_str().unwrap(), "--max-tokens", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("exceeds the context"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
