//! shardline coordinator: finds nodes through the DHT, registers them at discovery, keeps their admission queues and
//! health, plans routes over layer boundaries, and runs pipeline sessions over QUIC (`SwarmClient`).

pub mod api;
pub mod client;
pub mod deadline;
pub mod discovery;
pub mod queue;
pub mod registry;
pub mod routing;
pub mod run;
pub mod session;

pub use client::{SwarmClient, SwarmClientConfig, SwarmSession};
pub use discovery::{Discovery, DiscoveryConfig, register_record};
pub use queue::{NodeQueue, QueueError, QueuePermit};
pub use registry::{NodeEntry, NodeHealth, NodeRegistry, RegistryConfig, Upsert};
pub use routing::{CoveragePolicy, Route, RouteError, RouteStage};
pub use run::{CoordinatorArgs, CoordinatorHandle, run_coordinator, start_coordinator};
pub use session::{RouteSession, SessionError, SessionParams};
