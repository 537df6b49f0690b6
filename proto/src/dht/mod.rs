//! Discovery over Kademlia: the swarm event loop and its client, the versioned record key scheme, and the filter every
//! inbound record passes before it is stored. The node side that publishes records is `shardline_node::announcer`.

pub mod allow;
pub mod filter;
pub mod keys;
pub mod network;
pub mod private;

pub use allow::{AllowList, AllowListError, read_allow_list};
pub use filter::{AnnouncementFilter, RecordFilter, check_node_record};
pub use keys::{model_key, node_key, parse_model_key, parse_node_key};
pub use network::{DhtClient, DhtConfig, DhtError, DhtEvent, FoundRecord, SERVICE_BOOTSTRAP_PATIENCE};
pub use private::{PreSharedKey, SwarmKeyError, read_swarm_key};
