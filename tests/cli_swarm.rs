//! The CLI end to end, as separate processes on loopback: `shardline coordinator`, two `shardline node`s found
//! through the DHT alone, and `shardline generate --swarm` printing exactly what single-process `generate` prints.

mod common;

use std::process::Command;

use common::{BIN, coordinator, node};
use shardline_kernels::DType;
use shardline_node::test_models::{TinyDTypes, TinySpec, write_tiny_gguf};

fn generate_json(extra: &[&str], model: &str) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["generate", "--model", model, "--prompt", "hello world", "--max-tokens", "12", "--json"])
        .args(["--temperature", "0.9", "--top-k", "20", "--seed", "11"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run generate");
    assert!(out.status.success(), "generate {extra:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn processes_found_through_the_dht_generate_what_one_process_generates() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let spec = TinySpec { n_layers: 4, dtypes: TinyDTypes::like_llama_cpp(DType::Q8_0), ..Default::default() };
    write_tiny_gguf(&spec, &model).unwrap();
    let model = model.to_str().unwrap();

    let (_coordinator, coord_addr) = coordinator();
    let _a = node(model, "0..2", "/ip4/127.0.0.1/tcp/0", &coord_addr);
    let _b = node(model, "2..4", "/ip4/127.0.0.1/udp/0/quic-v1", &coord_addr);

    let local = generate_json(&["--device", "cpu"], model);
    let swarm = generate_json(&["--swarm", &coord_addr, "--swarm-timeout", "60"], model);
    assert_eq!(local["prompt_tokens"], swarm["prompt_tokens"]);
    assert_eq!(local["tokens"], swarm["tokens"], "swarm tokens differ from the single process");
    assert_eq!(local["text"], swarm["text"]);
    assert_eq!(local["tokens"].as_array().map(Vec::len), Some(12));
}
