//! The official `openai` Python package, unchanged, against the API of an in-process swarm on a tiny model: runs
//! `scripts/test-openai.py` (streaming and not, typed errors). Needs `python3` with `openai` installed
//! (`pip install openai`); without them the test prints why it is skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use shardline_coordinator::api::{self, ApiConfig, ApiState};
use shardline_coordinator::{CoordinatorArgs, start_coordinator};
use shardline_kernels::cpu::CpuBackend;
use shardline_node::stage::{NodeArgs, start_node};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};
use shardline_proto::LayerRange;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-openai.py")
}

fn python_with_openai() -> Result<(), String> {
    match Command::new("python3").args(["-c", "import openai"]).output() {
        Err(e) => Err(format!("python3 not runnable: {e}")),
        Ok(o) if !o.status.success() => {
            Err(format!("the openai package is missing: {}", String::from_utf8_lossy(&o.stderr).trim()))
        }
        Ok(_) => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_client_works_unchanged() {
    if let Err(why) = python_with_openai() {
        println!("skipped: {why}; run `pip install openai`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 4, context: 1024, ..TinySpec::default() }, &model).unwrap();
    let mut args = CoordinatorArgs::new(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()], vec![]);
    args.discovery.query_interval = Duration::from_millis(300);
    let coordinator = start_coordinator(args).await.unwrap();
    let state = ApiState::open(&coordinator, &[&model], ApiConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve(listener, state));
    let mut nodes = Vec::new();
    for (a, b) in [(0, 2), (2, 4)] {
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut n = NodeArgs::new(model.clone(), LayerRange::new(a, b), Arc::new(CpuBackend::new(1)), listen);
        n.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        n.bootstrap = coordinator.p2p_addrs.clone();
        n.measure_tokens = 4;
        nodes.push(start_node(n).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| coordinator.registry.contains(&n.peer_id)) {
        assert!(tokio::time::Instant::now() < deadline, "coordinator did not register every node");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = format!("http://{addr}/v1");
    let out = tokio::process::Command::new("python3")
        .arg(script())
        .args(["--base-url", &base, "--model", "tiny", "--max-tokens", "8"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "test-openai.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all checks passed"));
}
