//! What the swarm tests share: loopback nodes that find each other through the DHT, and a client joining them.
#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libp2p::Multiaddr;
use shardline_coordinator::api::{self, ApiConfig, ApiState};
use shardline_coordinator::{CoordinatorArgs, CoordinatorHandle, SwarmClientConfig, SwarmSession, start_coordinator};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, SamplingParams};
use shardline_node::generate::{LocalPipeline, Stepper};
use shardline_node::model::{LayerRange, ModelFiles, ModelId, Shard, ShardOptions};
use shardline_node::stage::{NodeArgs, NodeHandle, start_node};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};

/// Any free loopback TCP port, for libp2p.
pub fn any_loopback_tcp() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")
}

/// Prints the warnings of every node and client of the test process (failovers, bans and their reasons) on stdout,
/// so a failing swarm test shows why; `RUST_LOG` overrides the filter.
pub fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libp2p=error"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

pub fn cpu(threads: usize) -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(threads))
}

/// Starts one node per span of `model` on loopback, each with a CPU backend of `threads` threads, bootstrapping
/// from `boot` (or, when `boot` is empty, from the first node started); `tweak` adjusts each node's arguments.
/// Returns the nodes and the bootstrap addresses they used.
pub async fn start_nodes(
    model: &Path,
    spans: &[(usize, usize)],
    boot: &[Multiaddr],
    threads: usize,
    tweak: impl Fn(&mut NodeArgs),
) -> (Vec<NodeHandle>, Vec<Multiaddr>) {
    logs();
    let mut boot = boot.to_vec();
    let mut nodes = Vec::new();
    for &(a, b) in spans {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let mut args = NodeArgs::new(model.to_path_buf(), LayerRange::new(a, b), cpu(threads), listen);
        args.p2p_listen = vec![any_loopback_tcp()];
        args.bootstrap = boot.clone();
        tweak(&mut args);
        let node = start_node(args).await.expect("node starts");
        if boot.is_empty() {
            boot = node.p2p_addrs.clone();
        }
        nodes.push(node);
    }
    (nodes, boot)
}

/// A client configuration for `model_id` that listens on loopback and bootstraps from `boot`.
pub fn client_config(model_id: &str, boot: &[Multiaddr]) -> SwarmClientConfig {
    let mut cfg = SwarmClientConfig::new(model_id, boot.to_vec());
    cfg.p2p_listen = vec![any_loopback_tcp()];
    cfg
}

/// Writes a tiny random model of `spec` to `dir/tiny.gguf`; returns its path and model id.
pub fn tiny_model(dir: &Path, spec: &TinySpec) -> (PathBuf, String) {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(spec, &path).expect("tiny model written");
    let files = ModelFiles::open(&path).expect("tiny model opens");
    let id = ModelId::of_files(&files).expect("model id").to_hex();
    (path, id)
}

/// One node serving `layers` of `model` on loopback with a one-thread CPU backend and a short startup
/// measurement, bootstrapping from `bootstrap`; `tweak` adjusts its arguments.
pub async fn node_on(
    model: &Path,
    layers: LayerRange,
    bootstrap: &[Multiaddr],
    tweak: impl FnOnce(&mut NodeArgs),
) -> NodeHandle {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    logs();
    let mut args = NodeArgs::new(model.to_path_buf(), layers, cpu(1), listen);
    args.p2p_listen = vec![any_loopback_tcp()];
    args.bootstrap = bootstrap.to_vec();
    args.measure_tokens = 4;
    tweak(&mut args);
    start_node(args).await.expect("node starts")
}

/// The single-process pipeline over the first `n_layers` of `model`: the independent reference of the swarm tests.
pub fn local_pipeline(model: &Path, n_layers: usize) -> LocalPipeline {
    let files = ModelFiles::open(model).expect("model opens");
    let w = files.weights();
    let shard =
        Shard::load(w.as_ref(), LayerRange::new(0, n_layers), cpu(1), ShardOptions::default()).expect("shard loads");
    LocalPipeline::new(vec![Arc::new(shard)]).expect("pipeline")
}

/// `n` tokens of `pipeline` after `prompt`, one session alone: the prompt's sample, then one token per step.
pub fn solo_tokens(pipeline: &LocalPipeline, prompt: &[u32], n: usize, sampling: SamplingParams) -> Vec<u32> {
    let mut s = pipeline.open_session(prompt.len() + n + 1).expect("session");
    let mut out = vec![s.step_sync(prompt, &sampling, 0).expect("step").token];
    while out.len() < n {
        let t = *out.last().expect("a token");
        out.push(s.step_sync(&[t], &sampling, 0).expect("step").token);
    }
    out
}

/// Waits until every stage holds no session and all its KV cache is free, then asserts it.
pub async fn assert_stages_idle(nodes: &[&NodeHandle]) {
    for n in nodes {
        let s = n.server();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while (s.active_sessions() > 0 || s.shard().free_kv_tokens() != s.shard().kv_capacity_tokens())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(s.active_sessions(), 0, "stage {} still holds a session", n.layers);
        assert_eq!(s.shard().free_kv_tokens(), s.shard().kv_capacity_tokens(), "stage {} holds KV cache", n.layers);
    }
}

/// A coordinator serving the HTTP API on an ephemeral loopback port.
pub struct Api {
    pub coordinator: CoordinatorHandle,
    pub state: Arc<ApiState>,
    pub addr: SocketAddr,
    /// `http://` and the address.
    pub base: String,
}

/// A coordinator with the API on an ephemeral port, serving `model`; `max_waiting` sessions may queue per node.
pub async fn api(model: &Path, max_waiting: u32, config: ApiConfig) -> Api {
    let mut args = CoordinatorArgs::new(vec![any_loopback_tcp()], vec![]);
    args.discovery.query_interval = Duration::from_millis(300);
    args.registry.max_waiting = max_waiting;
    let coordinator = start_coordinator(args).await.expect("coordinator starts");
    let state = ApiState::open(&coordinator, &[model], config).expect("API state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(api::serve(listener, state.clone()));
    Api { coordinator, state, addr, base: format!("http://{addr}") }
}

/// Waits (at most 30 s) until the coordinator registered every one of `nodes`.
pub async fn wait_registered(c: &CoordinatorHandle, nodes: &[&NodeHandle]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| c.registry.contains(&n.peer_id)) {
        assert!(tokio::time::Instant::now() < deadline, "coordinator did not register every node");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs a JSON `body` to `base` + `path`.
pub async fn post(base: &str, path: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request sent")
}

/// Three nodes of `max_sessions` slots over layers 0..2, 2..4 and 4..6 of `model`, bootstrapping from `api`'s
/// coordinator, once it registered all three.
pub async fn three_stages_behind(api: &Api, model: &Path, max_sessions: usize) -> [NodeHandle; 3] {
    let boot = &api.coordinator.p2p_addrs;
    let (nodes, _) = three_stages(model, boot, |n| n.stage.max_sessions = max_sessions).await;
    wait_registered(&api.coordinator, &nodes.iter().collect::<Vec<_>>()).await;
    nodes
}

/// `n` tokens of `s` after `prompt`: the prompt's sample, then one token per step.
pub async fn session_tokens(s: &mut SwarmSession, prompt: &[u32], n: usize, sampling: SamplingParams) -> Vec<u32> {
    let mut out = vec![s.step(prompt, &sampling, 0).await.expect("step").token];
    while out.len() < n {
        let t = *out.last().expect("a token");
        out.push(s.step(&[t], &sampling, 0).await.expect("step").token);
    }
    out
}

/// Nodes over layers 0..2, 2..4 and 4..6 of `model` (as [`node_on`] makes them, adjusted by `tweak`), bootstrapping from `boot`
/// (or, when it is empty, the later two from the first); returns them and the addresses they bootstrapped from.
pub async fn three_stages(
    model: &Path,
    boot: &[Multiaddr],
    tweak: impl Fn(&mut NodeArgs),
) -> ([NodeHandle; 3], Vec<Multiaddr>) {
    let spans = [(0, 2), (2, 4), (4, 6)];
    let (nodes, boot) = start_nodes(model, &spans, boot, 1, |a| {
        a.measure_tokens = 4;
        tweak(a)
    })
    .await;
    (nodes.try_into().unwrap_or_else(|_| unreachable!("one node per span")), boot)
}
