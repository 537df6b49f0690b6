//! Discovery over Kademlia: the swarm event loop and its client, the record key scheme, the inbound record filter,
//! the persistent identity, and the node-side announcer.

pub mod announcer;
pub mod filter;
pub mod identity;
pub mod keys;
pub mod network;

pub use announcer::{Announcer, AnnouncerConfig};
pub use filter::{AnnouncementFilter, RecordFilter, check_node_record};
pub use keys::{model_key, node_key, parse_model_key, parse_node_key};
pub use network::{DhtClient, DhtConfig, DhtError, DhtEvent, SERVICE_BOOTSTRAP_PATIENCE};
