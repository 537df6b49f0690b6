//! `NodeRegistry`: every node the coordinator knows, keyed by peer id, with its latest verified announcement, its
//! admission queue and its health. Discovery inserts (that is the registration), a republish updates, expiry removes.
//! The route planner reads only this.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use shardline_proto::announcement::ShardAnnouncement;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::queue::NodeQueue;

/// Default of [`RegistryConfig::max_per_address`]: generous for several nodes per machine (GPUs, tests on
/// loopback), far below a flood of identities.
pub const DEFAULT_MAX_PER_ADDRESS: usize = 16;

/// The unit one source address stands for in [`RegistryConfig::max_per_address`]: an IPv4 address (also when
/// written IPv4-mapped in IPv6), or an IPv6 address's /64 prefix, the block one site or machine is commonly given (as
/// the stage's per-peer quotas group them, docs/PROTOCOL.md *Quotas*).
pub fn address_group(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// Shape every announcement of one model id must agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    pub n_layers: u32,
    pub hidden: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("announcement of {peer} for model {model_id} says {got:?}, other nodes of that model say {known:?}")]
    InconsistentModel { peer: PeerId, model_id: String, known: ModelShape, got: ModelShape },
    #[error("{peer} is not on the allowed peer list")]
    NotAllowed { peer: PeerId },
    #[error("{peer} not registered: {limit} identities with a stage on {ip} are registered already")]
    TooManyFromAddress { peer: PeerId, ip: std::net::IpAddr, limit: usize },
    /// Per-source limit (docs/SECURITY.md, *Trust and routing*): the identities whose signer's own DHT connection
    /// came from `ip` fill the limit.
    #[error("{peer} not registered: {limit} identities from source address {ip} are registered already")]
    TooManyFromSource { peer: PeerId, ip: std::net::IpAddr, limit: usize },
    /// A new identity whose source address nobody established (discovery could not reach its signer).
    #[error("{peer} not registered: the source address of its announcement is unknown")]
    UnknownSource { peer: PeerId },
}

/// What an upsert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsert {
    /// A node not known before: registered now.
    Inserted,
    /// A newer announcement of a known node.
    Updated,
    /// Not newer than the one held: ignored.
    Stale,
    /// A withdrawal of a registered node: removed.
    Withdrawn,
}

/// Bans, failures and measured latency of one node. Kept across re-registrations, so a node cannot shed a ban by
/// letting its record expire and announcing again.
#[derive(Clone, Debug, Default)]
pub struct NodeHealth {
    /// Consecutive failures; each doubles the ban.
    pub failures: u32,
    pub banned_until: Option<Instant>,
    /// Smoothed round-trip time to the node's stage server.
    pub rtt: Option<Duration>,
    /// Whether the owner has checked the node's output against a trusted replica (`trust.rs`).
    pub standing: crate::trust::Standing,
    /// The owner's measurement of the node's compute, milliseconds per layer per decoded token (an EWMA of timed
    /// steps; `None` until measured). Routing uses it instead of the announced throughput.
    pub ms_per_layer: Option<f64>,
    /// Timed steps folded into `ms_per_layer`.
    pub steps_timed: u32,
}

/// One registered node.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub announcement: ShardAnnouncement,
    pub queue: Arc<NodeQueue>,
    pub registered_at: Instant,
    pub last_seen: Instant,
    /// The signed record the announcement came in (`SignedAnnouncement::to_bytes`), when discovery kept it: an owner
    /// hands it to the previous stage of a route, which dials this node only on its word (docs/SECURITY.md, *Stage*).
    pub record: Option<Arc<[u8]>>,
    /// The IP address the identity is counted against for [`RegistryConfig::max_per_address`]: the remote address of
    /// the signer's own DHT connection to us (docs/SECURITY.md, *Trust and routing*), fixed at registration.
    pub source_ip: IpAddr,
}

/// Tunables of the registry.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Sessions that may wait in line per node.
    pub max_waiting: u32,
    /// First ban after a failure; doubled per consecutive failure up to `max_ban`.
    pub base_ban: Duration,
    pub max_ban: Duration,
    /// User sessions go only to nodes whose output a trusted replica confirmed (docs/SECURITY.md, "Trust and
    /// routing"); new identities are checked with the owner's canary sessions first.
    pub probation: bool,
    /// Identities that may be registered at once from one source IP address (the address of the signer's own DHT
    /// connection, [`NodeRegistry::upsert_from`]), and, separately, with a stage address on one IP address: a sybil
    /// flood from one machine fills this and no more ([`DEFAULT_MAX_PER_ADDRESS`]).
    pub max_per_address: usize,
    /// A private swarm's membership list (`--allow-peers`): announcements of other peers are refused.
    pub allow_peers: Option<shardline_proto::dht::AllowList>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            max_waiting: 16,
            base_ban: Duration::from_secs(2),
            max_ban: Duration::from_secs(300),
            probation: false,
            max_per_address: DEFAULT_MAX_PER_ADDRESS,
            allow_peers: None,
        }
    }
}

/// The shape a model id is held to: pinned by someone who read the model file (the coordinator serving it), or
/// else set by its registered nodes, and forgotten when the last of them leaves, so an early node with a wrong shape
/// blocks the real ones only while it is registered, and never a model whose file the coordinator has.
#[derive(Clone, Copy, Debug)]
struct ModelClaim {
    shape: ModelShape,
    pinned: bool,
    /// Registered nodes of the model.
    nodes: usize,
}

#[derive(Default)]
struct Inner {
    nodes: HashMap<PeerId, NodeEntry>,
    health: HashMap<PeerId, NodeHealth>,
    models: HashMap<String, ModelClaim>,
    /// Human names of model ids (from the model files the owner opened), for logs and errors.
    names: HashMap<String, String>,
}

impl Inner {
    fn name<'a>(&'a self, model_id: &'a str) -> &'a str {
        self.names.get(model_id).map_or_else(|| short_id(model_id), String::as_str)
    }
}

/// A model id as people read it where no name is known: its first 12 hex digits and an ellipsis.
pub fn short_id(model_id: &str) -> &str {
    model_id.get(..12).unwrap_or(model_id)
}

/// Whether an announcement is a withdrawal: a node that stops announces that it takes no sessions
/// (`max_sessions` 0), so registries drop it at once instead of when its last record expires (docs/SWARM.md).
pub fn is_withdrawal(a: &ShardAnnouncement) -> bool {
    a.max_sessions == 0
}

impl Inner {
    /// Takes a removed node off its model's claim.
    fn release(&mut self, model_id: &str) {
        if let Some(claim) = self.models.get_mut(model_id) {
            claim.nodes = claim.nodes.saturating_sub(1);
            if claim.nodes == 0 && !claim.pinned {
                self.models.remove(model_id);
            }
        }
    }
}

/// The node registry. Cheap to share (`Arc`); every change bumps a version that waiters can watch.
pub struct NodeRegistry {
    inner: RwLock<Inner>,
    config: RegistryConfig,
    version: watch::Sender<u64>,
    /// Models whose new nodes a prober checks already (`trust.rs`): one prober per model and registry.
    probers: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for NodeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRegistry").field("nodes", &self.len()).finish()
    }
}

impl NodeRegistry {
    pub fn new(config: RegistryConfig) -> Arc<Self> {
        Arc::new(Self {
            inner: RwLock::new(Inner::default()),
            config,
            version: watch::channel(0).0,
            probers: Default::default(),
        })
    }

    fn read(&self) -> parking_lot::RwLockReadGuard<'_, Inner> {
        self.inner.read()
    }

    fn write(&self) -> parking_lot::RwLockWriteGuard<'_, Inner> {
        self.inner.write()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever a node is registered, updated or removed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Names `model_id` for people: logs and errors say `name` instead of the hex id.
    pub fn name_model(&self, model_id: &str, name: &str) {
        self.write().names.insert(model_id.to_string(), name.to_string());
    }

    /// The human name of `model_id`, if someone named it.
    pub fn named(&self, model_id: &str) -> Option<String> {
        self.read().names.get(model_id).cloned()
    }

    /// The human name of `model_id`, or its first hex digits when nobody named it.
    pub fn model_name(&self, model_id: &str) -> String {
        self.read().name(model_id).to_string()
    }

    /// Holds `model_id` to `shape` (read from the model file), whatever nodes announce: registered nodes of another
    /// shape are removed, later ones refused. Returns the removed nodes.
    pub fn pin_shape(&self, model_id: &str, shape: ModelShape) -> Vec<PeerId> {
        let mut inner = self.write();
        let wrong: Vec<PeerId> = inner
            .nodes
            .values()
            .filter(|e| e.announcement.model_id == model_id)
            .filter(|e| ModelShape { n_layers: e.announcement.n_layers, hidden: e.announcement.hidden } != shape)
            .map(|e| e.announcement.peer_id)
            .collect();
        for p in &wrong {
            inner.nodes.remove(p);
            let model = inner.name(model_id);
            warn!(peer = %p, %model, "node removed: its announced shape differs from the model file");
        }
        let nodes = inner.nodes.values().filter(|e| e.announcement.model_id == model_id).count();
        inner.models.insert(model_id.to_string(), ModelClaim { shape, pinned: true, nodes });
        drop(inner);
        self.bump();
        wrong
    }

    /// Registers a verified announcement, or updates the node's entry if it is newer than the one held. All nodes of
    /// one model id must agree on its shape (layer count, hidden width): the pinned shape when the model file is
    /// known, else the shape of the nodes registered now. A withdrawal ([`is_withdrawal`]) newer than the entry held
    /// removes the node.
    ///
    /// The identity is counted against its stage's IP address, as if that were where it came from: for
    /// announcements of nodes the caller runs or knows (in-process swarms, tests, benches). Discovery registers with
    /// [`NodeRegistry::upsert_from`] and the source address it observed.
    pub fn upsert(&self, a: ShardAnnouncement) -> Result<Upsert, RegistryError> {
        let stage_ip = a.quic_addr.ip();
        self.upsert_from(a, Some(stage_ip))
    }

    /// As [`NodeRegistry::upsert`], counting a new identity against `source_ip`, the IP address its announcement
    /// came from (for discovery: the remote address of the signer's own DHT connection, docs/SECURITY.md, *Trust and
    /// routing*). At most [`RegistryConfig::max_per_address`] identities are registered per source address, and as
    /// many per stage address. `source_ip` matters only when the node is new: `None` then refuses it
    /// ([`RegistryError::UnknownSource`]); an update keeps the source of the registration.
    pub fn upsert_from(&self, a: ShardAnnouncement, source_ip: Option<IpAddr>) -> Result<Upsert, RegistryError> {
        let shape = ModelShape { n_layers: a.n_layers, hidden: a.hidden };
        if self.config.allow_peers.as_ref().is_some_and(|l| !l.contains(&a.peer_id)) {
            return Err(RegistryError::NotAllowed { peer: a.peer_id });
        }
        let now = Instant::now();
        let mut inner = self.write();
        if is_withdrawal(&a) {
            let newer = inner.nodes.get(&a.peer_id).is_some_and(|e| a.issued_at_ms > e.announcement.issued_at_ms);
            if !newer {
                return Ok(Upsert::Stale);
            }
            if let Some(e) = inner.nodes.remove(&a.peer_id) {
                inner.release(&e.announcement.model_id);
                let model = inner.name(&e.announcement.model_id).to_string();
                let layers = e.announcement.layers;
                info!(peer = %a.peer_id, %model, %layers, "node withdrew: removed from the registry");
            }
            drop(inner);
            self.bump();
            return Ok(Upsert::Withdrawn);
        }
        if let Some(claim) = inner.models.get(&a.model_id)
            && claim.shape != shape
        {
            return Err(RegistryError::InconsistentModel {
                peer: a.peer_id,
                model_id: a.model_id,
                known: claim.shape,
                got: shape,
            });
        }
        let outcome = match inner.nodes.get_mut(&a.peer_id) {
            Some(entry) if a.issued_at_ms <= entry.announcement.issued_at_ms => return Ok(Upsert::Stale),
            Some(entry) if entry.announcement.model_id == a.model_id => {
                entry.queue.set_capacity(a.max_sessions);
                entry.announcement = a;
                entry.last_seen = now;
                Upsert::Updated
            }
            Some(entry) => {
                // The node now serves another model: it leaves the old model's claim and joins the new one.
                let old = std::mem::replace(&mut entry.announcement.model_id, a.model_id.clone());
                entry.queue.set_capacity(a.max_sessions);
                entry.announcement = a.clone();
                entry.last_seen = now;
                inner.release(&old);
                inner.models.entry(a.model_id).or_insert(ModelClaim { shape, pinned: false, nodes: 0 }).nodes += 1;
                Upsert::Updated
            }
            None => {
                let Some(source_ip) = source_ip else { return Err(RegistryError::UnknownSource { peer: a.peer_id }) };
                let limit = self.config.max_per_address;
                let group = address_group(source_ip);
                if inner.nodes.values().filter(|e| address_group(e.source_ip) == group).count() >= limit {
                    return Err(RegistryError::TooManyFromSource { peer: a.peer_id, ip: source_ip, limit });
                }
                let ip = a.quic_addr.ip();
                if inner.nodes.values().filter(|e| e.announcement.quic_addr.ip() == ip).count() >= limit {
                    return Err(RegistryError::TooManyFromAddress { peer: a.peer_id, ip, limit });
                }
                let model = inner.name(&a.model_id).to_string();
                info!(peer = %a.peer_id, %model, layers = %a.layers, addr = %a.quic_addr, source = %source_ip, "node registered");
                inner
                    .models
                    .entry(a.model_id.clone())
                    .or_insert(ModelClaim { shape, pinned: false, nodes: 0 })
                    .nodes += 1;
                let queue = NodeQueue::new(a.max_sessions, self.config.max_waiting);
                inner.nodes.insert(
                    a.peer_id,
                    NodeEntry { announcement: a, queue, registered_at: now, last_seen: now, record: None, source_ip },
                );
                Upsert::Inserted
            }
        };
        drop(inner);
        self.bump();
        Ok(outcome)
    }

    /// Keeps `record`, the signed bytes of the announcement `a` just registered, beside the node's entry (only while
    /// that announcement is the one held).
    pub fn keep_record(&self, a: &ShardAnnouncement, record: Arc<[u8]>) {
        if let Some(e) = self.write().nodes.get_mut(&a.peer_id)
            && e.announcement.issued_at_ms == a.issued_at_ms
        {
            e.record = Some(record);
        }
    }

    /// The signed record of a registered node's current announcement.
    pub fn signed_record(&self, peer: &PeerId) -> Option<Arc<[u8]>> {
        self.read().nodes.get(peer)?.record.clone()
    }

    /// Removes a node (its record expired or it was found to be gone).
    pub fn remove(&self, peer: &PeerId) -> Option<NodeEntry> {
        let mut inner = self.write();
        let removed = inner.nodes.remove(peer);
        if let Some(e) = &removed {
            inner.release(&e.announcement.model_id);
        }
        drop(inner);
        if removed.is_some() {
            self.bump();
        }
        removed
    }

    /// Removes every node whose announcement expired before `now_ms` (Unix milliseconds); returns them.
    pub fn sweep_expired(&self, now_ms: u64) -> Vec<PeerId> {
        let mut inner = self.write();
        let gone: Vec<PeerId> =
            inner.nodes.iter().filter(|(_, e)| e.announcement.is_expired(now_ms)).map(|(p, _)| *p).collect();
        for p in &gone {
            if let Some(e) = inner.nodes.remove(p) {
                inner.release(&e.announcement.model_id);
                let model = inner.name(&e.announcement.model_id).to_string();
                info!(peer = %p, %model, layers = %e.announcement.layers, "node expired: removed from the registry");
            }
        }
        drop(inner);
        if !gone.is_empty() {
            self.bump();
        }
        gone
    }

    pub fn get(&self, peer: &PeerId) -> Option<NodeEntry> {
        self.read().nodes.get(peer).cloned()
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.read().nodes.contains_key(peer)
    }

    pub fn len(&self) -> usize {
        self.read().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape of a model: pinned from its file, or as its registered nodes announce it.
    pub fn model_shape(&self, model_id: &str) -> Option<ModelShape> {
        self.read().models.get(model_id).map(|c| c.shape)
    }

    /// Model ids with at least one registered node.
    pub fn models(&self) -> Vec<String> {
        let inner = self.read();
        let mut ids: Vec<String> = inner.nodes.values().map(|e| e.announcement.model_id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Every registered node of `model_id` with its health, for the planner.
    pub fn snapshot(&self, model_id: &str) -> Vec<(NodeEntry, NodeHealth)> {
        let inner = self.read();
        inner
            .nodes
            .values()
            .filter(|e| e.announcement.model_id == model_id)
            .map(|e| (e.clone(), inner.health.get(&e.announcement.peer_id).cloned().unwrap_or_default()))
            .collect()
    }

    pub fn health(&self, peer: &PeerId) -> NodeHealth {
        self.read().health.get(peer).cloned().unwrap_or_default()
    }

    /// Bans a node after a failure; the ban doubles with each consecutive failure (`base_ban · 2^(n-1)`, capped).
    /// Returns the ban's length.
    pub fn ban(&self, peer: &PeerId) -> Duration {
        let mut inner = self.write();
        let h = inner.health.entry(*peer).or_default();
        h.failures = h.failures.saturating_add(1);
        let factor = 1u32.checked_shl(h.failures - 1).unwrap_or(u32::MAX);
        let ban = self.config.base_ban.saturating_mul(factor).min(self.config.max_ban);
        h.banned_until = Some(Instant::now() + ban);
        warn!(%peer, failures = h.failures, ban_ms = ban.as_millis() as u64, "node banned");
        drop(inner);
        self.bump();
        ban
    }

    /// A session through the node succeeded: its failure count starts over.
    pub fn record_success(&self, peer: &PeerId) {
        if let Some(h) = self.write().health.get_mut(peer) {
            h.failures = 0;
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Claims the checking of `model_id`'s new nodes; `false` when a prober holds it already.
    pub fn claim_prober(&self, model_id: &str) -> bool {
        self.probers.lock().insert(model_id.to_string())
    }

    pub fn release_prober(&self, model_id: &str) {
        self.probers.lock().remove(model_id);
    }

    /// Sets a node's standing (probation, trusted, rejected); wakes route waiters when it changes.
    pub fn set_standing(&self, peer: &PeerId, standing: crate::trust::Standing) {
        let mut inner = self.write();
        let h = inner.health.entry(*peer).or_default();
        let changed = h.standing != standing;
        h.standing = standing;
        drop(inner);
        if changed {
            info!(%peer, ?standing, "node standing changed");
            self.bump();
        }
    }

    /// Folds one timed step into the node's measured milliseconds per layer (weight 1/4 for the new sample).
    pub fn record_layer_time(&self, peer: &PeerId, ms_per_layer: f64) {
        if !ms_per_layer.is_finite() || ms_per_layer < 0.0 {
            return;
        }
        let mut inner = self.write();
        let h = inner.health.entry(*peer).or_default();
        h.ms_per_layer = Some(match h.ms_per_layer {
            None => ms_per_layer,
            Some(old) => 0.75 * old + 0.25 * ms_per_layer,
        });
        h.steps_timed = h.steps_timed.saturating_add(1);
    }

    /// Folds a round-trip measurement into the node's smoothed RTT (weight 1/4 for the new sample).
    pub fn record_rtt(&self, peer: &PeerId, rtt: Duration) {
        let mut inner = self.write();
        let h = inner.health.entry(*peer).or_default();
        h.rtt = Some(match h.rtt {
            None => rtt,
            Some(old) => (old * 3 + rtt) / 4,
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use libp2p::identity::Keypair;
    use shardline_proto::LayerRange;

    use super::*;

    pub(crate) fn announcement(key: &Keypair, model: &str, layers: LayerRange, n_layers: u32) -> ShardAnnouncement {
        let a = ShardAnnouncement::example(key.public().to_peer_id(), model, layers, n_layers);
        ShardAnnouncement { hidden: 64, quic_addr: "127.0.0.1:9".parse().unwrap(), cert_fingerprint: [0; 32], ..a }
    }

    #[test]
    fn insert_update_stale_and_expiry() {
        let reg = NodeRegistry::new(RegistryConfig::default());
        let key = Keypair::generate_ed25519();
        let mut a = announcement(&key, "m", LayerRange::new(0, 10), 30);
        assert_eq!(reg.upsert(a.clone()).unwrap(), Upsert::Inserted);
        assert_eq!(reg.upsert(a.clone()).unwrap(), Upsert::Stale);
        a.issued_at_ms += 1;
        a.max_sessions = 9;
        assert_eq!(reg.upsert(a.clone()).unwrap(), Upsert::Updated);
        assert_eq!(reg.get(&a.peer_id).unwrap().queue.depth().2, 9);
        assert!(reg.sweep_expired(a.expires_at_ms - 1).is_empty());
        assert_eq!(reg.sweep_expired(a.expires_at_ms), vec![a.peer_id]);
        assert!(reg.is_empty());
    }

    #[test]
    fn a_model_id_cannot_change_shape() {
        let reg = NodeRegistry::new(RegistryConfig::default());
        let a = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 10), 30);
        let mut b = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(10, 32), 32);
        reg.upsert(a).unwrap();
        assert!(matches!(reg.upsert(b.clone()), Err(RegistryError::InconsistentModel { .. })));
        b.model_id = "other".into();
        assert_eq!(reg.upsert(b).unwrap(), Upsert::Inserted);
    }

    #[test]
    fn a_wrong_early_node_blocks_a_model_only_while_it_is_registered() {
        let reg = NodeRegistry::new(RegistryConfig::default());
        let liar = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 99), 99);
        let real = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
        reg.upsert(liar.clone()).unwrap();
        assert!(matches!(reg.upsert(real.clone()), Err(RegistryError::InconsistentModel { .. })));
        reg.remove(&liar.peer_id).unwrap();
        assert_eq!(reg.model_shape("m"), None, "the shape leaves with the last node");
        assert_eq!(reg.upsert(real.clone()).unwrap(), Upsert::Inserted);
        assert_eq!(reg.model_shape("m"), Some(ModelShape { n_layers: 30, hidden: 64 }));
        // Expiry releases the claim too.
        assert_eq!(reg.sweep_expired(real.expires_at_ms), vec![real.peer_id]);
        assert_eq!(reg.model_shape("m"), None);
        assert_eq!(reg.upsert(liar).unwrap(), Upsert::Inserted);
    }

    #[test]
    fn a_pinned_shape_removes_and_refuses_nodes_that_disagree() {
        let reg = NodeRegistry::new(RegistryConfig::default());
        let liar = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 99), 99);
        let real = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
        reg.upsert(liar.clone()).unwrap();
        let shape = ModelShape { n_layers: 30, hidden: 64 };
        assert_eq!(reg.pin_shape("m", shape), vec![liar.peer_id]);
        assert!(!reg.contains(&liar.peer_id));
        let mut again = liar.clone();
        again.issued_at_ms += 1;
        assert!(matches!(reg.upsert(again), Err(RegistryError::InconsistentModel { .. })));
        assert_eq!(reg.upsert(real.clone()).unwrap(), Upsert::Inserted);
        reg.remove(&real.peer_id).unwrap();
        assert_eq!(reg.model_shape("m"), Some(shape), "a pinned shape stays without nodes");
    }

    #[test]
    fn a_node_moving_to_another_model_releases_the_old_claim() {
        let reg = NodeRegistry::new(RegistryConfig::default());
        let key = Keypair::generate_ed25519();
        let mut a = announcement(&key, "m", LayerRange::new(0, 10), 30);
        reg.upsert(a.clone()).unwrap();
        a.model_id = "n".into();
        a.issued_at_ms += 1;
        assert_eq!(reg.upsert(a).unwrap(), Upsert::Updated);
        assert_eq!(reg.model_shape("m"), None);
        assert_eq!(reg.models(), vec!["n".to_string()]);
        let other = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 32), 32);
        assert_eq!(reg.upsert(other).unwrap(), Upsert::Inserted);
    }

    #[test]
    fn a_withdrawal_removes_the_node_and_names_are_kept() {
        let reg = NodeRegistry::new(RegistryConfig::default());
        reg.name_model("m", "Tiny.Q8_0");
        assert_eq!(reg.model_name("m"), "Tiny.Q8_0");
        assert_eq!(reg.model_name(&"ab".repeat(32)), "abababababab");
        let key = Keypair::generate_ed25519();
        let a = announcement(&key, "m", LayerRange::new(0, 10), 30);
        let mut gone = a.clone();
        gone.max_sessions = 0;
        assert_eq!(reg.upsert(gone.clone()).unwrap(), Upsert::Stale, "a withdrawal never registers a node");
        assert_eq!(reg.upsert(a.clone()).unwrap(), Upsert::Inserted);
        assert_eq!(reg.upsert(gone.clone()).unwrap(), Upsert::Stale, "an old withdrawal does not remove a newer entry");
        gone.issued_at_ms += 1;
        assert_eq!(reg.upsert(gone).unwrap(), Upsert::Withdrawn);
        assert!(reg.is_empty());
        assert_eq!(reg.model_shape("m"), None);
    }

    #[test]
    fn one_address_registers_a_bounded_number_of_identities() {
        let reg = NodeRegistry::new(RegistryConfig::default());
        let mut registered = 0;
        let mut refused = 0;
        for _ in 0..300 {
            match reg.upsert(announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30)) {
                Ok(Upsert::Inserted) => registered += 1,
                Err(RegistryError::TooManyFromSource { limit, .. }) => {
                    assert_eq!(limit, DEFAULT_MAX_PER_ADDRESS);
                    refused += 1
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((registered, refused), (DEFAULT_MAX_PER_ADDRESS, 300 - DEFAULT_MAX_PER_ADDRESS));
        // Another address still registers, and a registered node still updates.
        let mut other = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
        other.quic_addr = "10.0.0.2:9".parse().unwrap();
        assert_eq!(reg.upsert(other.clone()).unwrap(), Upsert::Inserted);
        other.issued_at_ms += 1;
        assert_eq!(reg.upsert(other).unwrap(), Upsert::Updated);
    }

    /// The attack the per-source limit is for: one source announces identities each naming another stage address.
    /// Counting stage addresses would register all 40; counting the source registers the limit.
    #[test]
    fn one_source_announcing_distinct_stage_addresses_registers_a_bounded_number() {
        let reg = NodeRegistry::new(RegistryConfig::default());
        let source: IpAddr = "192.0.2.7".parse().unwrap();
        let mut outcomes = (0, 0);
        for i in 0..40u8 {
            let mut a = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
            a.quic_addr = std::net::SocketAddr::new([10, 9, i, 1].into(), 9000);
            match reg.upsert_from(a, Some(source)) {
                Ok(Upsert::Inserted) => outcomes.0 += 1,
                Err(RegistryError::TooManyFromSource { ip, .. }) if ip == source => outcomes.1 += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(outcomes, (DEFAULT_MAX_PER_ADDRESS, 40 - DEFAULT_MAX_PER_ADDRESS));
        // Many sources naming one stage address are bounded too (identities pointing at one victim host).
        let mut pointed = 0;
        for i in 0..40u8 {
            let mut a = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
            a.quic_addr = "198.51.100.1:9000".parse().unwrap();
            if reg.upsert_from(a, Some(IpAddr::from([203, 0, 113, i]))).is_ok() {
                pointed += 1;
            }
        }
        assert_eq!(pointed, DEFAULT_MAX_PER_ADDRESS);
        // A new identity with no known source is refused; the update of a registered one needs none.
        let a = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
        assert!(matches!(reg.upsert_from(a, None), Err(RegistryError::UnknownSource { .. })));
        let mut b = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
        b.quic_addr = "198.51.100.99:9000".parse().unwrap();
        assert_eq!(reg.upsert_from(b.clone(), Some("198.51.100.99".parse().unwrap())).unwrap(), Upsert::Inserted);
        b.issued_at_ms += 1;
        assert_eq!(reg.upsert_from(b.clone(), None).unwrap(), Upsert::Updated);
        assert_eq!(reg.get(&b.peer_id).unwrap().source_ip, "198.51.100.99".parse::<IpAddr>().unwrap());
        // One IPv6 /64 is one source, however many of its addresses the identities come from.
        let mut v6 = 0;
        for i in 0..40u16 {
            let mut a = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
            a.quic_addr = std::net::SocketAddr::new([10, 8, i as u8, 1].into(), 9000);
            let ip: IpAddr = format!("2001:db8:7:1:{i:x}::1").parse().unwrap();
            if reg.upsert_from(a, Some(ip)).is_ok() {
                v6 += 1;
            }
        }
        assert_eq!(v6, DEFAULT_MAX_PER_ADDRESS);
        assert_eq!(address_group("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn only_allowed_peers_register_in_a_private_swarm() {
        let member = Keypair::generate_ed25519();
        let list: shardline_proto::dht::AllowList = Arc::new([member.public().to_peer_id()].into());
        let reg = NodeRegistry::new(RegistryConfig { allow_peers: Some(list), ..RegistryConfig::default() });
        let outsider = announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 30), 30);
        assert!(matches!(reg.upsert(outsider), Err(RegistryError::NotAllowed { .. })));
        assert_eq!(reg.upsert(announcement(&member, "m", LayerRange::new(0, 30), 30)).unwrap(), Upsert::Inserted);
    }

    #[test]
    fn bans_grow_and_reset() {
        let reg = NodeRegistry::new(RegistryConfig {
            base_ban: Duration::from_millis(100),
            max_ban: Duration::from_millis(350),
            ..Default::default()
        });
        let p = PeerId::random();
        assert_eq!(reg.ban(&p), Duration::from_millis(100));
        assert_eq!(reg.ban(&p), Duration::from_millis(200));
        assert_eq!(reg.ban(&p), Duration::from_millis(350));
        assert_eq!(reg.health(&p).failures, 3);
        reg.record_success(&p);
        assert_eq!(reg.ban(&p), Duration::from_millis(100));
    }
}
