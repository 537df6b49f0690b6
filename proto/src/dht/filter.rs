//! What a shardline DHT peer agrees to store. Kademlia records are not signed, so every inbound record passes here
//! first (kad's `StoreInserts::FilterBoth`): node records must be valid signed announcements stored under their own
//! peer's key; provider records must be for a model key. Everything else is dropped and logged.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::kad::{ProviderRecord, Record};
use tracing::debug;

use super::keys::{parse_model_key, parse_node_key};
use crate::announcement::{SignedAnnouncement, now_ms};

/// Why an inbound record was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordRejected {
    #[error("key is not a shardline node or model key")]
    UnknownKey,
    #[error("record stored under {key_peer} holds the announcement of {announced}")]
    WrongKey { key_peer: String, announced: String },
    #[error(transparent)]
    Announcement(#[from] Box<crate::announcement::AnnounceError>),
}

/// Checks a node record and returns the verified announcement with the instant it expires locally.
pub fn check_node_record(record: &Record) -> Result<(SignedAnnouncement, Instant), RecordRejected> {
    let key_peer = parse_node_key(&record.key).ok_or(RecordRejected::UnknownKey)?;
    let now = now_ms();
    let signed = SignedAnnouncement::verify(&record.value, now).map_err(Box::new)?;
    let announced = signed.announcement.peer_id;
    if announced != key_peer {
        return Err(RecordRejected::WrongKey { key_peer: key_peer.to_string(), announced: announced.to_string() });
    }
    let left = Duration::from_millis(signed.announcement.expires_at_ms.saturating_sub(now));
    Ok((signed, Instant::now() + left))
}

/// Decides which inbound records enter the local store.
pub trait RecordFilter: Send + Sync + 'static {
    /// The expiry to store `record` with, or `None` to drop it.
    fn accept_record(&self, source: &PeerId, record: &Record) -> Option<Instant>;
    fn accept_provider(&self, record: &ProviderRecord) -> bool;
}

/// The shardline policy described in the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnnouncementFilter;

impl RecordFilter for AnnouncementFilter {
    fn accept_record(&self, source: &PeerId, record: &Record) -> Option<Instant> {
        match check_node_record(record) {
            Ok((_, expires)) => Some(record.expires.map_or(expires, |e| e.min(expires))),
            Err(e) => {
                debug!(%source, error = %e, "inbound DHT record rejected");
                None
            }
        }
    }

    fn accept_provider(&self, record: &ProviderRecord) -> bool {
        let ok = parse_model_key(&record.key).is_some();
        if !ok {
            debug!(provider = %record.provider, "inbound provider record for a foreign key rejected");
        }
        ok
    }
}
