//! How routing cost grows with the swarm.
//! - `routing/plan`: the route planner alone over 10 … 10,000 announced nodes of a 32- and an 80-layer model.
//! - `routing/registry`: the same from a populated `NodeRegistry` (snapshot, candidate list, plan), which is what a
//!   session pays per route request.
//! - `routing/dht_discovery`: wall time from starting 5, 20 and 50 announcing nodes (real libp2p swarms on loopback,
//!   all in this process) until a coordinator's registry holds every one, through DHT discovery alone.
//!
//! `SHARDLINE_BENCH_QUICK=1` shortens the measurement for smoke runs.

mod common;

use std::collections::HashSet;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use shardline_coordinator::routing::{self, Candidate};
use shardline_coordinator::{Discovery, DiscoveryConfig, NodeRegistry, RegistryConfig};
use shardline_kernels::rng::SplitMix64;
use shardline_node::announcer::{Announcer, AnnouncerConfig};
use shardline_proto::LayerRange;
use shardline_proto::announcement::{ShardAnnouncement, now_ms};
use shardline_proto::dht::{DhtClient, DhtConfig};
use shardline_proto::wire::WireDType;

const MODEL: &str = "be0c000000000000000000000000000000000000000000000000000000000001";

fn config() -> Criterion {
    common::config(common::Timing { samples: 20, full_ms: (3000, 3000), quick_ms: (200, 500) })
}

/// Layer spans of `n` nodes over `n_layers`: the first four tile the model (so a route always exists), the rest are
/// random spans of 1/8 to 1/2 of the model, as volunteers with different memory would pick.
fn spans(n: usize, n_layers: usize) -> Vec<LayerRange> {
    let mut rng = SplitMix64::new(n as u64 * 1000 + n_layers as u64);
    (0..n)
        .map(|i| {
            if i < 4 {
                LayerRange::new(i * n_layers / 4, (i + 1) * n_layers / 4)
            } else {
                let min = (n_layers / 8).max(1);
                let len = min + rng.below((n_layers / 2 - min + 1) as u64) as usize;
                let start = rng.below((n_layers - len + 1) as u64) as usize;
                LayerRange::new(start, start + len)
            }
        })
        .collect()
}

fn announcement(peer: PeerId, layers: LayerRange, n_layers: usize, rng: &mut SplitMix64) -> ShardAnnouncement {
    let now = now_ms();
    ShardAnnouncement {
        peer_id: peer,
        model_id: MODEL.into(),
        n_layers: n_layers as u32,
        hidden: 4096,
        layers,
        has_embeddings: layers.start == 0,
        has_head: layers.end == n_layers,
        // One address each, as on real machines (a registry takes at most 16 identities per IP address).
        quic_addr: SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 | rng.below(1 << 24) as u32), 4000)),
        cert_fingerprint: [7; 32],
        wire_dtype: WireDType::F16,
        max_sessions: 4,
        free_kv_tokens: 8192,
        decode_tps: 5.0 + rng.below(100) as f32,
        prefill_tps: 500.0,
        active_sessions: 0,
        batch_sessions: 0,
        queued: 0,
        software_version: "bench".into(),
        issued_at_ms: now,
        expires_at_ms: now + 3_600_000,
    }
}

fn bench_plan(c: &mut Criterion) {
    let excluded = HashSet::new();
    for n_layers in [32usize, 80] {
        let mut g = c.benchmark_group(format!("routing/plan/{n_layers}_layers"));
        for n in [10usize, 100, 1_000, 10_000] {
            let mut rng = SplitMix64::new(n as u64);
            let cands: Vec<Candidate> = spans(n, n_layers)
                .into_iter()
                .map(|layers| Candidate {
                    peer: PeerId::random(),
                    layers,
                    addr: "10.0.0.1:4000".parse().expect("addr"),
                    fingerprint: [7; 32],
                    decode_tps: 5.0 + rng.below(100) as f32,
                    ms_per_layer: None,
                    rtt: Duration::from_micros(200 + rng.below(50_000)),
                    in_flight: rng.below(3) as u32,
                    waiting: 0,
                    capacity: 4,
                    queue: None,
                })
                .collect();
            let route = routing::plan(MODEL, &cands, n_layers, &excluded, 1).expect("the first four nodes cover");
            assert_eq!(route.stages.last().map(|s| s.span.end), Some(n_layers));
            let mut tie = 0u64;
            g.bench_with_input(BenchmarkId::new("nodes", n), &cands, |b, cands| {
                b.iter(|| {
                    tie += 1;
                    routing::plan(MODEL, black_box(cands), n_layers, &excluded, tie).expect("route")
                })
            });
        }
        g.finish();
    }
}

fn bench_registry(c: &mut Criterion) {
    let excluded = HashSet::new();
    for n_layers in [32usize, 80] {
        let mut g = c.benchmark_group(format!("routing/registry/{n_layers}_layers"));
        for n in [10usize, 100, 1_000, 10_000] {
            let mut rng = SplitMix64::new(n as u64 + 1);
            let registry = NodeRegistry::new(RegistryConfig::default());
            for layers in spans(n, n_layers) {
                registry.upsert(announcement(PeerId::random(), layers, n_layers, &mut rng)).expect("upsert");
            }
            assert_eq!(registry.len(), n);
            let mut tie = 0u64;
            g.bench_function(BenchmarkId::new("nodes", n), |b| {
                b.iter(|| {
                    tie += 1;
                    let cands = routing::candidates(&registry, MODEL);
                    routing::plan(MODEL, &cands, n_layers, &excluded, tie).expect("route")
                })
            });
        }
        g.finish();
    }
}

fn tcp() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")
}

/// Longest wait for one discovery round.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// One discovery round: a coordinator, then `n` nodes that bootstrap from it and announce; returns the time from the
/// first node's start until the registry holds all of them, or `Err(registered)` after [`DISCOVERY_TIMEOUT`].
/// Everything lives on its own runtime, dropped afterwards, so no swarm outlives its round.
fn discovery_round(n: usize) -> Result<Duration, usize> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let elapsed = rt.block_on(async move {
        let (dht, events) =
            DhtClient::start(DhtConfig::for_discovery(Keypair::generate_ed25519(), vec![tcp()], vec![]))
                .await
                .expect("dht");
        let registry = NodeRegistry::new(RegistryConfig::default());
        let config = DiscoveryConfig {
            models: vec![MODEL.to_string()],
            query_interval: Duration::from_millis(250),
            sweep_interval: Duration::from_secs(1),
        };
        let _discovery = Discovery::spawn(dht.clone(), events, registry.clone(), config);
        let boot = dht.listen_addrs().await.expect("listen addrs");
        let start = Instant::now();
        let mut nodes = Vec::with_capacity(n);
        let mut rng = SplitMix64::new(n as u64);
        for i in 0..n {
            let key = Keypair::generate_ed25519();
            let peer = key.public().to_peer_id();
            let (node_dht, _events) =
                DhtClient::start(DhtConfig::new(key.clone(), vec![tcp()], boot.clone())).await.expect("node dht");
            let a = announcement(peer, LayerRange::new(i % 30, i % 30 + 1), 32, &mut rng);
            let announcer = Announcer::spawn(node_dht.clone(), key, AnnouncerConfig::default(), move || a.clone());
            nodes.push((node_dht, announcer, _events));
        }
        let deadline = Instant::now() + DISCOVERY_TIMEOUT;
        while registry.len() < n {
            if Instant::now() >= deadline {
                return Err(registry.len());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(start.elapsed())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    elapsed
}

fn bench_discovery(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing/dht_discovery");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for n in [5usize, 20, 50] {
        // A probe round first: a swarm size that does not converge is reported, not timed.
        if let Err(registered) = discovery_round(n) {
            eprintln!(
                "routing/dht_discovery/nodes/{n}: not measured, only {registered} of {n} nodes registered after {} s",
                DISCOVERY_TIMEOUT.as_secs()
            );
            continue;
        }
        // A later round that does not converge counts as the full timeout and is reported after the group.
        let mut stuck = Vec::new();
        g.bench_function(BenchmarkId::new("nodes", n), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        discovery_round(n).unwrap_or_else(|registered| {
                            stuck.push(registered);
                            DISCOVERY_TIMEOUT
                        })
                    })
                    .sum()
            })
        });
        if !stuck.is_empty() {
            eprintln!(
                "routing/dht_discovery/nodes/{n}: {} round(s) did not converge within {} s (registered: {stuck:?}); \
                 each was timed as the full timeout",
                stuck.len(),
                DISCOVERY_TIMEOUT.as_secs()
            );
        }
    }
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = bench_plan, bench_registry, bench_discovery }
criterion_main!(benches);
