//! Many users at once: 16 greedy streams run concurrently through a 3-stage swarm on loopback (QUIC stage servers,
//! one `SwarmClient` sharing its connections between the sessions). Every stream gets exactly the tokens it gets
//! alone in the single-process pipeline, while the stages really batch sessions together (their scheduler reports
//! batches of several sessions), so a session's output does not depend on who it was batched with.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{assert_stages_idle, local_pipeline, session_tokens, solo_tokens};
use shardline_coordinator::{SwarmClient, SwarmClientConfig};
use shardline_kernels::{DType, SamplingParams};
use shardline_node::test_models::{TinyDTypes, TinySpec};

const N_LAYERS: usize = 6;
const STREAMS: usize = 16;
const NEW_TOKENS: usize = 12;

fn tiny_model(dir: &Path) -> (PathBuf, String) {
    // Quantised like the default model, so the batched matmuls take the tiled multi-row kernels.
    let dtypes = TinyDTypes::like_llama_cpp(DType::Q4_1);
    common::tiny_model(dir, &TinySpec { n_layers: N_LAYERS, context: 512, dtypes, ..TinySpec::default() })
}

/// A distinct prompt per stream, of lengths 4..=19.
fn prompt(i: usize) -> Vec<u32> {
    (0..4 + i).map(|j| ((i * 37 + j * 11 + 3) % 280) as u32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_through_three_stages_each_get_their_solo_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (model, id) = tiny_model(dir.path());
    let ([a, b, c], boot) = common::three_stages(&model, &[], |n| n.stage.max_sessions = STREAMS).await;
    let mut cfg = SwarmClientConfig::new(&id, boot.clone());
    cfg.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.prefill_chunk = 5;
    cfg.discovery.query_interval = Duration::from_millis(300);
    let client = SwarmClient::join(cfg).await.unwrap();
    let route = client.wait_for_coverage(Duration::from_secs(20)).await.unwrap();
    assert_eq!(route.peers(), vec![a.peer_id, b.peer_id, c.peer_id]);

    let pipeline = local_pipeline(&model, N_LAYERS);
    let want: Vec<Vec<u32>> =
        (0..STREAMS).map(|i| solo_tokens(&pipeline, &prompt(i), NEW_TOKENS, SamplingParams::GREEDY)).collect();

    let g = SamplingParams::GREEDY;
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let p = prompt(i);
                let mut s = client.session(p.len() + NEW_TOKENS + 1, g, 0);
                let out = session_tokens(&mut s, &p, NEW_TOKENS, g).await;
                s.close().await;
                out
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), want[i], "stream {i} differs from its solo run");
    }
    for n in [&a, &b, &c] {
        let stats = n.server().batch_stats();
        assert!(stats.peak_sessions > 1, "stage {} never batched two sessions: {stats:?}", n.layers);
        eprintln!("stage {}: {stats:?}", n.layers);
    }
    // Every session was closed: every stage freed its KV cache.
    assert_stages_idle(&[&a, &b, &c]).await;
}
