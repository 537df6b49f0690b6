//! `shardline coordinator`: join the DHT, discover and register nodes, plan routes.

use std::path::PathBuf;

use anyhow::{Context, Result};
use libp2p::Multiaddr;
use shardline_coordinator::{CoordinatorArgs, run_coordinator};

#[derive(Debug, clap::Args)]
pub struct CoordinatorCmd {
    /// libp2p listen multiaddr, TCP or QUIC; repeatable.
    #[arg(long = "p2p-listen", default_value = "/ip4/0.0.0.0/tcp/0")]
    pub p2p_listen: Vec<Multiaddr>,
    /// A peer of the swarm to join, with or without `/p2p/<peer id>`; repeatable.
    #[arg(long)]
    pub bootstrap: Vec<Multiaddr>,
    /// ed25519 identity file (created on first start).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Model id to look for from the start (others are learned from provider records); repeatable.
    #[arg(long = "model-id")]
    pub model_ids: Vec<String>,
}

pub fn run(cmd: CoordinatorCmd) -> Result<()> {
    let mut args = CoordinatorArgs::new(cmd.p2p_listen, cmd.bootstrap);
    args.key_file = cmd.key_file;
    args.models = cmd.model_ids;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(run_coordinator(args)).context("running the coordinator")
}
