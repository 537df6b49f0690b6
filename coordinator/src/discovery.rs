//! Discovery: turns what the DHT tells us into registry entries. Every node found through the DHT is registered at
//! discovery (no status message or command needed), updated on each re-publication, and removed when its
//! announcement expires.
//!
//! Nodes are found three ways: (1) as a DHT server the coordinator receives nodes' records and provider records itself
//! (in a small swarm it is among the closest peers of every key), and registers them as they arrive; (2) it
//! periodically queries the providers of every model it knows (configured, or learned from provider records); (3) at
//! the same period it reads its own Kademlia routing table (run it with [`DhtConfig::for_discovery`], whose buckets
//! keep every peer learned of). Of every peer found by (2) or (3) that is not registered, or whose registered
//! announcement is older than a third of its lifetime (a re-publication is due), it fetches the node record; a peer
//! whose record is missing (not a node, or not published yet) is retried with a growing back-off.
//!
//! (2) alone is not enough: a Kademlia peer answers a provider query with at most k = 20 providers of a key (libp2p-kad
//! `provider_peers` takes the first k of its store, in insertion order), so in a swarm of more than about 20 nodes the
//! later providers never appear in any answer. (3) is what makes "discovery registers a node, always" hold: every node
//! is a DHT server, so it enters the routing table of a coordinator it bootstraps from or that meets it in a query.
//!
//! Every record is verified before it counts: signature against the peer id, expiry, layer range inside the model,
//! stored under its own peer's key, and (for records found through a model's provider list) announcing that model.
//! Rejects are logged.
//!
//! A new identity is counted against the IP address it came from ([`signer_ip`]: the remote address of the signer's
//! own DHT connection, never the stage address it announces nor the address of a peer relaying its record), and the
//! registry holds at most `max_per_address` identities per source address (docs/SECURITY.md, *Trust and routing*).
//!
//! [`DhtConfig::for_discovery`]: shardline_proto::dht::DhtConfig::for_discovery

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;

use libp2p::PeerId;
use libp2p::kad::Record;
use shardline_proto::announcement::{ShardAnnouncement, now_ms};
use shardline_proto::dht::{DhtClient, DhtEvent, check_node_record, model_key, node_key, parse_model_key};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::registry::{NodeRegistry, Upsert};

#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Models to look for from the start (more are learned from provider records).
    pub models: Vec<String>,
    /// How often to query providers and fetch node records.
    pub query_interval: Duration,
    /// How often to remove expired nodes from the registry.
    pub sweep_interval: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self { models: Vec::new(), query_interval: Duration::from_secs(5), sweep_interval: Duration::from_secs(1) }
    }
}

/// Why a DHT record did not register a node.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryReject {
    #[error(transparent)]
    Record(#[from] shardline_proto::dht::filter::RecordRejected),
    #[error("provider of model {expected} announces model {got}")]
    WrongModel { expected: String, got: String },
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// How a record reached us: the peer whose connection delivered it (`None`: our own store) and that connection's
/// remote IP address.
#[derive(Clone, Copy, Debug, Default)]
pub struct Delivery {
    pub peer: Option<PeerId>,
    pub ip: Option<IpAddr>,
}

/// How long discovery waits to connect to the signer of a record a third peer delivered.
pub const SIGNER_DIAL_WAIT: Duration = Duration::from_secs(5);
/// Relayed records whose signer discovery checks at once; a record beyond these is left to the next discovery round
/// (which finds its signer again, if it is in the routing table or a provider list).
const MAX_SIGNER_CHECKS: usize = 16;

/// The IP address a new identity `signer` is counted against: the remote address of the signer's own DHT
/// connection to us. A record the signer delivered itself gives it at once. A record relayed by another peer (a PUT
/// of a copy, a lookup answered from someone's store, our own store) counts against the address of our current or
/// last connection to the signer, and where there was none, discovery connects to the signer (Kademlia knows its
/// addresses from the routing table or the query) and takes that connection's address; `None` when the signer cannot
/// be reached within [`SIGNER_DIAL_WAIT`], and the identity is not registered (yet).
///
/// The relay's own address is never used: an attacker could otherwise plant records in honest peers' stores and have
/// its identities counted against (and filling the limit of) those honest peers' addresses, or spread them over as
/// many addresses as there are honest relays. Relaying itself stays harmless: an honest copy of a record registers
/// its signer as soon as the signer is reachable, wherever the copy came from.
pub async fn signer_ip(dht: &DhtClient, signer: PeerId, delivery: Delivery) -> Option<IpAddr> {
    if delivery.peer == Some(signer) && delivery.ip.is_some() {
        return delivery.ip;
    }
    if let Ok(Some(ip)) = dht.peer_ip(signer).await {
        return Some(ip);
    }
    match tokio::time::timeout(SIGNER_DIAL_WAIT, dht.connect(signer)).await {
        Ok(Ok(())) => dht.peer_ip(signer).await.ok().flatten(),
        Ok(Err(e)) => {
            debug!(%signer, error = %e, "signer of a relayed record unreachable");
            None
        }
        Err(_) => None,
    }
}

/// Verifies a node record that `delivery` brought and registers (or updates) its node, counting a new node against
/// its signer's source address ([`signer_ip`]).
pub async fn register_delivered(
    dht: &DhtClient,
    registry: &NodeRegistry,
    record: &Record,
    expected_model: Option<&str>,
    delivery: Delivery,
) -> Result<(Upsert, ShardAnnouncement), DiscoveryReject> {
    let (signed, _) = check_node_record(record)?;
    let signer = signed.announcement.peer_id;
    // A registered node keeps the source of its registration: an update needs none.
    let source = if registry.contains(&signer) { None } else { signer_ip(dht, signer, delivery).await };
    register_verified(registry, record, signed.announcement, expected_model, source)
}

fn register_verified(
    registry: &NodeRegistry,
    record: &Record,
    a: ShardAnnouncement,
    expected_model: Option<&str>,
    source: Option<IpAddr>,
) -> Result<(Upsert, ShardAnnouncement), DiscoveryReject> {
    if let Some(expected) = expected_model
        && a.model_id != expected
    {
        return Err(DiscoveryReject::WrongModel { expected: expected.to_string(), got: a.model_id });
    }
    let outcome = registry.upsert_from(a.clone(), source)?;
    registry.keep_record(&a, record.value.as_slice().into());
    Ok((outcome, a))
}

/// Verifies a node record and registers (or updates) its node. `expected_model` is the model whose provider list
/// led to the record, when it came that way. A new node is counted against its stage's address (as
/// `NodeRegistry::upsert`): for records the caller vouches for; discovery uses [`register_delivered`].
pub fn register_record(
    registry: &NodeRegistry,
    record: &Record,
    expected_model: Option<&str>,
) -> Result<(Upsert, ShardAnnouncement), DiscoveryReject> {
    let (signed, _) = check_node_record(record)?;
    let a = signed.announcement;
    if let Some(expected) = expected_model
        && a.model_id != expected
    {
        return Err(DiscoveryReject::WrongModel { expected: expected.to_string(), got: a.model_id });
    }
    let outcome = registry.upsert(a.clone())?;
    registry.keep_record(&a, record.value.as_slice().into());
    Ok((outcome, a))
}

/// The running discovery task; dropping it stops discovery.
pub struct Discovery {
    task: JoinHandle<()>,
    models: Arc<Mutex<BTreeSet<String>>>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Discovery {
    /// Starts discovery over `dht`, reading its inbound `events`, into `registry`.
    pub fn spawn(
        dht: DhtClient,
        mut events: mpsc::Receiver<DhtEvent>,
        registry: Arc<NodeRegistry>,
        config: DiscoveryConfig,
    ) -> Discovery {
        let models = Arc::new(Mutex::new(config.models.iter().cloned().collect::<BTreeSet<_>>()));
        let watched = models.clone();
        let task = tokio::spawn(async move {
            let mut query = tokio::time::interval(config.query_interval);
            let mut sweep = tokio::time::interval(config.sweep_interval);
            query.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let retry = Arc::new(Mutex::new(HashMap::new()));
            let signer_checks = Arc::new(Semaphore::new(MAX_SIGNER_CHECKS));
            let mut round: Option<JoinHandle<()>> = None;
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Some(DhtEvent::RecordStored { source, source_ip, record }) => {
                            let delivery = Delivery { peer: Some(source), ip: source_ip };
                            on_record_stored(&dht, &registry, &signer_checks, record, delivery);
                        }
                        Some(DhtEvent::ProviderAdded { key, provider }) => {
                            if let Some(model) = parse_model_key(&key) {
                                watched.lock().insert(model.clone());
                                tokio::spawn(fetch_node(dht.clone(), registry.clone(), provider, Some(model)));
                            }
                        }
                        Some(DhtEvent::PeerConnected(_)) => {}
                        None => break,
                    },
                    _ = query.tick() => {
                        // One round at a time: on a loaded machine a round may outlast the period.
                        if round.as_ref().is_some_and(|r| !r.is_finished()) {
                            continue;
                        }
                        let list: Vec<String> = {
                            let mut m = watched.lock();
                            m.extend(registry.models());
                            m.iter().cloned().collect()
                        };
                        round = Some(tokio::spawn(discovery_round(
                            dht.clone(),
                            registry.clone(),
                            list,
                            retry.clone(),
                            config.query_interval,
                        )));
                    }
                    _ = sweep.tick() => {
                        registry.sweep_expired(now_ms());
                    }
                }
            }
            if let Some(r) = round {
                r.abort();
            }
            debug!("discovery stopped: the DHT event loop is gone");
        });
        Discovery { task, models }
    }

    /// Models discovery currently looks for.
    pub fn models(&self) -> Vec<String> {
        self.models.lock().iter().cloned().collect()
    }

    /// Adds a model to look for.
    pub fn watch(&self, model_id: &str) {
        self.models.lock().insert(model_id.to_string());
    }
}

/// Registers a record a peer stored with us: at once when its signer delivered it or is registered already (no I/O
/// needed), else on a task that finds the signer's address first, at most [`MAX_SIGNER_CHECKS`] at a time.
fn on_record_stored(
    dht: &DhtClient,
    registry: &Arc<NodeRegistry>,
    checks: &Arc<Semaphore>,
    record: Record,
    delivery: Delivery,
) {
    let from = delivery.peer.map_or_else(String::new, |p| p.to_string());
    let (signed, _) = match check_node_record(&record) {
        Ok(checked) => checked,
        Err(e) => return log_outcome(&from, Err(e.into())),
    };
    let signer = signed.announcement.peer_id;
    if delivery.peer == Some(signer) || registry.contains(&signer) {
        let source = if delivery.peer == Some(signer) { delivery.ip } else { None };
        return log_outcome(&from, register_verified(registry, &record, signed.announcement, None, source));
    }
    let Ok(permit) = checks.clone().try_acquire_owned() else {
        debug!(%signer, relay = %from, "relayed record left to the next discovery round: signer checks are busy");
        return;
    };
    let (dht, registry) = (dht.clone(), registry.clone());
    tokio::spawn(async move {
        let outcome = register_delivered(&dht, &registry, &record, None, delivery).await;
        drop(permit);
        log_outcome(&from, outcome);
    });
}

fn log_outcome(from: &str, outcome: Result<(Upsert, ShardAnnouncement), DiscoveryReject>) {
    match outcome {
        Ok((Upsert::Inserted, a)) => debug!(peer = %a.peer_id, layers = %a.layers, "registered at discovery"),
        Ok(_) => {}
        Err(e) => warn!(%from, error = %e, "DHT record rejected"),
    }
}

/// Fetches and registers `peer`'s node record; true when the registry now holds a current announcement of it.
async fn fetch_node(dht: DhtClient, registry: Arc<NodeRegistry>, peer: PeerId, model: Option<String>) -> bool {
    match dht.get_record_from(node_key(&peer)).await {
        Ok(records) => {
            for f in &records {
                let delivery = Delivery { peer: f.from, ip: f.from_ip };
                let outcome = register_delivered(&dht, &registry, &f.record, model.as_deref(), delivery).await;
                log_outcome(&peer.to_string(), outcome);
            }
        }
        Err(e) => debug!(%peer, error = %e, "node record lookup failed"),
    }
    !needs_fetch(&registry, &peer, now_ms())
}

/// Node record lookups in flight at once during a round.
const MAX_CONCURRENT_FETCHES: usize = 16;
/// Longest back-off for a peer without a node record, in query periods.
const MAX_BACKOFF_PERIODS: u32 = 8;

/// Back-off of a peer whose record lookup found nothing: failures so far, and when to try again.
type RetryState = Arc<Mutex<HashMap<PeerId, (u32, Instant)>>>;

/// Whether `peer`'s node record should be fetched: not registered, or its announcement is a third of its lifetime old
/// (the announcer re-publishes at about that age, with fresh load).
fn needs_fetch(registry: &NodeRegistry, peer: &PeerId, now_ms: u64) -> bool {
    match registry.get(peer) {
        None => true,
        Some(entry) => {
            let a = &entry.announcement;
            let lifetime = a.expires_at_ms.saturating_sub(a.issued_at_ms);
            now_ms.saturating_sub(a.issued_at_ms) >= lifetime / 3
        }
    }
}

/// One discovery round: the providers of every watched model and every peer of the routing table are candidates;
/// those whose record is due (see [`needs_fetch`]) and not backing off are fetched.
async fn discovery_round(
    dht: DhtClient,
    registry: Arc<NodeRegistry>,
    models: Vec<String>,
    retry: RetryState,
    period: Duration,
) {
    // Candidate → the model whose provider list named it (checked against its record), if any.
    let mut candidates: HashMap<PeerId, Option<String>> = HashMap::new();
    for model in models {
        match dht.get_providers(model_key(&model)).await {
            Ok(providers) => candidates.extend(providers.into_iter().map(|p| (p, Some(model.clone())))),
            Err(e) => debug!(%model, error = %e, "provider lookup failed"),
        }
    }
    match dht.routing_peers().await {
        Ok(peers) => {
            for p in peers {
                candidates.entry(p).or_insert(None);
            }
        }
        Err(e) => debug!(error = %e, "routing table unavailable"),
    }
    candidates.remove(&dht.peer_id());
    let (now, wall) = (Instant::now(), now_ms());
    let due: Vec<(PeerId, Option<String>)> = {
        let mut retry = retry.lock();
        // Forget peers that left the routing table and every provider list.
        retry.retain(|p, _| candidates.contains_key(p));
        candidates
            .into_iter()
            .filter(|(p, _)| needs_fetch(&registry, p, wall) && retry.get(p).is_none_or(|(_, at)| *at <= now))
            .collect()
    };
    let fetches = due.into_iter().map(|(p, model)| {
        let (dht, registry) = (dht.clone(), registry.clone());
        async move { (p, fetch_node(dht, registry, p, model).await) }
    });
    let mut results = futures::stream::iter(fetches).buffer_unordered(MAX_CONCURRENT_FETCHES);
    while let Some((peer, registered)) = results.next().await {
        let mut retry = retry.lock();
        if registered {
            retry.remove(&peer);
        } else {
            let failures = retry.get(&peer).map_or(0, |(f, _)| *f) + 1;
            let periods = (1u32 << failures.min(4)).min(MAX_BACKOFF_PERIODS);
            retry.insert(peer, (failures, Instant::now() + period * periods));
        }
    }
}
