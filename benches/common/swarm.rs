//! A loopback swarm for the benches that time whole pipelines: nodes over equal spans, found through the DHT.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shardline_coordinator::{Route, SwarmClient, SwarmClientConfig};
use shardline_kernels::cpu::CpuBackend;
use shardline_node::model::LayerRange;
use shardline_node::stage::{NodeArgs, NodeHandle, start_node};

/// `k` nodes serving `model` (`n_layers` blocks) in equal spans on loopback, each on a CPU backend of `threads`
/// threads, and a fresh client that found every layer through the DHT. With `sessions`, each node has that many
/// session slots, all of which the one client may hold, and the client queues that many sessions per node. The
/// nodes stop when dropped.
pub async fn loopback_swarm(
    model: &Path,
    n_layers: usize,
    k: usize,
    threads: usize,
    sessions: Option<usize>,
) -> (Vec<NodeHandle>, SwarmClient, Route) {
    loopback_swarm_with(model, LayerRange::split_evenly(n_layers, k), threads, sessions, |_| {}).await
}

/// [`loopback_swarm`] over the given spans (contiguous, covering the model), each node's stage config adjusted by
/// `tune` after the defaults.
#[allow(dead_code)] // not every bench that includes this module tunes its stages
pub async fn loopback_swarm_with(
    model: &Path,
    spans: Vec<LayerRange>,
    threads: usize,
    sessions: Option<usize>,
    tune: impl Fn(&mut shardline_node::stage::StageConfig),
) -> (Vec<NodeHandle>, SwarmClient, Route) {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut boot = Vec::new();
    for span in spans {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut args = NodeArgs::new(model.to_path_buf(), span, Arc::new(CpuBackend::new(threads)), listen);
        args.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
        args.bootstrap = boot.clone();
        if let Some(s) = sessions {
            args.stage.max_sessions = s;
            // One owner drives every session here: let it hold all the slots (a stage keeps a quarter of them
            // from any single peer by default, docs/SECURITY.md, *Stage*).
            args.stage.max_sessions_per_peer = Some(s);
        }
        tune(&mut args.stage);
        let n = start_node(args).await.expect("start node");
        if boot.is_empty() {
            boot = n.p2p_addrs.clone();
        }
        nodes.push(n);
    }
    let mut cfg = SwarmClientConfig::new(nodes[0].model_id.clone(), boot);
    cfg.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    if let Some(s) = sessions {
        cfg.registry.max_waiting = u32::try_from(s).expect("sessions fit u32");
    }
    let client = SwarmClient::join(cfg).await.expect("join");
    let route = client.wait_for_coverage(Duration::from_secs(60)).await.expect("coverage");
    (nodes, client, route)
}
