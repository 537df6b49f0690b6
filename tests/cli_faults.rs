//! Faults at the process level (docs/RELIABILITY.md): a stage SIGKILLed at every position of the route, during
//! prefill and during decode, with a replica present; a stage killed with no replica; a node drained with SIGTERM and
//! restarted with the same key. Each prints what it measured.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Proc, coordinator, coordinator_http, node_args, spawn, wait_line};
use libp2p::{Multiaddr, PeerId};
use shardline_coordinator::{SwarmClient, SwarmClientConfig, SwarmSession};
use shardline_kernels::SamplingParams;
use shardline_node::generate::Stepper;
use shardline_node::model::{ModelFiles, ModelId};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};

/// A one-thread CPU node on loopback with a small KV cache and extra arguments; returns it with its peer id.
fn node_with(model: &str, layers: &str, bootstrap: &str, extra: &[&str]) -> (Proc, PeerId) {
    let mut args = node_args(model, layers, "127.0.0.1:0", "/ip4/127.0.0.1/tcp/0", bootstrap);
    args.extend_from_slice(&["--kv-cache-mib", "16"]);
    args.extend_from_slice(extra);
    let (p, rx) = spawn(&args);
    let peer = wait_line(&rx, "peer id", Duration::from_secs(60));
    wait_line(&rx, "serving layers", Duration::from_secs(60));
    (p, peer.parse().expect("peer id"))
}

fn model_id(path: &std::path::Path) -> String {
    ModelId::of(ModelFiles::open(path).unwrap().weights().as_ref()).unwrap().to_hex()
}

async fn client_for(model_id: &str, boot: &str, peers: &[PeerId]) -> SwarmClient {
    client_with(model_id, boot, peers, Duration::from_secs(2)).await
}

/// A client whose first ban after a failure lasts `ban`.
async fn client_with(model_id: &str, boot: &str, peers: &[PeerId], ban: Duration) -> SwarmClient {
    let mut cfg = SwarmClientConfig::new(model_id, vec![boot.parse::<Multiaddr>().unwrap()]);
    cfg.registry.base_ban = ban;
    cfg.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.discovery.query_interval = Duration::from_millis(300);
    let client = SwarmClient::join(cfg).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !peers.iter().all(|p| client.registry().contains(p)) {
        assert!(Instant::now() < deadline, "every node registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
}

const GREEDY: SamplingParams = SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 1 };

/// Decode steps until `out` holds `until` tokens.
async fn decode(s: &mut SwarmSession, out: &mut Vec<u32>, until: usize) {
    while out.len() < until {
        let t = *out.last().unwrap();
        out.push(s.step(&[t], &GREEDY, 0).await.expect("decode step").token);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Prefill,
    Decode,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_killed_at_any_position_in_prefill_or_decode_fails_over_with_identical_text() {
    // The owner's warnings (which stage was blamed, and why) go to the test's output.
    let _ = tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    // Wide enough that a 600-position prefill takes a while on one thread, so a kill lands inside it.
    let spec = TinySpec { n_layers: 6, hidden: 256, ffn: 768, context: 1024, ..TinySpec::default() };
    write_tiny_gguf(&spec, &path).unwrap();
    let id = model_id(&path);
    let model = path.to_str().unwrap();
    let (_coordinator, boot) = coordinator();
    let spans = ["0..2", "2..4", "4..6"];
    // Three copies of every span: each position loses two (one in prefill, one in decode) and keeps one.
    let mut nodes: Vec<(usize, Option<Proc>, PeerId)> = Vec::new();
    for (pos, span) in spans.iter().enumerate() {
        for _ in 0..3 {
            let (p, peer) = node_with(model, span, &boot, &[]);
            nodes.push((pos, Some(p), peer));
        }
    }
    let peers: Vec<PeerId> = nodes.iter().map(|n| n.2).collect();
    // A killed node's record stays in the registry until it expires (60 s): with the default 2-s ban, later
    // sessions of this test would meet the nodes killed earlier again, and each would cost one more failover (a
    // bounded handshake). Banned for the whole test, each kill is measured on its own.
    let client = client_with(&id, &boot, &peers, Duration::from_secs(120)).await;

    let prompt: Vec<u32> = (0..600u32).map(|i| (i * 7 + 3) % 288).collect();
    let n_out = 8;
    let mut s = client.session(prompt.len() + n_out + 1, GREEDY, 0);
    s.feed(&prompt[..1]).await.unwrap();
    let t = Instant::now();
    let mut expected = vec![s.step(&prompt[1..], &GREEDY, 0).await.unwrap().token];
    let prefill_time = t.elapsed();
    decode(&mut s, &mut expected, n_out).await;
    s.close().await;
    eprintln!("undisturbed: prefill of {} positions {prefill_time:?}, tokens {expected:?}", prompt.len());

    let mut report = Vec::new();
    for (pos, span) in spans.iter().enumerate() {
        for phase in [Phase::Prefill, Phase::Decode] {
            let mut s = client.session(prompt.len() + n_out + 1, GREEDY, 0);
            // One position first: the route is chosen and known before the long prefill starts.
            s.feed(&prompt[..1]).await.unwrap();
            // Routes planned before the dead nodes' bans expired may meet them again: count only this kill's.
            let before = s.failovers();
            let victim_peer = s.routes().last().unwrap()[pos];
            let k = nodes.iter().position(|n| n.2 == victim_peer).expect("the route's node is one of ours");
            let mut victim = nodes[k].1.take().expect("a node in a route is alive");
            let mut out = Vec::new();
            let killed_at = match phase {
                Phase::Prefill => {
                    let delay = prefill_time / 4;
                    let killer = std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        victim.0.kill().expect("SIGKILL");
                        let at = Instant::now();
                        victim.0.wait().unwrap();
                        at
                    });
                    out.push(s.step(&prompt[1..], &GREEDY, 0).await.expect("prefill step").token);
                    let done = Instant::now();
                    let killed = killer.join().unwrap();
                    assert!(killed < done, "the kill landed after the prefill had finished; make the prompt longer");
                    killed
                }
                Phase::Decode => {
                    out.push(s.step(&prompt[1..], &GREEDY, 0).await.expect("prefill step").token);
                    decode(&mut s, &mut out, 3).await;
                    victim.0.kill().expect("SIGKILL");
                    victim.0.wait().unwrap();
                    Instant::now()
                }
            };
            // A stage may have done its share of the prefill before it died (the first stage, late in the prompt):
            // then the failover happens at the next step that needs it. Recovery ends with the first token after it.
            while s.failovers() == before {
                assert!(out.len() < n_out, "stage {pos} killed in {phase:?}: no failover");
                let n = out.len() + 1;
                decode(&mut s, &mut out, n).await;
            }
            let recovered_at = Instant::now();
            decode(&mut s, &mut out, n_out).await;
            assert_eq!(out, expected, "stage {pos} killed in {phase:?}: the text differs from the undisturbed run");
            let extra = s.failovers() - before;
            assert_eq!(extra, 1, "stage {pos} killed in {phase:?}: routes {:?}", s.routes());
            assert!(!s.routes().last().unwrap().contains(&victim_peer), "the dead node is not in the new route");
            let took = recovered_at - killed_at;
            eprintln!(
                "stage {pos} ({}) killed in {phase:?}: first token after the failover {took:?} after the kill",
                span
            );
            report.push((pos, phase, took));
            s.close().await;
        }
    }
    for (pos, phase, took) in &report {
        // The target is 2 s on loopback; the bound leaves room for a loaded machine, never the 8-s idle timeout.
        assert!(*took < Duration::from_secs(6), "stage {pos} in {phase:?}: recovery took {took:?}");
    }
}

fn http(addr: &str, method: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
    common::http(addr, method, path, Some(body), Duration::from_secs(60))
}

#[test]
fn without_a_replica_requests_end_with_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    // Wide enough that 900 tokens take a while to stream, so the kill lands inside the stream.
    let spec = TinySpec { n_layers: 4, hidden: 256, ffn: 768, context: 1024, ..TinySpec::default() };
    write_tiny_gguf(&spec, &path).unwrap();
    let model = path.to_str().unwrap();
    let (_c, boot, http_url) = coordinator_http(model);
    let addr = http_url.strip_prefix("http://").unwrap().to_string();
    let (_head, _) = node_with(model, "0..2", &boot, &[]);
    let (mut tail, _) = node_with(model, "2..4", &boot, &[]);
    common::wait_status(&format!("{http_url}/health"), 200, Duration::from_secs(60));

    // A long streaming request; the only tail is killed as soon as the first chunk arrives.
    let streaming = long_stream_started(addr.clone());
    tail.0.kill().unwrap();
    tail.0.wait().unwrap();
    let killed = Instant::now();
    let (resp, ended) = streaming.join().unwrap();
    let took = ended.saturating_duration_since(killed);
    let tail_lines: Vec<&str> = resp.lines().filter(|l| l.starts_with("data: ")).rev().take(2).collect();
    eprintln!("streaming request ended {took:?} after the kill; last events: {tail_lines:?}");
    assert!(resp.starts_with("HTTP/1.1 200"), "the stream had started: {resp}");
    assert!(tail_lines.iter().any(|l| l.contains("\"error\"")), "the stream ends with an error event: {tail_lines:?}");
    assert!(!resp.contains("\"finish_reason\":\"length\""), "the stream finished before the kill; make it longer");
    assert!(took < Duration::from_secs(15), "the stream took {took:?} to end after the kill");

    // A request after the loss: 503 naming the missing layers, at once.
    let t = Instant::now();
    let chat = serde_json::json!({
        "model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hi"}],
    });
    let (status, body) = http(&addr, "POST", "/v1/chat/completions", &chat);
    let took = t.elapsed();
    eprintln!("non-streaming request after the loss: {status} in {took:?}: {body}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("2..4"), "the error names the missing layers: {body}");
    assert!(took < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_and_a_restart_with_the_same_key_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 4, context: 512, ..TinySpec::default() }, &path).unwrap();
    let id = model_id(&path);
    let model = path.to_str().unwrap();
    let key = dir.path().join("tail.key");
    let key = key.to_str().unwrap();
    let (_coordinator, boot) = coordinator();
    let (_head, head_id) = node_with(model, "0..2", &boot, &[]);
    let (tail, tail_id) = node_with(model, "2..4", &boot, &["--key-file", key, "--drain-timeout", "1"]);
    let client = client_for(&id, &boot, &[head_id, tail_id]).await;

    let prompt = [1u32, 40, 41, 42, 100, 200, 7, 9];
    let mut s = client.session(prompt.len() + 41, GREEDY, 0);
    let mut expected = vec![s.step(&prompt, &GREEDY, 0).await.unwrap().token];
    decode(&mut s, &mut expected, 40).await;
    s.close().await;

    // A session on the node to drain (the only tail yet), then the replica it will fail over to.
    let mut s = client.session(prompt.len() + 41, GREEDY, 0);
    let mut out = vec![s.step(&prompt, &GREEDY, 0).await.unwrap().token];
    assert_eq!(s.routes()[0][1], tail_id);
    let (other, other_id) = node_with(model, "2..4", &boot, &[]);
    let t = Instant::now();
    while !client.registry().contains(&other_id) {
        assert!(t.elapsed() < Duration::from_secs(60), "the replica registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    decode(&mut s, &mut out, 5).await;

    let pid = libc::pid_t::try_from(tail.0.id()).unwrap();
    // SAFETY: kill(2) on our own child, not yet reaped, with a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let t = Instant::now();
    // The registry drops the node at once (withdrawal), so a new session goes to the other tail.
    while client.registry().contains(&tail_id) {
        assert!(t.elapsed() < Duration::from_secs(5), "the withdrawal reached the registry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let withdrawn = t.elapsed();
    // The running session goes on while the node drains; past the 1-s drain deadline it is cut off with an error
    // frame, and the step that meets it fails over at once.
    let mut failover = None;
    let t = Instant::now();
    while out.len() < 40 {
        let step = Instant::now();
        let n = out.len() + 1;
        decode(&mut s, &mut out, n).await;
        if s.failovers() == 1 && failover.is_none() {
            failover = Some((step.elapsed(), t.elapsed()));
        }
        if failover.is_none() {
            assert!(t.elapsed() < Duration::from_secs(10), "the drain never cut the session off");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (failover, cut_after) = failover.expect("the session failed over");
    assert_eq!(out, expected, "the text after the drain differs from the undisturbed run");
    assert_eq!(s.failovers(), 1);
    assert_eq!(s.routes().last().unwrap()[1], other_id);
    s.close().await;
    let mut tail = tail;
    let t = Instant::now();
    let exit = loop {
        if let Some(e) = tail.0.try_wait().unwrap() {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the drained node exits");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "the drained node exits cleanly: {exit}");
    eprintln!(
        "withdrawal seen after {withdrawn:?}; session cut off {cut_after:?} after the withdrawal; its failover step \
         took {failover:?}"
    );
    assert!(failover < Duration::from_secs(2), "an error frame, not a timeout, ended the session: {failover:?}");

    // Restarted with the same key: the same peer id registers again and takes sessions.
    let (_tail2, tail2_id) = node_with(model, "2..4", &boot, &["--key-file", key]);
    assert_eq!(tail2_id, tail_id);
    let t = Instant::now();
    while !client.registry().contains(&tail_id) {
        assert!(t.elapsed() < Duration::from_secs(30), "the restarted node registers again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The planner prefers the faster of equal replicas, so the other tail leaves (SIGTERM: withdrawn at once) and a
    // new session has only the restarted node to go to.
    let other_pid = libc::pid_t::try_from(other.0.id()).unwrap();
    // SAFETY: kill(2) on our own child, not yet reaped, with a valid signal number.
    assert_eq!(unsafe { libc::kill(other_pid, libc::SIGTERM) }, 0);
    let t = Instant::now();
    while client.registry().contains(&other_id) {
        assert!(t.elapsed() < Duration::from_secs(5), "the other tail's withdrawal reached the registry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = client.session(prompt.len() + 5, GREEDY, 0);
    let mut out = vec![s.step(&prompt, &GREEDY, 0).await.expect("a session on the restarted node").token];
    decode(&mut s, &mut out, 4).await;
    assert_eq!(out[..], expected[..4]);
    let served = s.routes().iter().all(|r| r[1] == tail_id);
    s.close().await;
    assert!(served, "the restarted node took a new session");
}

/// Starts a long greedy streaming chat (900 tokens) against the API at `addr` on its own thread and returns once its
/// first event arrived; the thread's result is the body read until the connection ended, and when it ended.
fn long_stream_started(addr: String) -> std::thread::JoinHandle<(String, Instant)> {
    let chat = serde_json::json!({
        "model": "tiny", "max_tokens": 900, "temperature": 0, "stream": true, "ignore_eos": true,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let streaming = std::thread::spawn(move || stream_until_end(addr, chat, first_tx));
    first_rx.recv_timeout(Duration::from_secs(30)).expect("the stream starts");
    streaming
}

/// Reads a streaming response until the connection ends (EOF or error); tells `first` when the first event arrived.
fn stream_until_end(addr: String, body: String, first: std::sync::mpsc::Sender<()>) -> (String, Instant) {
    let mut s = TcpStream::connect(&addr).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let mut told = false;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("the stream hung for 60 s")
            }
            Err(_) => break,
        };
        text.extend_from_slice(&buf[..n]);
        if !told && String::from_utf8_lossy(&text).contains("data: ") {
            told = true;
            let _ = first.send(());
        }
    }
    (String::from_utf8_lossy(&text).into_owned(), Instant::now())
}

#[test]
fn a_coordinator_restarted_while_nodes_run_rediscovers_them_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec { n_layers: 4, hidden: 256, ffn: 768, context: 1024, ..TinySpec::default() };
    write_tiny_gguf(&spec, &path).unwrap();
    let model = path.to_str().unwrap();
    let key = dir.path().join("coordinator.key");
    let key = key.to_str().unwrap().to_string();
    let p2p = format!("/ip4/127.0.0.1/tcp/{}", common::closed_port());
    let start = || {
        let (p, rx) = spawn(&[
            "coordinator",
            "--p2p-listen",
            &p2p,
            "--http",
            "127.0.0.1:0",
            "--model",
            model,
            "--key-file",
            &key,
        ]);
        let boot = wait_line(&rx, "p2p listening on", Duration::from_secs(60));
        let http = wait_line(&rx, "http listening on", Duration::from_secs(60));
        (p, boot, http)
    };
    let (mut coord, boot, http_url) = start();
    let (_head, _) = node_with(model, "0..2", &boot, &[]);
    let (_tail, _) = node_with(model, "2..4", &boot, &[]);
    common::wait_status(&format!("{http_url}/health"), 200, Duration::from_secs(60));

    // A request in flight when the coordinator dies ends (the connection breaks), it does not hang.
    let streaming = long_stream_started(http_url.strip_prefix("http://").unwrap().to_string());
    coord.0.kill().unwrap();
    coord.0.wait().unwrap();
    let killed = Instant::now();
    let (resp, ended) = streaming.join().unwrap();
    let took = ended.saturating_duration_since(killed);
    assert!(!resp.contains("\"finish_reason\":\"length\""), "the stream finished before the kill; make it longer");
    assert!(took < Duration::from_secs(5), "the in-flight request took {took:?} to end");

    // Restarted with the same key and p2p address: the nodes' next re-publication (every 20 s) finds it.
    let t = Instant::now();
    let (_coord2, boot2, http2) = start();
    assert_eq!(boot2, boot, "same peer id and address");
    let rediscovered = common::wait_status(&format!("{http2}/health"), 200, Duration::from_secs(60));
    let chat = serde_json::json!({
        "model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hi"}],
    });
    let (status, body) = http(http2.strip_prefix("http://").unwrap(), "POST", "/v1/chat/completions", &chat);
    eprintln!(
        "coordinator killed mid-stream: the stream ended {took:?} after; restarted, routable again after \
         {rediscovered:?} ({:?} after the restart began); a new request: {status}",
        t.elapsed()
    );
    assert_eq!(status, 200, "{body}");
    let resp: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["usage"]["completion_tokens"], 4, "{body}");
}
