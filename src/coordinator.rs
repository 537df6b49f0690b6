//! `shardline coordinator`: join the DHT, discover and register nodes, plan routes, and with `--http` serve the
//! OpenAI-compatible API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use libp2p::Multiaddr;
use shardline_coordinator::api::{self, ApiConfig, ApiState};
use shardline_coordinator::{CoordinatorArgs, run_coordinator, start_coordinator};
use tracing::info;

use crate::generate::resolve_model;

#[derive(Debug, clap::Args)]
pub struct CoordinatorCmd {
    /// libp2p listen multiaddr, TCP or QUIC; repeatable.
    #[arg(long = "p2p-listen", default_value = "/ip4/0.0.0.0/tcp/0", value_parser = crate::args::multiaddr)]
    pub p2p_listen: Vec<Multiaddr>,
    /// A peer of the swarm to join, as a multiaddr (`/ip4/10.0.0.1/tcp/4000`, with or without `/p2p/<peer id>`);
    /// repeatable.
    #[arg(long, value_parser = crate::args::multiaddr)]
    pub bootstrap: Vec<Multiaddr>,
    /// ed25519 identity file (created on first start).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Private swarm: a file of the peer ids allowed in (one per line, `#` comments); connections from any other
    /// peer are dropped and no other node is registered.
    #[arg(long)]
    pub allow_peers: Option<PathBuf>,
    /// Private swarm: a libp2p pre-shared key file (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits); only peers
    /// holding the same key can connect to the DHT. TCP only (QUIC p2p addresses are refused).
    #[arg(long)]
    pub swarm_key: Option<PathBuf>,
    /// Let new nodes take user sessions before this coordinator's canary sessions checked their output against a
    /// trusted replica (docs/SECURITY.md, "Trust and routing"). Without it, an unchecked node never sees a prompt.
    #[arg(long)]
    pub no_probation: bool,
    /// Model id to look for from the start (others are learned from provider records); repeatable.
    #[arg(long = "model-id")]
    pub model_ids: Vec<String>,
    /// Serve the OpenAI-compatible HTTP API on this address, e.g. `127.0.0.1:8080`.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// With `--http`: model to serve, a GGUF file or a Hugging Face model directory (tokenizer, chat template and
    /// model id only; no weights are loaded); repeatable. Default: SmolLM2-135M-Instruct from the model cache.
    #[arg(long)]
    pub model: Vec<PathBuf>,
    /// With `--http`: seconds a streaming client may leave the next piece of text unread before its generation is
    /// stopped and its stages freed; 0 waits forever.
    #[arg(long, default_value_t = 15)]
    pub send_timeout_secs: u64,
    /// With `--http`: seconds a connection may take to send a request's headers before it is closed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_secs: u64,
    /// With `--http`: seconds a request's body may take to arrive before it is answered with 408.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_secs: u64,
    /// With `--http`: most HTTP connections served at once (more wait in the listen backlog).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

pub fn run(cmd: CoordinatorCmd) -> Result<()> {
    let mut args = CoordinatorArgs::new(cmd.p2p_listen, cmd.bootstrap);
    args.key_file = cmd.key_file;
    if let Some(p) = &cmd.allow_peers {
        args.registry.allow_peers = Some(shardline_proto::dht::read_allow_list(p)?);
    }
    args.swarm_key = cmd.swarm_key.as_deref().map(shardline_proto::dht::read_swarm_key).transpose()?;
    args.bootstrap_patience = shardline_proto::dht::SERVICE_BOOTSTRAP_PATIENCE;
    args.registry.probation = !cmd.no_probation;
    args.models = cmd.model_ids;
    let api_config = ApiConfig {
        send_timeout: (cmd.send_timeout_secs > 0).then(|| Duration::from_secs(cmd.send_timeout_secs)),
        header_timeout: Duration::from_secs(cmd.header_timeout_secs),
        body_timeout: Duration::from_secs(cmd.body_timeout_secs),
        max_connections: cmd.max_connections as usize,
        ..ApiConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let Some(http) = cmd.http else {
        return rt.block_on(run_coordinator(args)).context("running the coordinator");
    };
    let models = if cmd.model.is_empty() {
        vec![resolve_model(None)?]
    } else {
        cmd.model.into_iter().map(|m| resolve_model(Some(m))).collect::<Result<Vec<_>>>()?
    };
    rt.block_on(async move {
        let coordinator = start_coordinator(args).await.context("starting the coordinator")?;
        let state = ApiState::open(&coordinator, &models, api_config).context("opening the served models")?;
        let listener =
            tokio::net::TcpListener::bind(http).await.with_context(|| format!("binding the HTTP API to {http}"))?;
        println!("peer id {}", coordinator.dht.peer_id());
        for a in &coordinator.p2p_addrs {
            println!("p2p listening on {a}");
        }
        println!("http listening on http://{}", listener.local_addr()?);
        for m in &state.models {
            println!("serving model {} (id {})", m.name, m.model_id);
        }
        let registry = coordinator.registry.clone();
        tokio::spawn(async move {
            let mut changes = registry.subscribe();
            while changes.changed().await.is_ok() {
                for model in registry.models() {
                    let mut spans: Vec<String> = registry
                        .snapshot(&model)
                        .iter()
                        .map(|(e, _)| format!("{}@{}", e.announcement.layers, e.announcement.peer_id))
                        .collect();
                    spans.sort();
                    let model = registry.model_name(&model);
                    info!(%model, nodes = spans.len(), layout = %spans.join(" "), "registry changed");
                }
            }
        });
        tokio::select! {
            r = api::serve(listener, state) => r.context("serving the HTTP API"),
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
        }
    })
}
