//! An operator's first hour, without a swarm: the messages and exit codes of common mistakes (negative numbers,
//! devices, `host:port` for a multiaddr, a directory as `--model`, unreachable swarm addresses), `--max-tokens 0`,
//! negatable switches over a config file, and shell completions.

mod common;

use std::path::Path;

use common::{closed_port, run};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};

fn tiny(dir: &Path) -> String {
    let model = dir.join("tiny.gguf");
    write_tiny_gguf(&TinySpec::default(), &model).unwrap();
    model.to_str().unwrap().to_string()
}

#[test]
fn negative_numbers_reach_the_real_validation() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    for flag in ["--temperature", "--top-p"] {
        let (code, _, err, _) = run(&["generate", "--model", &model, "--prompt", "hi", flag, "-1", "--device", "cpu"]);
        assert_eq!(code, 1, "{flag} -1: {err}");
        assert!(!err.contains("unexpected argument"), "{flag} -1 was read as a flag: {err}");
        assert!(err.contains(&format!("{flag} must be")), "{flag} -1: {err}");
    }
}

#[test]
fn max_tokens_zero_generates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let (code, out, err, _) = run(&["generate", "--model", &model, "--prompt", "hello", "--max-tokens", "0", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tokens"], serde_json::json!([]));
    assert_eq!(v["text"], "");
    assert!(!v["prompt_tokens"].as_array().unwrap().is_empty(), "the prompt is still read: {v}");
}

#[test]
fn no_chat_overrides_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let config = dir.path().join("shardline.toml");
    std::fs::write(&config, "[generate]\nchat = true\njson = true\nmax_tokens = 0\n").unwrap();
    let config = config.to_str().unwrap();
    let prompt_tokens = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["--config", config, "generate", "--model", &model, "--prompt", "hello"];
        args.extend_from_slice(extra);
        let (code, out, err, _) = run(&args);
        assert_eq!(code, 0, "{extra:?}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["prompt_tokens"].clone()
    };
    let chat = prompt_tokens(&[]);
    let plain = prompt_tokens(&["--no-chat"]);
    let (_, direct, _, _) = run(&["generate", "--model", &model, "--prompt", "hello", "--max-tokens", "0", "--json"]);
    let direct: serde_json::Value = serde_json::from_str(&direct).unwrap();
    assert_ne!(chat, plain, "the chat template changes the prompt");
    assert_eq!(plain, direct["prompt_tokens"], "--no-chat reads the prompt as it is");
    // And `--no-json` undoes `json = true`: no JSON object on stdout.
    let (code, out, err, _) =
        run(&["--config", config, "generate", "--model", &model, "--prompt", "hello", "--no-json", "--no-chat"]);
    assert_eq!(code, 0, "{err}");
    assert!(serde_json::from_str::<serde_json::Value>(&out).is_err(), "--no-json still printed JSON: {out}");
}

#[test]
fn device_errors_list_the_accepted_values() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let (code, _, err, _) = run(&["generate", "--model", &model, "--prompt", "hi", "--device", "tpu"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown device `tpu`") && err.contains("`cpu`, `cuda` (alias `gpu`) or `cuda:N`"), "{err}");
    // `gpu` is CUDA: without a usable GPU the error says why and what else is accepted.
    let (code, _, err, _) = run(&["generate", "--model", &model, "--prompt", "hi", "--device", "gpu", "--json"]);
    if code == 0 {
        println!("skipped the no-GPU message: --device gpu works on this machine");
    } else {
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("--device gpu") && err.contains("accepted: `cpu`"), "{err}");
    }
}

#[test]
fn a_host_port_is_answered_with_the_multiaddr() {
    for sub in
        [&["node", "--layers", "0..1", "--bootstrap"][..], &["coordinator", "--bootstrap"], &["nodes", "--swarm"]]
    {
        let mut args = sub.to_vec();
        args.push("127.0.0.1:4000");
        let (code, _, err, _) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("did you mean `/ip4/127.0.0.1/tcp/4000`?"), "{args:?}: {err}");
    }
}

#[test]
fn a_directory_as_model_says_what_was_expected_once() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err, _) = run(&["generate", "--model", dir.path().to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.matches("expects a GGUF file or a Hugging Face model directory").count(), 1, "{err}");
    assert_eq!(err.lines().filter(|l| !l.trim().is_empty()).count(), 1, "one line: {err}");
    let model = tiny(dir.path());
    let (code, _, err, _) = run(&["node", "--model", dir.path().to_str().unwrap(), "--layers", "0..1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("did you mean {model}?")), "{err}");
}

#[test]
fn unreachable_swarm_addresses_are_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let addr = format!("/ip4/127.0.0.1/tcp/{}", closed_port());
    let (code, _, err, secs) = run(&["generate", "--model", &model, "--prompt", "hi", "--swarm", &addr]);
    assert_eq!(code, 1, "{err}");
    assert!(secs < 10.0, "took {secs:.1} s to report an unreachable address");
    assert!(err.contains(&addr) && err.contains("Connection refused"), "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "the OS error is repeated: {err}");
    assert!(!err.contains("no node of"), "{err}");
    let (code, _, err, secs) = run(&["nodes", "--swarm", &addr]);
    assert_eq!(code, 1, "{err}");
    assert!(secs < 10.0 && err.contains(&addr) && err.contains("Connection refused"), "{secs:.1} s: {err}");
    let url = format!("http://127.0.0.1:{}", closed_port());
    let (code, _, err, _) = run(&["nodes", "--http", &url]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&url) && err.contains("Connection refused"), "{err}");
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err, _) = run(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for word in ["shardline", "generate", "nodes", "--bootstrap", "--no-chat"] {
            let word = if shell == "fish" { word.trim_start_matches("--") } else { word };
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    let (code, _, err, _) = run(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
}
