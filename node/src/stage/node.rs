//! A whole node: one shard behind a stage server, announced in the DHT. `shardline node` is a thin layer over
//! [`run_node`]; tests use [`start_node`] to run several nodes in one process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use libp2p::{Multiaddr, PeerId};
use shardline_kernels::{Backend, DType};
use tracing::info;

use super::core::StageConfig;
use super::server::{StageError, StageServer};
use crate::announcer::{self, Announcer, AnnouncerConfig};
use crate::error::ModelError;
use crate::model::{LayerRange, ModelFiles, ModelId, Shard, ShardInput, ShardOptions, ShardOutput};
use crate::wire_convert::wire_dtype_of;
use shardline_proto::announcement::ShardAnnouncement;
use shardline_proto::dht::{DhtClient, DhtConfig, DhtError};
use shardline_proto::identity::{self, IdentityError};
use shardline_proto::wire::{Fingerprint, WireDType};

/// Everything `shardline node` needs.
pub struct NodeArgs {
    /// GGUF file or Hugging Face directory.
    pub model: PathBuf,
    pub layers: LayerRange,
    /// Compute device (the CLI builds it from `--device`).
    pub backend: Arc<dyn Backend>,
    /// QUIC address of the stage server (activations).
    pub listen: SocketAddr,
    /// Address announced to clients; defaults to `listen`, with 127.0.0.1 in place of an unspecified IP.
    pub advertise: Option<SocketAddr>,
    pub p2p_listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// How long to keep dialling unreachable bootstrap peers before failing (`DhtConfig::bootstrap_patience`).
    pub bootstrap_patience: std::time::Duration,
    /// ed25519 identity file; a fresh identity each start when `None`.
    pub key_file: Option<PathBuf>,
    /// A private swarm's membership list (`--allow-peers`): the DHT drops connections from other peers.
    pub allow_peers: Option<shardline_proto::dht::AllowList>,
    /// A private swarm's pre-shared key (`--swarm-key`): the DHT runs over TCP behind it, and no QUIC.
    pub swarm_key: Option<shardline_proto::dht::PreSharedKey>,
    pub shard: ShardOptions,
    pub stage: StageConfig,
    /// Hidden-state dtype on the wire; defaults to the backend's activation dtype (f32 on the CPU, so a split run is
    /// bit-identical to a whole one).
    pub wire_dtype: Option<WireDType>,
    pub announce: AnnouncerConfig,
    /// On SIGTERM or Ctrl-C: how long running sessions may go on before they are cut off (docs/RELIABILITY.md,
    /// "Drain").
    pub drain_timeout: std::time::Duration,
    /// Positions of the start-up throughput measurement (prefill chunk size; decode uses a quarter of it).
    pub measure_tokens: usize,
}

impl NodeArgs {
    /// Defaults for everything but the model, layers, device and addresses.
    pub fn new(model: PathBuf, layers: LayerRange, backend: Arc<dyn Backend>, listen: SocketAddr) -> Self {
        Self {
            model,
            layers,
            backend,
            listen,
            advertise: None,
            p2p_listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("static multiaddr")],
            bootstrap: Vec::new(),
            bootstrap_patience: std::time::Duration::ZERO,
            key_file: None,
            allow_peers: None,
            swarm_key: None,
            shard: ShardOptions::default(),
            stage: StageConfig::default(),
            wire_dtype: None,
            announce: AnnouncerConfig::default(),
            measure_tokens: 32,
            drain_timeout: std::time::Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Dht(#[from] DhtError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Task(String),
}

/// A running node. Dropping it stops announcing, closes the stage server and leaves the DHT.
pub struct NodeHandle {
    pub peer_id: PeerId,
    /// Full p2p listen multiaddrs, `/p2p/<peer id>` included.
    pub p2p_addrs: Vec<Multiaddr>,
    pub quic_addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub model_id: String,
    pub layers: LayerRange,
    /// Measured tokens per second through the whole shard.
    pub decode_tps: f32,
    pub prefill_tps: f32,
    server: StageServer,
    dht: DhtClient,
    announcer: Option<Announcer>,
    /// What the node announces (times and load filled in at each publication), and the key it signs with: what a
    /// withdrawal is made of.
    template: ShardAnnouncement,
    keypair: libp2p::identity::Keypair,
    /// The model's human name, for logs.
    pub model_name: String,
}

impl NodeHandle {
    pub fn server(&self) -> &StageServer {
        &self.server
    }

    pub fn dht(&self) -> &DhtClient {
        &self.dht
    }

    /// Stops re-publishing the announcement (the node expires from the swarm within one TTL) but keeps serving.
    pub fn stop_announcing(&mut self) {
        self.announcer.take();
    }

    /// Leaves the swarm on purpose: stops announcing and publishes a withdrawal, so registries drop the node at
    /// once rather than when its record expires (waits at most `limit` for the DHT to take it).
    pub async fn withdraw(&mut self, limit: std::time::Duration) -> Result<(), NodeError> {
        self.announcer.take();
        match tokio::time::timeout(limit, announcer::withdraw(&self.dht, &self.keypair, self.template.clone())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NodeError::Task(format!("publishing the withdrawal: {e}"))),
            Err(_) => Err(NodeError::Task(format!("publishing the withdrawal took over {} ms", limit.as_millis()))),
        }
    }
}

/// Measures prefill and decode tokens/s of the whole shard on a scratch session.
fn measure(shard: &Shard, tokens: usize) -> Result<(f32, f32), ModelError> {
    let prefill = tokens.max(2);
    let decode = (prefill / 4).max(1);
    let mut s = shard.open_session(prefill + decode)?;
    let c = shard.config();
    let b = shard.backend();
    let mut feed = |n: usize| -> Result<(), ModelError> {
        let out = if shard.layers().start == 0 {
            let ids: Vec<u32> = (0..n as u32).map(|i| i % c.vocab as u32).collect();
            shard.forward(&mut s, ShardInput::Tokens(&ids))?
        } else {
            let x = b.upload_f32(&[n, c.hidden], &vec![0.01; n * c.hidden])?;
            shard.forward(&mut s, ShardInput::Hidden(&x))?
        };
        let (ShardOutput::Hidden(t) | ShardOutput::Logits(t)) = out;
        b.download_raw(&t, DType::F32)?;
        Ok(())
    };
    let t = Instant::now();
    feed(prefill)?;
    let prefill_tps = prefill as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let t = Instant::now();
    for _ in 0..decode {
        feed(1)?;
    }
    let decode_tps = decode as f64 / t.elapsed().as_secs_f64().max(1e-9);
    Ok((decode_tps as f32, prefill_tps as f32))
}

/// Loads the shard, measures it, starts the stage server, joins the DHT and starts announcing.
pub async fn start_node(args: NodeArgs) -> Result<NodeHandle, NodeError> {
    let keypair = match &args.key_file {
        Some(p) => identity::load_or_create(p)?,
        None => libp2p::identity::Keypair::generate_ed25519(),
    };
    let peer_id = keypair.public().to_peer_id();
    let (model, layers, backend, shard_opts, measure_tokens) =
        (args.model.clone(), args.layers, args.backend.clone(), args.shard.clone(), args.measure_tokens);
    let (shard, model_id, decode_tps, prefill_tps) = tokio::task::spawn_blocking(move || {
        let files = ModelFiles::open(&model)?;
        let weights = files.weights();
        let model_id = ModelId::of_files(&files)?.to_hex();
        let shard = Shard::load(weights.as_ref(), layers, backend, shard_opts)?;
        let (d, p) = measure(&shard, measure_tokens)?;
        Ok::<_, ModelError>((Arc::new(shard), model_id, d, p))
    })
    .await
    .map_err(|e| NodeError::Task(e.to_string()))??;
    let wire = args.wire_dtype.unwrap_or_else(|| wire_dtype_of(shard.backend().act_dtype()));
    let server = StageServer::start(shard.clone(), model_id.clone(), args.listen, args.stage.clone())?;
    let quic_addr = args.advertise.unwrap_or_else(|| {
        let a = server.local_addr();
        if a.ip().is_unspecified() { SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), a.port()) } else { a }
    });
    let mut dht_config = DhtConfig::new(keypair.clone(), args.p2p_listen.clone(), args.bootstrap.clone());
    dht_config.bootstrap_patience = args.bootstrap_patience;
    dht_config.allow_peers = args.allow_peers.clone();
    dht_config.swarm_key = args.swarm_key;
    let (dht, _events) = DhtClient::start(dht_config).await?;
    let p2p_addrs = dht.listen_addrs().await?;
    let c = shard.config().clone();
    let probe = server.probe();
    // What one owner can hold here: its per-peer quota (docs/SECURITY.md, *Stage*), at most the slots.
    let max_sessions = args.stage.sessions_per_peer() as u32;
    let template = ShardAnnouncement {
        peer_id,
        model_id: model_id.clone(),
        n_layers: c.n_layers as u32,
        hidden: c.hidden as u32,
        layers,
        has_embeddings: shard.has_embeddings(),
        has_head: shard.has_head(),
        quic_addr,
        cert_fingerprint: server.fingerprint(),
        wire_dtype: wire,
        max_sessions,
        free_kv_tokens: 0,
        decode_tps,
        prefill_tps,
        active_sessions: 0,
        batch_sessions: 0,
        queued: 0,
        software_version: env!("CARGO_PKG_VERSION").to_string(),
        issued_at_ms: 0,
        expires_at_ms: 0,
    };
    let announced = template.clone();
    let announcer = Announcer::spawn(dht.clone(), keypair.clone(), args.announce, move || {
        let mut a = template.clone();
        a.active_sessions = probe.active_sessions() as u32;
        a.free_kv_tokens = probe.free_kv_tokens() as u64;
        let batch = probe.batch_stats();
        a.batch_sessions = batch.batch_sessions as u32;
        a.queued = (batch.queued_chunks + batch.waiting_opens) as u32;
        a
    });
    let model_name = crate::model::display_name(&args.model);
    info!(%peer_id, model = %model_name, %layers, quic = %quic_addr, decode_tps, prefill_tps, "node started");
    Ok(NodeHandle {
        peer_id,
        p2p_addrs,
        quic_addr,
        fingerprint: server.fingerprint(),
        model_id,
        layers,
        decode_tps,
        prefill_tps,
        server,
        dht,
        announcer: Some(announcer),
        template: announced,
        keypair,
        model_name,
    })
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what `kill` and service managers send).
async fn stop_signal() -> Result<&'static str, NodeError> {
    let task = |e: std::io::Error| NodeError::Task(format!("waiting for a stop signal: {e}"));
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(task)?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map(|_| "SIGINT").map_err(task),
            _ = term.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map(|_| "Ctrl-C").map_err(task)
    }
}

/// Runs a node until Ctrl-C: prints its peer id and full listen multiaddrs (to pass to `--bootstrap`) first.
pub async fn run_node(args: NodeArgs) -> Result<(), NodeError> {
    let drain_timeout = args.drain_timeout;
    let node = start_node(args).await?;
    println!("peer id {}", node.peer_id);
    for a in &node.p2p_addrs {
        println!("p2p listening on {a}");
    }
    println!(
        "serving layers {} of model {} (id {}) on quic {} (certificate sha256 {})",
        node.layers,
        node.model_name,
        node.model_id,
        node.quic_addr,
        hex::encode(node.fingerprint)
    );
    let mut node = node;
    let signal = stop_signal().await?;
    info!(signal, "stopping: withdrawing from the swarm");
    if let Err(e) = node.withdraw(std::time::Duration::from_secs(3)).await {
        tracing::warn!(error = %e, "the withdrawal may not have reached the swarm; the record expires on its own");
    }
    info!(sessions = node.server.active_sessions(), limit_ms = drain_timeout.as_millis() as u64, "draining");
    let cut = node.server.drain(drain_timeout).await;
    info!(cut, "drained: sessions still running at the deadline were ended with an error frame");
    println!("drained ({cut} sessions cut off)");
    drop(node);
    Ok(())
}
