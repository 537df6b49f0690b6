//! `shardline nodes`: the dashboard's node and coverage table in a terminal, from a coordinator's API (`--http`,
//! `GET /v1/swarm`) or straight from the DHT (`--swarm`: joins as a client, discovers for a few seconds, prints).

use std::fmt::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use serde_json::Value;
use shardline_coordinator::api::swarm::model_views;
use shardline_coordinator::{Discovery, DiscoveryConfig, NodeRegistry, RegistryConfig};
use shardline_proto::dht::{DhtClient, DhtConfig};

#[derive(Debug, clap::Args)]
pub struct NodesCmd {
    /// A coordinator's HTTP API, e.g. `http://127.0.0.1:8080` (reads `GET /v1/swarm`).
    #[arg(long, value_name = "URL", required_unless_present = "swarm", conflicts_with = "swarm")]
    pub http: Option<String>,
    /// A peer of the swarm to join, as a multiaddr (`/ip4/10.0.0.1/tcp/4000`); repeatable. Nodes are discovered
    /// through the DHT for `--wait` seconds.
    #[arg(long, value_parser = crate::args::multiaddr)]
    pub swarm: Vec<Multiaddr>,
    /// With `--swarm`: the longest time to discover nodes, in seconds (it returns sooner once the list is steady).
    #[arg(long, default_value_t = 10, requires = "swarm")]
    pub wait: u64,
    /// Print the JSON (what `GET /v1/swarm` answers) instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: NodesCmd) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let view = match &cmd.http {
        Some(url) => rt.block_on(from_http(url))?,
        None => rt.block_on(from_swarm(&cmd.swarm, Duration::from_secs(cmd.wait)))?,
    };
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", render(&view));
    }
    Ok(())
}

/// `GET {url}/v1/swarm`.
async fn from_http(url: &str) -> Result<Value> {
    let base = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let endpoint = format!("{}/v1/swarm", base.trim_end_matches('/'));
    let resp = reqwest::get(&endpoint).await.map_err(|e| {
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        anyhow::anyhow!("cannot reach the coordinator at {endpoint}: {cause}")
    })?;
    if !resp.status().is_success() {
        bail!("{endpoint} answered {}", resp.status());
    }
    resp.json().await.with_context(|| format!("{endpoint} did not answer the swarm view"))
}

/// Joins the swarm as a discovering peer and returns the view once the registry has been steady for a while (or
/// after `wait`).
async fn from_swarm(bootstrap: &[Multiaddr], wait: Duration) -> Result<Value> {
    let listen = vec!["/ip4/0.0.0.0/tcp/0".parse()?];
    let config = DhtConfig::for_discovery(Keypair::generate_ed25519(), listen, bootstrap.to_vec());
    let (dht, events) = DhtClient::start(config).await.context("joining the swarm")?;
    let registry = NodeRegistry::new(RegistryConfig::default());
    let discovery_config = DiscoveryConfig { query_interval: Duration::from_millis(500), ..DiscoveryConfig::default() };
    let _discovery = Discovery::spawn(dht, events, registry.clone(), discovery_config);
    // Steady: no registry change for this long after the first node appeared.
    let steady = Duration::from_secs(2);
    let deadline = Instant::now() + wait;
    let mut changes = registry.subscribe();
    let mut last_change = Instant::now();
    while Instant::now() < deadline {
        if !registry.is_empty() && last_change.elapsed() >= steady {
            break;
        }
        let tick = tokio::time::sleep(Duration::from_millis(200));
        tokio::select! {
            r = changes.changed() => if r.is_ok() { last_change = Instant::now() },
            _ = tick => {}
        }
    }
    Ok(serde_json::json!({
        "models": model_views(&registry, &|_| None),
        "registered_nodes": registry.len(),
    }))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn num(v: &Value, key: &str, digits: usize) -> String {
    v[key].as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

/// The table: per model a line with its name, layer count and coverage, then one line per node.
pub fn render(view: &Value) -> String {
    let mut out = String::new();
    let models = view["models"].as_array().map(Vec::as_slice).unwrap_or_default();
    let _ = writeln!(out, "{} nodes registered", view["registered_nodes"].as_u64().unwrap_or(0));
    if models.is_empty() {
        let _ = writeln!(out, "no model has a registered node");
    }
    for m in models {
        let id = s(m, "model_id");
        let name = m["name"].as_str().map_or_else(|| id.get(..12).unwrap_or(id).to_string(), str::to_string);
        let missing: Vec<&str> =
            m["missing"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let coverage = if missing.is_empty() {
            "every layer covered".to_string()
        } else {
            format!("missing {}", missing.join(", "))
        };
        let _ = writeln!(out, "\n{name}: {} layers, {coverage} (model id {id})", m["n_layers"].as_u64().unwrap_or(0));
        let header = ["NODE", "LAYERS", "ADDRESS", "LOAD", "QUEUE", "DECODE t/s", "PREFILL t/s", "RTT ms", "SEEN s"];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        for n in m["nodes"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let banned = if n["banned"].as_bool() == Some(true) { " (banned)" } else { "" };
            rows.push(vec![
                format!("{}{banned}", s(n, "peer_id")),
                s(n, "layers").to_string(),
                s(n, "address").to_string(),
                format!("{}/{}", n["running"].as_u64().unwrap_or(0), n["capacity"].as_u64().unwrap_or(0)),
                n["waiting"].as_u64().unwrap_or(0).to_string(),
                num(n, "decode_tokens_per_s", 1),
                num(n, "prefill_tokens_per_s", 1),
                num(n, "rtt_ms", 2),
                n["last_seen_ms"].as_f64().map_or_else(|| "-".to_string(), |ms| format!("{:.1}", ms / 1000.0)),
            ]);
        }
        let widths: Vec<usize> =
            (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        for r in &rows {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_every_node_and_the_gaps() {
        let view = serde_json::json!({
            "registered_nodes": 2,
            "models": [{
                "model_id": "ab".repeat(32), "name": "Tiny.Q8_0", "n_layers": 30, "missing": ["10..20"],
                "nodes": [
                    {"peer_id": "12D3KooWA", "layers": "0..10", "address": "127.0.0.1:5000", "running": 1,
                     "capacity": 8, "waiting": 0, "decode_tokens_per_s": 12.34, "prefill_tokens_per_s": 99.0,
                     "rtt_ms": null, "banned": false, "last_seen_ms": 1500},
                    {"peer_id": "12D3KooWB", "layers": "20..30", "address": "127.0.0.1:5001", "running": 0,
                     "capacity": 8, "waiting": 2, "decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 2.0,
                     "rtt_ms": 0.5, "banned": true, "last_seen_ms": 0}
                ]
            }]
        });
        let t = render(&view);
        assert!(t.contains("Tiny.Q8_0: 30 layers, missing 10..20"), "{t}");
        let a = t.lines().find(|l| l.contains("12D3KooWA")).unwrap();
        assert!(a.contains("0..10") && a.contains("127.0.0.1:5000") && a.contains("1/8") && a.contains("12.3"), "{a}");
        let b = t.lines().find(|l| l.contains("12D3KooWB")).unwrap();
        assert!(b.contains("(banned)") && b.contains("0.50"), "{b}");
        let empty = render(&serde_json::json!({"registered_nodes": 0, "models": []}));
        assert!(empty.contains("no model has a registered node"), "{empty}");
    }
}
