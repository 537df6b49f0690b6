//! shardline coordinator: finds nodes through the DHT, registers them at discovery, keeps their admission queues and
//! health, plans routes over layer boundaries, and runs pipeline sessions over QUIC (`SwarmClient`).

pub mod discovery;
pub mod queue;
pub mod registry;
pub mod routing;

pub use discovery::{Discovery, DiscoveryConfig, register_record};
pub use queue::{NodeQueue, QueueError, QueuePermit};
pub use registry::{NodeEntry, NodeHealth, NodeRegistry, RegistryConfig, Upsert};
pub use routing::{CoveragePolicy, Route, RouteError, RouteStage};
