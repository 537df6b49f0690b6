//! An operator's first hour with a swarm of processes on loopback: a taken p2p port is refused, `--swarm-timeout`
//! is a deadline (also while the client retries a dead stage), "no route" names what was found and what is missing
//! by the model's name, a node stopped with Ctrl-C leaves `/health` within seconds, `shardline nodes` prints what
//! `GET /v1/swarm` holds, and an unreachable bootstrap peer is reported at once.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Proc, closed_port, coordinator, coordinator_http, http_get, node, run, spawn_both, wait_line, wait_status,
};
use shardline_kernels::DType;
use shardline_node::model::{ModelFiles, ModelId};
use shardline_node::test_models::{TinyDTypes, TinySpec, write_tiny_gguf};

/// A 4-layer tiny model in `dir`, named `tiny` (its file is `tiny.gguf`).
fn tiny(dir: &Path) -> String {
    let model = dir.join("tiny.gguf");
    let spec = TinySpec { n_layers: 4, dtypes: TinyDTypes::like_llama_cpp(DType::Q8_0), ..Default::default() };
    write_tiny_gguf(&spec, &model).unwrap();
    model.to_str().unwrap().to_string()
}

/// The port of a `/ip4/…/tcp/P/…` or `/ip4/…/udp/P/…` multiaddr.
fn port_of(addr: &str) -> String {
    let parts: Vec<&str> = addr.split('/').collect();
    let i = parts.iter().position(|p| *p == "tcp" || *p == "udp").expect("a port");
    parts[i + 1].to_string()
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: sends a signal to a child process this test started and still owns (not yet waited for).
    let r = unsafe { libc::kill(p.0.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({sig}) failed");
}

#[test]
fn a_taken_p2p_port_is_refused() {
    for listen in ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"] {
        let (_first, rx, first_err) = spawn_both(&["coordinator", "--p2p-listen", listen]);
        let addr = wait_line(&rx, "p2p listening on", Duration::from_secs(60));
        let port = port_of(&addr);
        let taken = listen.replace("/0", &format!("/{port}"));
        let (code, out, err, secs) = run(&["coordinator", "--p2p-listen", &taken]);
        assert_eq!(code, 1, "a second coordinator on {taken} started: {out}{err}");
        let kind = if listen.contains("/tcp/") { "TCP" } else { "UDP" };
        assert!(err.contains(&format!("{kind} port {port} is not free")), "{err}");
        assert!(secs < 10.0, "{secs:.1} s");
        // The first coordinator of a swarm starts without libp2p's "No known peers" chatter.
        let said: Vec<String> = first_err.try_iter().collect();
        assert!(said.iter().all(|l| !l.contains("Failed to trigger bootstrap")), "{said:?}");
    }
}

#[test]
fn swarm_timeout_is_a_deadline_and_no_route_names_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let (_c, coord) = coordinator();
    let (_a, _) = node(&model, "0..2", "/ip4/127.0.0.1/tcp/0", &coord);
    let generate = |timeout: &str| {
        run(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
            "--swarm",
            &coord,
            "--swarm-timeout",
            timeout,
        ])
    };
    // Layers 2..4 are served by nobody: the wait ends at the deadline, naming what was found and what is missing.
    let (code, _, err, secs) = generate("3");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("found 0..2; missing 2..4 of tiny"), "{err}");
    let files = ModelFiles::open(&model).unwrap();
    let id = ModelId::of_files(&files).unwrap().to_hex();
    assert!(!err.contains(&id[..12]), "the hex id instead of the name: {err}");
    assert!((3.0..20.0).contains(&secs), "--swarm-timeout 3 took {secs:.1} s");

    // A stage that died without a word (SIGKILL: no withdrawal) is still registered: the client connects to it,
    // fails, and retries; `--swarm-timeout` bounds all of that.
    let (b, peer_b) = node(&model, "2..4", "/ip4/127.0.0.1/tcp/0", &coord);
    let (code, out, err, _) = generate("30");
    assert_eq!(code, 0, "the whole swarm did not generate: {out}{err}");
    signal(&b, libc::SIGKILL);
    drop(b);
    let (code, _, err, secs) = generate("4");
    assert_eq!(code, 1, "generated through a killed stage? {err}");
    assert!(secs < 20.0, "--swarm-timeout 4 with a dead stage ({peer_b}) took {secs:.1} s: {err}");
    println!("dead stage: failed after {secs:.1} s: {}", err.trim());
}

#[test]
fn a_node_stopped_with_ctrl_c_leaves_health_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let (_c, coord, http) = coordinator_http(&model);
    let (a, _) = node(&model, "0..4", "/ip4/127.0.0.1/tcp/0", &coord);
    wait_status(&format!("{http}/health"), 200, Duration::from_secs(60));
    let stopped = Instant::now();
    signal(&a, libc::SIGINT);
    let took = wait_status(&format!("{http}/health"), 503, Duration::from_secs(30));
    println!("/health answered 503 {} ms after the node's Ctrl-C", took.as_millis());
    assert!(took < Duration::from_secs(5), "/health took {took:?} to see the node go (its record lives 60 s)");
    let mut a = a;
    let status = a.0.wait().unwrap();
    assert!(status.success(), "the node did not exit cleanly on Ctrl-C: {status}");
    assert!(stopped.elapsed() < Duration::from_secs(10));
    let (_, body) = http_get(&format!("{http}/v1/models")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let card = &v["partial"][0];
    assert_eq!(card["id"], "tiny");
    let mtime = std::fs::metadata(&model).unwrap().modified().unwrap();
    let secs = mtime.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(card["created"].as_u64(), Some(secs), "created is the file's mtime");

    // SIGTERM (what `kill` and service managers send) withdraws too.
    let (b, _) = node(&model, "0..4", "/ip4/127.0.0.1/tcp/0", &coord);
    wait_status(&format!("{http}/health"), 200, Duration::from_secs(60));
    signal(&b, libc::SIGTERM);
    let took = wait_status(&format!("{http}/health"), 503, Duration::from_secs(30));
    assert!(took < Duration::from_secs(5), "/health took {took:?} after SIGTERM");
}

#[test]
fn nodes_prints_what_the_swarm_view_holds() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let (_c, coord, http) = coordinator_http(&model);
    let (_a, _) = node(&model, "0..2", "/ip4/127.0.0.1/tcp/0", &coord);
    let (_b, _) = node(&model, "2..4", "/ip4/127.0.0.1/udp/0/quic-v1", &coord);
    wait_status(&format!("{http}/health"), 200, Duration::from_secs(60));
    let (status, body) = http_get(&format!("{http}/v1/swarm")).unwrap();
    assert_eq!(status, 200);
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    let m = &view["models"][0];
    assert_eq!(m["name"], "tiny");
    let nodes = m["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);

    let (code, table, err, _) = run(&["nodes", "--http", &http]);
    assert_eq!(code, 0, "{err}");
    println!("{table}");
    assert!(table.contains("2 nodes registered"), "{table}");
    assert!(table.contains("tiny: 4 layers, every layer covered"), "{table}");
    assert!(table.contains(m["model_id"].as_str().unwrap()), "{table}");
    for n in nodes {
        let line = table
            .lines()
            .find(|l| l.contains(n["peer_id"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("no line for {n} in {table}"));
        for key in ["layers", "address"] {
            assert!(line.contains(n[key].as_str().unwrap()), "{key} of {n} not in {line:?}");
        }
        assert!(line.contains(&format!("{}/{}", n["running"], n["capacity"])), "{line}");
    }
    // `--json` is the view's models as the API has them.
    let (code, json, err, _) = run(&["nodes", "--http", &http, "--json"]);
    assert_eq!(code, 0, "{err}");
    let printed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let peers = |v: &serde_json::Value| -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = v["models"][0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["peer_id"].as_str().unwrap().into(), n["layers"].as_str().unwrap().into()))
            .collect();
        p.sort();
        p
    };
    assert_eq!(peers(&printed), peers(&view));
    // From the DHT itself, without the API: the same nodes and layers.
    let (code, json, err, _) = run(&["nodes", "--swarm", &coord, "--json"]);
    assert_eq!(code, 0, "{err}");
    let discovered: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(peers(&discovered), peers(&view));
    assert_eq!(discovered["models"][0]["missing"], serde_json::json!([]));
}

#[test]
fn an_unreachable_bootstrap_peer_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let addr = format!("/ip4/127.0.0.1/tcp/{}", closed_port());
    let started = Instant::now();
    let (_n, _out, err) = spawn_both(&[
        "node",
        "--model",
        &model,
        "--layers",
        "0..4",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--p2p-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &addr,
    ]);
    let mut seen = Vec::new();
    let line = loop {
        let left = Duration::from_secs(30).saturating_sub(started.elapsed());
        let line = err.recv_timeout(left).unwrap_or_else(|_| panic!("no report of {addr}; stderr: {seen:?}"));
        if line.contains(&addr) {
            break line;
        }
        seen.push(line);
    };
    assert!(line.contains("Connection refused"), "{line}");
    assert_eq!(line.matches("os error").count(), 1, "{line}");
    assert!(seen.iter().all(|l| !l.contains("Failed to trigger bootstrap")), "libp2p chatter: {seen:?}");
}
