//! Node side of discovery: publishes the node's signed announcement (value record under its node key) and a
//! provider record under its model key, and re-publishes both well before they expire, with fresh load figures.
//! When the announcer stops, the records expire everywhere within one TTL and the node disappears from the swarm; a
//! node that stops on purpose publishes a withdrawal first ([`withdraw`]), so registries drop it at once.

use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::kad::Record;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use shardline_proto::announcement::{ShardAnnouncement, now_ms};
use shardline_proto::dht::{DhtClient, model_key, node_key};

#[derive(Clone, Copy, Debug)]
pub struct AnnouncerConfig {
    /// Lifetime of each announcement (docs/ARCHITECTURE.md, discovery records: about 60 s).
    pub ttl: Duration,
    /// Re-publication period (about a third of the TTL, so two re-publications may fail before expiry).
    pub republish: Duration,
}

impl Default for AnnouncerConfig {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(60), republish: Duration::from_secs(20) }
    }
}

/// The running announcer; dropping it (or calling `stop`) ends the re-publication.
pub struct Announcer {
    task: JoinHandle<()>,
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Announcer {
    /// Starts publishing. `fresh` builds the current announcement (load, free KV cache); the announcer stamps issue
    /// and expiry times and signs it with `key`.
    pub fn spawn(
        dht: DhtClient,
        key: Keypair,
        config: AnnouncerConfig,
        fresh: impl Fn() -> ShardAnnouncement + Send + Sync + 'static,
    ) -> Announcer {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.republish);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = publish_once(&dht, &key, config.ttl, fresh()).await {
                    warn!(error = %e, "announcement not published; retrying at the next period");
                }
            }
        });
        Announcer { task }
    }

    pub fn stop(self) {}
}

/// Lifetime of a withdrawal record: long enough to reach the peers that store node records, short enough that it is
/// gone before the node could come back under the same identity.
pub const WITHDRAWAL_TTL: Duration = Duration::from_secs(10);

/// Publishes the node's withdrawal under its node key: its announcement with `max_sessions` 0, which registries read
/// as "this node is leaving" and which replaces the node's stored record (docs/SWARM.md). Call it after the
/// announcer stopped.
pub async fn withdraw(dht: &DhtClient, key: &Keypair, mut a: ShardAnnouncement) -> Result<(), String> {
    a.max_sessions = 0;
    a.active_sessions = 0;
    a.free_kv_tokens = 0;
    let now = now_ms();
    a.issued_at_ms = now;
    a.expires_at_ms = now + WITHDRAWAL_TTL.as_millis() as u64;
    let signed = a.sign(key).map_err(|e| e.to_string())?;
    let mut record = Record::new(node_key(&key.public().to_peer_id()), signed.to_bytes());
    record.publisher = Some(key.public().to_peer_id());
    record.expires = Some(Instant::now() + WITHDRAWAL_TTL);
    dht.put_record_everywhere(record).await.map_err(|e| e.to_string())?;
    debug!("withdrawal published");
    Ok(())
}

/// Signs and publishes one announcement: the node record first, then the provider record of its model.
pub async fn publish_once(
    dht: &DhtClient,
    key: &Keypair,
    ttl: Duration,
    mut a: ShardAnnouncement,
) -> Result<(), String> {
    let now = now_ms();
    a.issued_at_ms = now;
    a.expires_at_ms = now + ttl.as_millis() as u64;
    let model = model_key(&a.model_id);
    let signed = a.sign(key).map_err(|e| e.to_string())?;
    let mut record = Record::new(node_key(&key.public().to_peer_id()), signed.to_bytes());
    record.publisher = Some(key.public().to_peer_id());
    record.expires = Some(Instant::now() + ttl);
    dht.put_record(record).await.map_err(|e| e.to_string())?;
    dht.start_providing(model).await.map_err(|e| e.to_string())?;
    debug!("announcement published");
    Ok(())
}
