//! What the CLI tests share: child processes of the `shardline` binary that die with the test, their stdout read line
//! by line, and a CPU node on loopback.
#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_shardline");

/// Kills the process when the test ends, however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `shardline args…` with its stdout read line by line into the returned channel (stderr is the test's).
pub fn spawn(args: &[&str]) -> (Proc, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn shardline");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (Proc(child), rx)
}

/// The rest of the first line that starts with `prefix`; lines before it are skipped.
pub fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no line starting with {prefix:?}"));
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.trim().to_string();
        }
    }
}

/// A coordinator on loopback (no HTTP); returns it with its p2p address, to bootstrap from.
pub fn coordinator() -> (Proc, String) {
    let (p, rx) = spawn(&["coordinator", "--p2p-listen", "/ip4/127.0.0.1/tcp/0"]);
    let addr = wait_line(&rx, "p2p listening on", Duration::from_secs(60));
    (p, addr)
}

/// A one-thread CPU node serving `layers` of `model` on loopback, joined through `bootstrap`, once it serves;
/// returns it with its peer id.
pub fn node(model: &str, layers: &str, p2p_listen: &str, bootstrap: &str) -> (Proc, String) {
    let (p, rx) = spawn(&[
        "node",
        "--model",
        model,
        "--layers",
        layers,
        "--device",
        "cpu",
        "--threads",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--p2p-listen",
        p2p_listen,
        "--bootstrap",
        bootstrap,
    ]);
    let peer = wait_line(&rx, "peer id", Duration::from_secs(60));
    wait_line(&rx, "serving layers", Duration::from_secs(60));
    (p, peer)
}
