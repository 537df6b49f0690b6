//! Versioned DHT key scheme: a provider record per model tells who serves it; a value record per node holds the
//! node's signed announcement. Replicas of one range therefore never overwrite each other.

use libp2p::PeerId;
use libp2p::kad::RecordKey;

const MODEL_PREFIX: &str = "/shardline/1/model/";
const NODE_PREFIX: &str = "/shardline/1/node/";

/// `/shardline/1/model/<model-id>`: providers are the nodes serving any layers of the model.
pub fn model_key(model_id: &str) -> RecordKey {
    RecordKey::new(&format!("{MODEL_PREFIX}{model_id}"))
}

/// `/shardline/1/node/<peer-id>`: the value is the node's `SignedAnnouncement` record.
pub fn node_key(peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("{NODE_PREFIX}{peer}"))
}

/// The model id of a model key.
pub fn parse_model_key(key: &RecordKey) -> Option<String> {
    let s = std::str::from_utf8(key.as_ref()).ok()?;
    let id = s.strip_prefix(MODEL_PREFIX)?;
    (!id.is_empty() && id.len() <= 256 && id.bytes().all(|b| b.is_ascii_graphic())).then(|| id.to_string())
}

/// The peer id of a node key.
pub fn parse_node_key(key: &RecordKey) -> Option<PeerId> {
    let s = std::str::from_utf8(key.as_ref()).ok()?;
    s.strip_prefix(NODE_PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let p = PeerId::random();
        assert_eq!(parse_node_key(&node_key(&p)), Some(p));
        assert_eq!(parse_model_key(&model_key("abc123")), Some("abc123".into()));
        assert_eq!(parse_model_key(&node_key(&p)), None);
        assert_eq!(parse_node_key(&model_key("abc")), None);
        assert_eq!(parse_node_key(&RecordKey::new(&"/shardline/1/node/not-a-peer")), None);
    }
}
