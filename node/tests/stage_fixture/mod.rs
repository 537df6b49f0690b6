//! What the stage tests share: the two-layer tiny model as shards or as a stage server on loopback, a client
//! connection to that server, and an `Open` for it.
#![allow(dead_code)] // each test binary uses its own part

use std::path::Path;
use std::sync::Arc;

use shardline_kernels::cpu::CpuBackend;
use shardline_node::model::{LayerRange, ModelFiles, Shard, ShardOptions};
use shardline_node::stage::{StageConfig, StageServer};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};
use shardline_proto::tls;
use shardline_proto::wire::{Hop, SessionKey, SessionOpen, WireDType, WireSampling};

/// The model id the test stages serve.
pub const MODEL: &str = "tiny-test-model";
/// Hidden width of the default tiny model.
pub const WIDTH: usize = 64;

/// Layers `layers` of the model at `path`, on a one-thread CPU backend.
pub fn shard(path: &Path, layers: LayerRange) -> Arc<Shard> {
    let files = ModelFiles::open(path).expect("model opens");
    let shard = Shard::load(files.weights().as_ref(), layers, Arc::new(CpuBackend::new(1)), ShardOptions::default());
    Arc::new(shard.expect("shard loads"))
}

/// A stage server on loopback over both layers of a two-layer tiny model written to `dir`.
pub fn server(dir: &Path, config: StageConfig) -> StageServer {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 2, ..TinySpec::default() }, &path).expect("tiny model written");
    let listen = "127.0.0.1:0".parse().expect("valid address");
    StageServer::start(shard(&path, LayerRange::new(0, 2)), MODEL.into(), listen, config).expect("stage starts")
}

/// A connection to `s` from the loopback address `local` (another loopback address is another peer).
pub async fn connect_from(s: &StageServer, local: &str) -> quinn::Connection {
    let mut ep = quinn::Endpoint::client(format!("{local}:0").parse().expect("valid address")).expect("endpoint");
    ep.set_default_client_config(tls::client_config(s.fingerprint()).expect("client config"));
    ep.connect(s.local_addr(), tls::SERVER_NAME).expect("connect").await.expect("handshake")
}

/// A connection to `s` from 127.0.0.1.
pub async fn connect(s: &StageServer) -> quinn::Connection {
    connect_from(s, "127.0.0.1").await
}

/// A greedy `Open` of `span` of the two-layer tiny model, sending F32 hidden states on to `rest`, attachable with
/// `attach_key`.
pub fn open_with(span: LayerRange, rest: Vec<Hop>, attach_key: SessionKey) -> SessionOpen {
    SessionOpen {
        model_id: MODEL.into(),
        n_layers: 2,
        span,
        max_tokens: 64,
        sampling: WireSampling::GREEDY,
        n_top: 0,
        wire_dtype: WireDType::F32,
        hidden: WIDTH as u32,
        rest,
        attach_key,
        next_key: SessionKey::default(),
        next_record: Vec::new(),
    }
}
