//! `shardline coordinator`: joins the DHT, discovers and registers nodes, and keeps the registry current. The HTTP
//! API (another issue) is served on top of the registry this returns.

use std::sync::Arc;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use shardline_proto::announcement::now_ms;
use shardline_proto::dht::{DhtClient, DhtConfig};
use shardline_proto::identity;
use tracing::info;

use crate::discovery::{Discovery, DiscoveryConfig};
use crate::registry::{NodeRegistry, RegistryConfig};

/// Everything `shardline coordinator` needs.
#[derive(Clone, Debug)]
pub struct CoordinatorArgs {
    pub p2p_listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub key_file: Option<std::path::PathBuf>,
    /// A private swarm's pre-shared key (`--swarm-key`): the DHT runs over TCP behind it, and no QUIC.
    pub swarm_key: Option<shardline_proto::dht::PreSharedKey>,
    /// How long to keep dialling unreachable bootstrap peers before failing (`DhtConfig::bootstrap_patience`).
    pub bootstrap_patience: Duration,
    /// Model ids to look for from the start (others are learned from provider records).
    pub models: Vec<String>,
    pub registry: RegistryConfig,
    pub discovery: DiscoveryConfig,
}

impl CoordinatorArgs {
    pub fn new(p2p_listen: Vec<Multiaddr>, bootstrap: Vec<Multiaddr>) -> Self {
        Self {
            p2p_listen,
            bootstrap,
            key_file: None,
            swarm_key: None,
            bootstrap_patience: Duration::ZERO,
            models: Vec::new(),
            registry: RegistryConfig::default(),
            discovery: DiscoveryConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Dht(#[from] shardline_proto::dht::DhtError),
    #[error(transparent)]
    Identity(#[from] shardline_proto::identity::IdentityError),
    #[error("{0}")]
    Signal(std::io::Error),
}

/// A running coordinator: DHT membership, discovery and the registry.
pub struct CoordinatorHandle {
    pub dht: DhtClient,
    pub registry: Arc<NodeRegistry>,
    pub discovery: Discovery,
    pub p2p_addrs: Vec<Multiaddr>,
}

impl CoordinatorHandle {
    /// A session runner for `model_id` over this coordinator's registry (what the HTTP API uses).
    pub fn client(&self, model_id: &str) -> Result<crate::client::SwarmClient, crate::client::ClientError> {
        self.discovery.watch(model_id);
        let config = crate::client::SwarmClientConfig::new(model_id, Vec::new());
        crate::client::SwarmClient::with_registry(self.dht.clone(), self.registry.clone(), config)
    }
}

/// Joins the DHT and starts discovery.
pub async fn start_coordinator(args: CoordinatorArgs) -> Result<CoordinatorHandle, CoordinatorError> {
    let keypair = match &args.key_file {
        Some(p) => identity::load_or_create(p)?,
        None => Keypair::generate_ed25519(),
    };
    let mut dht_config = DhtConfig::for_discovery(keypair, args.p2p_listen.clone(), args.bootstrap.clone());
    dht_config.allow_peers = args.registry.allow_peers.clone();
    dht_config.swarm_key = args.swarm_key;
    dht_config.bootstrap_patience = args.bootstrap_patience;
    let (dht, events) = DhtClient::start(dht_config).await?;
    let registry = NodeRegistry::new(args.registry.clone());
    let mut dcfg = args.discovery.clone();
    dcfg.models.extend(args.models.iter().cloned());
    let discovery = Discovery::spawn(dht.clone(), events, registry.clone(), dcfg);
    let p2p_addrs = dht.listen_addrs().await?;
    Ok(CoordinatorHandle { dht, registry, discovery, p2p_addrs })
}

/// Runs a coordinator until Ctrl-C, printing its listen addresses first and the registry whenever it changes.
pub async fn run_coordinator(args: CoordinatorArgs) -> Result<(), CoordinatorError> {
    let c = start_coordinator(args).await?;
    println!("peer id {}", c.dht.peer_id());
    for a in &c.p2p_addrs {
        println!("p2p listening on {a}");
    }
    let mut changes = c.registry.subscribe();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            r = &mut ctrl_c => { r.map_err(CoordinatorError::Signal)?; break; }
            _ = changes.changed() => {
                for model in c.registry.models() {
                    let nodes = c.registry.snapshot(&model);
                    let mut spans: Vec<String> =
                        nodes.iter().map(|(e, _)| format!("{}@{}", e.announcement.layers, e.announcement.peer_id)).collect();
                    spans.sort();
                    let model = c.registry.model_name(&model);
                    info!(%model, nodes = nodes.len(), layout = %spans.join(" "), "registry changed");
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(60)) => {
                info!(nodes = c.registry.len(), now_ms = now_ms(), "coordinator alive");
            }
        }
    }
    Ok(())
}
