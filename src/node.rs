//! `shardline node`: serve a layer range of a model over QUIC and announce it in the DHT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use libp2p::Multiaddr;
use shardline_node::model::{LayerRange, ShardOptions};
use shardline_node::stage::node::{NodeArgs, run_node};

use crate::generate::{resolve_model, select_backend};

#[derive(Debug, clap::Args)]
pub struct NodeCmd {
    /// GGUF file or Hugging Face model directory (default: SmolLM2-135M-Instruct from the model cache).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Layers to serve, `A..B` (end exclusive).
    #[arg(long)]
    pub layers: LayerRange,
    /// Compute device: `cpu`, `cuda` (alias `gpu`) or `cuda:N` (default: CUDA when a usable GPU is found, else CPU).
    #[arg(long, value_parser = crate::args::device)]
    pub device: Option<String>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// QUIC address of the stage server (activations).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// Address announced to clients (default: the listen address, loopback in place of 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// libp2p listen multiaddr, TCP (`/ip4/0.0.0.0/tcp/P`) or QUIC (`/ip4/0.0.0.0/udp/P/quic-v1`); repeatable.
    #[arg(long = "p2p-listen", default_value = "/ip4/0.0.0.0/tcp/0", value_parser = crate::args::multiaddr)]
    pub p2p_listen: Vec<Multiaddr>,
    /// A peer of the swarm to join, as a multiaddr (`/ip4/10.0.0.1/tcp/4000`, the coordinator's `p2p listening on`
    /// line, with or without `/p2p/<peer id>`); repeatable.
    #[arg(long, value_parser = crate::args::multiaddr)]
    pub bootstrap: Vec<Multiaddr>,
    /// ed25519 identity file: created on first start, reused after, so the peer id survives restarts.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Private swarm: a file of the peer ids allowed in (one per line, `#` comments); connections from any other
    /// peer are dropped.
    #[arg(long)]
    pub allow_peers: Option<PathBuf>,
    /// Private swarm: a libp2p pre-shared key file (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits); only peers
    /// holding the same key can connect to the DHT. TCP only (QUIC p2p addresses are refused).
    #[arg(long)]
    pub swarm_key: Option<PathBuf>,
    /// KV-cache memory for all sessions of this node, in MiB.
    #[arg(long, default_value_t = 256)]
    pub kv_cache_mib: usize,
    /// On SIGTERM or Ctrl-C: seconds running sessions may go on (new ones are refused) before the rest are ended
    /// with an error frame that makes their owners fail over.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
}

pub fn run(cmd: NodeCmd) -> Result<()> {
    let model = resolve_model(cmd.model)?;
    let backend = select_backend(cmd.device.as_deref(), cmd.threads)?;
    let mut args = NodeArgs::new(model, cmd.layers, backend, cmd.listen);
    args.advertise = cmd.advertise;
    args.p2p_listen = cmd.p2p_listen;
    args.bootstrap = cmd.bootstrap;
    args.bootstrap_patience = shardline_proto::dht::SERVICE_BOOTSTRAP_PATIENCE;
    args.key_file = cmd.key_file;
    args.drain_timeout = std::time::Duration::try_from_secs_f64(cmd.drain_timeout)
        .map_err(|e| anyhow::anyhow!("--drain-timeout {}: {e}", cmd.drain_timeout))?;
    if let Some(p) = &cmd.allow_peers {
        args.allow_peers = Some(shardline_proto::dht::read_allow_list(p)?);
    }
    args.swarm_key = cmd.swarm_key.as_deref().map(shardline_proto::dht::read_swarm_key).transpose()?;
    args.shard = ShardOptions { kv_budget_bytes: cmd.kv_cache_mib << 20, ..ShardOptions::default() };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(run_node(args)).context("running the node")
}
