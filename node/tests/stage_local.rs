//! The stage core run by the in-process driver: a two-stage pipeline of the tiny model, wired in memory, draws the
//! same greedy tokens as the whole model run directly through `Shard` (an independent path: no core, no wire), frees
//! the KV cache of both stages on close, and reports a last stage that went away to the owner as `Downstream`.

mod stage_fixture;

use std::net::SocketAddr;
use std::sync::Arc;

use stage_fixture::{MODEL, open_with, shard};

use shardline_kernels::SamplingParams;
use shardline_node::model::{LayerRange, ShardInput, ShardOutput};
use shardline_node::stage::{LocalSwarm, ShardStage, StageConfig};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};
use shardline_proto::wire::{ErrorCode, Frame, Hop, SessionKey, SessionOpen, StageData};

fn open(span: LayerRange, rest: Vec<Hop>) -> SessionOpen {
    open_with(span, rest, SessionKey::default())
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Greedy tokens of the whole model, straight through `Shard`: the prompt, then each drawn token fed back.
fn reference(path: &std::path::Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let whole = shard(path, LayerRange::new(0, 2));
    let mut kv = whole.open_session(64).unwrap();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let ShardOutput::Logits(l) = whole.forward(&mut kv, ShardInput::Tokens(&input)).unwrap() else {
            panic!("the whole model ends at the head")
        };
        let t = whole.sample(&l, &SamplingParams::GREEDY, kv.len() as u64, 0).unwrap().token;
        out.push(t);
        input = vec![t];
    }
    out
}

fn token(swarm: &mut LocalSwarm<Arc<ShardStage>>, c: shardline_node::stage::local::ClientStream) -> u32 {
    match swarm.recv(c) {
        Some(Frame::Token { result, .. }) => result.token,
        other => panic!("expected a token, got {other:?}"),
    }
}

#[test]
fn a_two_stage_pipeline_in_memory_draws_the_whole_models_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 2, ..TinySpec::default() }, &path).unwrap();
    let prompt = [5, 6, 7, 8];
    let expected = reference(&path, &prompt, 6);

    let (first, last) = (shard(&path, LayerRange::new(0, 1)), shard(&path, LayerRange::new(1, 2)));
    let mut swarm = LocalSwarm::new();
    swarm.add_stage(addr(1), Arc::new(ShardStage::new(first.clone(), MODEL.into())), StageConfig::default());
    swarm.add_stage(addr(2), Arc::new(ShardStage::new(last.clone(), MODEL.into())), StageConfig::default());

    // The owner opens the last stage first, then the first one, which attaches to it.
    let c2 = swarm.connect(addr(2)).unwrap();
    swarm.send(c2, Frame::Open { session: 1, open: open(LayerRange::new(1, 2), vec![]) });
    swarm.run();
    assert_eq!(swarm.recv(c2), Some(Frame::Opened { session: 1 }));
    let hop = Hop { layers: LayerRange::new(1, 2), addr: addr(2), fingerprint: [0; 32] };
    let c1 = swarm.connect(addr(1)).unwrap();
    swarm.send(c1, Frame::Open { session: 1, open: open(LayerRange::new(0, 1), vec![hop]) });
    swarm.run();
    assert_eq!(swarm.recv(c1), Some(Frame::Opened { session: 1 }));

    // Prefill in two chunks (only the last asks for a token), then decode.
    swarm
        .send(c1, Frame::Prefill { session: 1, position: 0, last: false, data: StageData::Tokens(prompt[..2].into()) });
    swarm.send(c1, Frame::Prefill { session: 1, position: 2, last: true, data: StageData::Tokens(prompt[2..].into()) });
    swarm.run();
    let mut got = vec![token(&mut swarm, c2)];
    let mut position = prompt.len() as u64;
    while got.len() < expected.len() {
        let t = *got.last().unwrap();
        swarm.send(c1, Frame::Decode { session: 1, position, data: StageData::Tokens(vec![t]) });
        swarm.run();
        got.push(token(&mut swarm, c2));
        position += 1;
    }
    assert_eq!(got, expected);

    // Close from the owner: both stages end the session and free their KV cache.
    swarm.send(c1, Frame::Close { session: 1 });
    swarm.run();
    assert!(swarm.is_finished(c1));
    assert_eq!(swarm.core(addr(1)).unwrap().active_sessions(), 0);
    assert_eq!(swarm.core(addr(2)).unwrap().active_sessions(), 0);
    assert_eq!(first.free_kv_tokens(), first.kv_capacity_tokens());
    assert_eq!(last.free_kv_tokens(), last.kv_capacity_tokens());
}

#[test]
fn a_last_stage_that_went_away_is_reported_to_the_owner_as_downstream() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 2, ..TinySpec::default() }, &path).unwrap();
    let (first, last) = (shard(&path, LayerRange::new(0, 1)), shard(&path, LayerRange::new(1, 2)));
    let mut swarm = LocalSwarm::new();
    swarm.add_stage(addr(1), Arc::new(ShardStage::new(first.clone(), MODEL.into())), StageConfig::default());
    swarm.add_stage(addr(2), Arc::new(ShardStage::new(last.clone(), MODEL.into())), StageConfig::default());
    let c2 = swarm.connect(addr(2)).unwrap();
    swarm.send(c2, Frame::Open { session: 1, open: open(LayerRange::new(1, 2), vec![]) });
    let hop = Hop { layers: LayerRange::new(1, 2), addr: addr(2), fingerprint: [0; 32] };
    let c1 = swarm.connect(addr(1)).unwrap();
    swarm.send(c1, Frame::Open { session: 1, open: open(LayerRange::new(0, 1), vec![hop]) });
    swarm.run();
    assert_eq!(swarm.recv(c1), Some(Frame::Opened { session: 1 }));
    // The last stage's owner stream is reset: it ends the session and stops reading its data stream, so the first
    // stage's next output cannot be delivered.
    swarm.reset(c2);
    swarm.run();
    assert_eq!(swarm.core(addr(2)).unwrap().active_sessions(), 0);
    swarm.send(c1, Frame::Prefill { session: 1, position: 0, last: true, data: StageData::Tokens(vec![1, 2]) });
    swarm.run();
    match swarm.recv(c1) {
        Some(Frame::Error { code: ErrorCode::Downstream, session: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(swarm.is_finished(c1));
    assert_eq!(first.free_kv_tokens(), first.kv_capacity_tokens());
    assert_eq!(last.free_kv_tokens(), last.kv_capacity_tokens());
}
