//! Blame and capacity through the HTTP API, against real nodes on loopback (docs/SECURITY.md, "Blame and
//! failover"): a request's own fault is a 4xx that bans nobody; a full node (session slots or KV cache) gives 429
//! with `Retry-After` or a wait, never a ban; a stage that breaks the protocol is banned, and failover goes on past
//! any number of such stages while an untried route exists.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{api, assert_stages_idle, post, three_stages_behind, wait_registered};
use libp2p::{Multiaddr, PeerId};
use serde_json::{Value, json};
use shardline_coordinator::CoordinatorHandle;
use shardline_coordinator::api::ApiConfig;
use shardline_node::model::{LayerRange, ShardOptions};
use shardline_node::stage::NodeHandle;
use shardline_node::test_models::TinySpec;
use shardline_proto::announcement::{ShardAnnouncement, now_ms};
use shardline_proto::tls::StageIdentity;
use shardline_proto::wire::{Frame, Limits, TokenResult, read_frame, write_frame};

const N_LAYERS: usize = 6;
const CONTEXT: usize = 2048;

fn tiny_model(dir: &Path) -> PathBuf {
    common::tiny_model(dir, &TinySpec { n_layers: N_LAYERS, context: CONTEXT, ..TinySpec::default() }).0
}

/// A node of `max_sessions` slots and `kv` bytes of KV cache.
async fn node_with(
    model: &Path,
    layers: LayerRange,
    bootstrap: &[Multiaddr],
    max_sessions: usize,
    kv: usize,
) -> NodeHandle {
    common::node_on(model, layers, bootstrap, |a| {
        a.stage.max_sessions = max_sessions;
        a.shard = ShardOptions { kv_budget_bytes: kv, ..ShardOptions::default() };
    })
    .await
}

async fn node(model: &Path, layers: LayerRange, bootstrap: &[Multiaddr], max_sessions: usize) -> NodeHandle {
    node_with(model, layers, bootstrap, max_sessions, ShardOptions::default().kv_budget_bytes).await
}

fn assert_nobody_banned(c: &CoordinatorHandle, peers: &[PeerId]) {
    for p in peers {
        let h = c.registry.health(p);
        assert!(h.failures == 0 && h.banned_until.is_none(), "node {p} was blamed: {h:?}");
    }
}

/// Checks one finished request: 200 with a whole answer (a stream ends with `[DONE]` and carries no error event),
/// or 429 with `Retry-After`. Returns the status.
async fn ok_or_429(r: reqwest::Response, stream: bool) -> u16 {
    let status = r.status().as_u16();
    match status {
        200 => {
            let body = r.text().await.unwrap();
            if stream {
                assert!(body.trim_end().ends_with("data: [DONE]"), "stream cut short: {body}");
                assert!(!body.contains("\"error\""), "error event in a 200 stream: {body}");
            }
        }
        429 => assert!(r.headers().get("retry-after").is_some(), "429 without Retry-After"),
        other => panic!("status {other}: {}", r.text().await.unwrap_or_default()),
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_of_2_pow_64_minus_1_is_the_requests_fault_and_bans_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let api = api(&model, 16, ApiConfig::default()).await;
    let boot = api.coordinator.p2p_addrs.clone();
    let a = node(&model, LayerRange::new(0, 3), &boot, 4).await;
    let b = node(&model, LayerRange::new(3, 6), &boot, 4).await;
    wait_registered(&api.coordinator, &[&a, &b]).await;
    let base = api.base.as_str();
    let huge = u64::MAX;
    for (path, body) in [
        ("/v1/completions", json!({"model": "tiny", "prompt": "hello there", "max_tokens": huge})),
        ("/v1/completions", json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": huge - 1})),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "max_tokens": huge, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "max_completion_tokens": huge, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let r = post(base, path, &body.to_string()).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    }
    assert_nobody_banned(&api.coordinator, &[a.peer_id, b.peer_id]);
    // The model is still served.
    let ok = json!({"model": "tiny", "prompt": "hello there", "max_tokens": 4}).to_string();
    assert_eq!(post(base, "/v1/completions", &ok).await.status(), 200);
    assert_stages_idle(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_eight_streams_on_nodes_admitting_sixteen_end_200_or_429_and_ban_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let config = ApiConfig { admit_wait: Duration::from_secs(20), retry_after_secs: 1, ..ApiConfig::default() };
    let api = api(&model, 16, config).await;
    let [a, b, c] = three_stages_behind(&api, &model, 16).await;
    let nodes = [&a, &b, &c];
    let base = api.base.clone();
    let mut tasks = Vec::new();
    for i in 0..28u32 {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({
                "model": "tiny", "prompt": format!("request {i} says"), "max_tokens": 24, "stream": true,
                "ignore_eos": true, "temperature": 0.7, "seed": i,
            });
            ok_or_429(post(&base, "/v1/completions", &body.to_string()).await, true).await
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    eprintln!("28 streams on 16 slots: {ok} x 200, {} x 429", statuses.len() - ok);
    assert!(ok >= 16, "at least the admitted ones finish: {statuses:?}");
    assert_nobody_banned(&api.coordinator, &[a.peer_id, b.peer_id, c.peer_id]);
    assert_stages_idle(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_cache_filled_by_two_large_requests_gives_429_and_bans_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let config = ApiConfig { admit_wait: Duration::from_millis(300), retry_after_secs: 3, ..ApiConfig::default() };
    let api = api(&model, 16, config).await;
    let boot = api.coordinator.p2p_addrs.clone();
    // 3 layers x 2 (K, V) x 32 wide x 4 bytes = 768 bytes per position: 1.5 MiB holds 2048 positions, one large
    // request but not two.
    let kv = 3 * 2 * 32 * 4 * 2048;
    let a = node_with(&model, LayerRange::new(0, 3), &boot, 16, kv).await;
    let b = node_with(&model, LayerRange::new(3, 6), &boot, 16, kv).await;
    wait_registered(&api.coordinator, &[&a, &b]).await;
    let cap = a.server().shard().kv_capacity_tokens();
    assert!((1200..2400).contains(&cap), "KV capacity {cap} positions");
    let base = api.base.as_str();
    let large = |stream: bool| {
        json!({"model": "tiny", "prompt": "a long story", "max_tokens": 1200, "ignore_eos": true, "stream": stream})
            .to_string()
    };
    // The first holds its KV reservation while it streams.
    let mut first = post(base, "/v1/completions", &large(true)).await;
    assert_eq!(first.status(), 200);
    assert!(first.chunk().await.unwrap().is_some(), "the first stream started");
    let second = post(base, "/v1/completions", &large(false)).await;
    let status = second.status().as_u16();
    let retry = second.headers().get("retry-after").cloned();
    let text = second.text().await.unwrap();
    assert_eq!(status, 429, "{text}");
    assert_eq!(retry.unwrap(), "3");
    while first.chunk().await.unwrap().is_some() {}
    assert_nobody_banned(&api.coordinator, &[a.peer_id, b.peer_id]);
    // With the cache free again, the same request goes through.
    assert_eq!(post(base, "/v1/completions", &large(false)).await.status(), 200);
    assert_stages_idle(&[&a, &b]).await;
}

/// A stage that accepts sessions and answers every `Open` with a `Token` frame (a frame kind the protocol does not
/// allow there). Returns its address and certificate fingerprint.
async fn lying_stage() -> (SocketAddr, [u8; 32]) {
    let id = StageIdentity::generate().unwrap();
    let endpoint = quinn::Endpoint::server(id.server_config().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        if let Ok(Some(f)) = read_frame(&mut recv, &Limits::default()).await {
                            let result = TokenResult { token: 1, logprob: -0.1, top: vec![] };
                            let lie = Frame::Token { session: f.session(), position: 0, result };
                            let _ = write_frame(&mut send, &lie).await;
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    });
                }
            });
        }
    });
    (addr, id.fingerprint())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_stages_answering_open_wrongly_are_banned_and_the_request_still_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let api = api(&model, 16, ApiConfig::default()).await;
    let boot = api.coordinator.p2p_addrs.clone();
    let honest = node(&model, LayerRange::new(0, 6), &boot, 8).await;
    wait_registered(&api.coordinator, &[&honest]).await;
    let registry = &api.coordinator.registry;
    let real = registry.get(&honest.peer_id).unwrap().announcement;
    // Four liars claiming the whole model, each measured faster than the honest node by earlier sessions (nodes
    // that behaved, then turned), so the planner tries every one of them first.
    let (addr, fingerprint) = lying_stage().await;
    let mut liars = Vec::new();
    for _ in 0..4 {
        let peer = PeerId::random();
        let now = now_ms();
        let a = ShardAnnouncement {
            peer_id: peer,
            quic_addr: addr,
            cert_fingerprint: fingerprint,
            decode_tps: 1e9,
            prefill_tps: 1e9,
            issued_at_ms: now,
            expires_at_ms: now + 600_000,
            ..real.clone()
        };
        registry.upsert(a).unwrap();
        registry.record_layer_time(&peer, 0.01);
        liars.push(peer);
    }
    // The honest node was measured slow (a busy machine), so it comes last.
    registry.record_layer_time(&honest.peer_id, 50.0);
    let body = json!({"model": "tiny", "prompt": "hello there", "max_tokens": 6, "temperature": 0}).to_string();
    let r = post(&api.base, "/v1/completions", &body).await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    let blamed: Vec<&PeerId> = liars.iter().filter(|p| registry.health(p).failures > 0).collect();
    eprintln!("{} of 4 lying stages tried and banned before the honest route", blamed.len());
    for p in &liars {
        let h = registry.health(p);
        // A liar the planner never picked is not blamed; every one that was picked is.
        assert!(h.failures <= 1, "a liar is blamed once per lie: {h:?}");
    }
    assert_eq!(blamed.len(), 4, "the planner prefers the liars' measured speed, so all four are tried");
    assert_nobody_banned(&api.coordinator, &[honest.peer_id]);
    assert_stages_idle(&[&honest]).await;
}

/// A last stage whose logits are partly NaN (a broken forward, or a node made to produce them) refuses to draw a
/// token from the finite rest: it fails the session with `Compute`, the owner bans that stage, and the request is
/// answered by a replica with the same text as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_with_partly_nan_logits_is_banned_and_a_replica_answers() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let api = api(&model, 16, ApiConfig::default()).await;
    let boot = api.coordinator.p2p_addrs.clone();
    let bad = node(&model, LayerRange::new(0, 6), &boot, 8).await;
    let good = node(&model, LayerRange::new(0, 6), &boot, 8).await;
    wait_registered(&api.coordinator, &[&bad, &good]).await;
    let registry = &api.coordinator.registry;
    let body = json!({"model": "tiny", "prompt": "hello there", "max_tokens": 6, "temperature": 0}).to_string();
    let honest = post(&api.base, "/v1/completions", &body).await;
    assert_eq!(honest.status(), 200);
    let honest: Value = honest.json().await.unwrap();
    assert_nobody_banned(&api.coordinator, &[bad.peer_id, good.peer_id]);

    bad.server().poison_logits(true);
    // The poisoned node is measured fastest, so the planner tries it first.
    registry.record_layer_time(&bad.peer_id, 0.001);
    registry.record_layer_time(&good.peer_id, 50.0);
    let r = post(&api.base, "/v1/completions", &body).await;
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], honest["choices"][0]["text"], "the replica's text is the honest one");
    let h = registry.health(&bad.peer_id);
    assert!(h.failures == 1 && h.banned_until.is_some(), "the stage with NaN logits is blamed: {h:?}");
    assert_nobody_banned(&api.coordinator, &[good.peer_id]);
    assert_stages_idle(&[&bad, &good]).await;
}
