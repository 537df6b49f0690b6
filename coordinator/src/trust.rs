//! Trust from measurement (docs/SECURITY.md, "Trust and routing"): what a node says about itself is a hint, what the
//! owner measured and checked is what counts.
//!
//! - **Timing.** The owner times every one-token step of a route ([`RouteSession::last_decode`]) and folds it into
//!   each stage's measured milliseconds per layer (`NodeRegistry::record_layer_time`); routing uses that instead of
//!   the announced throughput.
//! - **Probation.** A new identity is [`Standing::Probation`]: user sessions never reach it. The [`Prober`] runs the
//!   owner's own canary sessions (random prompts, greedy, with top log-probabilities) through the node, the rest of
//!   the route on trusted nodes, and compares the result with the same canary on trusted nodes only. Agreement within
//!   [`LOGPROB_TOLERANCE`] makes it [`Standing::Trusted`]; disagreement rejects and bans it. With no trusted node
//!   yet, once no new node registered for [`BOOTSTRAP_SETTLE`], up to three disjoint routes over the new nodes are
//!   run and a strict majority is trusted (a single route, with no replica to check against, is trusted as it is: a
//!   swarm without replicas has nothing to compare with).
//! - **Sampled checking.** A fraction of user sessions ([`crate::SwarmClientConfig::audit_fraction`]) run every step
//!   on a second, disjoint route too (a shadow) and the owner compares the two results. When they disagree a third
//!   disjoint route replays the history and decides: the route that disagrees with the majority loses (a one-stage
//!   route's node is rejected and banned, the stages of a longer one go back on probation, where each is checked
//!   alone), and the user gets the majority's token, so the output stays that of honest nodes.
//!
//! The comparison is of the last stage's output (token and log-probabilities of the top tokens), which is a function
//! of every stage's hidden states, so no protocol change was needed; a perturbation of a hidden state that moves no
//! log-probability by more than the tolerance goes unseen.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use shardline_kernels::SamplingParams;
use shardline_proto::pool::ConnectionPool;
use shardline_proto::wire::{Limits, TokenResult, WireDType};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::deadline::DeadlineConfig;
use crate::registry::NodeRegistry;
use crate::routing::{self, Candidate, Route};
use crate::session::{RouteSession, SessionError, SessionParams};

/// Whether the owner has checked a node's output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Standing {
    /// New: measured and checked with canary sessions, never given a user's session.
    #[default]
    Probation,
    /// Its output agreed with a trusted replica's.
    Trusted,
    /// Its output disagreed with the majority: never routed to again by this owner.
    Rejected,
}

/// Largest difference between two log-probabilities (nats) that honest replicas may show: CPU and GPU kernels round
/// differently (measured differences are below 0.01 on SmolLM2), while a tampered weight or hidden state moves them
/// by far more.
pub const LOGPROB_TOLERANCE: f32 = 0.1;
/// Canary prompt length and decode steps.
const CANARY_PROMPT: usize = 8;
const CANARY_STEPS: usize = 4;
/// With no trusted node yet, how long after the latest registration the majority is taken: nodes started together
/// are then compared together, instead of the first one registered being trusted alone.
const BOOTSTRAP_SETTLE: Duration = Duration::from_millis(1500);
/// Top log-probabilities compared per canary step.
const CANARY_TOP: u8 = 4;

/// Whether two results of the same step agree: the same token with log-probabilities within the tolerance, or a
/// near-tie (each side's token is in the other's top list within the tolerance of its best).
pub fn agree(a: &TokenResult, b: &TokenResult) -> bool {
    let close = |x: f32, y: f32| (x - y).abs() <= LOGPROB_TOLERANCE || (x.is_nan() && y.is_nan());
    if !a.logprob.is_finite() || !b.logprob.is_finite() {
        return false;
    }
    if a.token == b.token {
        if !close(a.logprob, b.logprob) {
            return false;
        }
        // Every token both top lists name must have close log-probabilities.
        return a.top.iter().all(|(t, lp)| b.top.iter().find(|(u, _)| u == t).is_none_or(|(_, lq)| close(*lp, *lq)));
    }
    let in_top = |r: &TokenResult, t: u32, best: f32| r.top.iter().any(|(u, lp)| *u == t && close(*lp, best));
    in_top(b, a.token, b.logprob) && in_top(a, b.token, a.logprob)
}

/// Whether two canary runs agree, step by step; after a near-tie the continuations may differ and are not compared.
pub fn agree_all(a: &[TokenResult], b: &[TokenResult]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    for (x, y) in a.iter().zip(b) {
        if !agree(x, y) {
            return false;
        }
        if x.token != y.token {
            return true;
        }
    }
    true
}

/// Folds the wall time of one decoded token on `route` into each stage's measured time per layer: the time less
/// the stages' round trips, spread evenly over the model's layers (exact for a one-stage route; for longer ones a
/// slow stage is shared with its route-mates, which averages out over routes).
pub fn record_route_time(registry: &NodeRegistry, route: &Route, elapsed: Duration) {
    let n_layers: usize = route.stages.iter().map(|s| s.span.len()).sum();
    if n_layers == 0 {
        return;
    }
    let rtts: Duration = route.stages.iter().filter_map(|s| registry.health(&s.peer).rtt).sum();
    let compute = elapsed.saturating_sub(rtts).as_secs_f64() * 1000.0;
    // Never below the plausible floor: on a tiny model the round trips can exceed the whole step, and a zero would
    // make a node's cost blind to how many sessions share it (`routing.rs`, `cost_terms`).
    let per_layer = (compute / n_layers as f64).max(crate::routing::MIN_PLAUSIBLE_MS_PER_LAYER);
    for s in &route.stages {
        registry.record_layer_time(&s.peer, per_layer);
    }
}

/// What the checks need of a swarm client.
#[derive(Clone)]
pub struct TrustContext {
    pub pool: Arc<ConnectionPool>,
    pub registry: Arc<NodeRegistry>,
    pub model_id: String,
    pub wire_dtype: WireDType,
    pub prefill_chunk: usize,
    /// When a late canary or checked step's silent stage is taken for dead, as for user sessions.
    pub detect: DeadlineConfig,
}

impl TrustContext {
    fn params(&self, max_tokens: usize, sampling: SamplingParams, n_top: u8) -> Option<SessionParams> {
        let shape = self.registry.model_shape(&self.model_id)?;
        Some(SessionParams {
            model_id: self.model_id.clone(),
            n_layers: shape.n_layers,
            hidden: shape.hidden,
            max_tokens: max_tokens as u32,
            sampling,
            n_top,
            wire_dtype: self.wire_dtype,
            prefill_chunk: self.prefill_chunk,
            detect: self.detect,
            // Checks run on nodes not measured yet: their times are not the user sessions' to start from.
            step_memory: None,
        })
    }

    async fn open(&self, route: Route, params: &SessionParams) -> Result<RouteSession, SessionError> {
        let (registry, records) = (self.registry.clone(), self.registry.clone());
        RouteSession::open(
            &self.pool,
            route,
            params,
            Limits::default(),
            move |p, rtt| registry.record_rtt(&p, rtt),
            move |p| records.signed_record(p),
        )
        .await
    }

    /// Runs a greedy canary: `prompt`, then [`CANARY_STEPS`] decode steps; every decode step is timed.
    pub async fn canary(&self, route: Route, prompt: &[u32]) -> Result<Vec<TokenResult>, SessionError> {
        let params = self
            .params(prompt.len() + CANARY_STEPS + 1, SamplingParams::GREEDY, CANARY_TOP)
            .ok_or_else(|| SessionError::Protocol("model shape unknown".into()))?;
        let mut s = self.open(route, &params).await?;
        let limit = Duration::from_secs(60);
        let mut out = Vec::with_capacity(CANARY_STEPS);
        let mut next: Vec<u32> = prompt.to_vec();
        let run = async {
            for _ in 0..CANARY_STEPS {
                let r = s.feed(&next, true).await?.ok_or_else(|| SessionError::Protocol("no token".into()))?;
                if let Some(t) = s.last_decode() {
                    record_route_time(&self.registry, s.route(), t);
                }
                next = vec![r.token];
                out.push(r);
            }
            Ok::<_, SessionError>(())
        };
        let result = tokio::time::timeout(limit, run).await.map_err(|_| SessionError::Timeout(limit));
        let route_peers = s.route().peers();
        s.close().await;
        match result {
            Ok(Ok(())) => Ok(out),
            Ok(Err(e)) | Err(e) => {
                debug!(route = ?route_peers, error = %e, "canary failed");
                Err(e)
            }
        }
    }

    /// Rejects a node whose output disagreed with the majority: never routed to again, and banned.
    fn reject(&self, peer: &PeerId, why: &str) {
        warn!(%peer, why, "node rejected: its output disagrees with trusted replicas");
        self.registry.set_standing(peer, Standing::Rejected);
        self.registry.ban(peer);
    }

    fn standing(&self, peer: &PeerId) -> Standing {
        self.registry.health(peer).standing
    }
}

/// A random canary prompt (token ids every vocabulary of a real model has).
fn canary_prompt() -> Vec<u32> {
    (0..CANARY_PROMPT).map(|_| rand::random::<u32>() % 200 + 3).collect()
}

/// The task that checks new identities; one per (registry, model) — see [`Prober::spawn`].
pub struct Prober {
    task: JoinHandle<()>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Prober {
    /// Starts checking the nodes on probation of `ctx.model_id` every `interval`, unless the registry runs no
    /// probation or another prober already checks this model in this registry.
    pub fn spawn(ctx: TrustContext, interval: Duration) -> Option<Prober> {
        if !ctx.registry.config().probation || !ctx.registry.claim_prober(&ctx.model_id) {
            return None;
        }
        let task = tokio::spawn(async move {
            let _claim = ProberClaim(ctx.clone());
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                probe_round(&ctx).await;
            }
        });
        Some(Prober { task })
    }
}

/// Releases the registry's prober claim when the task ends (aborted or not).
struct ProberClaim(TrustContext);

impl Drop for ProberClaim {
    fn drop(&mut self) {
        self.0.registry.release_prober(&self.0.model_id);
    }
}

/// One round: checks every node on probation against trusted nodes, or bootstraps trust by majority.
pub async fn probe_round(ctx: &TrustContext) {
    let Some(shape) = ctx.registry.model_shape(&ctx.model_id) else { return };
    let n = shape.n_layers as usize;
    let all = routing::candidates_where(&ctx.registry, &ctx.model_id, |h| h.standing != Standing::Rejected);
    let (trusted, probation): (Vec<Candidate>, Vec<Candidate>) =
        all.into_iter().partition(|c| ctx.standing(&c.peer) == Standing::Trusted);
    if probation.is_empty() {
        return;
    }
    let prompt = canary_prompt();
    match routing::plan(&ctx.model_id, &trusted, n, &HashSet::new(), rand::random()) {
        Ok(reference_route) => {
            let reference = match ctx.canary(reference_route, &prompt).await {
                Ok(r) => r,
                Err(e) => {
                    // A trusted node failed to serve: an ordinary failure, banned as any other.
                    if let Some(p) = e.failed_peer() {
                        ctx.registry.ban(&p);
                    }
                    return;
                }
            };
            for x in &probation {
                check_one(ctx, &trusted, x, n, &prompt, &reference).await;
            }
        }
        Err(_) => {
            // Let the nodes present at start all register before a majority is taken among them.
            let newest = probation.iter().filter_map(|c| ctx.registry.get(&c.peer)).map(|e| e.registered_at).max();
            if newest.is_some_and(|t| t.elapsed() < BOOTSTRAP_SETTLE) {
                return;
            }
            bootstrap(ctx, trusted, probation, n, &prompt).await
        }
    }
}

/// Checks node `x` on a route where every other stage is trusted.
async fn check_one(
    ctx: &TrustContext,
    trusted: &[Candidate],
    x: &Candidate,
    n: usize,
    prompt: &[u32],
    reference: &[TokenResult],
) {
    let mut forced = x.clone();
    // Free to use, so the planner runs it over all of its layers it can.
    forced.ms_per_layer = Some(0.0);
    forced.rtt = Duration::ZERO;
    forced.in_flight = 0;
    forced.waiting = 0;
    let mut cands = trusted.to_vec();
    cands.push(forced);
    let Ok(route) = routing::plan(&ctx.model_id, &cands, n, &HashSet::new(), rand::random()) else { return };
    if !route.peers().contains(&x.peer) {
        return;
    }
    match ctx.canary(route, prompt).await {
        Ok(out) if agree_all(reference, &out) => {
            info!(peer = %x.peer, layers = %x.layers, "node passed probation: its canary agrees with trusted replicas");
            ctx.registry.set_standing(&x.peer, Standing::Trusted);
        }
        Ok(_) => ctx.reject(&x.peer, "canary output differs"),
        Err(e) => {
            // Unreachable or broken: banned with backoff, still on probation.
            if let Some(p) = e.failed_peer() {
                ctx.registry.ban(&p);
            }
        }
    }
}

/// No trusted route yet: up to three disjoint routes over the new nodes, the majority is trusted.
async fn bootstrap(ctx: &TrustContext, trusted: Vec<Candidate>, probation: Vec<Candidate>, n: usize, prompt: &[u32]) {
    let mut cands = trusted;
    cands.extend(probation);
    let mut used = HashSet::new();
    let mut runs: Vec<(Vec<PeerId>, Vec<TokenResult>)> = Vec::new();
    for _ in 0..3 {
        let Ok(route) = routing::plan(&ctx.model_id, &cands, n, &used, rand::random()) else { break };
        let peers = route.peers();
        used.extend(peers.iter().copied());
        match ctx.canary(route, prompt).await {
            Ok(out) => runs.push((peers, out)),
            Err(e) => {
                if let Some(p) = e.failed_peer() {
                    ctx.registry.ban(&p);
                }
            }
        }
    }
    if runs.len() == 1 {
        warn!(peers = ?runs[0].0, "no replica to check the first route against: trusting it as it is");
        runs[0].0.iter().for_each(|p| ctx.registry.set_standing(p, Standing::Trusted));
        return;
    }
    // The run most others agree with, if a strict majority does.
    let agreeing = |i: usize| (0..runs.len()).filter(|&j| agree_all(&runs[i].1, &runs[j].1)).collect::<Vec<_>>();
    let Some(best) = (0..runs.len()).map(agreeing).max_by_key(|v| v.len()) else { return };
    if best.len() * 2 <= runs.len() {
        warn!(routes = runs.len(), "replicas disagree with no majority: nothing trusted yet");
        return;
    }
    for (j, (peers, _)) in runs.iter().enumerate() {
        if best.contains(&j) {
            peers.iter().for_each(|p| ctx.registry.set_standing(p, Standing::Trusted));
        } else if let [only] = peers.as_slice() {
            ctx.reject(only, "canary output differs from the majority");
        }
        // A longer losing route stays on probation: each of its stages is checked alone next round.
    }
}

/// The sampled check of one user session: a shadow session on a disjoint route fed the same tokens.
pub struct Audit {
    shadow: Option<RouteSession>,
    /// History positions the shadow has been fed.
    fed: usize,
    max_tokens: usize,
    sampling: SamplingParams,
    n_top: u8,
    /// Steps compared so far (for tests and logs).
    pub checked: usize,
}

/// What a checked step returns to the session.
pub struct Checked {
    /// The token to give the user: the main route's, or the majority's when the main route lost.
    pub result: TokenResult,
    /// The main route disagreed with the majority: drop it and replay the session elsewhere.
    pub main_route_failed: bool,
}

impl Audit {
    /// An audit for a session, drawn with probability `fraction`.
    pub fn draw(fraction: f64, max_tokens: usize, sampling: SamplingParams, n_top: u8) -> Option<Audit> {
        (fraction > 0.0 && rand::random::<f64>() < fraction).then_some(Audit {
            shadow: None,
            fed: 0,
            max_tokens,
            sampling,
            n_top,
            checked: 0,
        })
    }
}

/// The owner's hook after every sampled step of a user session: times the route and, for an audited session,
/// checks the step on a shadow route.
pub async fn after_step(
    ctx: &TrustContext,
    audit: &mut Option<Audit>,
    history: &[u32],
    tokens: &[u32],
    main: Option<&RouteSession>,
    result: TokenResult,
) -> Result<Checked, SessionError> {
    let Some(main) = main else { return Ok(Checked { result, main_route_failed: false }) };
    if let Some(t) = main.last_decode() {
        record_route_time(&ctx.registry, main.route(), t);
    }
    let Some(a) = audit.as_mut() else { return Ok(Checked { result, main_route_failed: false }) };
    let main_peers: HashSet<PeerId> = main.route().peers().into_iter().collect();
    let Some(shadow_result) = shadow_step(ctx, a, &main_peers, history, tokens).await else {
        return Ok(Checked { result, main_route_failed: false });
    };
    a.checked += 1;
    if agree(&result, &shadow_result) {
        return Ok(Checked { result, main_route_failed: false });
    }
    let shadow_peers: HashSet<PeerId> =
        a.shadow.as_ref().map(|s| s.route().peers().into_iter().collect()).unwrap_or_default();
    warn!(main = ?main_peers, shadow = ?shadow_peers, "replicas disagree on a step: asking a third route");
    let mut excluded: HashSet<PeerId> = main_peers.union(&shadow_peers).copied().collect();
    let third = replay(ctx, a, &mut excluded, history, tokens).await;
    let Some(third) = third else {
        a.shadow = None;
        return Err(SessionError::Protocol("two routes disagree and no third route can decide".into()));
    };
    if agree(&third, &result) {
        demote(ctx, &shadow_peers);
        a.shadow = None;
        Ok(Checked { result, main_route_failed: false })
    } else if agree(&third, &shadow_result) {
        demote(ctx, &main_peers);
        // The shadow is right and stays; the main route is replayed elsewhere by the session.
        Ok(Checked { result: shadow_result, main_route_failed: true })
    } else {
        a.shadow = None;
        Err(SessionError::Protocol("three routes disagree on one step".into()))
    }
}

/// The peers of a route that lost a majority vote: a lone node is rejected; stages of a longer route go back on
/// probation, where each is checked alone.
fn demote(ctx: &TrustContext, peers: &HashSet<PeerId>) {
    if peers.len() == 1 {
        peers.iter().for_each(|p| ctx.reject(p, "its step differs from two other replicas"));
    } else {
        for p in peers {
            warn!(%p, "back on probation: its route's step differs from two other replicas");
            ctx.registry.set_standing(p, Standing::Probation);
        }
    }
}

/// Feeds the shadow what it has not seen (opening it on a route disjoint from `main` first) and returns its token.
async fn shadow_step(
    ctx: &TrustContext,
    a: &mut Audit,
    main: &HashSet<PeerId>,
    history: &[u32],
    tokens: &[u32],
) -> Option<TokenResult> {
    if a.shadow.is_none() {
        let route = plan_user_route(ctx, main)?;
        let params = ctx.params(a.max_tokens, a.sampling, a.n_top)?;
        a.shadow = ctx.open(route, &params).await.ok();
        a.fed = 0;
    }
    let s = a.shadow.as_mut()?;
    let mut feed = history.get(a.fed..)?.to_vec();
    feed.extend_from_slice(tokens);
    match s.feed(&feed, true).await {
        Ok(Some(r)) => {
            a.fed = history.len() + tokens.len();
            Some(r)
        }
        _ => {
            // A failing shadow is not the user's problem: the next step tries another.
            a.shadow = None;
            None
        }
    }
}

/// Replays `history + tokens` on a route avoiding `excluded` and returns the token after them.
async fn replay(
    ctx: &TrustContext,
    a: &Audit,
    excluded: &mut HashSet<PeerId>,
    history: &[u32],
    tokens: &[u32],
) -> Option<TokenResult> {
    let route = plan_user_route(ctx, excluded)?;
    let params = ctx.params(a.max_tokens, a.sampling, a.n_top)?;
    let mut s = ctx.open(route, &params).await.ok()?;
    let mut all = history.to_vec();
    all.extend_from_slice(tokens);
    let r = s.feed(&all, true).await.ok().flatten();
    s.close().await;
    r
}

/// A route of trusted nodes avoiding `excluded`, drawn without regard to speed (every stage costs the same per
/// layer), so the checks reach every replica, not only the fastest ones.
fn plan_user_route(ctx: &TrustContext, excluded: &HashSet<PeerId>) -> Option<Route> {
    let shape = ctx.registry.model_shape(&ctx.model_id)?;
    let mut cands = routing::candidates(&ctx.registry, &ctx.model_id);
    for c in &mut cands {
        c.ms_per_layer = Some(1.0);
        c.rtt = routing::DEFAULT_RTT;
        c.in_flight = 0;
        c.waiting = 0;
    }
    routing::plan(&ctx.model_id, &cands, shape.n_layers as usize, excluded, rand::random()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(token: u32, logprob: f32, top: &[(u32, f32)]) -> TokenResult {
        TokenResult { token, logprob, top: top.to_vec() }
    }

    #[test]
    fn agreement_allows_rounding_and_near_ties_only() {
        let a = r(5, -0.50, &[(5, -0.50), (9, -1.2)]);
        assert!(agree(&a, &r(5, -0.51, &[(5, -0.51), (9, -1.19)])));
        assert!(!agree(&a, &r(5, -0.9, &[(5, -0.9), (9, -1.2)])), "log-probability moved");
        assert!(!agree(&a, &r(5, -0.50, &[(5, -0.50), (9, -2.0)])), "a top entry moved");
        // A near-tie decided the other way on another device.
        let tie = r(5, -0.69, &[(5, -0.69), (9, -0.70)]);
        assert!(agree(&tie, &r(9, -0.69, &[(9, -0.69), (5, -0.70)])));
        assert!(!agree(&a, &r(9, -0.5, &[(9, -0.5), (5, -1.5)])), "another token, far from a tie");
        assert!(!agree(&a, &r(5, f32::NAN, &[])));
        assert!(agree_all(&[a.clone(), tie.clone()], &[a.clone(), r(9, -0.69, &[(9, -0.69), (5, -0.70)])]));
        assert!(!agree_all(std::slice::from_ref(&a), &[a.clone(), a.clone()]));
    }
}
