//! The libp2p swarm (Kademlia + identify over TCP and QUIC), owned by one event-loop task. The rest of the program
//! holds a cloneable [`DhtClient`] that sends commands over a channel, each with a oneshot for the reply; replies to
//! queries are kept in `pending_*` maps keyed by `QueryId` until kad reports the query finished.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{
    self, GetProvidersOk, GetRecordOk, InboundRequest, Mode, QueryId, QueryResult, Quorum, Record, RecordKey,
    StoreInserts,
};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PnetConfig;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, Transport, identify, noise, tcp, yamux};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::filter::RecordFilter;

/// Our own Kademlia protocol name: shardline peers never join (or pollute) the public IPFS DHT.
pub const KAD_PROTOCOL: &str = "/shardline/kad/1.0.0";
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/shardline/id/1.0.0";
/// Kademlia's bucket size (k), kept by nodes.
pub const DEFAULT_KBUCKET_SIZE: usize = 20;
/// Bucket size for a peer that runs discovery (coordinator, `SwarmClient`): its routing table keeps every peer it
/// learns of (up to this many per distance bucket), because discovery fetches the node record of each of them. With
/// k = 20 about half of a 50-node swarm falls into the one farthest bucket, and the surplus would be dropped.
pub const DISCOVERY_KBUCKET_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DhtError {
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {detail}")]
    Listen { addr: Multiaddr, detail: String },
    #[error("cannot dial {addr}: {detail}")]
    Dial { addr: Multiaddr, detail: String },
    /// Every bootstrap peer failed: `failures` holds one `address: reason` per peer.
    #[error("no bootstrap peer is reachable: {}", .failures.join("; "))]
    Unreachable { failures: Vec<String> },
    #[error("DHT query failed: {0}")]
    Query(String),
    #[error("the DHT event loop has stopped")]
    Stopped,
}

/// Settings of a DHT peer.
pub struct DhtConfig {
    pub keypair: Keypair,
    /// Multiaddrs to listen on (`/ip4/…/tcp/P`, `/ip4/…/udp/P/quic-v1`; port 0 picks one).
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, with or without `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Lifetime of value records we store for others when the publisher gives none.
    pub record_ttl: Duration,
    /// Lifetime of provider records, and how often kad re-publishes ours.
    pub provider_ttl: Duration,
    pub provider_republish: Duration,
    /// Peers kept per routing-table bucket ([`DEFAULT_KBUCKET_SIZE`]; [`DISCOVERY_KBUCKET_SIZE`] where discovery runs).
    pub kbucket_size: usize,
    pub filter: Arc<dyn RecordFilter>,
    /// How long to keep dialling when no bootstrap peer answers, before [`DhtClient::start`] fails. Zero (the
    /// default) fails at once; long-running processes (`shardline node`, `shardline coordinator`) wait a little, so
    /// a swarm started in one go does not depend on which process is up first. The first failure is logged at once.
    pub bootstrap_patience: Duration,
    /// A private swarm's membership list (`--allow-peers`, `allow.rs`): connections from other peers are closed at
    /// once. `None` admits every peer.
    pub allow_peers: Option<super::AllowList>,
    /// A private swarm's pre-shared key (`--swarm-key`, `private.rs`): connections run over TCP behind the key's
    /// handshake, and no QUIC. `None`: a public swarm over TCP and QUIC.
    pub swarm_key: Option<super::PreSharedKey>,
}

impl DhtConfig {
    /// Defaults of docs/ARCHITECTURE.md (discovery records): records live about 60 s; providers are re-published every 20 s.
    pub fn new(keypair: Keypair, listen: Vec<Multiaddr>, bootstrap: Vec<Multiaddr>) -> Self {
        Self {
            keypair,
            listen,
            bootstrap,
            record_ttl: Duration::from_secs(60),
            provider_ttl: Duration::from_secs(60),
            provider_republish: Duration::from_secs(20),
            kbucket_size: DEFAULT_KBUCKET_SIZE,
            filter: Arc::new(super::filter::AnnouncementFilter),
            bootstrap_patience: Duration::ZERO,
            allow_peers: None,
            swarm_key: None,
        }
    }

    /// The configuration of a peer that runs discovery: as [`DhtConfig::new`], with routing-table buckets of
    /// [`DISCOVERY_KBUCKET_SIZE`].
    pub fn for_discovery(keypair: Keypair, listen: Vec<Multiaddr>, bootstrap: Vec<Multiaddr>) -> Self {
        Self { kbucket_size: DISCOVERY_KBUCKET_SIZE, ..Self::new(keypair, listen, bootstrap) }
    }
}

/// What the event loop tells its owner about inbound traffic (only records that passed the filter).
#[derive(Clone, Debug)]
pub enum DhtEvent {
    /// A peer stored a record with us. `source` is the peer whose connection delivered it (for a node record, the
    /// announcement's signer, or a peer relaying it), `source_ip` that connection's remote IP address.
    RecordStored {
        source: PeerId,
        source_ip: Option<IpAddr>,
        record: Record,
    },
    /// A peer announced itself as a provider of `key`.
    ProviderAdded {
        key: RecordKey,
        provider: PeerId,
    },
    PeerConnected(PeerId),
}

/// A record a lookup found, with the connection that delivered it.
#[derive(Clone, Debug)]
pub struct FoundRecord {
    pub record: Record,
    /// The peer that answered with it; `None` when it came from our own store.
    pub from: Option<PeerId>,
    /// The remote IP address of our connection to `from`, when known.
    pub from_ip: Option<IpAddr>,
}

/// Peers whose last connection's remote IP address the event loop remembers beyond their connection (see
/// [`DhtClient::peer_ip`]); past this, only connected peers are kept.
const MAX_REMEMBERED_PEERS: usize = 65_536;

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
}

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), DhtError>>),
    PutRecord(Record, Quorum, oneshot::Sender<Result<(), DhtError>>),
    StartProviding(RecordKey, oneshot::Sender<Result<(), DhtError>>),
    GetProviders(RecordKey, oneshot::Sender<HashSet<PeerId>>),
    GetRecord(RecordKey, oneshot::Sender<Vec<FoundRecord>>),
    DialPeer(PeerId, oneshot::Sender<Result<(), DhtError>>),
    PeerIp(PeerId, oneshot::Sender<Option<IpAddr>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    RoutingPeers(oneshot::Sender<Vec<PeerId>>),
}

/// Handle on the DHT event loop. Cheap to clone; the loop stops when every handle is dropped.
#[derive(Clone)]
pub struct DhtClient {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for DhtClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhtClient").field("peer_id", &self.peer_id).finish()
    }
}

impl DhtClient {
    /// Builds the swarm, starts listening and dialling the bootstrap peers, and spawns the event loop on the current
    /// tokio runtime. Returns once every listener reported its address.
    ///
    /// With bootstrap peers it also waits (at most [`BOOTSTRAP_DIAL_WAIT`]) for the outcome of dialling them: when
    /// none answers, it fails with each address and the reason (`Connection refused (os error 111)`), so an operator
    /// hears of a wrong address at once; a peer that fails while another answers is logged.
    pub async fn start(config: DhtConfig) -> Result<(DhtClient, mpsc::Receiver<DhtEvent>), DhtError> {
        let peer_id = config.keypair.public().to_peer_id();
        let mut swarm = build_swarm(&config)?;
        // Which address each listener was started for, so a failing listener is reported by its own address.
        let mut listeners = HashMap::new();
        for addr in &config.listen {
            probe_port(addr)?;
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| DhtError::Listen { addr: addr.clone(), detail: e.to_string() })?;
            listeners.insert(id, addr.clone());
        }
        // Wait for the listen addresses, so callers can print and hand them out right away.
        let mut listen_addrs = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while listen_addrs.len() < listeners.len() {
            match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => listen_addrs.push(address),
                Ok(SwarmEvent::ListenerError { listener_id, error })
                | Ok(SwarmEvent::ListenerClosed { listener_id, reason: Err(error), .. }) => {
                    let addr = listeners.get(&listener_id).cloned().unwrap_or_else(Multiaddr::empty);
                    return Err(DhtError::Listen { addr, detail: root_cause(&error) });
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let event_loop = EventLoop {
            swarm,
            commands: cmd_rx,
            events: ev_tx,
            filter: config.filter.clone(),
            allow_peers: config.allow_peers.clone(),
            listen_addrs,
            pending_dial: HashMap::new(),
            pending_put: HashMap::new(),
            pending_provide: HashMap::new(),
            pending_providers: HashMap::new(),
            pending_record: HashMap::new(),
            peer_ips: HashMap::new(),
            bootstrapped: false,
        };
        tokio::spawn(event_loop.run());
        let client = DhtClient { peer_id, commands: cmd_tx };
        let give_up = tokio::time::Instant::now() + config.bootstrap_patience;
        let mut warned = false;
        loop {
            match client.join(&config.bootstrap).await {
                Err(e) if tokio::time::Instant::now() < give_up => {
                    if !warned {
                        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
                        warn!(error = %e, retry_for_s = left.as_secs(), "cannot join the swarm yet; retrying");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
                Ok(()) => break,
            }
        }
        if warned {
            info!("joined the swarm");
        }
        Ok((client, ev_rx))
    }

    /// Dials every bootstrap peer at once and waits for the outcomes (see [`DhtClient::start`]).
    async fn join(&self, bootstrap: &[Multiaddr]) -> Result<(), DhtError> {
        if bootstrap.is_empty() {
            return Ok(());
        }
        let dials = bootstrap.iter().map(|addr| async move {
            let outcome = match tokio::time::timeout(BOOTSTRAP_DIAL_WAIT, self.dial(addr.clone())).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(DhtError::Dial { detail, .. })) => Err(detail),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} s", BOOTSTRAP_DIAL_WAIT.as_secs())),
            };
            (addr, outcome)
        });
        let outcomes = futures::future::join_all(dials).await;
        let failures: Vec<String> =
            outcomes.iter().filter_map(|(a, o)| o.as_ref().err().map(|e| format!("{a}: {e}"))).collect();
        if failures.len() == outcomes.len() {
            return Err(DhtError::Unreachable { failures });
        }
        for f in &failures {
            warn!(peer = %f, "bootstrap peer unreachable; joined through the others");
        }
        Ok(())
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, DhtError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| DhtError::Stopped)?;
        rx.await.map_err(|_| DhtError::Stopped)
    }

    /// Dials a peer (`/p2p/<id>` optional); resolves once connected.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), DhtError> {
        self.ask(|tx| Command::Dial(addr, tx)).await?
    }

    /// Stores a record locally and at the closest peers (`Quorum::One`). Succeeds when at least one peer took it, or
    /// when no peer is known yet (the record is stored locally and served from here).
    pub async fn put_record(&self, record: Record) -> Result<(), DhtError> {
        self.ask(|tx| Command::PutRecord(record, Quorum::One, tx)).await?
    }

    /// Stores a record at every one of the closest peers, and resolves once each answered (or the query timed out):
    /// for a withdrawal, which must replace the node's record everywhere. With `Quorum::One` kad ends the query at
    /// the first success, and the peers it had not reached yet (beyond its parallelism of 3) never get the record.
    pub async fn put_record_everywhere(&self, record: Record) -> Result<(), DhtError> {
        self.ask(|tx| Command::PutRecord(record, Quorum::All, tx)).await?
    }

    /// Announces this peer as a provider of `key`.
    pub async fn start_providing(&self, key: RecordKey) -> Result<(), DhtError> {
        self.ask(|tx| Command::StartProviding(key, tx)).await?
    }

    /// Every provider of `key` the query finds (local store included).
    pub async fn get_providers(&self, key: RecordKey) -> Result<HashSet<PeerId>, DhtError> {
        self.ask(|tx| Command::GetProviders(key, tx)).await
    }

    /// Every copy of the record under `key` the query finds (local store included), unfiltered: callers verify.
    pub async fn get_record(&self, key: RecordKey) -> Result<Vec<Record>, DhtError> {
        Ok(self.get_record_from(key).await?.into_iter().map(|f| f.record).collect())
    }

    /// As [`DhtClient::get_record`], with the peer (and its address) that delivered each copy.
    pub async fn get_record_from(&self, key: RecordKey) -> Result<Vec<FoundRecord>, DhtError> {
        self.ask(|tx| Command::GetRecord(key, tx)).await
    }

    /// The remote IP address of our current connection to `peer`, or of the last one (remembered for up to
    /// [`MAX_REMEMBERED_PEERS`] peers). The address is what the network showed, not what the peer claims about
    /// itself (identify's listen addresses are never used).
    pub async fn peer_ip(&self, peer: PeerId) -> Result<Option<IpAddr>, DhtError> {
        self.ask(|tx| Command::PeerIp(peer, tx)).await
    }

    /// Connects to `peer` by its id, at the addresses Kademlia knows for it (routing table, running queries);
    /// resolves once connected (at once when connected already). The connection authenticates the peer's key.
    pub async fn connect(&self, peer: PeerId) -> Result<(), DhtError> {
        self.ask(|tx| Command::DialPeer(peer, tx)).await?
    }

    /// Full listen multiaddrs, each ending in `/p2p/<our peer id>`.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, DhtError> {
        self.ask(Command::ListenAddrs).await
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, DhtError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Every peer in the Kademlia routing table.
    pub async fn routing_peers(&self) -> Result<Vec<PeerId>, DhtError> {
        self.ask(Command::RoutingPeers).await
    }
}

fn build_swarm(config: &DhtConfig) -> Result<Swarm<Behaviour>, DhtError> {
    let peer_id = config.keypair.public().to_peer_id();
    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg
        .set_record_ttl(Some(config.record_ttl))
        .set_provider_record_ttl(Some(config.provider_ttl))
        .set_provider_publication_interval(Some(config.provider_republish))
        // Nodes re-publish their own announcements with fresh load; stale copies must not be re-spread by others.
        .set_publication_interval(None)
        .set_replication_interval(None)
        .set_record_filtering(StoreInserts::FilterBoth)
        // The event loop refreshes the routing table itself, and only while it knows a peer: kad's own timer warns
        // "No known peers" on every peer that starts a swarm.
        .set_periodic_bootstrap_interval(None)
        .set_query_timeout(Duration::from_secs(10))
        .set_kbucket_size(NonZeroUsize::new(config.kbucket_size).unwrap_or(NonZeroUsize::MIN));
    // Announcements are a few hundred bytes; every replica of a model is a provider of its key (kad keeps only 20 per
    // key by default, far too few for a swarm with many replicas).
    let store_cfg = MemoryStoreConfig {
        max_records: 65_536,
        max_value_bytes: 4096,
        max_providers_per_key: 4096,
        ..Default::default()
    };
    let keypair = config.keypair.clone();
    let behaviour = move |key: &Keypair| {
        let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::with_config(peer_id, store_cfg), kad_cfg);
        // Every shardline peer answers DHT queries, also on loopback or private addresses where kad's automatic mode
        // detection would leave it a client.
        kad.set_mode(Some(Mode::Server));
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("shardline/{}", env!("CARGO_PKG_VERSION"))),
        );
        Behaviour { kad, identify }
    };
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(120));
    let build = |e: &dyn std::fmt::Display| DhtError::Build(e.to_string());
    let swarm = match config.swarm_key {
        None => SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| build(&e))?
            .with_quic()
            .with_behaviour(behaviour)
            .map_err(|e| build(&e))?
            .with_swarm_config(idle)
            .build(),
        Some(psk) => {
            if let Some(a) = super::private::non_tcp(config.listen.iter().chain(&config.bootstrap)) {
                return Err(DhtError::Build(format!("a private swarm (--swarm-key) runs over TCP only: {a}")));
            }
            SwarmBuilder::with_existing_identity(keypair)
                .with_tokio()
                .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                    let noise = noise::Config::new(key)?;
                    Ok(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                        .upgrade(upgrade::Version::V1)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default()))
                })
                .map_err(|e| build(&e))?
                .with_behaviour(behaviour)
                .map_err(|e| build(&e))?
                .with_swarm_config(idle)
                .build()
        }
    };
    Ok(swarm)
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<DhtEvent>,
    filter: Arc<dyn RecordFilter>,
    allow_peers: Option<super::AllowList>,
    listen_addrs: Vec<Multiaddr>,
    pending_dial: HashMap<libp2p::swarm::ConnectionId, (Multiaddr, oneshot::Sender<Result<(), DhtError>>)>,
    pending_put: HashMap<QueryId, oneshot::Sender<Result<(), DhtError>>>,
    pending_provide: HashMap<QueryId, oneshot::Sender<Result<(), DhtError>>>,
    pending_providers: HashMap<QueryId, (HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>)>,
    pending_record: HashMap<QueryId, (Vec<FoundRecord>, oneshot::Sender<Vec<FoundRecord>>)>,
    /// The remote IP address of each peer's latest connection (see [`DhtClient::peer_ip`]).
    peer_ips: HashMap<PeerId, IpAddr>,
    bootstrapped: bool,
}

impl EventLoop {
    async fn run(mut self) {
        let mut refresh = tokio::time::interval(ROUTING_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.tick().await;
        loop {
            tokio::select! {
                _ = refresh.tick() => {
                    if self.swarm.connected_peers().next().is_some() {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
            }
        }
        debug!("DHT event loop stopped: every client was dropped");
    }

    fn emit(&self, event: DhtEvent) {
        if self.events.try_send(event).is_err() {
            debug!("DHT event dropped: nobody reads them or the reader is behind");
        }
    }

    /// Dials `addr`; with a trailing `/p2p/<id>` the peer id is checked on connection, without it it is learned.
    fn dial(&mut self, addr: Multiaddr) -> Result<libp2p::swarm::ConnectionId, DhtError> {
        let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id().address(addr.clone()).build();
        let opts = match addr.iter().last() {
            Some(Protocol::P2p(peer)) => {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                    .build()
            }
            _ => opts,
        };
        let id = opts.connection_id();
        self.swarm.dial(opts).map_err(|e| DhtError::Dial { addr, detail: dial_error_detail(&e) })?;
        Ok(id)
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Dial(addr, tx) if dial_target(&addr).is_some_and(|p| self.swarm.is_connected(&p)) => {
                let _ = tx.send(Ok(()));
            }
            Command::Dial(addr, tx) => match self.dial(addr.clone()) {
                Ok(id) => {
                    self.pending_dial.insert(id, (addr, tx));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
            Command::PutRecord(record, quorum, tx) => match self.swarm.behaviour_mut().kad.put_record(record, quorum) {
                Ok(id) => {
                    self.pending_put.insert(id, tx);
                }
                Err(e) => {
                    let _ = tx.send(Err(DhtError::Query(format!("local store refused the record: {e:?}"))));
                }
            },
            Command::StartProviding(key, tx) => match self.swarm.behaviour_mut().kad.start_providing(key) {
                Ok(id) => {
                    self.pending_provide.insert(id, tx);
                }
                Err(e) => {
                    let _ = tx.send(Err(DhtError::Query(format!("local store refused the provider record: {e:?}"))));
                }
            },
            Command::GetProviders(key, tx) => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.pending_providers.insert(id, (HashSet::new(), tx));
            }
            Command::GetRecord(key, tx) => {
                let id = self.swarm.behaviour_mut().kad.get_record(key);
                self.pending_record.insert(id, (Vec::new(), tx));
            }
            Command::PeerIp(peer, tx) => {
                let _ = tx.send(self.peer_ips.get(&peer).copied());
            }
            Command::DialPeer(peer, tx) if self.swarm.is_connected(&peer) => {
                let _ = tx.send(Ok(()));
            }
            Command::DialPeer(peer, tx) => {
                use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
                let opts = DialOpts::peer_id(peer).condition(PeerCondition::Disconnected).build();
                let id = opts.connection_id();
                let addr = Multiaddr::empty().with(Protocol::P2p(peer));
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dial.insert(id, (addr, tx));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(DhtError::Dial { addr, detail: dial_error_detail(&e) }));
                    }
                }
            }
            Command::ListenAddrs(tx) => {
                let me = *self.swarm.local_peer_id();
                let addrs = self.listen_addrs.iter().map(|a| a.clone().with(Protocol::P2p(me))).collect();
                let _ = tx.send(addrs);
            }
            Command::ConnectedPeers(tx) => {
                let _ = tx.send(self.swarm.connected_peers().copied().collect());
            }
            Command::RoutingPeers(tx) => {
                let peers = (self.swarm.behaviour_mut().kad.kbuckets())
                    .flat_map(|bucket| bucket.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>())
                    .collect();
                let _ = tx.send(peers);
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } if !self.listen_addrs.contains(&address) => {
                self.listen_addrs.push(address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, connection_id, .. }
                if self.allow_peers.as_ref().is_some_and(|a| !a.contains(&peer_id)) =>
            {
                warn!(peer = %peer_id, addr = %endpoint.get_remote_address(), "peer not on --allow-peers: disconnected");
                let _ = self.swarm.disconnect_peer_id(peer_id);
                if let Some((_, tx)) = self.pending_dial.remove(&connection_id) {
                    let detail = format!("peer {peer_id} is not on the allowed peer list");
                    let _ = tx.send(Err(DhtError::Dial { addr: endpoint.get_remote_address().clone(), detail }));
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, connection_id, .. } => {
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    self.remember_ip(peer_id, ip);
                }
                if endpoint.is_dialer() {
                    // Learned on dialling: bootstrap addresses may come without `/p2p/<id>`.
                    let addr = endpoint.get_remote_address().clone();
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    if !self.bootstrapped {
                        self.bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                    }
                }
                if let Some((_, tx)) = self.pending_dial.remove(&connection_id) {
                    let _ = tx.send(Ok(()));
                }
                self.emit(DhtEvent::PeerConnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError { connection_id, error, peer_id } => {
                debug!(?peer_id, %error, "outgoing connection failed");
                if let Some((addr, tx)) = self.pending_dial.remove(&connection_id) {
                    let _ = tx.send(Err(DhtError::Dial { addr, detail: dial_error_detail(&error) }));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) =>
            {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            _ => {}
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request: InboundRequest::PutRecord { source, record: Some(mut record), .. },
            } => match self.filter.accept_record(&source, &record) {
                Some(expires) => {
                    record.expires = Some(expires);
                    if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(record.clone()) {
                        warn!(error = ?e, "cannot store an accepted record");
                        return;
                    }
                    // The request arrived on a connection to `source`, so its address is known (recorded when that
                    // connection was established).
                    let source_ip = self.peer_ips.get(&source).copied();
                    self.emit(DhtEvent::RecordStored { source, source_ip, record });
                }
                None => debug!(%source, "record not stored"),
            },
            kad::Event::InboundRequest { request: InboundRequest::AddProvider { record: Some(record) } }
                if self.filter.accept_provider(&record) =>
            {
                let (key, provider) = (record.key.clone(), record.provider);
                if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().add_provider(record) {
                    warn!(error = ?e, "cannot store an accepted provider record");
                    return;
                }
                self.emit(DhtEvent::ProviderAdded { key, provider });
            }
            kad::Event::OutboundQueryProgressed { id, result, step, .. } => match result {
                QueryResult::PutRecord(res) => {
                    if let Some(tx) = self.pending_put.remove(&id) {
                        // `Quorum::All` asks for the replication factor (20): in a smaller swarm, every peer that
                        // took the record is all there is.
                        let res = match res {
                            Err(kad::PutRecordError::QuorumFailed { success, .. }) if !success.is_empty() => Ok(()),
                            other => other.map(|_| ()).map_err(|e| format!("{e:?}")),
                        };
                        let _ = tx.send(self.publish_outcome(res));
                    }
                }
                QueryResult::StartProviding(res) => {
                    if let Some(tx) = self.pending_provide.remove(&id) {
                        let _ = tx.send(self.publish_outcome(res.map(|_| ()).map_err(|e| format!("{e:?}"))));
                    }
                }
                QueryResult::GetProviders(res) => {
                    let finished = step.last;
                    if let Some((found, _)) = self.pending_providers.get_mut(&id)
                        && let Ok(GetProvidersOk::FoundProviders { providers, .. }) = res
                    {
                        found.extend(providers);
                    }
                    if finished && let Some((found, tx)) = self.pending_providers.remove(&id) {
                        let _ = tx.send(found);
                    }
                }
                QueryResult::GetRecord(res) => {
                    let finished = step.last;
                    if let Some((found, _)) = self.pending_record.get_mut(&id)
                        && let Ok(GetRecordOk::FoundRecord(peer_record)) = res
                    {
                        let from_ip = peer_record.peer.and_then(|p| self.peer_ips.get(&p).copied());
                        found.push(FoundRecord { record: peer_record.record, from: peer_record.peer, from_ip });
                    }
                    if finished && let Some((found, tx)) = self.pending_record.remove(&id) {
                        let _ = tx.send(found);
                    }
                }
                QueryResult::Bootstrap(Ok(ok)) => debug!(remaining = ok.num_remaining, "kad bootstrap step"),
                _ => {}
            },
            kad::Event::RoutingUpdated { peer, .. } => debug!(%peer, "kad routing table updated"),
            _ => {}
        }
    }

    /// Remembers `ip` as `peer`'s address; past [`MAX_REMEMBERED_PEERS`] peers, forgets those not connected.
    fn remember_ip(&mut self, peer: PeerId, ip: IpAddr) {
        if self.peer_ips.len() >= MAX_REMEMBERED_PEERS && !self.peer_ips.contains_key(&peer) {
            let swarm = &self.swarm;
            self.peer_ips.retain(|p, _| swarm.is_connected(p));
        }
        self.peer_ips.insert(peer, ip);
    }

    /// A publication that reached no peer is still a success while we know no peer at all: the record is in our store
    /// and is served from here; peers that join later fetch it or get the next re-publication.
    fn publish_outcome(&mut self, res: Result<(), String>) -> Result<(), DhtError> {
        match res {
            Ok(()) => Ok(()),
            Err(_) if self.swarm.connected_peers().next().is_none() => Ok(()),
            Err(e) => Err(DhtError::Query(e)),
        }
    }
}

/// How long [`DhtClient::start`] waits for the bootstrap peers to answer (a QUIC handshake gives up after 5 s).
pub const BOOTSTRAP_DIAL_WAIT: Duration = Duration::from_secs(10);

/// [`DhtConfig::bootstrap_patience`] of `shardline node` and `shardline coordinator`.
pub const SERVICE_BOOTSTRAP_PATIENCE: Duration = Duration::from_secs(30);

/// How often the routing table is refreshed (a Kademlia bootstrap) while some peer is connected.
const ROUTING_REFRESH: Duration = Duration::from_secs(300);

/// The innermost error of a chain: the OS error (`Connection refused (os error 111)`) rather than the wrappers around
/// it, which repeat it.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Why a dial failed, in a few words: per address tried, the innermost cause.
fn dial_error_detail(e: &libp2p::swarm::DialError) -> String {
    use libp2p::TransportError;
    use libp2p::swarm::DialError;
    match e {
        DialError::Transport(tries) => {
            let mut reasons: Vec<String> = tries
                .iter()
                .map(|(_, err)| match err {
                    TransportError::MultiaddrNotSupported(a) => format!("{a} is not a TCP or QUIC address"),
                    TransportError::Other(io) => root_cause(io),
                })
                .collect();
            reasons.dedup();
            reasons.join(", ")
        }
        DialError::WrongPeerId { obtained, .. } => format!("the peer there is {obtained}, not the one in the address"),
        other => root_cause(other),
    }
}

/// Refuses a listen address whose TCP or UDP port another process holds. libp2p's TCP listener sets
/// `SO_REUSEPORT`, so without this check a second process would listen on the same port beside the first.
fn probe_port(addr: &Multiaddr) -> Result<(), DhtError> {
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) | Protocol::Udp(port) if port != 0 => {
                let Some(ip) = ip else { return Ok(()) };
                let at = std::net::SocketAddr::new(ip, port);
                let taken = if matches!(p, Protocol::Tcp(_)) {
                    std::net::TcpListener::bind(at).err()
                } else {
                    std::net::UdpSocket::bind(at).err()
                };
                if let Some(e) = taken {
                    let kind = if matches!(p, Protocol::Tcp(_)) { "TCP" } else { "UDP" };
                    return Err(DhtError::Listen {
                        addr: addr.clone(),
                        detail: format!("{kind} port {port} is not free: {e}"),
                    });
                }
                return Ok(());
            }
            _ => {}
        }
    }
    Ok(())
}

/// The IP address a multiaddr starts with (`/ip4/…` or `/ip6/…`); `None` for other addresses (DNS, memory).
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next() {
        Some(Protocol::Ip4(a)) => Some(IpAddr::V4(a)),
        Some(Protocol::Ip6(a)) => Some(IpAddr::V6(a)),
        _ => None,
    }
}

/// The peer id at the end of a multiaddr, if any.
fn dial_target(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Logs the listen addresses in the form other processes pass to `--bootstrap`.
pub fn log_listen_addrs(addrs: &[Multiaddr]) {
    for a in addrs {
        info!(addr = %a, "p2p listening");
    }
}
