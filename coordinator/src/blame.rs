//! Who is at fault when a session step fails, and what the owner does about it (docs/SECURITY.md, "Blame and
//! failover"). Three kinds of failure, three answers:
//!
//! - the **request's** fault (a size the coordinator cannot serve, sampling changed mid-session): the client gets a
//!   4xx, nobody is banned, nothing is retried;
//! - **capacity** (a full queue, a stage out of session slots or KV cache): other nodes are tried, the request waits
//!   at most the admission wait, then gets 429 with `Retry-After`; never a ban;
//! - a **peer's** fault (a broken protocol, a wrong frame, a failed connection, a stage error, a token that cannot
//!   be a sample): that peer, and only that peer, is banned, and the session fails over.
//!
//! Error frames say which hop failed (`Downstream` names the next stage, `Upstream` the previous one), so a stage
//! reporting its neighbour's fault is not blamed for it.

use libp2p::PeerId;
use shardline_proto::wire::{ErrorCode, TokenResult};

use crate::routing::RouteError;
use crate::session::SessionError;

/// What a failed step tells the owner to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request cannot be served as asked: answer the client, ban nobody, do not retry.
    Request,
    /// No capacity now; `peer` is the full node when one is known. Re-route or wait; 429 when nothing frees up.
    Capacity(Option<PeerId>),
    /// This peer failed or misbehaved: ban it and fail over.
    Peer(PeerId),
    /// The step failed and no single stage can be named (the whole route went silent): re-route around it, ban
    /// nobody.
    Unattributed,
    /// Nothing to retry (no route covers the model, or the owner's own state is wrong): answer at once.
    Final,
}

/// Classifies a failed step.
pub fn classify(e: &SessionError) -> Fault {
    match e {
        SessionError::Request(_) | SessionError::SamplingChanged | SessionError::TopChanged { .. } => Fault::Request,
        SessionError::Busy { peer, .. } => Fault::Capacity(Some(*peer)),
        SessionError::Stage { peer, code, .. } => match code {
            ErrorCode::Busy => Fault::Capacity(Some(*peer)),
            // "No input for the idle timeout": the owner or the previous stage went quiet, not this stage.
            ErrorCode::Timeout => Fault::Unattributed,
            _ => Fault::Peer(*peer),
        },
        SessionError::Connect { peer, .. }
        | SessionError::Violation { peer, .. }
        | SessionError::Silent { peer, .. } => Fault::Peer(*peer),
        SessionError::Timeout(_) => Fault::Unattributed,
        SessionError::Route(RouteError::Uncovered { .. } | RouteError::UnknownModel { .. }) => Fault::Final,
        SessionError::Protocol(_) => Fault::Final,
        SessionError::Exhausted(_, inner) => classify(inner),
    }
}

/// The stage of an `n`-stage route that an error frame from stage `from` blames: `Downstream` names the next hop
/// and `Upstream` the previous one (when there is one); every other code, the stage that sent it.
pub fn blamed_stage(code: ErrorCode, from: usize, n: usize) -> usize {
    match code {
        ErrorCode::Downstream if from + 1 < n => from + 1,
        ErrorCode::Upstream if from > 0 => from - 1,
        _ => from,
    }
}

/// Why a `Token` frame cannot be an honest sample, if it cannot: the sampled token's log-probability is a finite
/// number at most 0 (allowing rounding); an alternative's may also be -inf (a token the model rules out), never NaN
/// or above 0.
pub fn implausible_token(t: &TokenResult) -> Option<String> {
    const SLACK: f32 = 1e-3;
    if !t.logprob.is_finite() || t.logprob > SLACK {
        return Some(format!("token {} with log-probability {}", t.token, t.logprob));
    }
    if let Some((tok, lp)) = t.top.iter().find(|(_, lp)| lp.is_nan() || *lp > SLACK) {
        return Some(format!("alternative {tok} with log-probability {lp}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shardline_proto::LayerRange;

    use super::*;
    use crate::queue::QueueError;

    fn stage(code: ErrorCode) -> (PeerId, SessionError) {
        let peer = PeerId::random();
        (peer, SessionError::Stage { peer, code, message: "x".into() })
    }

    #[test]
    fn capacity_is_never_a_peer_fault() {
        let (p, busy) = stage(ErrorCode::Busy);
        assert_eq!(classify(&busy), Fault::Capacity(Some(p)));
        let q = PeerId::random();
        for source in
            [QueueError::Busy { in_flight: 16, waiting: 16, max_waiting: 16 }, QueueError::Timeout(Duration::ZERO)]
        {
            assert_eq!(classify(&SessionError::Busy { peer: q, source }), Fault::Capacity(Some(q)));
        }
        assert_eq!(classify(&SessionError::Exhausted(2, Box::new(busy))), Fault::Capacity(Some(p)));
    }

    #[test]
    fn the_requests_own_fault_bans_nobody() {
        assert_eq!(classify(&SessionError::Request("max_tokens".into())), Fault::Request);
        assert_eq!(classify(&SessionError::SamplingChanged), Fault::Request);
        assert_eq!(classify(&SessionError::TopChanged { asked: 3, opened: 1 }), Fault::Request);
    }

    #[test]
    fn protocol_breaks_and_stage_errors_blame_that_peer() {
        for code in [
            ErrorCode::Malformed,
            ErrorCode::UnknownSession,
            ErrorCode::BadRequest,
            ErrorCode::Compute,
            ErrorCode::Downstream,
            ErrorCode::Upstream,
            ErrorCode::Other(99),
        ] {
            let (p, e) = stage(code);
            assert_eq!(classify(&e), Fault::Peer(p), "{code:?}");
        }
        let p = PeerId::random();
        assert_eq!(
            classify(&SessionError::Violation { peer: p, detail: "Token in answer to Open".into() }),
            Fault::Peer(p)
        );
        assert_eq!(classify(&SessionError::Connect { peer: p, detail: "refused".into() }), Fault::Peer(p));
        // The owner's own silence detection names the silent stage (a stage's Timeout frame does not).
        let silent = SessionError::Silent { peer: p, silent: Duration::from_secs(1), during: "during a late step" };
        assert_eq!(classify(&silent), Fault::Peer(p));
    }

    #[test]
    fn silence_without_a_culprit_and_missing_layers() {
        assert_eq!(classify(&stage(ErrorCode::Timeout).1), Fault::Unattributed);
        assert_eq!(classify(&SessionError::Timeout(Duration::from_secs(1))), Fault::Unattributed);
        let uncovered = SessionError::Route(RouteError::Uncovered {
            model_id: "m".into(),
            model: "m".into(),
            n_layers: 4,
            found: vec![],
            missing: vec![LayerRange::new(0, 4)],
        });
        assert_eq!(classify(&uncovered), Fault::Final);
    }

    #[test]
    fn error_frames_name_their_hop() {
        // Route of three stages: 0 → 1 → 2.
        assert_eq!(blamed_stage(ErrorCode::Downstream, 0, 3), 1);
        assert_eq!(blamed_stage(ErrorCode::Downstream, 2, 3), 2, "the last stage has no next hop to blame");
        assert_eq!(blamed_stage(ErrorCode::Upstream, 2, 3), 1);
        assert_eq!(blamed_stage(ErrorCode::Upstream, 0, 3), 0, "the first stage's input is the owner's");
        assert_eq!(blamed_stage(ErrorCode::Compute, 1, 3), 1);
    }

    #[test]
    fn tokens_that_cannot_be_samples() {
        let ok = TokenResult { token: 5, logprob: -0.25, top: vec![(5, -0.25), (9, -3.0)] };
        assert_eq!(implausible_token(&ok), None);
        for lp in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.5] {
            assert!(implausible_token(&TokenResult { logprob: lp, ..ok.clone() }).is_some(), "{lp}");
        }
        let top = TokenResult { top: vec![(1, f32::NAN)], ..ok.clone() };
        assert!(implausible_token(&top).is_some());
        let ruled_out = TokenResult { top: vec![(1, f32::NEG_INFINITY)], ..ok };
        assert_eq!(implausible_token(&ruled_out), None);
    }
}
