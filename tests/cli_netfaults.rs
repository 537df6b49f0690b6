//! Network faults rather than dead processes (docs/RELIABILITY.md): a UDP relay in front of one stage, which it
//! advertises as its QUIC address, can black-hole every datagram (a cut cable: the process lives on, nothing gets
//! through) or drop a fraction of them (a lossy hop).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Proc, coordinator, node_args, spawn, wait_line};
use libp2p::{Multiaddr, PeerId};
use shardline_coordinator::{SwarmClient, SwarmClientConfig, SwarmSession};
use shardline_kernels::SamplingParams;
use shardline_node::generate::Stepper;
use shardline_node::model::{ModelFiles, ModelId};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};
use tokio::net::UdpSocket;

/// What the relay does to datagrams, in both directions.
#[derive(Default)]
struct Faults {
    blackhole: AtomicBool,
    /// Datagrams dropped per 1,000 (chosen at random).
    drop_permille: AtomicU32,
    dropped: AtomicU32,
    /// A SplitMix64 counter: which datagrams are dropped.
    rng: AtomicU64,
}

impl Faults {
    fn draw(&self) -> u64 {
        let mut z = self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pass(&self) -> bool {
        if self.blackhole.load(Ordering::Relaxed)
            || self.draw() % 1000 < u64::from(self.drop_permille.load(Ordering::Relaxed))
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// A UDP relay on loopback forwarding to `target`: one upstream socket per client address, so answers find their way
/// back. Returns its address.
async fn relay(target: SocketAddr, faults: Arc<Faults>) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else { return };
            let up = match ups.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    u.connect(target).await.unwrap();
                    let (u2, front2, faults2) = (u.clone(), front.clone(), faults.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = u2.recv(&mut buf).await {
                            if faults2.pass() {
                                let _ = front2.send_to(&buf[..n], from).await;
                            }
                        }
                    });
                    ups.insert(from, u.clone());
                    u
                }
            };
            if faults.pass() {
                let _ = up.send(&buf[..n]).await;
            }
        }
    });
    addr
}

/// A one-thread CPU node on loopback; `advertise` replaces its QUIC address in the announcement.
fn node_at(model: &str, layers: &str, bootstrap: &str, listen: &str, advertise: Option<&str>) -> (Proc, PeerId) {
    let mut args = node_args(model, layers, listen, "/ip4/127.0.0.1/tcp/0", bootstrap);
    args.extend_from_slice(&["--kv-cache-mib", "16"]);
    if let Some(a) = advertise {
        args.extend_from_slice(&["--advertise", a]);
    }
    let (p, rx) = spawn(&args);
    let peer = wait_line(&rx, "peer id", Duration::from_secs(60));
    wait_line(&rx, "serving layers", Duration::from_secs(60));
    (p, peer.parse().expect("peer id"))
}

/// A UDP port free now on loopback (bound and released).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const GREEDY: SamplingParams = SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 1 };

async fn decode(s: &mut SwarmSession, out: &mut Vec<u32>, until: usize) {
    while out.len() < until {
        let t = *out.last().unwrap();
        out.push(s.step(&[t], &GREEDY, 0).await.expect("decode step").token);
    }
}

/// A swarm of a head (`0..2`) and a tail (`2..4`) behind a relay, and a client that sees both.
struct Swarm {
    procs: Vec<Proc>,
    client: SwarmClient,
    relayed: PeerId,
    faults: Arc<Faults>,
    boot: String,
    dir: tempfile::TempDir,
}

impl Swarm {
    /// A second tail, not behind the relay, once the client has registered it.
    async fn add_tail(&mut self) -> PeerId {
        let model = self.dir.path().join("tiny.gguf");
        let (p, other) = node_at(model.to_str().unwrap(), "2..4", &self.boot, "127.0.0.1:0", None);
        self.procs.push(p);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.client.registry().contains(&other) {
            assert!(Instant::now() < deadline, "the second tail registered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        other
    }
}

async fn swarm() -> Swarm {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 4, context: 512, ..TinySpec::default() }, &path).unwrap();
    let id = ModelId::of(ModelFiles::open(&path).unwrap().weights().as_ref()).unwrap().to_hex();
    let model = path.to_str().unwrap();
    let (coord, boot) = coordinator();
    let (head, head_id) = node_at(model, "0..2", &boot, "127.0.0.1:0", None);
    let faults = Arc::new(Faults::default());
    let port = free_udp_port();
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let front = relay(target, faults.clone()).await;
    let (relayed_p, relayed) = node_at(model, "2..4", &boot, &target.to_string(), Some(&front.to_string()));
    let mut cfg = SwarmClientConfig::new(&id, vec![boot.parse::<Multiaddr>().unwrap()]);
    cfg.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.discovery.query_interval = Duration::from_millis(300);
    let client = SwarmClient::join(cfg).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ![head_id, relayed].iter().all(|p| client.registry().contains(p)) {
        assert!(Instant::now() < deadline, "every node registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Swarm { procs: vec![coord, head, relayed_p], client, relayed, faults, boot, dir }
}

const PROMPT: [u32; 8] = [1, 40, 41, 42, 100, 200, 7, 9];

/// A session through the relayed tail (the only one yet), with its first token.
async fn session_through(sw: &Swarm, len: usize) -> (SwarmSession, Vec<u32>) {
    let mut s = sw.client.session(PROMPT.len() + len + 1, GREEDY, 0);
    let first = s.step(&PROMPT, &GREEDY, 0).await.unwrap().token;
    assert_eq!(s.routes()[0][1], sw.relayed);
    (s, vec![first])
}

async fn undisturbed(sw: &Swarm, len: usize) -> Vec<u32> {
    let mut s = sw.client.session(PROMPT.len() + len + 1, GREEDY, 0);
    let mut out = vec![s.step(&PROMPT, &GREEDY, 0).await.unwrap().token];
    decode(&mut s, &mut out, len).await;
    s.close().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_network_is_cut_is_noticed_within_seconds_and_the_text_is_unchanged() {
    let mut sw = swarm().await;
    let expected = undisturbed(&sw, 24).await;
    let (mut s, mut out) = session_through(&sw, 24).await;
    decode(&mut s, &mut out, 8).await;
    let other = sw.add_tail().await;
    sw.faults.blackhole.store(true, Ordering::SeqCst);
    let t = Instant::now();
    decode(&mut s, &mut out, 9).await;
    let took = t.elapsed();
    decode(&mut s, &mut out, 24).await;
    eprintln!("network of a stage cut: next token {took:?} later");
    assert_eq!(out, expected, "the text after the cut differs from the undisturbed run");
    assert_eq!(s.failovers(), 1);
    assert_eq!(s.routes().last().unwrap()[1], other);
    assert!(took < Duration::from_secs(5), "the cut took {took:?} to notice (the QUIC idle timeout is 8 s)");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_packet_loss_on_a_hop_costs_no_failover_and_no_token() {
    let sw = swarm().await;
    let expected = undisturbed(&sw, 48).await;
    sw.faults.drop_permille.store(100, Ordering::SeqCst);
    let (mut s, mut out) = session_through(&sw, 48).await;
    let t = Instant::now();
    decode(&mut s, &mut out, 48).await;
    let took = t.elapsed();
    let dropped = sw.faults.dropped.load(Ordering::SeqCst);
    eprintln!("10% loss: 47 decode steps in {took:?}, {dropped} datagrams dropped");
    assert!(dropped > 0, "the relay dropped datagrams");
    assert_eq!(out, expected, "the text under packet loss differs from the undisturbed run");
    assert_eq!(s.failovers(), 0, "packet loss is not a death");
    s.close().await;
}
