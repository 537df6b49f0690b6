//! What the swarm tests share: loopback nodes that find each other through the DHT, and a client joining them.
#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use libp2p::Multiaddr;
use shardline_coordinator::SwarmClientConfig;
use shardline_kernels::Backend;
use shardline_kernels::cpu::CpuBackend;
use shardline_node::model::LayerRange;
use shardline_node::stage::{NodeArgs, NodeHandle, start_node};

/// Any free loopback TCP port, for libp2p.
pub fn any_loopback_tcp() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")
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
