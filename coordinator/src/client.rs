//! `SwarmClient`: joins the DHT, keeps its own registry through discovery, plans routes, and runs generation
//! sessions over QUIC with failover: a failed stage is banned (with growing backoff), a new route is planned, and the
//! session's token history is re-prefilled on it. Because sampling depends only on `(seed, position)`, the text is
//! the same as an undisturbed run.
//!
//! `shardline generate --swarm` runs the engine's generation loop over a [`SwarmSession`], which is a
//! [`Stepper`] itself:
//!
//! ```no_run
//! # async fn demo(model: &std::path::Path, bootstrap: libp2p::Multiaddr) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use shardline_coordinator::{SwarmClient, SwarmClientConfig};
//! use shardline_node::engine::{TextStream, encode_prompt, load_tokenizer, stop_tokens};
//! use shardline_node::generate::{self, GenerateParams};
//! use shardline_node::model::{ModelFiles, ModelId};
//!
//! // The tokenizer and the model id come from a local copy of the model file; no weights are loaded.
//! let files = ModelFiles::open(model)?;
//! let tokenizer = Arc::new(load_tokenizer(&files)?);
//! let model_id = ModelId::of(files.weights().as_ref())?.to_hex();
//! let client = SwarmClient::join(SwarmClientConfig::new(model_id, vec![bootstrap])).await?;
//! let prompt = encode_prompt(&tokenizer, "Hello!", true)?;
//! let params = GenerateParams { stop_tokens: stop_tokens(&tokenizer), ..GenerateParams::default() };
//! let mut session = client.session(prompt.len() + params.max_tokens, params.sampling, params.n_top_logprobs);
//! let mut decoder = TextStream::new(tokenizer);
//! let mut print = |text: &str| {
//!     print!("{text}");
//!     true
//! };
//! let generation = generate::generate(&mut session, &prompt, &params, &mut decoder, &mut print).await;
//! // Every stage frees the session's KV cache, whatever the outcome.
//! session.close().await;
//! println!("\n{} tokens", generation?.tokens.len());
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use shardline_kernels::{Sampled, SamplingParams};
use shardline_node::generate::Stepper;
use shardline_proto::dht::{DhtClient, DhtConfig, DhtError};
use shardline_proto::pool::ConnectionPool;
use shardline_proto::wire::{Limits, WireDType};
use tracing::{info, warn};

use crate::deadline::DeadlineConfig;
use crate::discovery::{Discovery, DiscoveryConfig};
use crate::queue::QueuePermit;
use crate::registry::{NodeRegistry, RegistryConfig};
use crate::routing::{self, CoveragePolicy, Route, RouteError};
use crate::session::{RouteSession, SessionError, SessionParams};

/// Settings of a swarm client.
#[derive(Clone, Debug)]
pub struct SwarmClientConfig {
    pub model_id: String,
    pub bootstrap: Vec<Multiaddr>,
    pub p2p_listen: Vec<Multiaddr>,
    /// Identity in the DHT; a fresh one when `None`.
    pub keypair: Option<Keypair>,
    pub policy: CoveragePolicy,
    pub wire_dtype: WireDType,
    /// Positions per prefill frame.
    pub prefill_chunk: usize,
    /// Route changes a session may go through before giving up.
    pub max_failovers: usize,
    /// How long a session waits in a saturated node's queue.
    pub admit_wait: Duration,
    /// Longest wait for the token of one step (prefill included) before the step fails, however alive its stages.
    pub step_timeout: Duration,
    /// When a late step's silent stage is taken for dead (`deadline.rs`).
    pub detect: DeadlineConfig,
    pub registry: RegistryConfig,
    pub discovery: DiscoveryConfig,
}

impl SwarmClientConfig {
    pub fn new(model_id: impl Into<String>, bootstrap: Vec<Multiaddr>) -> Self {
        Self {
            model_id: model_id.into(),
            bootstrap,
            p2p_listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("static multiaddr")],
            keypair: None,
            policy: CoveragePolicy::WaitAndRetry { timeout: Duration::from_secs(30) },
            wire_dtype: WireDType::F32,
            prefill_chunk: 64,
            max_failovers: 3,
            admit_wait: Duration::from_secs(30),
            step_timeout: Duration::from_secs(300),
            detect: DeadlineConfig::default(),
            registry: RegistryConfig::default(),
            discovery: DiscoveryConfig { query_interval: Duration::from_secs(2), ..DiscoveryConfig::default() },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Dht(#[from] DhtError),
    #[error("cannot open the QUIC client endpoint: {0}")]
    Endpoint(std::io::Error),
}

struct Inner {
    config: SwarmClientConfig,
    dht: DhtClient,
    registry: Arc<NodeRegistry>,
    /// `None` when the client shares a coordinator's registry (the coordinator runs discovery).
    discovery: Option<Discovery>,
    pool: ConnectionPool,
}

/// A member of the swarm that runs sessions. Cheap to clone.
#[derive(Clone)]
pub struct SwarmClient {
    inner: Arc<Inner>,
}

impl SwarmClient {
    /// Joins the DHT through `config.bootstrap` and starts discovering the nodes of `config.model_id`.
    pub async fn join(config: SwarmClientConfig) -> Result<SwarmClient, ClientError> {
        let keypair = config.keypair.clone().unwrap_or_else(Keypair::generate_ed25519);
        let (dht, events) =
            DhtClient::start(DhtConfig::for_discovery(keypair, config.p2p_listen.clone(), config.bootstrap.clone()))
                .await?;
        let registry = NodeRegistry::new(config.registry.clone());
        let mut dcfg = config.discovery.clone();
        dcfg.models.push(config.model_id.clone());
        let discovery = Discovery::spawn(dht.clone(), events, registry.clone(), dcfg);
        let pool = client_pool()?;
        Ok(SwarmClient { inner: Arc::new(Inner { config, dht, registry, discovery: Some(discovery), pool }) })
    }

    /// A client over a registry someone else keeps current (a coordinator's: see `CoordinatorHandle::client`); it
    /// runs no discovery of its own.
    pub fn with_registry(
        dht: DhtClient,
        registry: Arc<NodeRegistry>,
        config: SwarmClientConfig,
    ) -> Result<SwarmClient, ClientError> {
        let pool = client_pool()?;
        Ok(SwarmClient { inner: Arc::new(Inner { config, dht, registry, discovery: None, pool }) })
    }

    pub fn registry(&self) -> &Arc<NodeRegistry> {
        &self.inner.registry
    }

    /// Closes every QUIC connection to the stages and waits (at most `limit`) until the peers have been told, so a
    /// process that exits right after does not leave stages to find a lost connection. Close sessions first.
    pub async fn shutdown(&self, limit: Duration) {
        let endpoint = self.inner.pool.endpoint();
        endpoint.close(0u32.into(), b"client done");
        let _ = tokio::time::timeout(limit, endpoint.wait_idle()).await;
    }

    pub fn dht(&self) -> &DhtClient {
        &self.inner.dht
    }

    /// The client's own discovery, unless it shares a coordinator's registry.
    pub fn discovery(&self) -> Option<&Discovery> {
        self.inner.discovery.as_ref()
    }

    pub fn config(&self) -> &SwarmClientConfig {
        &self.inner.config
    }

    /// A route for the client's model under its coverage policy.
    pub async fn route(&self) -> Result<Route, RouteError> {
        let c = &self.inner.config;
        routing::route(&self.inner.registry, &c.model_id, &HashSet::new(), c.policy).await
    }

    /// Waits until the registered nodes cover the model (or `timeout`).
    pub async fn wait_for_coverage(&self, timeout: Duration) -> Result<Route, RouteError> {
        let c = &self.inner.config;
        routing::route(&self.inner.registry, &c.model_id, &HashSet::new(), CoveragePolicy::WaitAndRetry { timeout })
            .await
    }

    /// A session that will hold at most `max_tokens` positions; stages are chosen on the first step.
    pub fn session(&self, max_tokens: usize, sampling: SamplingParams, n_top: usize) -> SwarmSession {
        SwarmSession {
            client: self.clone(),
            max_tokens,
            sampling,
            n_top: n_top.min(u8::MAX as usize) as u8,
            history: Vec::new(),
            pipeline: None,
            permits: Vec::new(),
            failovers: 0,
            routes: Vec::new(),
        }
    }
}

fn client_pool() -> Result<ConnectionPool, ClientError> {
    let endpoint =
        quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).map_err(ClientError::Endpoint)?;
    Ok(ConnectionPool::new(endpoint))
}

/// One generation session over the swarm, surviving stage failures.
pub struct SwarmSession {
    client: SwarmClient,
    max_tokens: usize,
    sampling: SamplingParams,
    n_top: u8,
    /// Every token fed so far: what a new route must be prefilled with.
    history: Vec<u32>,
    pipeline: Option<RouteSession>,
    permits: Vec<QueuePermit>,
    failovers: usize,
    /// Peers of every route used, in order.
    routes: Vec<Vec<PeerId>>,
}

impl SwarmSession {
    /// Peers of each route this session used (more than one after a failover).
    pub fn routes(&self) -> &[Vec<PeerId>] {
        &self.routes
    }

    pub fn failovers(&self) -> usize {
        self.failovers
    }

    async fn connect(&mut self) -> Result<(), SessionError> {
        let inner = &self.client.inner;
        let c = &inner.config;
        let route = routing::route(&inner.registry, &c.model_id, &HashSet::new(), c.policy).await?;
        let shape = inner
            .registry
            .model_shape(&c.model_id)
            .ok_or_else(|| SessionError::Route(RouteError::unknown_model(&inner.registry, &c.model_id)))?;
        let mut permits = Vec::new();
        for s in &route.stages {
            if let Some(q) = &s.queue {
                permits
                    .push(q.admit(c.admit_wait).await.map_err(|source| SessionError::Busy { peer: s.peer, source })?);
            }
        }
        let params = SessionParams {
            model_id: c.model_id.clone(),
            n_layers: shape.n_layers,
            hidden: shape.hidden,
            max_tokens: self.max_tokens as u32,
            sampling: self.sampling,
            n_top: self.n_top,
            wire_dtype: c.wire_dtype,
            prefill_chunk: c.prefill_chunk,
            detect: c.detect,
        };
        let registry = inner.registry.clone();
        let peers = route.peers();
        let mut pipeline = RouteSession::open(
            &inner.pool,
            route,
            &params,
            Limits::default(),
            |p, rtt| registry.record_rtt(&p, rtt),
            |p| registry.signed_record(p),
        )
        .await?;
        if !self.history.is_empty() {
            info!(tokens = self.history.len(), "re-prefilling the session history on the new route");
            pipeline.feed(&self.history, false).await?;
        }
        self.routes.push(peers);
        self.pipeline = Some(pipeline);
        self.permits = permits;
        Ok(())
    }

    /// Feeds `tokens` and, with `sample`, returns the token sampled after them, failing over to another route when a
    /// stage fails. Without `sample` the frames are only written: a stage's failure on them surfaces at the next
    /// sampled step, whose failover re-prefills them (they are in the history by then).
    ///
    /// Under [`CoveragePolicy::WaitAndRetry`] its timeout is a hard deadline for getting a working route in this step
    /// (connecting and every failover together), not a wait per attempt.
    async fn run(&mut self, tokens: &[u32], sample: bool) -> Result<Option<Sampled>, SessionError> {
        let connect_by = match self.client.inner.config.policy {
            CoveragePolicy::WaitAndRetry { timeout } => Some((tokio::time::Instant::now() + timeout, timeout)),
            CoveragePolicy::FailFast => None,
        };
        loop {
            let attempt = async {
                if self.pipeline.is_none() {
                    match connect_by {
                        Some((by, wait)) => tokio::time::timeout_at(by, self.connect())
                            .await
                            .map_err(|_| SessionError::Timeout(wait))??,
                        None => self.connect().await?,
                    }
                }
                let p = self.pipeline.as_mut().ok_or_else(|| SessionError::Protocol("no pipeline".into()))?;
                let limit = self.client.inner.config.step_timeout;
                tokio::time::timeout(limit, p.feed(tokens, sample)).await.map_err(|_| SessionError::Timeout(limit))?
            }
            .await;
            match attempt {
                Ok(None) if sample => return Err(SessionError::Protocol("no token returned".into())),
                Ok(None) => {
                    self.history.extend_from_slice(tokens);
                    return Ok(None);
                }
                Ok(Some(r)) => {
                    self.history.extend_from_slice(tokens);
                    if let Some(p) = &self.pipeline {
                        for peer in p.route().peers() {
                            self.client.inner.registry.record_success(&peer);
                        }
                    }
                    return Ok(Some(Sampled { token: r.token, logprob: r.logprob, top: r.top }));
                }
                Err(e) => {
                    self.pipeline = None;
                    self.permits.clear();
                    let Some(peer) = e.failed_peer() else { return Err(e) };
                    if connect_by.is_some_and(|(by, _)| tokio::time::Instant::now() >= by) {
                        return Err(SessionError::Exhausted(self.failovers, Box::new(e)));
                    }
                    if self.failovers >= self.client.inner.config.max_failovers {
                        return Err(SessionError::Exhausted(self.failovers, Box::new(e)));
                    }
                    warn!(%peer, error = %e, "stage failed: banning it and re-routing");
                    self.client.inner.registry.ban(&peer);
                    self.failovers += 1;
                }
            }
        }
    }

    /// Closes the session on its stages.
    pub async fn close(mut self) {
        if let Some(p) = self.pipeline.take() {
            p.close().await;
        }
    }
}

/// A swarm session is driven by the generation loop (`shardline_node::generate::generate`) directly, on the
/// caller's runtime. Sampling and `n_top` are fixed when the session opens on its stages (they travel in the open
/// frame), so a step must ask for the same sampling and at most that many top log-probabilities.
impl Stepper for SwarmSession {
    type Error = SessionError;

    async fn feed(&mut self, tokens: &[u32]) -> Result<(), SessionError> {
        self.run(tokens, false).await.map(drop)
    }

    async fn step(&mut self, tokens: &[u32], sampling: &SamplingParams, n_top: usize) -> Result<Sampled, SessionError> {
        if *sampling != self.sampling {
            return Err(SessionError::SamplingChanged);
        }
        if n_top > usize::from(self.n_top) {
            return Err(SessionError::TopChanged { asked: n_top, opened: self.n_top });
        }
        let mut s = self.run(tokens, true).await?.ok_or_else(|| SessionError::Protocol("no token returned".into()))?;
        s.top.truncate(n_top);
        Ok(s)
    }
}
