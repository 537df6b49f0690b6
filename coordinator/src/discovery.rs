//! Discovery: turns what the DHT tells us into registry entries. Every node found through the DHT is registered at
//! discovery (no status message or command needed), updated on each re-publication, and removed when its
//! announcement expires.
//!
//! Nodes are found two ways: (1) as a DHT server the coordinator receives nodes' records and provider records itself
//! (in a small swarm it is among the closest peers of every key), and registers them as they arrive; (2) it
//! periodically queries the providers of every model it knows (configured, or learned from provider records) and
//! fetches each provider's node record. Every record is verified before it counts: signature against the peer id,
//! expiry, layer range inside the model, stored under its own peer's key, and (for records found through a model's
//! provider list) announcing that model. Rejects are logged.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::kad::Record;
use shardline_node::announce::{ShardAnnouncement, now_ms};
use shardline_node::dht::{DhtClient, DhtEvent, check_node_record, model_key, node_key, parse_model_key};
use tokio::sync::mpsc;
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
    Record(#[from] shardline_node::dht::filter::RecordRejected),
    #[error("provider of model {expected} announces model {got}")]
    WrongModel { expected: String, got: String },
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// Verifies a node record and registers (or updates) its node. `expected_model` is the model whose provider list
/// led to the record, when it came that way.
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
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Some(DhtEvent::RecordStored { source, record }) => {
                            log_outcome(&source.to_string(), register_record(&registry, &record, None));
                        }
                        Some(DhtEvent::ProviderAdded { key, provider }) => {
                            if let Some(model) = parse_model_key(&key) {
                                watched.lock().unwrap_or_else(|e| e.into_inner()).insert(model.clone());
                                tokio::spawn(fetch_node(dht.clone(), registry.clone(), provider, model));
                            }
                        }
                        Some(DhtEvent::PeerConnected(_)) => {}
                        None => break,
                    },
                    _ = query.tick() => {
                        let list: Vec<String> = {
                            let mut m = watched.lock().unwrap_or_else(|e| e.into_inner());
                            m.extend(registry.models());
                            m.iter().cloned().collect()
                        };
                        for model in list {
                            tokio::spawn(query_model(dht.clone(), registry.clone(), model));
                        }
                    }
                    _ = sweep.tick() => {
                        registry.sweep_expired(now_ms());
                    }
                }
            }
            debug!("discovery stopped: the DHT event loop is gone");
        });
        Discovery { task, models }
    }

    /// Models discovery currently looks for.
    pub fn models(&self) -> Vec<String> {
        self.models.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Adds a model to look for.
    pub fn watch(&self, model_id: &str) {
        self.models.lock().unwrap_or_else(|e| e.into_inner()).insert(model_id.to_string());
    }
}

fn log_outcome(from: &str, outcome: Result<(Upsert, ShardAnnouncement), DiscoveryReject>) {
    match outcome {
        Ok((Upsert::Inserted, a)) => debug!(peer = %a.peer_id, layers = %a.layers, "registered at discovery"),
        Ok(_) => {}
        Err(e) => warn!(%from, error = %e, "DHT record rejected"),
    }
}

async fn fetch_node(dht: DhtClient, registry: Arc<NodeRegistry>, peer: PeerId, model: String) {
    match dht.get_record(node_key(&peer)).await {
        Ok(records) => {
            for r in &records {
                log_outcome(&peer.to_string(), register_record(&registry, r, Some(&model)));
            }
        }
        Err(e) => debug!(%peer, error = %e, "node record lookup failed"),
    }
}

async fn query_model(dht: DhtClient, registry: Arc<NodeRegistry>, model: String) {
    let providers = match dht.get_providers(model_key(&model)).await {
        Ok(p) => p,
        Err(e) => {
            debug!(%model, error = %e, "provider lookup failed");
            return;
        }
    };
    let lookups = providers.into_iter().map(|p| fetch_node(dht.clone(), registry.clone(), p, model.clone()));
    futures::future::join_all(lookups).await;
}
