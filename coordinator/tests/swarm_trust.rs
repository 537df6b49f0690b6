//! Trust from measurement against real node processes' code on loopback (docs/SECURITY.md, "Trust and routing"):
//! a node with tampered weights is caught on probation and never serves a user; a node that turns bad after
//! probation is caught by the sampled checks and the user's output stays that of honest nodes; a sybil announcing
//! absurd speed takes no session; a node over a tampered copy of the file announces another model.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{local_pipeline, session_tokens, solo_tokens};
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use shardline_coordinator::trust::Standing;
use shardline_coordinator::{SwarmClient, SwarmClientConfig};
use shardline_kernels::SamplingParams;
use shardline_node::model::LayerRange;
use shardline_node::stage::NodeHandle;
use shardline_node::test_models::TinySpec;
use shardline_proto::announcement::{ShardAnnouncement, now_ms};
use shardline_proto::wire::WireDType;

const N_LAYERS: usize = 4;
const PROMPT: [u32; 8] = [1, 40, 41, 42, 100, 200, 7, 9];

fn tiny_model(dir: &Path) -> (PathBuf, String) {
    common::tiny_model(dir, &TinySpec { n_layers: N_LAYERS, context: 256, ..TinySpec::default() })
}

/// Tokens of the single-process pipeline: the independent reference.
fn reference(model: &Path, prompt: &[u32], n: usize, sampling: SamplingParams) -> Vec<u32> {
    solo_tokens(&local_pipeline(model, N_LAYERS), prompt, n, sampling)
}

async fn node(model: &Path, bootstrap: &[Multiaddr]) -> NodeHandle {
    common::node_on(model, LayerRange::new(0, N_LAYERS), bootstrap, |_| {}).await
}

async fn client(model_id: &str, bootstrap: &[Multiaddr], audit: f64) -> SwarmClient {
    let mut cfg = SwarmClientConfig::new(model_id, bootstrap.to_vec());
    cfg.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.discovery.query_interval = Duration::from_millis(300);
    cfg.probe_interval = Duration::from_millis(200);
    cfg.registry.base_ban = Duration::from_secs(60);
    cfg.registry.probation = true;
    cfg.audit_fraction = audit;
    SwarmClient::join(cfg).await.unwrap()
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one greedy generation; returns the tokens and the peers of every route the session used.
async fn generate(c: &SwarmClient, n: usize, audit: Option<f64>) -> (Vec<u32>, Vec<libp2p::PeerId>, usize) {
    let g = SamplingParams::GREEDY;
    let mut s = c.session(PROMPT.len() + n + 1, g, 2);
    if let Some(f) = audit {
        s.set_audit(f);
    }
    let out = session_tokens(&mut s, &PROMPT, n, g).await;
    let peers = s.routes().iter().flatten().copied().collect();
    let audited = s.audited_steps();
    s.close().await;
    (out, peers, audited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_node_is_caught_on_probation_and_never_serves_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny_model(dir.path());
    let a = node(&model, &[]).await;
    let b = node(&model, &a.p2p_addrs).await;
    let t = node(&model, &a.p2p_addrs).await;
    // Same file, same announced id, but its stage computes garbage.
    t.server().tamper(true);
    let cl = client(&id, &a.p2p_addrs, 0.0).await;
    let reg = cl.registry().clone();
    wait_for("the tampered node rejected and the honest ones trusted", || {
        reg.health(&t.peer_id).standing == Standing::Rejected
            && reg.health(&a.peer_id).standing == Standing::Trusted
            && reg.health(&b.peer_id).standing == Standing::Trusted
    })
    .await;
    assert!(reg.health(&t.peer_id).banned_until.is_some());
    let expected = reference(&model, &PROMPT, 8, SamplingParams::GREEDY);
    for _ in 0..6 {
        let (out, peers, _) = generate(&cl, 8, None).await;
        assert_eq!(out, expected);
        assert!(!peers.contains(&t.peer_id));
    }
    assert_eq!(reg.get(&t.peer_id).unwrap().queue.admitted(), 0, "no user session was admitted on it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_turning_bad_after_probation_is_caught_by_sampled_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny_model(dir.path());
    let a = node(&model, &[]).await;
    let b = node(&model, &a.p2p_addrs).await;
    let c = node(&model, &a.p2p_addrs).await;
    let cl = client(&id, &a.p2p_addrs, 0.0).await;
    let reg = cl.registry().clone();
    wait_for("three trusted replicas", || {
        [&a, &b, &c].iter().all(|n| reg.health(&n.peer_id).standing == Standing::Trusted)
    })
    .await;
    let expected = reference(&model, &PROMPT, 8, SamplingParams::GREEDY);
    // Overhead of checking every step (tiny model: mostly the shadow route's round trips), interleaved runs.
    let (mut plain, mut checked) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let t0 = Instant::now();
        let (out, _, n) = generate(&cl, 8, None).await;
        plain.push(t0.elapsed());
        assert_eq!((out.as_slice(), n), (expected.as_slice(), 0));
        let t0 = Instant::now();
        let (out, _, n) = generate(&cl, 8, Some(1.0)).await;
        checked.push(t0.elapsed());
        assert_eq!((out.as_slice(), n), (expected.as_slice(), 8), "every step checked");
    }
    plain.sort();
    checked.sort();
    println!("8-token session, median of 4: unchecked {:?}, every step checked {:?}", plain[2], checked[2]);
    // C turns bad. Every session is checked on a shadow route drawn among the other replicas: the first session
    // whose main or shadow route is C catches it (about one in two here).
    c.server().tamper(true);
    let mut sessions = 0;
    while reg.health(&c.peer_id).standing != Standing::Rejected {
        sessions += 1;
        assert!(sessions <= 16, "the bad node was not caught in 16 checked sessions");
        let (out, _, _) = generate(&cl, 8, Some(1.0)).await;
        assert_eq!(out, expected, "the user gets the majority's tokens");
    }
    println!("caught after {sessions} checked session(s)");
    assert!(reg.health(&c.peer_id).banned_until.is_some());
    assert_eq!(reg.health(&a.peer_id).standing, Standing::Trusted);
    assert_eq!(reg.health(&b.peer_id).standing, Standing::Trusted);
    for _ in 0..3 {
        let (out, peers, _) = generate(&cl, 8, Some(1.0)).await;
        assert_eq!(out, expected);
        assert!(!peers.contains(&c.peer_id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sybil_announcing_absurd_speed_takes_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny_model(dir.path());
    let a = node(&model, &[]).await;
    let cl = client(&id, &a.p2p_addrs, 0.0).await;
    let reg = cl.registry().clone();
    wait_for("the honest node trusted", || reg.health(&a.peer_id).standing == Standing::Trusted).await;
    // A fresh key announces every layer at 1e30 tokens/s, its stage address a port nobody serves.
    let key = Keypair::generate_ed25519();
    let unused = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut sybil: ShardAnnouncement = reg.get(&a.peer_id).unwrap().announcement;
    let now = now_ms();
    sybil.peer_id = key.public().to_peer_id();
    sybil.quic_addr = unused;
    sybil.decode_tps = 1e30;
    sybil.prefill_tps = 1e30;
    sybil.wire_dtype = WireDType::F32;
    sybil.issued_at_ms = now;
    sybil.expires_at_ms = now + 60_000;
    reg.upsert(sybil.clone()).unwrap();
    let expected = reference(&model, &PROMPT, 6, SamplingParams::GREEDY);
    for _ in 0..5 {
        let (out, peers, _) = generate(&cl, 6, None).await;
        assert_eq!(out, expected);
        assert_eq!(peers, vec![a.peer_id], "every session on the honest node, none failed over");
    }
    assert_ne!(reg.health(&sybil.peer_id).standing, Standing::Trusted);
    assert_eq!(reg.get(&sybil.peer_id).unwrap().queue.admitted(), 0);
    // Without probation its announcement is a prior no better than the measured node.
    let cands = shardline_coordinator::routing::candidates_where(&reg, &id, |_| true);
    let honest = cands.iter().find(|c| c.peer == a.peer_id).unwrap().ms_per_layer.unwrap();
    let liar = cands.iter().find(|c| c.peer == sybil.peer_id).map(|c| c.ms_per_layer.unwrap());
    assert!(reg.health(&a.peer_id).ms_per_layer.is_some(), "the honest node was measured");
    if let Some(liar) = liar {
        assert!(liar >= honest, "sybil prior {liar} ms/layer, honest measured {honest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_a_tampered_file_announces_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny_model(dir.path());
    let copy = dir.path().join("tampered.gguf");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // the last bytes of a GGUF file are tensor data
    std::fs::write(&copy, bytes).unwrap();
    let a = node(&model, &[]).await;
    let t = node(&copy, &a.p2p_addrs).await;
    assert_eq!(a.model_id, id);
    assert_ne!(t.model_id, id);
    let cl = client(&id, &a.p2p_addrs, 0.0).await;
    let reg = cl.registry().clone();
    wait_for("the honest node trusted", || reg.health(&a.peer_id).standing == Standing::Trusted).await;
    let (out, peers, _) = generate(&cl, 6, None).await;
    assert_eq!(out, reference(&model, &PROMPT, 6, SamplingParams::GREEDY));
    assert_eq!(peers, vec![a.peer_id]);
    assert!(reg.snapshot(&id).iter().all(|(e, _)| e.announcement.peer_id != t.peer_id));
}
