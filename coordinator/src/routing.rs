//! The route planner: the cheapest chain of nodes covering layers `0..N`, as a shortest path over layer boundaries.
//!
//! A node serving `a..b` may join a route at any boundary `s` in `a..b` and runs to its end `b` (a stage runs a
//! suffix of its shard; this is what lets overlapping layouts such as `0..16` + `10..30` be combined). The graph is a
//! DAG over the boundaries `0..=N`, so one pass in boundary order finds the shortest path in `O(Σ layers per node)`.
//!
//! Edge cost, in milliseconds per decoded token: the measured round-trip time to the node, plus the time the node
//! needs for that many layers, scaled by how many sessions already share it, plus a large penalty once its queue is
//! full. The time per layer is what the owner measured (an EWMA of timed steps, `trust.rs`); what a node announces
//! about itself is only a prior for a node not measured yet, and never better than the best measured node of the
//! model (docs/SECURITY.md, "Trust and routing"). Replicas of equal cost are separated by a per-request tie-break, so
//! sessions spread over them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use shardline_kernels::rng::mix64;
use shardline_proto::LayerRange;
use shardline_proto::wire::Fingerprint;

use crate::queue::NodeQueue;
use crate::registry::{NodeEntry, NodeHealth};

/// RTT assumed for a node not measured yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Decode throughput assumed for a node announcing none, tokens per second.
const FALLBACK_TPS: f64 = 1.0;
/// The fastest compute a node may be assumed to have before it is measured, milliseconds per layer per token: an
/// announcement claiming more is clamped to it (100,000 layer-steps per second).
pub const MIN_PLAUSIBLE_MS_PER_LAYER: f64 = 0.01;
/// Added per waiting session once a node is at capacity, in milliseconds: saturated nodes are used only when nothing
/// else covers their layers.
const SATURATION_PENALTY_MS: f64 = 10_000.0;

/// One node as the planner sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub peer: PeerId,
    pub layers: LayerRange,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    /// Tokens per second through the node's whole shard.
    pub decode_tps: f32,
    /// Milliseconds per layer per token: measured by the owner, or the clamped prior (see [`candidates`]); `None`
    /// to derive it from `decode_tps`.
    pub ms_per_layer: Option<f64>,
    pub rtt: Duration,
    pub in_flight: u32,
    pub waiting: u32,
    pub capacity: u32,
    pub queue: Option<Arc<NodeQueue>>,
}

impl Candidate {
    /// A candidate from a registry entry (queue depth read now).
    pub fn from_entry(entry: &NodeEntry, health: &NodeHealth) -> Self {
        let (in_flight, waiting, capacity) = entry.queue.depth();
        let a = &entry.announcement;
        Self {
            peer: a.peer_id,
            layers: a.layers,
            addr: a.quic_addr,
            fingerprint: a.cert_fingerprint,
            decode_tps: a.decode_tps,
            ms_per_layer: health.ms_per_layer,
            rtt: health.rtt.unwrap_or(DEFAULT_RTT),
            in_flight,
            waiting,
            capacity,
            queue: Some(entry.queue.clone()),
        }
    }

    /// What the node's announcement claims, milliseconds per layer per token, clamped to
    /// [`MIN_PLAUSIBLE_MS_PER_LAYER`].
    pub fn announced_ms_per_layer(&self) -> f64 {
        let tps =
            if self.decode_tps.is_finite() && self.decode_tps > 0.0 { self.decode_tps as f64 } else { FALLBACK_TPS };
        (1000.0 / tps / self.layers.len().max(1) as f64).max(MIN_PLAUSIBLE_MS_PER_LAYER)
    }

    /// `(fixed, per_layer)` milliseconds of using this node for one token: the edge cost for `n` layers is
    /// `fixed + per_layer · n`.
    fn cost_terms(&self, tie_break: u64) -> (f64, f64) {
        let sharing = 1.0 + self.in_flight as f64 + self.waiting as f64;
        let per_layer = self.ms_per_layer.unwrap_or_else(|| self.announced_ms_per_layer()) * sharing;
        let saturated = if self.in_flight >= self.capacity.max(1) {
            SATURATION_PENALTY_MS * (1.0 + self.waiting as f64)
        } else {
            0.0
        };
        // Up to 1% of the cost, from a hash of (peer, tie_break): equal replicas are chosen evenly across requests.
        let scale = 1.0 + (mix64(hash_peer(&self.peer) ^ tie_break) % 1000) as f64 / 100_000.0;
        ((self.rtt.as_secs_f64() * 1000.0 + saturated) * scale, per_layer * scale)
    }
}

/// One stage of a route: which node runs which layers.
#[derive(Clone, Debug)]
pub struct RouteStage {
    pub peer: PeerId,
    pub span: LayerRange,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub queue: Option<Arc<NodeQueue>>,
}

/// A chain of stages covering `0..N` in order.
#[derive(Clone, Debug)]
pub struct Route {
    pub stages: Vec<RouteStage>,
    /// Estimated milliseconds per decoded token.
    pub cost_ms: f64,
}

impl Route {
    pub fn peers(&self) -> Vec<PeerId> {
        self.stages.iter().map(|s| s.peer).collect()
    }
}

/// What to do when the registered nodes do not cover every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoveragePolicy {
    /// Fail at once, naming the missing ranges.
    FailFast,
    /// Wait for nodes to appear (re-planning on every registry change) up to `timeout`.
    WaitAndRetry { timeout: Duration },
}

/// Why no route was found. `model` is the model's human name (the hex id when nobody named it, see
/// [`NodeRegistry::name_model`](crate::registry::NodeRegistry::name_model)).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("no route: found {}; missing {} of {model} ({n_layers} layers)", fmt_found(.found), fmt_ranges(.missing))]
    Uncovered { model_id: String, model: String, n_layers: usize, found: Vec<LayerRange>, missing: Vec<LayerRange> },
    #[error("no route: no node of {model} is registered")]
    UnknownModel { model_id: String, model: String },
}

impl RouteError {
    /// The hex id of the model the error is about.
    pub fn model_id(&self) -> &str {
        match self {
            Self::Uncovered { model_id, .. } | Self::UnknownModel { model_id, .. } => model_id,
        }
    }

    /// No node of `model_id` is registered in `registry` (named as the registry names it).
    pub fn unknown_model(registry: &crate::registry::NodeRegistry, model_id: &str) -> Self {
        Self::UnknownModel { model_id: model_id.to_string(), model: registry.model_name(model_id) }
    }

    fn named(mut self, name: String) -> Self {
        match &mut self {
            Self::Uncovered { model, .. } | Self::UnknownModel { model, .. } => *model = name,
        }
        self
    }
}

fn fmt_ranges(r: &[LayerRange]) -> String {
    r.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

fn fmt_found(r: &[LayerRange]) -> String {
    if r.is_empty() { "no layers".to_string() } else { fmt_ranges(r) }
}

/// Layer ranges of `0..n_layers` that some candidate covers, merged, in order (the complement of
/// [`missing_ranges`]).
pub fn covered_ranges(cands: &[Candidate], n_layers: usize) -> Vec<LayerRange> {
    let missing = missing_ranges(cands, n_layers);
    let mut covered = Vec::new();
    let mut at = 0;
    for m in missing.iter().chain(std::iter::once(&LayerRange::new(n_layers, n_layers))) {
        if m.start > at {
            covered.push(LayerRange::new(at, m.start));
        }
        at = m.end;
    }
    covered
}

/// Layer ranges of `0..n_layers` that no candidate covers, in order.
pub fn missing_ranges(cands: &[Candidate], n_layers: usize) -> Vec<LayerRange> {
    let mut covered = vec![false; n_layers];
    for c in cands {
        let end = c.layers.end.min(n_layers);
        if c.layers.start < end {
            covered[c.layers.start..end].iter_mut().for_each(|l| *l = true);
        }
    }
    let mut missing = Vec::new();
    let mut l = 0;
    while l < n_layers {
        if covered[l] {
            l += 1;
            continue;
        }
        let start = l;
        while l < n_layers && !covered[l] {
            l += 1;
        }
        missing.push(LayerRange::new(start, l));
    }
    missing
}

/// The cheapest route over `cands` for a model of `n_layers` blocks, skipping `excluded` peers. `tie_break` varies
/// the choice among equally good replicas (pass a per-session random number).
pub fn plan(
    model_id: &str,
    cands: &[Candidate],
    n_layers: usize,
    excluded: &HashSet<PeerId>,
    tie_break: u64,
) -> Result<Route, RouteError> {
    let usable: Vec<&Candidate> = cands
        .iter()
        .filter(|c| !excluded.contains(&c.peer) && c.layers.start < c.layers.end && c.layers.end <= n_layers)
        .collect();
    // Nodes grouped by the boundary where they end.
    let mut by_end: Vec<Vec<usize>> = vec![Vec::new(); n_layers + 1];
    for (i, c) in usable.iter().enumerate() {
        by_end[c.layers.end].push(i);
    }
    let terms: Vec<(f64, f64)> = usable.iter().map(|c| c.cost_terms(tie_break)).collect();
    let mut dist = vec![f64::INFINITY; n_layers + 1];
    // For each boundary: the node that reaches it and the boundary it started from.
    let mut prev: Vec<Option<(usize, usize)>> = vec![None; n_layers + 1];
    dist[0] = 0.0;
    for b in 1..=n_layers {
        for &i in &by_end[b] {
            let (fixed, per_layer) = terms[i];
            for s in usable[i].layers.start..b {
                let d = dist[s] + fixed + per_layer * (b - s) as f64;
                if d < dist[b] {
                    dist[b] = d;
                    prev[b] = Some((i, s));
                }
            }
        }
    }
    if !dist[n_layers].is_finite() {
        let owned: Vec<Candidate> = usable.into_iter().cloned().collect();
        let mut missing = missing_ranges(&owned, n_layers);
        if missing.is_empty() {
            missing.push(LayerRange::new(0, n_layers));
        }
        let found = covered_ranges(&owned, n_layers);
        return Err(RouteError::Uncovered {
            model_id: model_id.to_string(),
            model: model_id.to_string(),
            n_layers,
            found,
            missing,
        });
    }
    let mut stages = Vec::new();
    let mut b = n_layers;
    while b > 0 {
        let Some((i, s)) = prev[b] else { break };
        let c = usable[i];
        stages.push(RouteStage {
            peer: c.peer,
            span: LayerRange::new(s, b),
            addr: c.addr,
            fingerprint: c.fingerprint,
            queue: c.queue.clone(),
        });
        b = s;
    }
    stages.reverse();
    Ok(Route { stages, cost_ms: dist[n_layers] })
}

/// Candidates of `model_id` from the registry for user sessions: without banned nodes and, when the registry runs
/// probation, only nodes whose output a trusted replica confirmed. A node whose RTT was never measured is assumed
/// as close as the closest measured one (or [`DEFAULT_RTT`]), so new replicas get tried instead of being starved by a
/// pessimistic guess; likewise a node whose compute was never measured is assumed exactly as fast as the fastest
/// measured node of the model, whatever it announces (its announcement counts only while nothing is measured).
pub fn candidates(registry: &crate::registry::NodeRegistry, model_id: &str) -> Vec<Candidate> {
    let probation = registry.config().probation;
    candidates_where(registry, model_id, |h| !probation || h.standing == crate::trust::Standing::Trusted)
}

/// Candidates of `model_id` that cover layers for health and coverage reports: not banned and not rejected, on
/// probation included (they take user sessions once checked, within a few seconds).
pub fn coverage_candidates(registry: &crate::registry::NodeRegistry, model_id: &str) -> Vec<Candidate> {
    candidates_where(registry, model_id, |h| h.standing != crate::trust::Standing::Rejected)
}

/// Longest a session waits for nodes on probation that would cover the model to be checked, whatever the coverage
/// policy: a request arriving just after nodes joined is served once they are trusted instead of failing.
pub const PROBATION_WAIT: Duration = Duration::from_secs(10);

/// Candidates of `model_id` whose health passes `admit` (and not banned), with measured or clamped compute times.
pub fn candidates_where(
    registry: &crate::registry::NodeRegistry,
    model_id: &str,
    admit: impl Fn(&NodeHealth) -> bool,
) -> Vec<Candidate> {
    let now = Instant::now();
    let snapshot = registry.snapshot(model_id);
    let assumed = snapshot.iter().filter_map(|(_, h)| h.rtt).min().unwrap_or(DEFAULT_RTT);
    let best_measured = snapshot
        .iter()
        .filter_map(|(_, h)| h.ms_per_layer)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
    snapshot
        .iter()
        .filter(|(_, h)| h.banned_until.is_none_or(|t| t <= now) && admit(h))
        .map(|(e, h)| {
            let mut c = Candidate::from_entry(e, h);
            if h.rtt.is_none() {
                c.rtt = assumed;
            }
            if c.ms_per_layer.is_none() {
                // Once anything is measured, an announcement says nothing more: claiming faster is clamped, and a
                // pessimistic one (a startup benchmark on a loaded machine) must not starve the node of the one
                // session that measures it.
                c.ms_per_layer = Some(best_measured.unwrap_or_else(|| c.announced_ms_per_layer()));
            }
            c
        })
        .collect()
}

/// Plans a route from the registry, applying the coverage policy.
pub async fn route(
    registry: &crate::registry::NodeRegistry,
    model_id: &str,
    excluded: &HashSet<PeerId>,
    policy: CoveragePolicy,
) -> Result<Route, RouteError> {
    let mut changes = registry.subscribe();
    let deadline = match policy {
        CoveragePolicy::FailFast => None,
        CoveragePolicy::WaitAndRetry { timeout } => Some(tokio::time::Instant::now() + timeout),
    };
    let mut probation_deadline: Option<tokio::time::Instant> = None;
    loop {
        changes.borrow_and_update();
        let attempt = match registry.model_shape(model_id) {
            None => Err(RouteError::UnknownModel { model_id: model_id.to_string(), model: model_id.to_string() }),
            Some(shape) => {
                let cands = candidates(registry, model_id);
                let planned = plan(model_id, &cands, shape.n_layers as usize, excluded, rand::random());
                // Built only when debug logging is on: routing runs on every session's connect.
                if let Ok(r) = &planned
                    && tracing::enabled!(tracing::Level::DEBUG)
                {
                    let seen: Vec<(PeerId, Option<f64>, u32, Duration)> =
                        cands.iter().map(|c| (c.peer, c.ms_per_layer, c.in_flight, c.rtt)).collect();
                    tracing::debug!(route = ?r.peers(), cost_ms = r.cost_ms, candidates = ?seen, "route planned");
                }
                planned
            }
        };
        let Err(mut err) = attempt else { return attempt };
        // Covered only with nodes still on probation: wait for their check (bounded) even when failing fast. Not
        // covered even with them: the error names what is missing among them.
        let mut probation_covers = false;
        if registry.config().probation
            && let Some(shape) = registry.model_shape(model_id)
        {
            let all = coverage_candidates(registry, model_id);
            match plan(model_id, &all, shape.n_layers as usize, excluded, 0) {
                Ok(_) => probation_covers = true,
                Err(e) => err = e,
            }
        }
        let err = err.named(registry.model_name(model_id));
        let deadline = match deadline {
            None if probation_covers => {
                let by = *probation_deadline.get_or_insert_with(|| tokio::time::Instant::now() + PROBATION_WAIT);
                Some(by)
            }
            d => d,
        };
        let Some(deadline) = deadline else { return Err(err) };
        // Bans expire without a registry change, so re-plan at least every 250 ms.
        let wake = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
        if tokio::time::Instant::now() >= deadline {
            return Err(err);
        }
        let _ = tokio::time::timeout_at(wake, changes.changed()).await;
    }
}

/// The last 8 bytes of the peer id's multihash digest (uniformly distributed for ed25519 and hashed keys).
fn hash_peer(p: &PeerId) -> u64 {
    let digest = p.as_ref().digest();
    digest.iter().rev().take(8).fold(0u64, |h, &b| (h << 8) | b as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(start: usize, end: usize, tps: f32) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            layers: LayerRange::new(start, end),
            addr: "127.0.0.1:1".parse().unwrap(),
            fingerprint: [0; 32],
            decode_tps: tps,
            ms_per_layer: None,
            rtt: DEFAULT_RTT,
            in_flight: 0,
            waiting: 0,
            capacity: 4,
            queue: None,
        }
    }

    fn spans(r: &Route) -> Vec<(usize, usize)> {
        r.stages.iter().map(|s| (s.span.start, s.span.end)).collect()
    }

    #[test]
    fn chains_a_split_model() {
        let c = vec![cand(20, 30, 100.0), cand(0, 10, 100.0), cand(10, 20, 100.0)];
        let r = plan("m", &c, 30, &HashSet::new(), 0).unwrap();
        assert_eq!(spans(&r), vec![(0, 10), (10, 20), (20, 30)]);
        assert_eq!(r.stages[0].peer, c[1].peer);
    }

    #[test]
    fn overlapping_layout_runs_a_suffix_of_the_second_shard() {
        let c = vec![cand(0, 16, 100.0), cand(10, 30, 100.0)];
        let r = plan("m", &c, 30, &HashSet::new(), 0).unwrap();
        assert_eq!(spans(&r), vec![(0, 16), (16, 30)]);
    }

    #[test]
    fn prefers_one_fast_whole_model_over_many_hops_and_avoids_loaded_nodes() {
        let whole = cand(0, 30, 100.0);
        let c = vec![whole.clone(), cand(0, 15, 100.0), cand(15, 30, 100.0)];
        let r = plan("m", &c, 30, &HashSet::new(), 0).unwrap();
        assert_eq!(r.stages.len(), 1);
        assert_eq!(r.stages[0].peer, whole.peer);
        // Load the whole-model node: the split route wins.
        let mut loaded = c.clone();
        loaded[0].in_flight = 3;
        let r = plan("m", &loaded, 30, &HashSet::new(), 0).unwrap();
        assert_eq!(spans(&r), vec![(0, 15), (15, 30)]);
        // Excluding peers is honoured.
        let excluded: HashSet<PeerId> = [c[1].peer].into();
        let r = plan("m", &c, 30, &excluded, 0).unwrap();
        assert!(!r.peers().contains(&c[1].peer));
    }

    #[test]
    fn names_the_missing_ranges() {
        let c = vec![cand(0, 10, 100.0), cand(12, 20, 100.0), cand(25, 28, 100.0)];
        let err = plan("m", &c, 30, &HashSet::new(), 0).unwrap_err();
        let RouteError::Uncovered { missing, found, .. } = &err else { panic!("{err}") };
        assert_eq!(missing, &vec![LayerRange::new(10, 12), LayerRange::new(20, 25), LayerRange::new(28, 30)]);
        assert_eq!(found, &vec![LayerRange::new(0, 10), LayerRange::new(12, 20), LayerRange::new(25, 28)]);
        assert!(err.to_string().contains("found 0..10, 12..20, 25..28; missing 10..12, 20..25, 28..30 of m"), "{err}");
        let err = plan("m", &[], 30, &HashSet::new(), 0).unwrap_err();
        assert!(err.to_string().contains("found no layers; missing 0..30"), "{err}");
    }

    #[test]
    fn replicas_share_sessions_evenly() {
        let c = vec![cand(0, 30, 100.0), cand(0, 30, 100.0)];
        let mut counts = [0usize; 2];
        for t in 0..1000u64 {
            let r = plan("m", &c, 30, &HashSet::new(), mix64(t)).unwrap();
            counts[usize::from(r.stages[0].peer == c[1].peer)] += 1;
        }
        assert!(counts[0] > 350 && counts[1] > 350, "{counts:?}");
    }

    #[test]
    fn ten_thousand_nodes_over_eighty_layers_plan_in_well_under_ten_ms() {
        let n_layers = 80;
        let mut c = Vec::with_capacity(10_000);
        let mut x = 1u64;
        for _ in 0..10_000 {
            x = mix64(x);
            let start = (x % n_layers as u64) as usize;
            let len = 1 + (mix64(x) % 16) as usize;
            c.push(cand(start, (start + len).min(n_layers), 10.0 + (x % 200) as f32));
        }
        c.push(cand(0, 8, 50.0));
        let excluded = HashSet::new();
        let _ = plan("m", &c, n_layers, &excluded, 0).unwrap();
        let t = Instant::now();
        let runs = 10;
        for i in 0..runs {
            plan("m", &c, n_layers, &excluded, i).unwrap();
        }
        let per = t.elapsed() / runs as u32;
        // Debug builds are several times slower than release; the bound holds for both.
        assert!(per < Duration::from_millis(10), "planning took {per:?}");
    }

    #[test]
    fn a_sybil_on_probation_is_no_candidate_and_its_announced_speed_is_clamped_to_the_best_measured() {
        use libp2p::identity::Keypair;

        use crate::registry::tests::announcement;
        use crate::registry::{NodeRegistry, RegistryConfig};
        use crate::trust::Standing;

        let full = LayerRange::new(0, 30);
        for probation in [true, false] {
            let reg = NodeRegistry::new(RegistryConfig { probation, ..RegistryConfig::default() });
            let honest = announcement(&Keypair::generate_ed25519(), "m", full, 30);
            let mut sybil = announcement(&Keypair::generate_ed25519(), "m", full, 30);
            sybil.decode_tps = 1e30;
            reg.upsert(honest.clone()).unwrap();
            reg.upsert(sybil.clone()).unwrap();
            reg.set_standing(&honest.peer_id, Standing::Trusted);
            // The owner measured the honest node at 0.5 ms per layer.
            reg.record_layer_time(&honest.peer_id, 0.5);
            let cands = candidates(&reg, "m");
            let by = |p: &PeerId| cands.iter().find(|c| c.peer == *p);
            assert_eq!(by(&honest.peer_id).unwrap().ms_per_layer, Some(0.5));
            if probation {
                assert!(by(&sybil.peer_id).is_none(), "a node on probation takes no user session");
                let r = plan("m", &cands, 30, &HashSet::new(), 7).unwrap();
                assert_eq!(r.peers(), vec![honest.peer_id]);
            } else {
                // Announced 1e30 tokens/s: assumed no faster than the measured node, so at most a fair share.
                assert_eq!(by(&sybil.peer_id).unwrap().ms_per_layer, Some(0.5));
                let mut sybil_wins = 0;
                for t in 0..400u64 {
                    let r = plan("m", &cands, 30, &HashSet::new(), mix64(t)).unwrap();
                    sybil_wins += usize::from(r.peers() == vec![sybil.peer_id]);
                }
                assert!(sybil_wins < 280, "the sybil took {sybil_wins} of 400 routes");
                // Once measured slower, it takes none.
                reg.record_layer_time(&sybil.peer_id, 5.0);
                let cands = candidates(&reg, "m");
                for t in 0..100u64 {
                    assert_eq!(plan("m", &cands, 30, &HashSet::new(), mix64(t)).unwrap().peers(), vec![honest.peer_id]);
                }
            }
        }
        // A replica announcing itself slow (a startup benchmark on a busy machine) is still tried, and measured,
        // once its peer is measured: it is assumed as fast as the best measured node.
        let reg = NodeRegistry::new(RegistryConfig::default());
        let measured = announcement(&Keypair::generate_ed25519(), "m", full, 30);
        let mut modest = announcement(&Keypair::generate_ed25519(), "m", full, 30);
        modest.decode_tps = 0.5;
        reg.upsert(measured.clone()).unwrap();
        reg.upsert(modest.clone()).unwrap();
        reg.record_layer_time(&measured.peer_id, 0.5);
        let cands = candidates(&reg, "m");
        let modest_wins = (0..400u64)
            .filter(|t| plan("m", &cands, 30, &HashSet::new(), mix64(*t)).unwrap().peers() == vec![modest.peer_id])
            .count();
        assert!((120..280).contains(&modest_wins), "the unmeasured replica took {modest_wins} of 400 routes");
        // With nothing measured yet, an absurd announcement is clamped to the plausible bound.
        let mut c = cand(0, 30, 1e30);
        assert_eq!(c.announced_ms_per_layer(), MIN_PLAUSIBLE_MS_PER_LAYER);
        c.decode_tps = f32::INFINITY;
        assert!(c.announced_ms_per_layer() >= MIN_PLAUSIBLE_MS_PER_LAYER);
    }

    #[tokio::test]
    async fn coverage_policies_fail_fast_or_wait_for_nodes() {
        use libp2p::identity::Keypair;

        use crate::registry::tests::announcement;
        use crate::registry::{NodeRegistry, RegistryConfig};

        // Coverage alone: no probation, every registered node counts.
        let config = RegistryConfig { probation: false, ..RegistryConfig::default() };
        let reg = NodeRegistry::new(config.clone());
        reg.name_model("m", "Tiny.Q8_0");
        let none = HashSet::new();
        assert_eq!(
            route(&reg, "m", &none, CoveragePolicy::FailFast).await.unwrap_err(),
            RouteError::UnknownModel { model_id: "m".into(), model: "Tiny.Q8_0".into() }
        );
        reg.upsert(announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(0, 10), 30)).unwrap();
        reg.upsert(announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(20, 30), 30)).unwrap();
        let err = route(&reg, "m", &none, CoveragePolicy::FailFast).await.unwrap_err();
        assert_eq!(
            err,
            RouteError::Uncovered {
                model_id: "m".into(),
                model: "Tiny.Q8_0".into(),
                n_layers: 30,
                found: vec![LayerRange::new(0, 10), LayerRange::new(20, 30)],
                missing: vec![LayerRange::new(10, 20)]
            }
        );
        assert!(err.to_string().contains("found 0..10, 20..30; missing 10..20 of Tiny.Q8_0"), "{err}");
        // Waiting: the missing node registers a little later and the route comes through.
        let late = reg.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            late.upsert(announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(10, 20), 30)).unwrap();
        });
        let wait = CoveragePolicy::WaitAndRetry { timeout: Duration::from_secs(5) };
        let r = route(&reg, "m", &none, wait).await.unwrap();
        assert_eq!(spans(&r), vec![(0, 10), (10, 20), (20, 30)]);
        // Waiting that runs out reports what is still missing.
        let reg = NodeRegistry::new(config);
        reg.upsert(announcement(&Keypair::generate_ed25519(), "m", LayerRange::new(5, 30), 30)).unwrap();
        let t = Instant::now();
        let short = CoveragePolicy::WaitAndRetry { timeout: Duration::from_millis(300) };
        let err = route(&reg, "m", &none, short).await.unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(matches!(err, RouteError::Uncovered { ref missing, .. } if missing == &vec![LayerRange::new(0, 5)]));
    }
}
