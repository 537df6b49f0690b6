//! A node process killed with SIGKILL in the middle of a generation (no QUIC close, no DHT goodbye): the session
//! notices, bans it, re-prefills on the replica and finishes with exactly the tokens of an undisturbed run, and the
//! failover costs seconds, not the QUIC idle timeout.

mod common;

use std::time::{Duration, Instant};

use common::{coordinator, node};
use libp2p::{Multiaddr, PeerId};
use shardline_coordinator::{SwarmClient, SwarmClientConfig};
use shardline_kernels::SamplingParams;
use shardline_node::generate::Stepper;
use shardline_node::model::{ModelFiles, ModelId};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};

/// A node on loopback with its peer id parsed.
fn tail(model: &str, bootstrap: &str) -> (common::Proc, PeerId) {
    let (p, id) = node(model, "2..4", "/ip4/127.0.0.1/tcp/0", bootstrap);
    (p, id.parse().expect("peer id"))
}

async fn steps(
    s: &mut shardline_coordinator::SwarmSession,
    sampling: &SamplingParams,
    out: &mut Vec<u32>,
    until: usize,
) {
    while out.len() < until {
        let t = *out.last().unwrap();
        out.push(s.step(&[t], sampling, 0).await.expect("step").token);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_process_fails_over_quickly_with_identical_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 4, context: 512, ..TinySpec::default() }, &model).unwrap();
    let model_id = ModelId::of_files(&ModelFiles::open(&model).unwrap()).unwrap().to_hex();

    let model = model.to_str().unwrap();
    let (_coordinator, boot) = coordinator();
    let _head = node(model, "0..2", "/ip4/127.0.0.1/tcp/0", &boot);
    let (tail1, id1) = tail(model, &boot);
    let (tail2, id2) = tail(model, &boot);

    let mut cfg = SwarmClientConfig::new(&model_id, vec![boot.parse::<Multiaddr>().unwrap()]);
    cfg.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.discovery.query_interval = Duration::from_millis(300);
    let client = SwarmClient::join(cfg).await.unwrap();
    let reg = client.registry().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(reg.contains(&id1) && reg.contains(&id2)) {
        assert!(Instant::now() < deadline, "both tails registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let prompt = [1u32, 40, 41, 42, 100, 200, 7, 9];
    let sampling = SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 5 };
    // The undisturbed run, through the same swarm.
    let mut s = client.session(prompt.len() + 17, sampling, 0);
    let mut expected = vec![s.step(&prompt, &sampling, 0).await.unwrap().token];
    steps(&mut s, &sampling, &mut expected, 16).await;
    s.close().await;

    let mut s = client.session(prompt.len() + 17, sampling, 0);
    let mut out = vec![s.step(&prompt, &sampling, 0).await.unwrap().token];
    steps(&mut s, &sampling, &mut out, 6).await;
    let used = s.routes()[0][1];
    let (mut victim, survivor) = if used == id1 { (tail1, id2) } else { (tail2, id1) };
    victim.0.kill().expect("SIGKILL the tail in use");
    victim.0.wait().unwrap();
    let t0 = Instant::now();
    steps(&mut s, &sampling, &mut out, 7).await;
    let failover = t0.elapsed();
    steps(&mut s, &sampling, &mut out, 16).await;

    assert_eq!(out, expected, "the text after failover differs from the undisturbed run");
    assert_eq!(s.failovers(), 1);
    assert_eq!(s.routes().last().unwrap()[1], survivor);
    assert!(reg.health(&used).banned_until.is_some(), "the dead node is banned");
    eprintln!("failover after SIGKILL took {failover:?}");
    assert!(failover < Duration::from_secs(15), "failover after SIGKILL took {failover:?}");
}
