//! `--config FILE` and `--help` as a user meets them: the example file drives a real `generate`, the command line
//! wins over the file, a mistake names the key and the file, and the top-level help fits on one screen.

use std::path::Path;
use std::process::{Command, Output};

use shardline_node::test_models::{TinySpec, write_tiny_gguf};

const BIN: &str = env!("CARGO_BIN_EXE_shardline");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("RUST_LOG", "warn").output().expect("run shardline")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "shardline failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn generate_takes_its_flags_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec::default(), &model).unwrap();
    let model = model.to_str().unwrap();
    let config = dir.path().join("shardline.toml");
    std::fs::write(
        &config,
        format!(
            "log_format = \"text\"\n[generate]\nmodel = {model:?}\nprompt = \"hello world\"\nmax_tokens = 6\n\
             json = true\ndevice = \"cpu\"\ntemperature = 0.8\nseed = 3\n[node]\nlayers = \"0..1\"\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let by_flags = json(&run(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "hello world",
        "--max-tokens",
        "6",
        "--json",
        "--device",
        "cpu",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]));
    let by_file = json(&run(&["--config", config, "generate"]));
    assert_eq!(by_file["tokens"], by_flags["tokens"]);
    assert_eq!(by_file["tokens"].as_array().map(Vec::len), Some(6));

    // The command line wins over the file.
    let fewer = json(&run(&["generate", "--config", config, "--max-tokens", "2"]));
    assert_eq!(fewer["tokens"].as_array().map(Vec::len), Some(2));

    // The example shipped in docs/ is a valid file for a real run (it only adds chat and a stop string here).
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/shardline.example.toml");
    let out = run(&[
        "--config",
        example.to_str().unwrap(),
        "generate",
        "--model",
        model,
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
        "--json",
        "--device",
        "cpu",
    ]);
    json(&out);
}

#[test]
fn a_mistake_in_the_config_file_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[generate]\nmax_tokens = \"many\"\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "generate"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("max_tokens") && err.contains("many"), "{err}");

    std::fs::write(&config, "[node]\nlayer = \"0..2\"\n").unwrap();
    let out = run(&["--config", config.to_str().unwrap(), "node"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("unknown key `layer` in [node]"), "{err}");

    let out = run(&["--config", dir.path().join("missing.toml").to_str().unwrap(), "node"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.toml"), "{err}");
}

#[test]
fn the_help_fits_on_one_screen_and_names_every_subcommand() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.lines().count() <= 40, "{} lines:\n{help}", help.lines().count());
    for sub in ["demo", "generate", "node", "coordinator", "fetch"] {
        assert!(help.contains(&format!("  {sub} ")), "no {sub} in:\n{help}");
    }
    for sub in ["demo", "generate", "node", "coordinator", "fetch"] {
        let out = run(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help failed");
    }
}
