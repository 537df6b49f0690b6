//! The binaries end to end: `shardline demo --prompt` answers like the single process and leaves no process
//! behind; `shardline demo` serves the API until SIGINT and then stops every child; `shardline coordinator --http`
//! with node processes answers `/health` and `/v1/models`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, node, spawn, wait_line};
use shardline_node::test_models::model_for_tests;
use shardline_node::test_models::{TinySpec, write_tiny_gguf};

/// A minimal HTTP/1.1 exchange (the API answers with a Content-Length and closes on `Connection: close`).
fn http(addr: &str, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    common::http(addr, method, path, body, Duration::from_secs(120))
}

/// The pids in a `pids  coordinator 1, node 0..10 2, …` line.
fn pids(line: &str) -> Vec<i32> {
    line.split(',').filter_map(|p| p.split_whitespace().last()?.parse().ok()).collect()
}

fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn demo_prompt_answers_as_one_process_does_and_leaves_no_process_behind() {
    let Some(model) = model_for_tests("demo_prompt_answers_as_one_process_does_and_leaves_no_process_behind") else {
        return;
    };
    let model = model.to_str().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let prompt = "Name three uses of a paperclip.";
    let out = Command::new(BIN)
        .args(["demo", "--prompt", prompt, "--nodes", "3", "--http", "127.0.0.1:0", "--max-tokens", "24"])
        .args(["--model", model, "--device", "cpu", "--threads", "1", "--log-dir"])
        .arg(logs.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let answer = String::from_utf8(out.stdout).unwrap();
    let answer = answer.strip_suffix('\n').unwrap_or(&answer);

    let single = Command::new(BIN)
        .args(["generate", "--chat", "--prompt", prompt, "--max-tokens", "24", "--json", "--device", "cpu"])
        .args(["--model", model])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run generate");
    assert!(single.status.success(), "generate failed: {}", String::from_utf8_lossy(&single.stderr));
    let single: serde_json::Value = serde_json::from_slice(&single.stdout).unwrap();
    assert!(!answer.is_empty());
    assert_eq!(answer, single["text"].as_str().unwrap(), "the swarm's answer differs from the single process");

    let line = stderr.lines().find_map(|l| l.trim().strip_prefix("pids")).expect("a pids line");
    let pids = pids(line);
    assert_eq!(pids.len(), 4, "{line}");
    for pid in pids {
        assert!(gone(pid), "child {pid} outlived the demo");
    }
}

#[test]
fn demo_serves_until_sigint_and_then_stops_every_child() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 4, ..TinySpec::default() }, &model).unwrap();
    let logs = dir.path().join("logs");
    let (mut demo, rx) = spawn(&[
        "demo",
        "--model",
        model.to_str().unwrap(),
        "--nodes",
        "2",
        "--http",
        "127.0.0.1:0",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--log-dir",
        logs.to_str().unwrap(),
    ]);
    let url = wait_line(&rx, "ready: ", Duration::from_secs(120));
    let url = url.split_whitespace().next().unwrap().to_string();
    let pids = pids(&wait_line(&rx, "  pids", Duration::from_secs(5)));
    assert_eq!(pids.len(), 3);
    let addr = url.strip_prefix("http://").unwrap();

    let (status, body) = http(addr, "GET", "/health", None);
    assert_eq!(status, 200, "{body}");
    let chat = serde_json::json!({
        "model": "tiny", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let (status, body) = http(addr, "POST", "/v1/chat/completions", Some(&chat));
    assert_eq!(status, 200, "{body}");
    let resp: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["usage"]["completion_tokens"], 4, "{body}");

    let pid = libc::pid_t::try_from(demo.0.id()).unwrap();
    // SAFETY: kill(2) on our own child, not yet reaped, with a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = demo.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "demo exited with {status}");
    for pid in pids {
        assert!(gone(pid), "child {pid} outlived the demo");
    }
}

#[test]
fn coordinator_with_http_serves_health_and_models_for_node_processes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 4, ..TinySpec::default() }, &model).unwrap();
    let model = model.to_str().unwrap();
    let (_coordinator, rx) =
        spawn(&["coordinator", "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--model", model]);
    let p2p = wait_line(&rx, "p2p listening on", Duration::from_secs(60));
    let http_addr = wait_line(&rx, "http listening on http://", Duration::from_secs(60));

    let (status, _) = http(&http_addr, "GET", "/health", None);
    assert_eq!(status, 503, "no node yet, so nothing is routable");

    let _nodes: Vec<_> =
        ["0..2", "2..4"].iter().map(|layers| node(model, layers, "/ip4/127.0.0.1/tcp/0", &p2p)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&http_addr, "GET", "/health", None).0 != 200 {
        assert!(Instant::now() < deadline, "the model never became routable");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = http(&http_addr, "GET", "/v1/models", None);
    assert_eq!(status, 200);
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    let card = &models["data"][0];
    assert_eq!(card["id"], "tiny", "{body}");
    assert_eq!(card["coverage"]["routable"], true, "{body}");
    assert_eq!(card["coverage"]["nodes"], 2, "{body}");
}
