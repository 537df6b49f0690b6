//! Counters and latency histograms of the API, rendered as Prometheus text at `GET /metrics` together with the
//! registry's state (registered nodes, per-node queue depth), and the recent request and token rates the dashboard
//! plots (`GET /v1/swarm`).

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::http::StatusCode;
use serde::Serialize;
use shardline_node::generate::{FinishReason, Generation};
use shardline_proto::announcement::ShardAnnouncement;

use super::error::ApiError;

/// A per-node gauge read from the node's announcement.
type AnnouncedGauge = fn(&ShardAnnouncement) -> u32;
use crate::registry::NodeRegistry;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if secs <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

/// Seconds of history [`RateWindow`] keeps.
pub const RATE_WINDOW_SECS: usize = 60;

/// What happened during one wall-clock second.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Which second (since the window's start) the counts belong to; a bucket stamped with an older second is stale
    /// and reads as zero.
    second: u64,
    requests: u64,
    tokens: u64,
}

/// Seconds per bucket of the longer history the dashboard's chart draws: 60 buckets of 10 s, the last 10 minutes.
pub const HISTORY_BUCKET_SECS: u64 = 10;

/// Generation requests and generated tokens over the last [`RATE_WINDOW_SECS`] buckets of `bucket_s` seconds (1 s by
/// default): a ring of buckets, so recording is O(1) and nothing has to expire them.
pub struct RateWindow {
    start: Instant,
    bucket_s: u64,
    buckets: Mutex<[Bucket; RATE_WINDOW_SECS]>,
}

impl Default for RateWindow {
    fn default() -> Self {
        Self::with_bucket_secs(1)
    }
}

/// Recent rates, oldest bucket first; the last entry is the current (partial) bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rates {
    /// Seconds the buckets span together.
    pub window_s: usize,
    /// Seconds per bucket.
    pub bucket_s: u64,
    /// Generation requests (completions and chat) started in each bucket.
    pub requests: Vec<u64>,
    /// Tokens generated in each bucket.
    pub tokens: Vec<u64>,
    /// Mean requests per second over the window.
    pub requests_per_s: f64,
    /// Mean generated tokens per second over the window.
    pub tokens_per_s: f64,
}

impl RateWindow {
    /// A window of [`RATE_WINDOW_SECS`] buckets of `bucket_s` seconds each (at least 1).
    pub fn with_bucket_secs(bucket_s: u64) -> Self {
        Self {
            start: Instant::now(),
            bucket_s: bucket_s.max(1),
            buckets: Mutex::new([Bucket::default(); RATE_WINDOW_SECS]),
        }
    }

    /// The current bucket's number since the window's start (named `second` below: with 1-s buckets it is one).
    fn now_second(&self) -> u64 {
        self.start.elapsed().as_secs() / self.bucket_s
    }

    /// Counts `requests` and `tokens` in the current bucket.
    pub fn add(&self, requests: u64, tokens: u64) {
        self.add_at(self.now_second(), requests, tokens);
    }

    fn add_at(&self, second: u64, requests: u64, tokens: u64) {
        let mut b = self.buckets.lock();
        let slot = &mut b[second as usize % RATE_WINDOW_SECS];
        if slot.second != second {
            *slot = Bucket { second, requests: 0, tokens: 0 };
        }
        slot.requests += requests;
        slot.tokens += tokens;
    }

    /// The window ending with the current second.
    pub fn rates(&self) -> Rates {
        self.rates_at(self.now_second())
    }

    fn rates_at(&self, now: u64) -> Rates {
        let b = self.buckets.lock();
        let (mut requests, mut tokens) = (Vec::new(), Vec::new());
        for age in (0..RATE_WINDOW_SECS as u64).rev() {
            let (r, t) = match now.checked_sub(age) {
                Some(second) => {
                    let slot = b[second as usize % RATE_WINDOW_SECS];
                    if slot.second == second { (slot.requests, slot.tokens) } else { (0, 0) }
                }
                None => (0, 0),
            };
            requests.push(r);
            tokens.push(t);
        }
        let window_s = RATE_WINDOW_SECS * self.bucket_s as usize;
        let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / window_s as f64;
        Rates {
            window_s,
            bucket_s: self.bucket_s,
            requests_per_s: mean(&requests),
            tokens_per_s: mean(&tokens),
            requests,
            tokens,
        }
    }
}

/// Everything the API counts. Shared by every request (`Arc`).
pub struct Metrics {
    /// `(endpoint, status code)` → requests answered.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Generations ended because the client went away.
    cancelled: AtomicU64,
    /// Requests refused because no route covered the model (503).
    route_failures: AtomicU64,
    /// Requests refused because queues were full (429).
    rejected_busy: AtomicU64,
    ttft: Mutex<Histogram>,
    inter_token: Mutex<Histogram>,
    rates: RateWindow,
    /// The same counts over the last 10 minutes, in [`HISTORY_BUCKET_SECS`] buckets (the dashboard's chart).
    history: RateWindow,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::default(),
            completion_tokens: AtomicU64::default(),
            cancelled: AtomicU64::default(),
            route_failures: AtomicU64::default(),
            rejected_busy: AtomicU64::default(),
            ttft: Mutex::default(),
            inter_token: Mutex::default(),
            rates: RateWindow::default(),
            history: RateWindow::with_bucket_secs(HISTORY_BUCKET_SECS),
        }
    }
}

impl Metrics {
    pub fn record_request(&self, endpoint: &'static str, status: StatusCode) {
        let mut r = self.requests.lock();
        *r.entry((endpoint, status.as_u16())).or_default() += 1;
        if matches!(endpoint, "completions" | "chat_completions") {
            self.rates.add(1, 0);
            self.history.add(1, 0);
        }
    }

    /// One generated token, counted in the recent rates as it is produced (the totals are counted when the
    /// generation ends).
    pub fn record_token(&self) {
        self.rates.add(0, 1);
        self.history.add(0, 1);
    }

    /// Requests and tokens per second over the last minute.
    pub fn rates(&self) -> Rates {
        self.rates.rates()
    }

    /// Requests and tokens per [`HISTORY_BUCKET_SECS`] over the last 10 minutes.
    pub fn history(&self) -> Rates {
        self.history.rates()
    }

    /// Tokens and latencies of a finished (or cancelled) generation.
    pub fn record_generation(&self, g: &Generation) {
        self.prompt_tokens.fetch_add(g.prompt_tokens.len() as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(g.tokens.len() as u64, Ordering::Relaxed);
        if g.finish == FinishReason::Cancelled {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        if !g.samples.is_empty() {
            self.ttft.lock().observe(g.prefill_secs);
        }
        let steps = g.samples.len().saturating_sub(1);
        if steps > 0 {
            let mut h = self.inter_token.lock();
            let each = g.decode_secs / steps as f64;
            for _ in 0..steps {
                h.observe(each);
            }
        }
    }

    /// A request that failed before or during generation.
    pub fn record_failure(&self, e: &ApiError) {
        match e.status {
            StatusCode::SERVICE_UNAVAILABLE => self.route_failures.fetch_add(1, Ordering::Relaxed),
            StatusCode::TOO_MANY_REQUESTS => self.rejected_busy.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Generations ended because the client disconnected.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition of the counters and of the registry's nodes.
    pub fn render(&self, registry: &NodeRegistry) -> String {
        let mut out = String::new();
        out.push_str("# HELP shardline_requests_total HTTP API requests by endpoint and status.\n");
        out.push_str("# TYPE shardline_requests_total counter\n");
        for ((endpoint, status), n) in self.requests.lock().iter() {
            let _ = writeln!(out, "shardline_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        };
        counter(&mut out, "shardline_prompt_tokens_total", "Prompt tokens prefilled.", &self.prompt_tokens);
        counter(&mut out, "shardline_completion_tokens_total", "Tokens generated.", &self.completion_tokens);
        counter(&mut out, "shardline_cancelled_total", "Generations ended by a client disconnect.", &self.cancelled);
        counter(
            &mut out,
            "shardline_route_failures_total",
            "Requests with no route over every layer.",
            &self.route_failures,
        );
        counter(
            &mut out,
            "shardline_rejected_busy_total",
            "Requests refused on full node queues.",
            &self.rejected_busy,
        );
        self.ttft.lock().render(
            &mut out,
            "shardline_time_to_first_token_seconds",
            "Seconds from the start of a generation to its first token (prefill).",
        );
        self.inter_token.lock().render(
            &mut out,
            "shardline_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens.",
        );
        let _ = writeln!(
            out,
            "# HELP shardline_registered_nodes Nodes in the registry.\n# TYPE shardline_registered_nodes gauge\n\
             shardline_registered_nodes {}",
            registry.len()
        );
        out.push_str("# HELP shardline_node_queue_depth Sessions per node: running or waiting.\n");
        out.push_str("# TYPE shardline_node_queue_depth gauge\n");
        for model in registry.models() {
            for (e, _) in registry.snapshot(&model) {
                let (in_flight, waiting, _) = e.queue.depth();
                let (peer, layers) = (e.announcement.peer_id, e.announcement.layers);
                for (state, v) in [("running", in_flight), ("waiting", waiting)] {
                    let _ = writeln!(
                        out,
                        "shardline_node_queue_depth{{peer=\"{peer}\",layers=\"{layers}\",state=\"{state}\"}} {v}"
                    );
                }
            }
        }
        // What each node last announced of its own scheduler (continuous batching on the stage).
        let nodes: Vec<_> = registry.models().iter().flat_map(|m| registry.snapshot(m)).collect();
        let per_node: [(&str, &str, AnnouncedGauge); 2] = [
            ("batch_sessions", "Sessions in the node's last compute batch, as announced.", |a| a.batch_sessions),
            ("stage_queued", "Input chunks and opens waiting on the node, as announced.", |a| a.queued),
        ];
        for (name, help, value) in per_node {
            let _ = writeln!(out, "# HELP shardline_node_{name} {help}\n# TYPE shardline_node_{name} gauge");
            for (e, _) in &nodes {
                let a = &e.announcement;
                let _ = writeln!(
                    out,
                    "shardline_node_{name}{{peer=\"{}\",layers=\"{}\"}} {}",
                    a.peer_id,
                    a.layers,
                    value(a)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.007);
        h.observe(0.2);
        h.observe(100.0);
        assert_eq!(h.counts[0], 0);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[5], 2);
        assert_eq!(h.counts[BUCKETS.len() - 1], 2);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3"), "{s}");
        assert!(s.contains("x_count 3"), "{s}");
    }

    #[test]
    fn rate_window_keeps_the_last_minute_only() {
        let w = RateWindow::default();
        w.add_at(0, 1, 5);
        w.add_at(0, 1, 0);
        w.add_at(2, 0, 7);
        let r = w.rates_at(2);
        assert_eq!(r.requests.len(), RATE_WINDOW_SECS);
        assert_eq!(&r.requests[RATE_WINDOW_SECS - 3..], &[2, 0, 0]);
        assert_eq!(&r.tokens[RATE_WINDOW_SECS - 3..], &[5, 0, 7]);
        assert!((r.tokens_per_s - 12.0 / RATE_WINDOW_SECS as f64).abs() < 1e-12);
        // Second 0 has left the window at second 60; second 60 reuses its slot without adding to it.
        let r = w.rates_at(RATE_WINDOW_SECS as u64);
        assert_eq!(r.requests.iter().sum::<u64>(), 0);
        assert_eq!(r.tokens.iter().sum::<u64>(), 7);
        w.add_at(RATE_WINDOW_SECS as u64, 3, 1);
        let r = w.rates_at(RATE_WINDOW_SECS as u64);
        assert_eq!((*r.requests.last().unwrap(), *r.tokens.last().unwrap()), (3, 1));
        assert_eq!(r.tokens.iter().sum::<u64>(), 8);
        // Long idle: everything reads as zero.
        assert_eq!(w.rates_at(1000).tokens.iter().sum::<u64>(), 0);
    }

    #[test]
    fn the_history_window_spans_ten_minutes_in_ten_second_buckets() {
        let w = RateWindow::with_bucket_secs(HISTORY_BUCKET_SECS);
        w.add_at(3, 2, 40);
        let r = w.rates_at(3);
        assert_eq!((r.window_s, r.bucket_s), (600, 10));
        assert_eq!(r.tokens.len(), RATE_WINDOW_SECS);
        assert_eq!(*r.tokens.last().unwrap(), 40);
        assert!((r.tokens_per_s - 40.0 / 600.0).abs() < 1e-12);
        let m = Metrics::default();
        m.record_request("completions", StatusCode::OK);
        m.record_token();
        m.record_token();
        let h = m.history();
        assert_eq!((h.requests.iter().sum::<u64>(), h.tokens.iter().sum::<u64>()), (1, 2));
    }
}
