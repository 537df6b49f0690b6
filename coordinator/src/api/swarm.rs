//! The swarm as the dashboard sees it: every model the registry knows with its nodes (layers, address, load,
//! throughput, queue, last seen) and uncovered layers, plus the API's recent request and token rates. `GET
//! /v1/swarm` answers it once; `GET /v1/swarm/events` pushes it as server-sent events whenever the registry changes
//! and at least every [`PUSH_INTERVAL`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::{self, Stream};
use serde::Serialize;

use super::metrics::Rates;
use super::{ApiState, ServedModel};
use crate::registry::NodeRegistry;
use crate::routing;

/// Longest time between two pushes of `GET /v1/swarm/events` (loads, rates and ages change without a registry
/// change).
pub const PUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Shortest time between two pushes: a burst of registry changes (republishes, RTT samples) becomes one event.
const MIN_PUSH_GAP: Duration = Duration::from_millis(100);

#[derive(Serialize)]
pub struct SwarmNode {
    pub peer_id: String,
    /// `a..b`, as elsewhere in the API.
    pub layers: String,
    pub layer_start: usize,
    pub layer_end: usize,
    pub address: String,
    pub running: u32,
    pub waiting: u32,
    pub capacity: u32,
    pub decode_tokens_per_s: f32,
    pub prefill_tokens_per_s: f32,
    pub free_kv_tokens: u64,
    /// Sessions in the node's last compute batch, as it last announced.
    pub batch_sessions: u32,
    /// Input chunks and opens waiting on the node, as it last announced.
    pub node_queued: u32,
    pub rtt_ms: Option<f64>,
    pub banned: bool,
    /// Milliseconds since its announcement was last refreshed.
    pub last_seen_ms: u64,
}

#[derive(Serialize)]
pub struct SwarmModel {
    pub model_id: String,
    /// The model's human name, when this coordinator serves the model (or otherwise knows its file).
    pub name: Option<String>,
    pub n_layers: u32,
    /// Layer ranges no usable node serves.
    pub missing: Vec<String>,
    pub nodes: Vec<SwarmNode>,
}

#[derive(Serialize)]
pub struct SwarmView {
    pub models: Vec<SwarmModel>,
    pub registered_nodes: usize,
    /// Names of the models this coordinator serves (requests name them in `model`), covered or not.
    pub served: Vec<String>,
    /// Generation requests and generated tokens per second over the last minute.
    pub rates: Rates,
    /// The same over the last 10 minutes, in 10-second buckets (the dashboard's throughput chart).
    pub history: Rates,
}

/// The swarm now.
pub fn view(state: &ApiState) -> SwarmView {
    SwarmView {
        models: model_views(&state.registry, &|id| state.model(id)),
        registered_nodes: state.registry.len(),
        served: state.models.iter().map(|m| m.name.clone()).collect(),
        rates: state.metrics.rates(),
        history: state.metrics.history(),
    }
}

/// Every model of `registry` with its nodes and uncovered layers; `served` gives the API's model of an id, if it
/// serves it (its file's layer count decides what is missing). `shardline nodes --swarm` prints this without an API.
pub fn model_views(registry: &NodeRegistry, served: &dyn Fn(&str) -> Option<Arc<ServedModel>>) -> Vec<SwarmModel> {
    let now = Instant::now();
    let reg = registry;
    reg.models()
        .into_iter()
        .map(|id| {
            let served = served(&id);
            let n_layers = reg.model_shape(&id).map(|s| s.n_layers).unwrap_or(0);
            let missing = match &served {
                Some(m) => m.missing_layers(reg),
                None => routing::missing_ranges(&routing::coverage_candidates(reg, &id), n_layers as usize),
            };
            let mut nodes: Vec<SwarmNode> = reg
                .snapshot(&id)
                .into_iter()
                .map(|(e, h)| {
                    let a = &e.announcement;
                    let (running, waiting, capacity) = e.queue.depth();
                    SwarmNode {
                        peer_id: a.peer_id.to_string(),
                        layers: a.layers.to_string(),
                        layer_start: a.layers.start,
                        layer_end: a.layers.end,
                        address: a.quic_addr.to_string(),
                        running,
                        waiting,
                        capacity,
                        decode_tokens_per_s: a.decode_tps,
                        prefill_tokens_per_s: a.prefill_tps,
                        free_kv_tokens: a.free_kv_tokens,
                        batch_sessions: a.batch_sessions,
                        node_queued: a.queued,
                        rtt_ms: h.rtt.map(|r| r.as_secs_f64() * 1000.0),
                        banned: h.banned_until.is_some_and(|t| t > now),
                        last_seen_ms: now.duration_since(e.last_seen).as_millis() as u64,
                    }
                })
                .collect();
            nodes.sort_by(|a, b| {
                (a.layer_start, a.layer_end, &a.peer_id).cmp(&(b.layer_start, b.layer_end, &b.peer_id))
            });
            let name = served.map(|m| m.name.clone()).or_else(|| reg.named(&id));
            SwarmModel { model_id: id, name, n_layers, missing: missing.iter().map(|r| r.to_string()).collect(), nodes }
        })
        .collect()
}

/// `GET /v1/swarm`.
pub async fn swarm(State(state): State<Arc<ApiState>>) -> Response {
    axum::Json(view(&state)).into_response()
}

fn view_event(state: &ApiState) -> Event {
    Event::default().event("swarm").data(serde_json::to_string(&view(state)).unwrap_or_default())
}

/// The stream of `GET /v1/swarm/events`: the view at once, then on every registry change (at most one per
/// [`MIN_PUSH_GAP`]) and at least every [`PUSH_INTERVAL`]. It ends when the client goes away.
fn view_stream(state: Arc<ApiState>) -> impl Stream<Item = Result<Event, Infallible>> {
    let changes = state.registry.subscribe();
    let first = view_event(&state);
    let rest = stream::unfold((state, changes), |(state, mut changes)| async move {
        tokio::time::sleep(MIN_PUSH_GAP).await;
        // A closed registry channel only leaves the periodic push.
        let changed = async {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let _ = tokio::time::timeout(PUSH_INTERVAL.saturating_sub(MIN_PUSH_GAP), changed).await;
        changes.borrow_and_update();
        Some((Ok(view_event(&state)), (state, changes)))
    });
    stream::once(async move { Ok(first) }).chain(rest)
}

/// `GET /v1/swarm/events`: server-sent events named `swarm`, each carrying what `GET /v1/swarm` answers.
pub async fn events(State(state): State<Arc<ApiState>>) -> Response {
    Sse::new(view_stream(state)).into_response()
}
