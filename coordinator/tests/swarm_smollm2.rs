//! Loopback swarm on the real default model: a coordinator and three nodes serving SmolLM2-135M layers `0..10`,
//! `10..20`, `20..30`, found through the DHT alone, generate greedily exactly the tokens and text of the
//! single-process engine (the path of `shardline generate`), through the same generation loop. The same holds on
//! the file people download most, the Q4_K_M quantisation (Q4_K and Q6_K super-blocks beside their fallback types),
//! made by `scripts/make-presets`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shardline_coordinator::{CoordinatorArgs, SwarmClient, start_coordinator};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, SamplingParams};
use shardline_node::engine::{Engine, TextStream, stop_tokens};
use shardline_node::generate::{self, GenerateParams};
use shardline_node::model::ShardOptions;
use shardline_node::test_models::{model_for_tests, preset_for_tests};

const PROMPTS: [&str; 3] = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 5."];

fn backend() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_smollm2_nodes_match_the_single_process_engine() {
    let Some(model) = model_for_tests("three_smollm2_nodes_match_the_single_process_engine") else { return };
    three_nodes_match_the_engine(model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_q4_k_m_file_match_the_single_process_engine() {
    let test = "three_nodes_on_a_q4_k_m_file_match_the_single_process_engine";
    let Some(model) = preset_for_tests(test, "Q4_K_M") else { return };
    three_nodes_match_the_engine(model).await;
}

/// Three nodes serving `0..10`, `10..20`, `20..30` of `model`, found through the DHT, give the engine's tokens and
/// text for every prompt, from a client that joined the swarm and from the coordinator.
async fn three_nodes_match_the_engine(model: PathBuf) {
    let m = model.clone();
    let engine = tokio::task::spawn_blocking(move || {
        Engine::load(&m, backend(), &[], ShardOptions::default(), &mut |_, _| {}).unwrap()
    })
    .await
    .unwrap();
    let engine = Arc::new(engine);
    let params = GenerateParams {
        max_tokens: 12,
        sampling: SamplingParams::GREEDY,
        stop_tokens: stop_tokens(engine.tokenizer()),
        ..GenerateParams::default()
    };

    let coordinator = start_coordinator(CoordinatorArgs::new(vec![common::any_loopback_tcp()], vec![])).await.unwrap();
    let boot = coordinator.p2p_addrs.clone();
    let (nodes, _) =
        common::start_nodes(&model, &[(0, 10), (10, 20), (20, 30)], &boot, 2, |a| a.measure_tokens = 4).await;
    let model_id = nodes[0].model_id.clone();
    // The coordinator registers all three from the DHT alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| coordinator.registry.contains(&n.peer_id)) {
        assert!(tokio::time::Instant::now() < deadline, "coordinator did not register every node");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two owners: a client that joins the swarm on its own, and the coordinator running sessions over its registry.
    let mut cfg = common::client_config(&model_id, &boot);
    cfg.prefill_chunk = 16;
    let joined = SwarmClient::join(cfg).await.unwrap();
    let on_coordinator = coordinator.client(&model_id).unwrap();
    for client in [&joined, &on_coordinator] {
        let route = client.wait_for_coverage(Duration::from_secs(30)).await.unwrap();
        assert_eq!(route.peers(), nodes.iter().map(|n| n.peer_id).collect::<Vec<_>>());
    }

    for (k, prompt) in PROMPTS.iter().enumerate() {
        let client = if k % 2 == 0 { &joined } else { &on_coordinator };
        let tokens = engine.prompt_tokens(prompt, true).unwrap();
        let (e, p, t) = (engine.clone(), params.clone(), tokens.clone());
        let local = tokio::task::spawn_blocking(move || e.generate(&t, &p, &mut |_| true).unwrap()).await.unwrap();
        let mut session = client.session(tokens.len() + params.max_tokens, params.sampling, 0);
        let mut decoder = TextStream::new(engine.tokenizer().clone());
        let swarm =
            generate::generate(&mut session, &tokens, &params, &mut decoder, &mut |_: &str| true).await.unwrap();
        session.close().await;
        assert_eq!(swarm.tokens, local.tokens, "prompt {prompt:?}");
        assert_eq!(swarm.text, local.text, "prompt {prompt:?}");
        assert_eq!(swarm.finish, local.finish);
    }
}
