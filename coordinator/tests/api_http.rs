//! The HTTP API under hostile clients (docs/SECURITY.md, "Clients and HTTP"): half-sent request heads are closed
//! after the header timeout, a body that never arrives is answered 408, large prompts are tokenised off the async
//! runtime (and refused by size first), and a streaming client that stops reading loses its session after the send
//! timeout, which frees every stage it held.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use serde_json::json;
use shardline_coordinator::api::ApiConfig;
use shardline_coordinator::{CoordinatorHandle, RegistryConfig};
use shardline_node::model::LayerRange;
use shardline_node::stage::NodeHandle;
use shardline_node::test_models::{TinySpec, model_for_tests};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn tiny_model(dir: &Path) -> PathBuf {
    common::tiny_model(dir, &TinySpec { n_layers: 4, context: 8192, ..TinySpec::default() }).0
}

async fn node(model: &Path, layers: LayerRange, bootstrap: &[Multiaddr]) -> NodeHandle {
    common::node_on(model, layers, bootstrap, |_| {}).await
}

async fn api(model: &Path, config: ApiConfig) -> (CoordinatorHandle, SocketAddr) {
    let api = common::api(model, RegistryConfig::default().max_waiting, config).await;
    (api.coordinator, api.addr)
}

/// Time for `GET /health` to answer (any status).
async fn health_latency(addr: SocketAddr) -> Duration {
    let t = Instant::now();
    let r = reqwest::get(format!("http://{addr}/health")).await.unwrap();
    let _ = r.text().await.unwrap();
    t.elapsed()
}

/// Reads until the server closes the connection; `Err` if it is still open after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, ()> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.map_err(|_| ())?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_half_sent_heads_are_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let config = ApiConfig { header_timeout: Duration::from_secs(2), ..ApiConfig::default() };
    let (_c, addr) = api(&model, config).await;
    let mut conns = Vec::new();
    for _ in 0..600 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl").await.unwrap();
        conns.push(s);
    }
    // The server still answers others while they hang.
    let t = health_latency(addr).await;
    assert!(t < Duration::from_secs(2), "/health took {t:?} with 600 half-sent heads open");
    let started = Instant::now();
    for s in &mut conns {
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        assert!(closed_within(s, left).await.is_ok(), "a half-sent head is still open after {:?}", started.elapsed());
    }
    eprintln!("600 half-sent heads closed {:?} after the last was sent", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_is_answered_408() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let config = ApiConfig { body_timeout: Duration::from_secs(1), ..ApiConfig::default() };
    let (_c, addr) = api(&model, config).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        .await
        .unwrap();
    // Trickle a byte now and then: the limit is for the whole body, not per read.
    let trickle = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if s.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let t = Instant::now();
    trickle.await;
    let answer = closed_within(&mut s, Duration::from_secs(5)).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?} after {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_large_prompts_do_not_stall_health() {
    // The real tokenizer (the tiny models' is too small to be slow); no weights are loaded and no node is needed.
    let Some(model) = model_for_tests("eight_large_prompts_do_not_stall_health") else { return };
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(1_700_000 / 45);
    assert!(prompt.len() > 1_650_000);
    for (limit, expect) in [(None, 400u16), (Some(4 << 20), 400)] {
        let config = ApiConfig { max_prompt_bytes: limit, ..ApiConfig::default() };
        let (_c, addr) = api(&model, config).await;
        let base = format!("http://{addr}");
        let idle = health_latency(addr).await;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let body = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": prompt, "max_tokens": 1}).to_string();
            let base = base.clone();
            tasks.push(tokio::spawn(async move {
                let r = reqwest::Client::new().post(format!("{base}/v1/completions")).body(body).send().await.unwrap();
                r.status().as_u16()
            }));
        }
        let mut worst = Duration::ZERO;
        while !tasks.iter().all(|t| t.is_finished()) {
            worst = worst.max(health_latency(addr).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in tasks {
            // Refused by size at once; or tokenised off the runtime, then refused as longer than the context.
            assert_eq!(t.await.unwrap(), expect, "limit {limit:?}");
        }
        eprintln!("limit {limit:?}: /health idle {idle:?}, worst while eight 1.7 MB prompts run {worst:?}");
        assert!(worst < Duration::from_millis(1000), "/health took {worst:?} while prompts were tokenised");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_client_that_stops_reading_loses_its_session_after_the_send_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let config = ApiConfig::default();
    let send_timeout = config.send_timeout.expect("a send timeout by default");
    let (c, addr) = api(&model, config).await;
    let boot = c.p2p_addrs.clone();
    let a = node(&model, LayerRange::new(0, 2), &boot).await;
    let b = node(&model, LayerRange::new(2, 4), &boot).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(c.registry.contains(&a.peer_id) && c.registry.contains(&b.peer_id)) {
        assert!(Instant::now() < deadline, "nodes not registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A client with a small receive window that reads the response head and then nothing. The whole answer would
    // be about 8 MB (8000 tokens with 20 alternatives each), far more than the socket buffers and the event channel
    // hold, so the generation cannot finish while nobody reads.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let body = json!({
        "model": "tiny", "prompt": "stall", "max_tokens": 8000, "ignore_eos": true, "stream": true,
        "logprobs": 20,
    })
    .to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let n = s.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let stalled = Instant::now();
    // Both stages free the session and the coordinator its slots, while the client still holds the connection.
    let limit = send_timeout + Duration::from_secs(45);
    let queues: Vec<_> = [a.peer_id, b.peer_id].iter().map(|p| c.registry.get(p).unwrap().queue).collect();
    loop {
        let held = a.server().active_sessions() + b.server().active_sessions();
        let in_flight: u32 = queues.iter().map(|q| q.depth().0).sum();
        if held == 0 && in_flight == 0 {
            break;
        }
        assert!(stalled.elapsed() < limit, "a stalled reader still holds {held} stage sessions after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let freed = stalled.elapsed();
    eprintln!("stalled reader's session freed {freed:?} after it stopped reading (send timeout {send_timeout:?})");
    // Freed by the send timeout, not by a generation that finished: the output cannot fit the buffers.
    assert!(freed + Duration::from_secs(1) >= send_timeout, "freed after {freed:?}: the generation was not stalled");
    for n in [&a, &b] {
        assert_eq!(n.server().shard().free_kv_tokens(), n.server().shard().kv_capacity_tokens());
    }
    drop(s);
}
