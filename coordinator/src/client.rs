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
//! let model_id = ModelId::of_files(&files)?.to_hex();
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

use crate::blame::{self, Fault};
use crate::deadline::DeadlineConfig;
use crate::discovery::{Discovery, DiscoveryConfig};
use crate::queue::QueuePermit;
use crate::registry::{NodeRegistry, RegistryConfig};
use crate::routing::{self, CoveragePolicy, Route, RouteError};
use crate::session::{RouteSession, SessionError, SessionParams};
use crate::trust::{Audit, Checked, Prober, TrustContext, after_step};

/// First wait when every route left is through a full node; doubled per wait up to [`MAX_CAPACITY_BACKOFF`].
const CAPACITY_BACKOFF: Duration = Duration::from_millis(50);
const MAX_CAPACITY_BACKOFF: Duration = Duration::from_secs(1);

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
    /// How long one step may keep failing over: while untried nodes can still form a route and this much time has
    /// not passed since the step began, a failed stage is banned and another route tried (a fixed count would let a
    /// handful of faulty nodes exhaust it with honest replicas still untried).
    pub failover_deadline: Duration,
    /// How long a session waits in a saturated node's queue.
    pub admit_wait: Duration,
    /// Longest wait for the token of one step (prefill included) before the step fails, however alive its stages.
    pub step_timeout: Duration,
    /// When a late step's silent stage is taken for dead (`deadline.rs`).
    pub detect: DeadlineConfig,
    pub registry: RegistryConfig,
    pub discovery: DiscoveryConfig,
    /// Fraction of sessions whose every step is also run on a second, disjoint route and compared (`trust.rs`).
    pub audit_fraction: f64,
    /// How often nodes on probation are checked with canary sessions.
    pub probe_interval: Duration,
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
            failover_deadline: Duration::from_secs(60),
            admit_wait: Duration::from_secs(30),
            step_timeout: Duration::from_secs(300),
            detect: DeadlineConfig::default(),
            registry: RegistryConfig::default(),
            discovery: DiscoveryConfig { query_interval: Duration::from_secs(2), ..DiscoveryConfig::default() },
            audit_fraction: 0.05,
            probe_interval: Duration::from_millis(500),
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
    pool: Arc<ConnectionPool>,
    /// Checks new nodes of the model (absent when another client of the same registry does, or without probation).
    _prober: Option<crate::trust::Prober>,
    /// What this client's sessions measured of step times: each new session's first deadlines start from it.
    step_memory: Arc<crate::deadline::StepMemory>,
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
        Self::build(config, dht, registry, Some(discovery))
    }

    /// A client over a registry someone else keeps current (a coordinator's: see `CoordinatorHandle::client`); it
    /// runs no discovery of its own.
    pub fn with_registry(
        dht: DhtClient,
        registry: Arc<NodeRegistry>,
        config: SwarmClientConfig,
    ) -> Result<SwarmClient, ClientError> {
        Self::build(config, dht, registry, None)
    }

    /// The client's connection pool and prober over `registry`, kept current by `discovery` or by someone else.
    fn build(
        config: SwarmClientConfig,
        dht: DhtClient,
        registry: Arc<NodeRegistry>,
        discovery: Option<Discovery>,
    ) -> Result<SwarmClient, ClientError> {
        let pool = client_pool()?;
        let prober = Prober::spawn(trust_context(&config, &registry, &pool), config.probe_interval);
        let step_memory = Default::default();
        Ok(SwarmClient {
            inner: Arc::new(Inner { config, dht, registry, discovery, pool, _prober: prober, step_memory }),
        })
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
            audit: Audit::draw(
                self.inner.config.audit_fraction,
                max_tokens,
                sampling,
                n_top.min(u8::MAX as usize) as u8,
            ),
        }
    }

    /// What the trust checks (`trust.rs`) need of this client.
    pub fn trust_context(&self) -> TrustContext {
        trust_context(&self.inner.config, &self.inner.registry, &self.inner.pool)
    }
}

fn trust_context(config: &SwarmClientConfig, registry: &Arc<NodeRegistry>, pool: &Arc<ConnectionPool>) -> TrustContext {
    TrustContext {
        pool: pool.clone(),
        registry: registry.clone(),
        model_id: config.model_id.clone(),
        wire_dtype: config.wire_dtype,
        prefill_chunk: config.prefill_chunk,
        detect: config.detect,
    }
}

fn client_pool() -> Result<Arc<ConnectionPool>, ClientError> {
    let endpoint =
        quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).map_err(ClientError::Endpoint)?;
    Ok(Arc::new(ConnectionPool::new(endpoint)))
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
    /// The sampled check of this session's steps on a second route, when drawn (`trust.rs`).
    audit: Option<Audit>,
}

impl SwarmSession {
    /// Peers of each route this session used (more than one after a failover).
    pub fn routes(&self) -> &[Vec<PeerId>] {
        &self.routes
    }

    /// Failures that made this session leave its route (a stage at fault, a silent route, or a running session cut
    /// off for capacity, such as a draining node); a node found full before the session started on it is not one.
    pub fn failovers(&self) -> usize {
        self.failovers
    }

    /// Steps of this session checked on a second route (0 when the session was not drawn for checking).
    pub fn audited_steps(&self) -> usize {
        self.audit.as_ref().map_or(0, |a| a.checked)
    }

    /// Draws this session for checking with probability `fraction` now (tests and callers that audit on demand).
    pub fn set_audit(&mut self, fraction: f64) {
        self.audit = Audit::draw(fraction, self.max_tokens, self.sampling, self.n_top);
    }

    /// Plans a route around `excluded` under `policy`, admits the session in each node's queue, opens it and
    /// re-prefills the history.
    async fn connect(&mut self, excluded: &HashSet<PeerId>, policy: CoveragePolicy) -> Result<(), SessionError> {
        let inner = &self.client.inner;
        let c = &inner.config;
        let max_tokens = u32::try_from(self.max_tokens).map_err(|_| {
            SessionError::Request(format!("{} positions do not fit a session (at most {})", self.max_tokens, u32::MAX))
        })?;
        let route = routing::route(&inner.registry, &c.model_id, excluded, policy).await?;
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
            max_tokens,
            sampling: self.sampling,
            n_top: self.n_top,
            wire_dtype: c.wire_dtype,
            prefill_chunk: c.prefill_chunk,
            detect: c.detect,
            step_memory: Some(inner.step_memory.clone()),
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
    /// Each failure is classified (`blame.rs`): the request's own fault ends the step at once; a peer's fault bans
    /// that peer and re-routes around it; a full node is routed around without a ban, and when no route is left but
    /// full nodes, the step waits (backing off) for a slot until the admission wait has passed. Failover goes on while
    /// a route avoiding every peer that failed in this step exists, within `failover_deadline`. Under
    /// [`CoveragePolicy::WaitAndRetry`] its timeout is also a hard deadline for getting a working route in this step.
    async fn run(&mut self, tokens: &[u32], sample: bool) -> Result<Option<Sampled>, SessionError> {
        let (policy, admit_wait, failover_deadline, limit) = {
            let c = &self.client.inner.config;
            (c.policy, c.admit_wait, c.failover_deadline, c.step_timeout)
        };
        let started = tokio::time::Instant::now();
        let connect_by = match policy {
            CoveragePolicy::WaitAndRetry { timeout } => Some((started + timeout, timeout)),
            CoveragePolicy::FailFast => None,
        };
        let give_up_at = connect_by.map_or(started + failover_deadline, |(by, _)| by.min(started + failover_deadline));
        let capacity_by = started + admit_wait;
        // Peers that failed in this step (banned too) and nodes found full in it (not banned).
        let mut failed: HashSet<PeerId> = HashSet::new();
        let mut full: HashSet<PeerId> = HashSet::new();
        // Routes that went silent as a whole with no stage to blame: avoided while another route exists, and
        // tried again (nobody is banned) when none does.
        let mut avoid: HashSet<PeerId> = HashSet::new();
        // The failure that made the last peer excluded: what the client hears when no route is left.
        let mut last: Option<SessionError> = None;
        let mut backoff = CAPACITY_BACKOFF;
        loop {
            let mut excluded: HashSet<PeerId> = failed.union(&full).copied().collect();
            if !avoid.is_empty() && self.pipeline.is_none() {
                let around: HashSet<PeerId> = excluded.union(&avoid).copied().collect();
                let inner = &self.client.inner;
                if routing::route(&inner.registry, &inner.config.model_id, &around, CoveragePolicy::FailFast)
                    .await
                    .is_ok()
                {
                    excluded = around;
                }
            }
            // Around a full node, plan once and fall back to waiting below rather than waiting for coverage.
            let plan_policy = if full.is_empty() { policy } else { CoveragePolicy::FailFast };
            let attempt = async {
                if self.pipeline.is_none() {
                    match connect_by {
                        Some((by, wait)) => tokio::time::timeout_at(by, self.connect(&excluded, plan_policy))
                            .await
                            .map_err(|_| SessionError::Timeout(wait))??,
                        None => self.connect(&excluded, plan_policy).await?,
                    }
                }
                let p = self.pipeline.as_mut().ok_or_else(|| SessionError::Protocol("no pipeline".into()))?;
                tokio::time::timeout(limit, p.feed(tokens, sample)).await.map_err(|_| SessionError::Timeout(limit))?
            }
            .await;
            let e = match attempt {
                Ok(None) if sample => return Err(SessionError::Protocol("no token returned".into())),
                Ok(None) => {
                    self.history.extend_from_slice(tokens);
                    return Ok(None);
                }
                Ok(Some(r)) => {
                    let ctx = self.client.trust_context();
                    let checked = after_step(&ctx, &mut self.audit, &self.history, tokens, self.pipeline.as_ref(), r);
                    let Checked { result: r, main_route_failed } = checked.await?;
                    if main_route_failed {
                        // The route lost a majority vote: the session is replayed on another at the next step.
                        self.pipeline = None;
                        self.permits.clear();
                    }
                    self.history.extend_from_slice(tokens);
                    if let Some(p) = &self.pipeline {
                        for peer in p.route().peers() {
                            self.client.inner.registry.record_success(&peer);
                        }
                    }
                    return Ok(Some(Sampled { token: r.token, logprob: r.logprob, top: r.top }));
                }
                Err(e) => e,
            };
            let route_peers = self.pipeline.as_ref().map(|p| p.route().peers()).unwrap_or_default();
            self.release();
            match blame::classify(&e) {
                Fault::Request => return Err(e),
                // No route around the peers excluded in this step (or none at all).
                Fault::Final if matches!(e, SessionError::Route(_)) && last.is_some() => {
                    let now = tokio::time::Instant::now();
                    if !full.is_empty() && now + backoff < capacity_by.min(give_up_at) {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_CAPACITY_BACKOFF);
                        full.clear();
                        continue;
                    }
                    let cause = last.take().unwrap_or(e);
                    return Err(SessionError::Exhausted(self.failovers, Box::new(cause)));
                }
                Fault::Final => return Err(e),
                Fault::Capacity(peer) => {
                    info!(peer = ?peer, error = %e, "node full: routing around it (no ban)");
                    full.extend(peer);
                    // A running session cut off (a draining node, a KV cache that filled) moves to another route.
                    if !route_peers.is_empty() {
                        self.failovers += 1;
                    }
                }
                Fault::Peer(peer) => {
                    warn!(%peer, error = %e, "stage failed: banning it and re-routing");
                    self.client.inner.registry.ban(&peer);
                    failed.insert(peer);
                    self.failovers += 1;
                }
                Fault::Unattributed => {
                    warn!(error = %e, "step failed with no stage to blame: re-routing around the whole route where another exists");
                    avoid.extend(route_peers);
                    self.failovers += 1;
                }
            }
            if tokio::time::Instant::now() >= give_up_at {
                return Err(if last.is_none() { e } else { SessionError::Exhausted(self.failovers, Box::new(e)) });
            }
            last = Some(e);
        }
    }

    /// Drops the current route after a failure: its stages are told to close in the background, and the session's
    /// queue permits are released only once they have (or after `session::CLOSE_WAIT`), so the owner never counts
    /// a slot free that a stage still holds.
    fn release(&mut self) {
        let permits = std::mem::take(&mut self.permits);
        match self.pipeline.take() {
            Some(p) => {
                tokio::spawn(async move {
                    p.close().await;
                    drop(permits);
                });
            }
            None => drop(permits),
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
