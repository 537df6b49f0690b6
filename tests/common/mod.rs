//! What the CLI tests share: child processes of the `shardline` binary that die with the test, their stdout read line
//! by line, and a CPU node on loopback.
#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader, Read, Write};
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
    let (p, rx) = spawn(&node_args(model, layers, "127.0.0.1:0", p2p_listen, bootstrap));
    let peer = wait_line(&rx, "peer id", Duration::from_secs(60));
    wait_line(&rx, "serving layers", Duration::from_secs(60));
    (p, peer)
}

/// Starts `shardline args…` with stdout and stderr each read line by line into a channel.
pub fn spawn_both(args: &[&str]) -> (Proc, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardline");
    let lines = |r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    };
    let out = lines(Box::new(child.stdout.take().expect("stdout")));
    let err = lines(Box::new(child.stderr.take().expect("stderr")));
    (Proc(child), out, err)
}

/// Runs `shardline args…` to its end; returns (exit code, stdout, stderr, seconds taken). Fails the test on a panic.
pub fn run(args: &[&str]) -> (i32, String, String, f64) {
    let t = Instant::now();
    let out = Command::new(BIN).args(args).env("RUST_LOG", "warn").output().expect("run shardline");
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "shardline {args:?} panicked: {stderr}");
    (out.status.code().unwrap_or(-1), stdout, stderr, secs)
}

/// A loopback port nothing listens on now (bound and released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// `GET url` (plain HTTP/1.1 on loopback); returns the status code and the body.
pub fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Waits until `GET url` answers `status`; returns how long that took.
pub fn wait_status(url: &str, status: u16, timeout: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if matches!(http_get(url), Ok((s, _)) if s == status) {
            return t.elapsed();
        }
        assert!(t.elapsed() < timeout, "{url} never answered {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A coordinator on loopback with the HTTP API serving `model`; returns it with its p2p address and API base URL.
pub fn coordinator_http(model: &str) -> (Proc, String, String) {
    let (p, rx) =
        spawn(&["coordinator", "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--model", model]);
    let addr = wait_line(&rx, "p2p listening on", Duration::from_secs(60));
    let http = wait_line(&rx, "http listening on", Duration::from_secs(60));
    (p, addr, http)
}

/// The arguments of a one-thread CPU node serving `layers` of `model`, its stage on `listen`, libp2p on `p2p_listen`,
/// joined through `bootstrap`; tests append their own flags.
pub fn node_args<'a>(
    model: &'a str,
    layers: &'a str,
    listen: &'a str,
    p2p_listen: &'a str,
    bootstrap: &'a str,
) -> Vec<&'a str> {
    vec![
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
        listen,
        "--p2p-listen",
        p2p_listen,
        "--bootstrap",
        bootstrap,
    ]
}

/// `method path` with an optional JSON body on a fresh connection, reading the reply for at most `read_timeout`:
/// the status and the raw body (chunked framing included).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    read_timeout: Duration,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(read_timeout)).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (status, body.to_string())
}
