//! shardline protocol: what session owners and stages both speak, with no compute or model code in it.
//!
//! - [`wire`]: the versioned, length-prefixed frames of a pipeline session over QUIC (`docs/PROTOCOL.md`).
//! - [`span`]: layer ranges, the unit a node serves and a stage runs.
//! - [`announcement`]: the signed `ShardAnnouncement` a node publishes about itself.
//! - [`dht`]: the Kademlia swarm (event loop and client), the versioned record keys, and the inbound record filter.
//! - [`identity`]: the persistent ed25519 key file of a node or client.
//! - [`tls`]: self-signed stage certificates and clients that pin exactly one fingerprint.
//! - [`pool`]: QUIC connections to stages, reused across sessions.

pub mod announcement;
pub mod dht;
pub mod identity;
pub mod pool;
pub mod span;
pub mod tls;
pub mod wire;

pub use announcement::{ShardAnnouncement, SignedAnnouncement};
pub use span::{LayerRange, SpanError};
