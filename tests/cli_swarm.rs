//! The CLI end to end, as separate processes on loopback: `shardline coordinator`, two `shardline node`s found
//! through the DHT alone, and `shardline generate --swarm` printing exactly what single-process `generate` prints.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use shardline_kernels::DType;
use shardline_node::test_models::{TinyDTypes, TinySpec, write_tiny_gguf};

const BIN: &str = env!("CARGO_BIN_EXE_shardline");

/// Kills the process when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `shardline args…` and returns it with the first stdout line that starts with `prefix`.
fn start(args: &[&str], prefix: &str) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn shardline");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let wanted = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no {prefix:?} line from {args:?}"));
    (Proc(child), line)
}

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

    let (_coordinator, coord_addr) =
        start(&["coordinator", "--p2p-listen", "/ip4/127.0.0.1/tcp/0"], "p2p listening on");
    let node = |layers: &str, p2p: &str| {
        start(
            &[
                "node",
                "--model",
                model,
                "--layers",
                layers,
                "--device",
                "cpu",
                "--threads",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--p2p-listen",
                p2p,
                "--bootstrap",
                &coord_addr,
            ],
            "serving layers",
        )
    };
    let (_a, _) = node("0..2", "/ip4/127.0.0.1/tcp/0");
    let (_b, _) = node("2..4", "/ip4/127.0.0.1/udp/0/quic-v1");

    let local = generate_json(&["--device", "cpu"], model);
    let swarm = generate_json(&["--swarm", &coord_addr, "--swarm-timeout", "60"], model);
    assert_eq!(local["prompt_tokens"], swarm["prompt_tokens"]);
    assert_eq!(local["tokens"], swarm["tokens"], "swarm tokens differ from the single process");
    assert_eq!(local["text"], swarm["text"]);
    assert_eq!(local["tokens"].as_array().map(Vec::len), Some(12));
}
