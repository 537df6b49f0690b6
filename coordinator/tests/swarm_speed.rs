//! Speed measurements for docs/PERFORMANCE.md (ignored by default; run with
//! `cargo test --release -p shardline-coordinator --test swarm_speed -- --ignored --nocapture`):
//! decode tokens/s of a 3-stage loopback pipeline vs the single-process engine on SmolLM2, and the round trip of a
//! one-token hidden-state frame through our codec vs a bare quinn echo of the same bytes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardline_coordinator::SwarmClient;
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, SamplingParams};
use shardline_node::generate::Stepper;
use shardline_node::model::{LayerRange, ModelFiles, Shard, ShardOptions};
use shardline_node::test_models::model_for_tests;
use shardline_proto::tls::{self, StageIdentity};
use shardline_proto::wire::{Frame, HiddenStates, Limits, StageData, read_frame, write_frame};

fn backend() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly in release"]
async fn decode_throughput_three_stages_vs_single_process() {
    let Some(model) = model_for_tests("decode_throughput_three_stages_vs_single_process") else { return };
    let prompt: Vec<u32> = (0..16u32).map(|i| 100 + i).collect();
    let files = ModelFiles::open(&model).unwrap();
    let w = files.weights();
    let shard = Shard::load(w.as_ref(), LayerRange::new(0, 30), backend(), ShardOptions::default()).unwrap();
    let pipeline = shardline_node::generate::LocalPipeline::new(vec![Arc::new(shard)]).unwrap();

    let (nodes, boot) = common::start_nodes(&model, &[(0, 10), (10, 20), (20, 30)], &[], 2, |_| {}).await;
    let client = SwarmClient::join(common::client_config(&nodes[0].model_id, &boot)).await.unwrap();
    client.wait_for_coverage(Duration::from_secs(30)).await.unwrap();

    // Rounds alternate between the two so that a change of background load hits both alike; the median of the
    // per-round ratios is reported. The local session lives on its own thread (it borrows the pipeline).
    let total = prompt.len() + ROUNDS * STEPS_PER_ROUND + 1;
    let mut swarm = client.session(total, SamplingParams::GREEDY, 0);
    let mut ts = swarm.step(&prompt, &SamplingParams::GREEDY, 0).await.unwrap().token;
    let (to_local, requests) = std::sync::mpsc::channel::<Vec<u32>>();
    let (replies, from_local) = std::sync::mpsc::channel::<(u32, f64)>();
    let local = std::thread::spawn(move || {
        let mut s = pipeline.open_session(total).unwrap();
        while let Ok(tokens) = requests.recv() {
            // A one-element request is a round of decode steps starting from that token; longer ones are the prompt.
            let start = Instant::now();
            let mut t = s.step_sync(&tokens, &SamplingParams::GREEDY, 0).unwrap().token;
            if tokens.len() == 1 {
                for _ in 1..STEPS_PER_ROUND {
                    t = s.step_sync(&[t], &SamplingParams::GREEDY, 0).unwrap().token;
                }
            }
            replies.send((t, start.elapsed().as_secs_f64())).unwrap();
        }
    });
    to_local.send(prompt.clone()).unwrap();
    let (mut tl, _) = from_local.recv().unwrap();
    assert_eq!(ts, tl, "first token agrees");
    let mut ratios = Vec::new();
    let (mut local_secs, mut swarm_secs) = (0.0, 0.0);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..STEPS_PER_ROUND {
            ts = swarm.step(&[ts], &SamplingParams::GREEDY, 0).await.unwrap().token;
        }
        let sw = start.elapsed().as_secs_f64();
        to_local.send(vec![tl]).unwrap();
        let (t, lo) = tokio::task::block_in_place(|| from_local.recv().unwrap());
        tl = t;
        assert_eq!(ts, tl, "greedy tokens agree");
        ratios.push(lo / sw);
        local_secs += lo;
        swarm_secs += sw;
    }
    drop(to_local);
    local.join().unwrap();
    ratios.sort_by(f64::total_cmp);
    let n = (ROUNDS * STEPS_PER_ROUND) as f64;
    println!(
        "decode tokens/s: single process {:.1}, 3-stage loopback swarm {:.1}; swarm/local per round: median {:.2}x \
         (min {:.2}x, max {:.2}x)",
        n / local_secs,
        n / swarm_secs,
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

const ROUNDS: usize = 8;
const STEPS_PER_ROUND: usize = 8;

/// Median round trip of `rounds` echoes over one stream, after a warm-up.
async fn echo_rtt(raw: bool, payload: usize, rounds: usize) -> Duration {
    let id = StageIdentity::generate().unwrap();
    let server = quinn::Endpoint::server(id.server_config().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let limits = Limits::default();
        if raw {
            let mut buf = vec![0u8; payload];
            while recv.read_exact(&mut buf).await.is_ok() {
                send.write_all(&buf).await.unwrap();
            }
        } else {
            while let Ok(Some(f)) = read_frame(&mut recv, &limits).await {
                write_frame(&mut send, &f).await.unwrap();
            }
        }
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(tls::client_config(id.fingerprint()).unwrap());
    let conn = client.connect(addr, tls::SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hidden = vec![0.5f32; (payload - shardline_proto::wire::HEADER_LEN) / 4];
    let frame = Frame::Decode {
        session: 1,
        position: 7,
        data: StageData::Hidden(HiddenStates::from_f32(1, hidden.len(), &hidden).unwrap()),
    };
    let bytes = frame.encode();
    assert_eq!(bytes.len(), payload);
    let limits = Limits::default();
    let mut times = Vec::with_capacity(rounds);
    let mut buf = vec![0u8; payload];
    for i in 0..rounds + 50 {
        let t = Instant::now();
        if raw {
            send.write_all(&bytes).await.unwrap();
            recv.read_exact(&mut buf).await.unwrap();
        } else {
            write_frame(&mut send, &frame).await.unwrap();
            let back = read_frame(&mut recv, &limits).await.unwrap().unwrap();
            assert_eq!(back.session(), 1);
        }
        if i >= 50 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly in release"]
async fn one_token_frame_hop_vs_bare_quinn_echo() {
    // One SmolLM2 position in f32: 576 x 4 bytes of hidden state plus the 36-byte header.
    let size = 576 * 4 + shardline_proto::wire::HEADER_LEN;
    let bare = echo_rtt(true, size, 2000).await;
    let framed = echo_rtt(false, size, 2000).await;
    println!("round trip of a {size}-byte one-token frame: bare quinn echo {bare:?}, shardline codec {framed:?}");
}

/// The swarm's own cost per decode step: a 3-stage pipeline of a tiny model whose compute is negligible, so the
/// time per step is three hops, the token back to the owner, and the per-stage bookkeeping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly in release"]
async fn per_step_overhead_of_a_three_stage_pipeline() {
    use shardline_node::test_models::{TinySpec, write_tiny_gguf};
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec { n_layers: 3, context: 4096, ..TinySpec::default() };
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&spec, &model).unwrap();
    let (nodes, boot) = common::start_nodes(&model, &[(0, 1), (1, 2), (2, 3)], &[], 2, |_| {}).await;
    let client = SwarmClient::join(common::client_config(&nodes[0].model_id, &boot)).await.unwrap();
    client.wait_for_coverage(Duration::from_secs(30)).await.unwrap();
    let steps = 2000;
    let mut s = client.session(steps + 8, SamplingParams::GREEDY, 0);
    let mut t = s.step(&[1, 2, 3], &SamplingParams::GREEDY, 0).await.unwrap().token;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        t = s.step(&[t], &SamplingParams::GREEDY, 0).await.unwrap().token;
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "3-stage tiny-model decode step: median {:?}, p90 {:?} (three hops + token back + stage bookkeeping)",
        times[steps / 2],
        times[steps * 9 / 10]
    );
}
