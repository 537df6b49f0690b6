//! One stage hop on loopback, measured three ways in the same run over the same bytes:
//! - `framed`: our codec (`write_frame`/`read_frame`, limits checked) over a QUIC stream with the stage's TLS and
//!   transport configuration (the client pins the server's certificate fingerprint), echoed back by a server that
//!   decodes and re-encodes every frame — what a stage hop costs without the compute;
//! - `quinn`: a bare quinn echo of the encoded bytes on the same configuration (no codec);
//! - `tcp`: a plain tokio TCP echo (`TCP_NODELAY`) of the same bytes: the loopback floor.
//!
//! Two payloads: a one-token frame (SmolLM2 hidden state, 576 × f32 + header: latency) and a 512-token prefill chunk
//! (512 × 576 × f32: throughput). Each iteration is one round trip, so the reported time is the RTT and the
//! throughput counts the bytes of one direction. Criterion measures the three one after another, so a change of
//! background load between them shows up as a difference; the bench therefore also prints a paired comparison:
//! rounds of round trips alternating between the three echoes, and the median of the per-round ratios.
//! `SHARDLINE_BENCH_QUICK=1` shortens the measurement.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shardline_proto::tls::{self, StageIdentity};
use shardline_proto::wire::{Frame, HiddenStates, Limits, StageData, read_frame, write_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// SmolLM2's hidden width.
const HIDDEN: usize = 576;

fn config() -> Criterion {
    common::config(common::Timing { samples: 20, full_ms: (3000, 4000), quick_ms: (300, 1000) })
}

fn frame(n_tokens: usize) -> Frame {
    let values: Vec<f32> = (0..n_tokens * HIDDEN).map(|i| (i % 97) as f32 / 97.0).collect();
    let data = StageData::Hidden(HiddenStates::from_f32(n_tokens, HIDDEN, &values).expect("hidden states"));
    if n_tokens == 1 {
        Frame::Decode { session: 1, position: 7, data }
    } else {
        Frame::Prefill { session: 1, position: 0, last: false, data }
    }
}

/// The client end of one echo, ready for round trips.
enum Echo {
    Framed { send: quinn::SendStream, recv: quinn::RecvStream, _conn: quinn::Connection, _ep: quinn::Endpoint },
    Quinn { send: quinn::SendStream, recv: quinn::RecvStream, _conn: quinn::Connection, _ep: quinn::Endpoint },
    Tcp(TcpStream),
}

/// A QUIC echo server with a fresh stage identity; `framed` decodes and re-encodes frames, otherwise it echoes
/// `len`-byte messages. Returns the connected client's streams.
async fn quic_echo(framed: bool, len: usize) -> Echo {
    let id = StageIdentity::generate().expect("identity");
    let server = quinn::Endpoint::server(id.server_config().expect("server config"), "127.0.0.1:0".parse().unwrap())
        .expect("server endpoint");
    let addr = server.local_addr().expect("addr");
    tokio::spawn(async move {
        let Some(incoming) = server.accept().await else { return };
        let Ok(conn) = incoming.await else { return };
        let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
        if framed {
            let limits = Limits::default();
            while let Ok(Some(f)) = read_frame(&mut recv, &limits).await {
                if write_frame(&mut send, &f).await.is_err() {
                    break;
                }
            }
        } else {
            let mut buf = vec![0u8; len];
            while recv.read_exact(&mut buf).await.is_ok() {
                if send.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
        drop(server);
    });
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    ep.set_default_client_config(tls::client_config(id.fingerprint()).expect("client config"));
    let conn = ep.connect(addr, tls::SERVER_NAME).expect("connect").await.expect("handshake");
    let (send, recv) = conn.open_bi().await.expect("stream");
    if framed {
        Echo::Framed { send, recv, _conn: conn, _ep: ep }
    } else {
        Echo::Quinn { send, recv, _conn: conn, _ep: ep }
    }
}

async fn tcp_echo(len: usize) -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else { return };
        let _ = s.set_nodelay(true);
        let mut buf = vec![0u8; len];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    Echo::Tcp(s)
}

impl Echo {
    /// `iters` round trips of `frame` (whose encoding is `bytes`); returns the time they took.
    async fn round_trips(&mut self, iters: u64, frame: &Frame, bytes: &[u8], buf: &mut [u8]) -> Duration {
        let limits = Limits::default();
        let start = Instant::now();
        for _ in 0..iters {
            match self {
                Echo::Framed { send, recv, .. } => {
                    write_frame(send, frame).await.expect("write frame");
                    let back = read_frame(recv, &limits).await.expect("read frame").expect("a frame");
                    debug_assert_eq!(back.session(), 1);
                }
                Echo::Quinn { send, recv, .. } => {
                    send.write_all(bytes).await.expect("write");
                    recv.read_exact(buf).await.expect("read");
                }
                Echo::Tcp(s) => {
                    s.write_all(bytes).await.expect("write");
                    s.read_exact(buf).await.expect("read");
                }
            }
        }
        start.elapsed()
    }
}

fn bench_hop(c: &mut Criterion) {
    let rt: Runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    for (name, n_tokens) in [("one_token", 1usize), ("prefill_512", 512)] {
        let f = frame(n_tokens);
        let bytes = f.encode();
        let mut g = c.benchmark_group(format!("quic/{name}"));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut echoes = Vec::new();
        for kind in ["framed", "quinn", "tcp"] {
            let mut echo = rt.block_on(async {
                match kind {
                    "framed" => quic_echo(true, bytes.len()).await,
                    "quinn" => quic_echo(false, bytes.len()).await,
                    _ => tcp_echo(bytes.len()).await,
                }
            });
            let mut buf = vec![0u8; bytes.len()];
            // The echo returns exactly what was sent.
            rt.block_on(echo.round_trips(1, &f, &bytes, &mut buf));
            if !matches!(echo, Echo::Framed { .. }) {
                assert_eq!(buf, bytes, "{kind} echo");
            }
            g.bench_function(BenchmarkId::new(kind, bytes.len()), |b| {
                b.iter_custom(|iters| rt.block_on(echo.round_trips(iters, &f, &bytes, &mut buf)))
            });
            echoes.push(echo);
        }
        g.finish();
        paired(&rt, name, &mut echoes, &f, &bytes);
    }
}

/// Alternates rounds of round trips over `echoes` (framed, quinn, tcp) and prints the median round trip of each and
/// the median of the per-round ratios framed / quinn and quinn / tcp.
fn paired(rt: &Runtime, name: &str, echoes: &mut [Echo], frame: &Frame, bytes: &[u8]) {
    let quick = common::quick();
    let (rounds, per_round) = match (quick, bytes.len() > 100_000) {
        (true, true) => (5, 10),
        (true, false) => (5, 200),
        (false, true) => (21, 20),
        (false, false) => (21, 500),
    };
    let mut buf = vec![0u8; bytes.len()];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); echoes.len()];
    for _ in 0..rounds {
        for (i, echo) in echoes.iter_mut().enumerate() {
            let t = rt.block_on(echo.round_trips(per_round, frame, bytes, &mut buf));
            times[i].push(t.as_secs_f64() / per_round as f64);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratio = |a: usize, b: usize| median(times[a].iter().zip(&times[b]).map(|(x, y)| x / y).collect());
    eprintln!(
        "quic/{name} paired ({rounds} rounds x {per_round} round trips, {} bytes): median RTT framed {:.1} µs, \
         quinn {:.1} µs, tcp {:.1} µs; per-round ratio framed/quinn {:.2}x, quinn/tcp {:.2}x",
        bytes.len(),
        median(times[0].clone()) * 1e6,
        median(times[1].clone()) * 1e6,
        median(times[2].clone()) * 1e6,
        ratio(0, 1),
        ratio(1, 2),
    );
}

criterion_group! { name = benches; config = config(); targets = bench_hop }
criterion_main!(benches);
