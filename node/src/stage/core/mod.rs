//! The stage as a state machine that does no I/O: [`StageCore`] takes [`Event`]s (a frame arrived on a stream, a
//! stream ended, a dial or a compute batch finished, time passed) and answers with [`Action`]s (read the next frame,
//! send a frame, finish a stream, dial the next stage, run a compute batch). No sockets, no tasks, no clock: the
//! driver passes `now` with every event and asks [`StageCore::next_deadline`] when to come back. The QUIC server
//! (`stage::server`) and the in-process driver (`stage::local`) run this same core; its tests script events by hand.
//!
//! Admission, the session map, position ordering, error replies, backpressure and the whole session lifecycle live
//! here (see `docs/PROTOCOL.md` for the frames):
//! - A stream's first frame is `Open` (a control stream from the owner) or `Attach` (a data stream from the previous
//!   stage); anything else is refused with `Malformed`.
//! - An admitted session's map entry owns its admission [`Slot`](admission::Slot) and its KV reservation, so removing
//!   the entry frees both; while a chunk computes the KV handle is lent to the batch, and a session ended meanwhile
//!   is kept as `Closing` until the handle comes back (its result is discarded).
//! - Backpressure: the core asks for one frame at a time per stream ([`Action::Read`]) and only while the session
//!   holds fewer than [`INPUT_QUEUE`] chunks, and computes a session only while fewer than [`OUTPUT_WINDOW`] of its
//!   output frames are unwritten; a fast sender is held back by the transport's flow control.
//! - Ordering: chunks must continue the session's positions exactly; a close, the end of an input stream or a
//!   refused frame takes effect after the chunks before it. A lost stream, a malformed frame, a failed next stage,
//!   a compute error and the idle timeout end the session at once.
//! - Security (`docs/SECURITY.md`, *Stage*): `Attach` must present the session's key and the next hop must be vouched
//!   for by its signed announcement ([`auth`]); every read carries an [`Expect`] so a frame the stream cannot take
//!   costs its header only; one peer holds at most its [`quota`] of sessions and KV cache; non-finite hidden states are
//!   refused and blamed on the stage that sent them ([`finite`]).

mod actions;
mod admission;
pub mod auth;
mod batch;
mod config;
mod cost;
mod events;
pub mod finite;
mod model;
pub mod quota;
mod schedule;
mod session;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

pub use actions::Action;
pub use admission::{Admission, Slot};
pub use batch::{ComputeBatch, ComputeItem, ComputeOutput, ComputeResult, Failure, Sample};
pub use config::{OWNER_KEEP_ALIVE, StageConfig};
pub use cost::{StepCost, StepShape};
pub use events::{Event, StreamId};
pub use model::{StageCompute, StageModel};
pub use quota::{Peer, PeerLease, PeerQuotas};
pub use schedule::{BatchGauge, BatchStats};
pub use session::{INPUT_QUEUE, OUTPUT_WINDOW};

use schedule::Candidate;
use session::{Chunk, ChunkKind, Downstream, InFlight, Link, Phase, Queued, StageSession, Upstream};

use crate::wire_convert::sampling_from_wire;
use shardline_proto::wire::{ErrorCode, Expect, Frame, FrameKind, SessionId, SessionOpen, StageData};

/// An open waiting for KV-cache blocks.
struct Parked {
    stream: StreamId,
    session: SessionId,
    open: SessionOpen,
    /// The peer's quota, held while waiting.
    lease: PeerLease,
    /// Refused `Busy` if still waiting then.
    deadline: Instant,
}

/// What a stream is to the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Accepted; its first frame decides.
    Pending,
    /// The owner's stream of `session` (`Open`, inputs on the first stage, `Close`; tokens and errors back).
    Control(SessionId),
    /// The previous stage's data stream of `session` (hidden-state inputs).
    Upstream(SessionId),
    /// Our data stream to the next stage of `session` (hidden-state outputs; only errors come back).
    Downstream(SessionId),
}

struct StreamState {
    role: Role,
    /// Who opened it (dialed streams: [`Peer::LOCAL`]; they never own a session).
    peer: Peer,
    /// A read was asked for and has not been answered.
    reading: bool,
    /// Frames sent on it that the driver has not reported written.
    unsent: usize,
}

/// One stage's sessions, driven by events. `M` checks opens and reserves KV cache; see the module docs.
pub struct StageCore<M: StageModel> {
    model: M,
    config: StageConfig,
    admission: Admission,
    quotas: PeerQuotas,
    /// Ordered by id so batches are built in a stable order.
    sessions: BTreeMap<SessionId, StageSession<M::Kv>>,
    streams: HashMap<StreamId, StreamState>,
    actions: VecDeque<Action<M::Kv>>,
    /// A batch is out; the next is built when it comes back.
    computing: bool,
    next_dial: u64,
    /// Shutting down: opens are refused ([`Event::Drain`]).
    draining: bool,
    /// Admission order given to the next session (the scheduler serves older prompts first).
    next_arrival: u64,
    /// Opens waiting for KV-cache blocks, oldest first (at most `config.max_waiting`).
    parked: VecDeque<Parked>,
    gauge: BatchGauge,
    /// What a step costs on this stage, learned from the compute times the driver reports.
    cost: StepCost,
    /// The shape of the batch out, then of the batch that came back last, until its time is reported.
    out_shape: Option<StepShape>,
    timed_shape: Option<StepShape>,
    /// Batches built so far: the number of the last one is each of its sessions' cohort.
    batches: u64,
    /// The last compute time reported: the gather window is a fraction of it.
    last_step: Option<Duration>,
    /// Holding the next batch back until then for sessions of a ready session's cohort ([`StageCore::gather`]).
    hold_until: Option<Instant>,
    /// The time of the last event: when a hold started.
    now: Option<Instant>,
}

impl<M: StageModel> StageCore<M> {
    pub fn new(model: M, config: StageConfig) -> Self {
        let admission = Admission::new(config.max_sessions);
        let quotas = PeerQuotas::new(config.sessions_per_peer(), config.max_kv_tokens_per_peer.unwrap_or(usize::MAX));
        Self {
            model,
            config,
            admission,
            quotas,
            sessions: BTreeMap::new(),
            streams: HashMap::new(),
            actions: VecDeque::new(),
            computing: false,
            next_dial: 0,
            draining: false,
            next_arrival: 0,
            parked: VecDeque::new(),
            gauge: BatchGauge::default(),
            cost: StepCost::default(),
            out_shape: None,
            timed_shape: None,
            batches: 0,
            last_step: None,
            hold_until: None,
            now: None,
        }
    }

    /// The step-time model the scheduler plans by (see `schedule`).
    pub fn step_cost(&self) -> &StepCost {
        &self.cost
    }

    /// What the scheduler did last (batch size, queue depth), readable from other threads.
    pub fn batch_gauge(&self) -> &BatchGauge {
        &self.gauge
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    pub fn config(&self) -> &StageConfig {
        &self.config
    }

    /// The admission counter, to read the load from elsewhere.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Sessions holding a slot (opening, running, or closing while their compute finishes).
    pub fn active_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The next action, in order. When none is left and no batch is out, builds a batch of every session's next
    /// ready chunk — so a driver that feeds all pending events before polling gets them batched together.
    pub fn poll_action(&mut self) -> Option<Action<M::Kv>> {
        if self.actions.is_empty() && !self.computing && !self.gather() {
            self.build_batch();
        }
        self.actions.pop_front()
    }

    /// Whether to hold the next batch back a moment: sessions that decoded in the same batch as a session whose next
    /// decode is ready here have theirs on the way (they left this stage together, went round the rest of the
    /// pipeline together, and only the transport's jitter put the first ahead). Building at once would split them:
    /// the ready ones now, the rest a step later, each group reading the weights again for the rest of the
    /// generation. So the stage waits for them, at most a quarter of its last step's time and never more than
    /// [`StageConfig::gather_wait`]; it builds at once when every one of them is here, when no decode is ready (a
    /// prompt does not wait), when a session's cohort is itself alone (a lone session never waits), when the ready
    /// rows fill the budget, and when no step time was reported (in process, every input of a step is delivered
    /// before the stage polls: `LocalSwarm` turns the wait off).
    fn gather(&mut self) -> bool {
        let Some(now) = self.now else { return false };
        if let Some(until) = self.hold_until {
            if now < until && self.missing_cohort() > 0 {
                return true;
            }
            self.hold_until = None;
            return false;
        }
        let wait = match self.last_step {
            Some(step) => (step / 4).min(self.config.gather_wait),
            None => return false,
        };
        if wait.is_zero() || self.missing_cohort() == 0 {
            return false;
        }
        let ready_rows: usize = self
            .sessions
            .values()
            .filter(|s| self.is_candidate(s))
            .filter_map(|s| match s.queue.front() {
                Some(Queued::Chunk(c)) => Some(c.data.n_tokens()),
                _ => None,
            })
            .sum();
        if ready_rows >= self.config.batch_tokens || self.ready_decodes() >= self.decode_cap() {
            return false;
        }
        self.hold_until = Some(now + wait);
        true
    }

    /// Sessions of the cohort of a session with a decode ready (the same last batch) whose own decode has not
    /// arrived yet, though nothing else holds them back.
    fn missing_cohort(&self) -> usize {
        let cohorts: HashSet<u64> = self
            .sessions
            .values()
            .filter(|s| self.is_candidate(s) && s.awaits_decode)
            .filter(|s| matches!(s.queue.front(), Some(Queued::Chunk(c)) if matches!(c.kind, ChunkKind::Decode)))
            .map(|s| s.cohort)
            .collect();
        if cohorts.is_empty() {
            return 0;
        }
        self.sessions
            .values()
            .filter(|s| {
                matches!(s.phase, Phase::Running)
                    && s.awaits_decode
                    && cohorts.contains(&s.cohort)
                    && s.queue.is_empty()
                    && s.in_flight.is_none()
                    && s.kv.is_some()
                    && !s.input_closed
                    && self.unsent(s.output_stream()) < OUTPUT_WINDOW
            })
            .count()
    }

    /// Sessions with a decode ready for the next batch.
    fn ready_decodes(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| self.is_candidate(s))
            .filter(|s| matches!(s.queue.front(), Some(Queued::Chunk(c)) if matches!(c.kind, ChunkKind::Decode)))
            .count()
    }

    /// The most decode rows one batch takes: the sessions decoding through this stage split into
    /// [`StageConfig::decode_groups`] groups (no bound with one group).
    fn decode_cap(&self) -> usize {
        let groups = self.config.decode_groups.max(1);
        if groups == 1 {
            return usize::MAX;
        }
        let decoding = self.sessions.values().filter(|s| matches!(s.phase, Phase::Running) && s.awaits_decode).count();
        decoding.div_ceil(groups).max(1)
    }

    /// Whether a session can go into the next batch now.
    fn is_candidate(&self, s: &StageSession<M::Kv>) -> bool {
        matches!(s.phase, Phase::Running) && s.has_ready_chunk() && self.unsent(s.output_stream()) < OUTPUT_WINDOW
    }

    /// The next queued action, without building a batch when none is queued: a driver that runs one batch per
    /// step (`LocalSwarm::step`) takes the rest of a step's actions with this, so the next batch is built only
    /// once the inputs that the step's outputs bring back have arrived.
    pub fn poll_queued(&mut self) -> Option<Action<M::Kv>> {
        self.actions.pop_front()
    }

    /// When the driver must send [`Event::Tick`] (a session's idle or connect timeout, the end of a gather window),
    /// if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let parked = self.parked.front().map(|p| p.deadline);
        self.sessions.values().filter_map(|s| self.deadline(s)).chain(parked).chain(self.hold_until).min()
    }

    /// Opens waiting for KV-cache blocks to be freed.
    pub fn waiting_opens(&self) -> usize {
        self.parked.len()
    }

    /// Takes one event that happened at `now`.
    pub fn handle(&mut self, now: Instant, event: Event<M::Kv>) {
        self.now = Some(now);
        self.handle_event(now, event);
        // Any event may have freed KV-cache blocks (a session ended) or run out a waiting open's time.
        if !self.parked.is_empty() {
            self.admit_parked(now);
        }
        self.gauge.set_waiting_opens(self.parked.len());
    }

    fn handle_event(&mut self, now: Instant, event: Event<M::Kv>) {
        match event {
            Event::Accepted { stream, peer } => {
                self.streams.insert(stream, StreamState { role: Role::Pending, peer, reading: false, unsent: 0 });
                self.read(stream);
            }
            Event::Frame { stream, frame } => {
                let Some(role) = self.answered(stream) else { return };
                match role {
                    Role::Pending => self.first_frame(now, stream, frame),
                    Role::Control(s) => self.input_frame(now, s, frame, false),
                    Role::Upstream(s) => self.input_frame(now, s, frame, true),
                    Role::Downstream(s) => self.downstream_frame(now, s, frame),
                }
            }
            Event::Finished { stream } => match self.answered(stream) {
                None => {}
                Some(Role::Pending) => self.forget(stream),
                Some(Role::Control(s)) => self.input_end(now, s, Ok(())),
                // Only the owner ends a session; a previous stage that ends the data stream is blamed for it.
                Some(Role::Upstream(s)) => {
                    let f = Failure::new(ErrorCode::Upstream, "the previous stage ended the data stream");
                    self.input_end(now, s, Err(f))
                }
                // Before attaching, a next stage that finishes its side has refused the session.
                Some(Role::Downstream(s)) if self.link(s) != Some(Link::Ready) => {
                    let msg = format!("next stage {} closed the stream before accepting", self.addr(s));
                    self.fail(s, Failure::new(ErrorCode::Downstream, msg));
                }
                // After attaching it has ended its part of the session (the owner closes every stage, so this races
                // with our own close): the session goes on until a write to it fails.
                Some(Role::Downstream(_)) => {}
            },
            Event::Lost { stream, reason } => match self.answered(stream) {
                None => {}
                Some(Role::Pending) => self.forget(stream),
                Some(Role::Control(s)) => {
                    debug!(session = s, %reason, "input stream lost: ending the session");
                    self.end(s, None);
                }
                Some(Role::Upstream(s)) => {
                    let msg = format!("the previous stage's data stream broke: {reason}");
                    self.fail(s, Failure::new(ErrorCode::Upstream, msg));
                }
                Some(Role::Downstream(s)) => {
                    let msg = format!("next stage {} stream: {reason}", self.addr(s));
                    self.fail(s, Failure::new(ErrorCode::Downstream, msg));
                }
            },
            Event::Malformed { stream, error } => match self.answered(stream) {
                None => {}
                Some(Role::Pending) => self.refuse(stream, 0, Failure::new(ErrorCode::Malformed, error)),
                Some(Role::Control(s)) => {
                    warn!(session = s, %error, "malformed frame: ending the session");
                    self.fail(s, Failure::new(ErrorCode::Malformed, error));
                }
                Some(Role::Upstream(s)) => {
                    let msg = format!("the previous stage sent a malformed frame: {error}");
                    self.fail(s, Failure::new(ErrorCode::Upstream, msg));
                }
                Some(Role::Downstream(s)) => {
                    let msg = format!("next stage {} stream: {error}", self.addr(s));
                    self.fail(s, Failure::new(ErrorCode::Downstream, msg));
                }
            },
            Event::Dialed { stream, result } => self.dialed(stream, result),
            Event::Sent { stream } => {
                if let Some(st) = self.streams.get_mut(&stream) {
                    st.unsent = st.unsent.saturating_sub(1);
                    if let Role::Control(s) | Role::Downstream(s) = st.role
                        && let Some(sess) = self.sessions.get_mut(&s)
                    {
                        sess.last_active = now;
                    }
                }
            }
            Event::SendFailed { stream, reason } => match self.streams.get(&stream).map(|st| st.role) {
                None | Some(Role::Upstream(_)) => {}
                Some(Role::Pending) => self.forget(stream),
                Some(Role::Control(s)) => {
                    debug!(session = s, %reason, "owner stream lost: ending the session");
                    self.end(s, None);
                }
                Some(Role::Downstream(s)) => {
                    let msg = format!("next stage {}: {reason}", self.addr(s));
                    self.fail(s, Failure::new(ErrorCode::Downstream, msg));
                }
            },
            Event::Computed(results) => {
                self.computing = false;
                self.timed_shape = self.out_shape.take();
                for r in results {
                    self.computed(now, r);
                }
            }
            Event::ComputeTime(took) => {
                self.last_step = Some(took);
                self.gauge.add_compute(took);
                if let Some(shape) = self.timed_shape.take() {
                    self.cost.observe(&shape, took);
                }
            }
            Event::ComputeLost { reason } => {
                self.computing = false;
                self.out_shape = None;
                let lost: Vec<SessionId> =
                    self.sessions.iter().filter(|(_, s)| s.in_flight.is_some()).map(|(id, _)| *id).collect();
                for id in lost {
                    let Some(s) = self.sessions.get_mut(&id) else { continue };
                    s.in_flight = None;
                    if matches!(s.phase, Phase::Closing) {
                        self.sessions.remove(&id);
                    } else {
                        self.fail(id, Failure::new(ErrorCode::Compute, format!("compute failed: {reason}")));
                    }
                }
            }
            Event::Tick => self.tick(now),
            Event::Drain => self.draining = true,
            Event::DrainExpired => {
                self.draining = true;
                let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
                for id in ids {
                    self.fail(id, Failure::new(ErrorCode::Busy, "node shutting down: drain deadline passed"));
                }
            }
        }
    }

    // ---- streams ----

    /// Marks a read on `stream` answered; `None` if the core no longer knows the stream.
    fn answered(&mut self, stream: StreamId) -> Option<Role> {
        let st = self.streams.get_mut(&stream)?;
        st.reading = false;
        Some(st.role)
    }

    fn read(&mut self, stream: StreamId) {
        let Some(role) = self.streams.get(&stream).filter(|st| !st.reading).map(|st| st.role) else { return };
        let expect = self.expect(role);
        if let Some(st) = self.streams.get_mut(&stream) {
            st.reading = true;
        }
        self.actions.push_back(Action::Read { stream, expect });
    }

    /// What the next frame of a stream in `role` may be, checked on its header before its payload is read: a first
    /// frame is a small `Open` or `Attach`; a session's inputs name it and fit the positions it has left.
    fn expect(&self, role: Role) -> Expect {
        let control = self.config.limits.max_control_payload;
        let inputs = |id: SessionId, s: &StageSession<M::Kv>, kinds: &[FrameKind]| {
            let left = (s.open.max_tokens as u64).saturating_sub(s.next_position);
            let rows = left.min(self.config.limits.max_tokens_per_frame as u64) as usize;
            let row = if s.open.span.start == 0 { 4 } else { s.open.hidden as usize * s.open.wire_dtype.size() };
            Expect::kinds(kinds).session(id).max_payload(rows.saturating_mul(row))
        };
        match role {
            Role::Pending => Expect::kinds(&[FrameKind::Open, FrameKind::Attach]).max_payload(control),
            Role::Control(id) => match self.sessions.get(&id) {
                Some(s) if s.open.span.start == 0 => {
                    inputs(id, s, &[FrameKind::Prefill, FrameKind::Decode, FrameKind::Close, FrameKind::Ping])
                }
                _ => Expect::kinds(&[FrameKind::Close, FrameKind::Ping]).session(id).max_payload(0),
            },
            Role::Upstream(id) => match self.sessions.get(&id) {
                Some(s) => inputs(id, s, &[FrameKind::Prefill, FrameKind::Decode, FrameKind::Close]),
                None => Expect::kinds(&[FrameKind::Close]).max_payload(0),
            },
            Role::Downstream(_) => Expect::kinds(&[FrameKind::Opened, FrameKind::Error]).max_payload(control),
        }
    }

    fn send(&mut self, stream: StreamId, frame: Frame) {
        if let Some(st) = self.streams.get_mut(&stream) {
            st.unsent += 1;
        }
        self.actions.push_back(Action::Send { stream, frame });
    }

    /// Finishes and forgets a stream.
    fn forget(&mut self, stream: StreamId) {
        if self.streams.remove(&stream).is_some() {
            self.actions.push_back(Action::Finish { stream });
        }
    }

    /// Answers a stream with an error frame and finishes it; no session is touched.
    fn refuse(&mut self, stream: StreamId, session: SessionId, f: Failure) {
        debug!(session, code = ?f.code, message = %f.message, "refusing stream");
        self.send(stream, Frame::Error { session, code: f.code, message: f.message });
        self.forget(stream);
    }

    fn unsent(&self, stream: StreamId) -> usize {
        self.streams.get(&stream).map_or(0, |s| s.unsent)
    }

    // ---- opening ----

    fn first_frame(&mut self, now: Instant, stream: StreamId, frame: Frame) {
        match frame {
            Frame::Open { session, open } => self.open(now, stream, session, open),
            Frame::Attach { session, dtype, width, key } => {
                // A wrong key is answered exactly like an unknown session, and leaves the session alone: knowing a
                // session id (it is logged) lets a peer neither join nor end a session.
                let Some(s) = self.sessions.get_mut(&session).filter(|s| {
                    matches!(s.phase, Phase::Running)
                        && s.upstream == Upstream::Expected
                        && s.open.attach_key.matches(&key)
                }) else {
                    let f = Failure::new(ErrorCode::UnknownSession, format!("no session {session}"));
                    return self.refuse(stream, session, f);
                };
                if (dtype, width) != (s.open.wire_dtype, s.open.hidden) {
                    let msg = format!(
                        "session expects {:?} x {}, attach says {dtype:?} x {width}",
                        s.open.wire_dtype, s.open.hidden
                    );
                    return self.refuse(stream, session, Failure::new(ErrorCode::BadRequest, msg));
                }
                s.upstream = Upstream::Attached(stream);
                s.last_active = now;
                if let Some(st) = self.streams.get_mut(&stream) {
                    st.role = Role::Upstream(session);
                }
                self.send(stream, Frame::Opened { session });
                self.refill_reads(session);
            }
            other => {
                let msg = format!("a stream starts with open or attach, not {}", other.kind().name());
                self.refuse(stream, other.session(), Failure::new(ErrorCode::Malformed, msg));
            }
        }
    }

    fn open(&mut self, now: Instant, stream: StreamId, session: SessionId, open: SessionOpen) {
        if let Err(msg) = self.model.check_open(&open) {
            return self.refuse(stream, session, Failure::new(ErrorCode::BadRequest, msg));
        }
        if self.draining {
            return self.refuse(stream, session, Failure::new(ErrorCode::Busy, "node shutting down: no new sessions"));
        }
        if self.sessions.contains_key(&session) || self.parked.iter().any(|p| p.session == session) {
            // Owners draw ids at random (64 bits), so an honest owner never meets its own id here: someone else
            // opened it first. That may be a stage of the owner's route, which learns the id from its own `Open`
            // before the owner opens the stages in front of it. `Busy` makes the owner route around this stage
            // with a fresh id, and blames no one: `BadRequest` would get this honest stage banned
            // (docs/SECURITY.md, *Stage*).
            let f = Failure::new(ErrorCode::Busy, "session id in use: opened by another peer");
            return self.refuse(stream, session, f);
        }
        if let Err(msg) = auth::check_next_hop(self.config.next_hops, &open) {
            return self.refuse(stream, session, Failure::new(ErrorCode::BadRequest, msg));
        }
        // A waiting open holds its peer's quota too: one peer cannot fill the wait queue either.
        let peer = self.streams.get(&stream).map_or(Peer::LOCAL, |st| st.peer);
        let lease = match self.quotas.try_take(peer, open.max_tokens as usize) {
            Ok(l) => l,
            Err(msg) => return self.refuse(stream, session, Failure::new(ErrorCode::Busy, msg)),
        };
        // Opens already waiting for KV cache go first.
        if !self.parked.is_empty() {
            return self.park(now, Parked { stream, session, open, lease, deadline: now }, None);
        }
        let Some(slot) = self.admission.try_admit() else {
            let msg = format!("{} sessions running", self.admission.max());
            return self.refuse(stream, session, Failure::new(ErrorCode::Busy, msg));
        };
        let kv = match self.model.reserve(open.max_tokens as usize) {
            Ok(kv) => kv,
            // Waiting only makes sense while running sessions hold blocks that they will give back.
            Err(f) if f.code == ErrorCode::Busy && !self.sessions.is_empty() => {
                return self.park(now, Parked { stream, session, open, lease, deadline: now }, Some(f));
            }
            Err(f) => return self.refuse(stream, session, f),
        };
        self.start(now, stream, session, open, slot, kv, lease);
    }

    /// Queues an open that finds the KV cache full, until running sessions free enough blocks (or `connect_timeout`
    /// passes); refused `Busy` at once when `max_waiting` opens already wait. A running session is never evicted to
    /// make room: its blocks were reserved whole when it was admitted.
    fn park(&mut self, now: Instant, mut p: Parked, why: Option<Failure>) {
        let (stream, session) = (p.stream, p.session);
        if self.parked.len() >= self.config.max_waiting {
            let msg = match why {
                Some(f) => format!("{}; {} opens already wait for KV cache", f.message, self.parked.len()),
                None => format!("{} opens already wait for KV cache", self.parked.len()),
            };
            return self.refuse(stream, session, Failure::new(ErrorCode::Busy, msg));
        }
        debug!(session, waiting = self.parked.len() + 1, "KV cache full: the open waits");
        p.deadline = now + self.config.connect_timeout;
        self.parked.push_back(p);
    }

    /// Admits waiting opens, oldest first, while slots and KV blocks allow; refuses those whose time is up.
    fn admit_parked(&mut self, now: Instant) {
        while let Some(p) = self.parked.front() {
            if !self.streams.contains_key(&p.stream) {
                self.parked.pop_front();
                continue;
            }
            if p.deadline <= now {
                let Some(p) = self.parked.pop_front() else { break };
                let msg = format!("KV cache full for {:?}", self.config.connect_timeout);
                self.refuse(p.stream, p.session, Failure::new(ErrorCode::Busy, msg));
                continue;
            }
            let Some(slot) = self.admission.try_admit() else { break };
            match self.model.reserve(p.open.max_tokens as usize) {
                Ok(kv) => {
                    let Some(p) = self.parked.pop_front() else { break };
                    self.start(now, p.stream, p.session, p.open, slot, kv, p.lease);
                }
                Err(f) if f.code == ErrorCode::Busy => break,
                Err(f) => {
                    let Some(p) = self.parked.pop_front() else { break };
                    self.refuse(p.stream, p.session, f);
                }
            }
        }
    }

    /// A session admitted with its slot and KV reservation: into the map, then `Opened` (or a dial of the next stage).
    #[allow(clippy::too_many_arguments)] // the parts of an admitted session, each owned and moved into it
    fn start(
        &mut self,
        now: Instant,
        stream: StreamId,
        session: SessionId,
        open: SessionOpen,
        slot: Slot,
        kv: M::Kv,
        lease: PeerLease,
    ) {
        if let Some(st) = self.streams.get_mut(&stream) {
            st.role = Role::Control(session);
        }
        let next = open.rest.first().map(|h| (h.addr, h.fingerprint));
        let deadline = now + self.config.connect_timeout;
        let mut entry = StageSession {
            open,
            control: stream,
            phase: Phase::Opening { deadline },
            upstream: Upstream::None,
            downstream: None,
            kv: Some(kv),
            in_flight: None,
            queue: VecDeque::new(),
            next_position: 0,
            input_closed: false,
            last_active: now,
            arrival: self.next_arrival,
            cohort: 0,
            awaits_decode: false,
            _slot: slot,
            _lease: lease,
        };
        self.next_arrival += 1;
        match next {
            None => {
                self.sessions.insert(session, entry);
                self.opened(now, session);
            }
            Some((addr, fingerprint)) => {
                let dial = StreamId::Dialed(self.next_dial);
                self.next_dial += 1;
                entry.downstream = Some(Downstream { stream: dial, addr, link: Link::Dialing });
                self.sessions.insert(session, entry);
                let state =
                    StreamState { role: Role::Downstream(session), peer: Peer::LOCAL, reading: false, unsent: 0 };
                self.streams.insert(dial, state);
                self.actions.push_back(Action::Dial { stream: dial, addr, fingerprint });
            }
        }
    }

    fn dialed(&mut self, stream: StreamId, result: Result<(), String>) {
        let Some(Role::Downstream(session)) = self.streams.get(&stream).map(|s| s.role) else {
            // The session ended while dialing: close what the driver just opened.
            if result.is_ok() {
                self.actions.push_back(Action::Finish { stream });
            }
            return;
        };
        let Some(s) = self.sessions.get_mut(&session) else { return };
        let Some(d) = s.downstream.as_mut().filter(|d| d.stream == stream && d.link == Link::Dialing) else { return };
        match result {
            Ok(()) => {
                d.link = Link::Attaching;
                let attach =
                    Frame::Attach { session, dtype: s.open.wire_dtype, width: s.open.hidden, key: s.open.next_key };
                self.send(stream, attach);
                self.read(stream);
            }
            Err(msg) => self.fail(session, Failure::new(ErrorCode::Downstream, msg)),
        }
    }

    /// The session is ready: tell the owner and start reading inputs.
    fn opened(&mut self, now: Instant, session: SessionId) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        s.phase = Phase::Running;
        s.last_active = now;
        if s.open.span.start > 0 {
            s.upstream = Upstream::Expected;
        }
        let control = s.control;
        debug!(session, layers = %s.open.span, "session open");
        self.send(control, Frame::Opened { session });
        self.refill_reads(session);
    }

    fn downstream_frame(&mut self, now: Instant, session: SessionId, frame: Frame) {
        let addr = self.addr(session);
        match (self.link(session), frame) {
            (Some(Link::Attaching), Frame::Opened { .. }) => {
                if let Some(d) = self.sessions.get_mut(&session).and_then(|s| s.downstream.as_mut()) {
                    d.link = Link::Ready;
                    let stream = d.stream;
                    // Keep one read out: the next stage speaks on this stream only to report a failure.
                    self.read(stream);
                }
                self.opened(now, session);
            }
            (Some(Link::Attaching), Frame::Error { code, message, .. }) => {
                let msg = format!("next stage {addr} refused ({code:?}): {message}");
                self.fail(session, Failure::new(ErrorCode::Downstream, msg));
            }
            (_, Frame::Error { code, message, .. }) => {
                let msg = format!("next stage failed ({code:?}): {message}");
                self.fail(session, Failure::new(ErrorCode::Downstream, msg));
            }
            (_, other) => {
                let msg = format!("next stage {addr} sent {}", other.kind().name());
                self.fail(session, Failure::new(ErrorCode::Downstream, msg));
            }
        }
    }

    fn link(&self, session: SessionId) -> Option<Link> {
        self.sessions.get(&session)?.downstream.as_ref().map(|d| d.link)
    }

    fn addr(&self, session: SessionId) -> String {
        match self.sessions.get(&session).and_then(|s| s.downstream.as_ref()) {
            Some(d) => d.addr.to_string(),
            None => "?".into(),
        }
    }

    // ---- inputs ----

    /// An input frame of `session`, from its owner or (`from_upstream`) from the previous stage.
    fn input_frame(&mut self, now: Instant, session: SessionId, frame: Frame, from_upstream: bool) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        if s.input_closed {
            return;
        }
        s.last_active = now;
        let mut item = match frame {
            f if f.session() != session => Queued::End(Err(Failure::new(
                ErrorCode::BadRequest,
                format!("frame for session {} on session {session}", f.session()),
            ))),
            Frame::Prefill { position, last, data, .. } => chunk(s, position, ChunkKind::Prefill { last }, data),
            Frame::Decode { position, data, .. } => chunk(s, position, ChunkKind::Decode, data),
            Frame::Close { .. } => Queued::End(Ok(())),
            // The owner is alive: the idle timeout counts again from now, nothing is queued.
            Frame::Ping { .. } => {
                self.refill_reads(session);
                return;
            }
            other => Queued::End(Err(Failure::new(
                ErrorCode::Malformed,
                format!("unexpected {} frame", other.kind().name()),
            ))),
        };
        if from_upstream && let Queued::End(outcome) = &mut item {
            *outcome = Err(upstream_failure(outcome));
        }
        if matches!(item, Queued::End(_)) {
            s.input_closed = true;
        }
        s.queue.push_back(item);
        self.refill_reads(session);
        self.advance(session);
    }

    /// An input stream ended: like a close, after the chunks before it.
    fn input_end(&mut self, _now: Instant, session: SessionId, outcome: Result<(), Failure>) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        if !s.input_closed {
            s.input_closed = true;
            s.queue.push_back(Queued::End(outcome));
        }
        self.advance(session);
    }

    /// Asks for the next frame on each input stream while the session has room for it.
    fn refill_reads(&mut self, session: SessionId) {
        let Some(s) = self.sessions.get(&session) else { return };
        if !matches!(s.phase, Phase::Running) || s.input_closed {
            return;
        }
        let inputs: Vec<StreamId> = s.input_streams().collect();
        let mut pending =
            s.queue.len() + inputs.iter().filter(|i| self.streams.get(*i).is_some_and(|st| st.reading)).count();
        for stream in inputs {
            if pending >= INPUT_QUEUE {
                break;
            }
            if self.streams.get(&stream).is_some_and(|st| !st.reading) {
                self.read(stream);
                pending += 1;
            }
        }
    }

    /// Ends the session if its next queued input is an end and nothing computes.
    fn advance(&mut self, session: SessionId) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        if s.in_flight.is_some() || !matches!(s.phase, Phase::Running) {
            return;
        }
        if matches!(s.queue.front(), Some(Queued::End(_)))
            && let Some(Queued::End(outcome)) = s.queue.pop_front()
        {
            match outcome {
                Ok(()) => self.end(session, None),
                Err(f) => self.fail(session, f),
            }
        }
    }

    // ---- compute ----

    /// The next batch, as [`schedule::plan_with`] picks it from every session with a chunk ready (and room for its
    /// output): all decode rows, then prefill chunks up to the token budget (beside decode rows, up to what keeps the
    /// step within `max_step_stretch` of a decode-only step by the learned step cost), the last one cut if it does not
    /// fit.
    fn build_batch(&mut self) {
        self.hold_until = None;
        let mut candidates: Vec<(u64, Candidate)> = self
            .sessions
            .iter()
            .filter(|(_, s)| self.is_candidate(s))
            .filter_map(|(id, s)| match s.queue.front() {
                Some(Queued::Chunk(c)) => Some((
                    s.cohort,
                    Candidate {
                        session: *id,
                        decode: matches!(c.kind, ChunkKind::Decode),
                        rows: c.data.n_tokens(),
                        start: c.position,
                        arrival: s.arrival,
                    },
                )),
                _ => None,
            })
            .collect();
        // Beyond the decode cap, the sessions of the oldest cohorts (batched here longest ago) go first, a cohort
        // whole where it fits; the rest wait for the next batch, where they are the oldest.
        let cap = self.decode_cap();
        if candidates.iter().filter(|(_, c)| c.decode).count() > cap {
            candidates.sort_by_key(|(cohort, c)| (!c.decode, *cohort, c.arrival, c.session));
            let mut taken = 0;
            candidates.retain(|(_, c)| {
                let keep = !c.decode || taken < cap;
                taken += usize::from(c.decode);
                keep
            });
        }
        let candidates: Vec<Candidate> = candidates.into_iter().map(|(_, c)| c).collect();
        let mut items = Vec::new();
        let mut shape = StepShape::default();
        let cohort = self.batches + 1;
        let cost = Some((&self.cost, self.config.max_step_stretch));
        for pick in schedule::plan_with(&candidates, self.config.batch_tokens, cost) {
            let Some(s) = self.sessions.get_mut(&pick.session) else { continue };
            let (Some(Queued::Chunk(mut c)), Some(kv)) = (s.queue.pop_front(), s.kv.take()) else { continue };
            if let ChunkKind::Prefill { last } = c.kind
                && pick.rows < c.data.n_tokens()
            {
                let (first, rest) = schedule::split_front(c.data, pick.rows);
                c.data = first;
                if let Some(rest) = rest {
                    let position = c.position + c.data.n_tokens() as u64;
                    s.queue.push_front(Queued::Chunk(Chunk {
                        position,
                        kind: ChunkKind::Prefill { last },
                        data: rest,
                    }));
                    c.kind = ChunkKind::Prefill { last: false };
                }
            }
            let n = c.data.n_tokens() as u64;
            let sample = match c.kind {
                ChunkKind::Prefill { last: false } => None,
                _ => Some(Sample { params: sampling_from_wire(&s.open.sampling), n_top: s.open.n_top as usize }),
            };
            s.in_flight = Some(InFlight { position: c.position, n, kind: c.kind });
            s.cohort = cohort;
            s.awaits_decode = matches!(c.kind, ChunkKind::Decode | ChunkKind::Prefill { last: true });
            shape.add(c.position, c.data.n_tokens());
            items.push(ComputeItem {
                session: pick.session,
                start: c.position,
                input: c.data,
                span: s.open.span,
                sample,
                wire_dtype: s.open.wire_dtype,
                kv,
            });
            self.refill_reads(pick.session);
        }
        if !items.is_empty() {
            let batch = ComputeBatch { items };
            let queued =
                self.sessions.values().map(|s| s.queue.iter().filter(|q| matches!(q, Queued::Chunk(_))).count()).sum();
            self.gauge.record(batch.items.len(), batch.rows(), queued);
            self.out_shape = Some(shape);
            self.batches = cohort;
            self.computing = true;
            self.actions.push_back(Action::Compute(batch));
        }
    }

    fn computed(&mut self, now: Instant, r: ComputeResult<M::Kv>) {
        let session = r.session;
        let Some(s) = self.sessions.get_mut(&session) else { return };
        let Some(chunk) = s.in_flight.take() else { return };
        if matches!(s.phase, Phase::Closing) {
            // Ended while computing: the result is discarded; dropping the KV handle and then the entry frees the
            // cache and the slot.
            drop(r);
            self.sessions.remove(&session);
            debug!(session, "session closed after its last compute: KV cache freed");
            return;
        }
        s.kv = Some(r.kv);
        s.last_active = now;
        let output = match r.output {
            Ok(o) => o,
            Err(f) => return self.fail(session, f),
        };
        match output {
            ComputeOutput::Hidden(hidden) => {
                let Some(d) = s.downstream.as_ref().filter(|d| d.link == Link::Ready) else {
                    return self.fail(session, Failure::new(ErrorCode::Compute, "no next stage"));
                };
                let stream = d.stream;
                let data = StageData::Hidden(hidden);
                let frame = match chunk.kind {
                    ChunkKind::Prefill { last } => Frame::Prefill { session, position: chunk.position, last, data },
                    ChunkKind::Decode => Frame::Decode { session, position: chunk.position, data },
                };
                self.send(stream, frame);
            }
            ComputeOutput::Token(result) => {
                let control = s.control;
                self.send(control, Frame::Token { session, position: chunk.position + chunk.n, result });
            }
            ComputeOutput::Nothing => {}
        }
        self.refill_reads(session);
        self.advance(session);
    }

    // ---- endings ----

    fn deadline(&self, s: &StageSession<M::Kv>) -> Option<Instant> {
        match s.phase {
            Phase::Opening { deadline } => Some(deadline),
            Phase::Running if s.in_flight.is_none() => Some(s.last_active + self.config.idle_timeout),
            _ => None,
        }
    }

    fn tick(&mut self, now: Instant) {
        let due: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| self.deadline(s).is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(s) = self.sessions.get(&id) else { continue };
            let f = match s.phase {
                Phase::Opening { .. } => {
                    Failure::new(ErrorCode::Downstream, format!("next stage {} did not accept in time", self.addr(id)))
                }
                _ if s.queue.is_empty() => {
                    Failure::new(ErrorCode::Timeout, format!("no input for {:?}", self.config.idle_timeout))
                }
                _ => Failure::new(
                    ErrorCode::Downstream,
                    format!("output not taken for {:?}: the next stage stopped reading", self.config.idle_timeout),
                ),
            };
            self.fail(id, f);
        }
    }

    /// Ends the session with an error frame to its owner.
    fn fail(&mut self, session: SessionId, f: Failure) {
        warn!(session, code = ?f.code, message = %f.message, "session failed");
        self.end(session, Some(f));
    }

    /// Ends the session now: error frame (if any), finish its streams, tell the next stage, free its KV cache and
    /// slot — or, while a chunk computes, keep the entry as `Closing` until the KV handle comes back.
    fn end(&mut self, session: SessionId, failure: Option<Failure>) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        if matches!(s.phase, Phase::Closing) {
            return;
        }
        s.queue.clear();
        s.input_closed = true;
        let control = s.control;
        let upstream = match s.upstream {
            Upstream::Attached(u) => Some(u),
            _ => None,
        };
        let downstream = s.downstream.as_ref().map(|d| (d.stream, d.link));
        let computing = s.in_flight.is_some();
        if computing {
            s.phase = Phase::Closing;
        }
        if let Some(f) = failure {
            self.send(control, Frame::Error { session, code: f.code, message: f.message });
        }
        self.forget(control);
        if let Some(u) = upstream {
            self.forget(u);
        }
        if let Some((d, link)) = downstream {
            if link == Link::Ready {
                self.send(d, Frame::Close { session });
            }
            self.forget(d);
        }
        if !computing {
            self.sessions.remove(&session);
            debug!(session, "session closed: KV cache freed");
        }
    }
}

/// What ends a session when its previous stage ends it (a `Close` or a refused frame on the data stream): the
/// owner must hear which hop did it, or it would blame this stage (docs/PROTOCOL.md, "Error body").
fn upstream_failure(outcome: &Result<(), Failure>) -> Failure {
    let msg = match outcome {
        Ok(()) => String::from("the previous stage closed the session"),
        Err(f) => format!("the previous stage sent a refused frame ({:?}): {}", f.code, f.message),
    };
    Failure::new(ErrorCode::Upstream, msg)
}

/// Checks a chunk against the session's history and shape; a chunk that does not fit becomes the session's end.
fn chunk<K>(s: &mut StageSession<K>, position: u64, kind: ChunkKind, data: StageData) -> Queued {
    if position != s.next_position {
        let msg = format!("position {position}, expected {}", s.next_position);
        return Queued::End(Err(Failure::new(ErrorCode::BadRequest, msg)));
    }
    let span = s.open.span;
    let fits = match &data {
        StageData::Tokens(_) => span.start == 0,
        StageData::Hidden(h) => span.start > 0 && h.dtype() == s.open.wire_dtype && h.width() == s.open.hidden as usize,
    };
    if !fits || data.n_tokens() == 0 {
        let msg = format!("input of the wrong kind or shape for span {span}");
        return Queued::End(Err(Failure::new(ErrorCode::BadRequest, msg)));
    }
    if let StageData::Hidden(h) = &data
        && let Some(i) = finite::first_non_finite(h)
    {
        let (row, col) = (i / h.width().max(1), i % h.width().max(1));
        let msg = format!(
            "the previous stage sent a non-finite hidden state (position {}, element {col})",
            position + row as u64
        );
        return Queued::End(Err(Failure::new(ErrorCode::Upstream, msg)));
    }
    s.next_position += data.n_tokens() as u64;
    Queued::Chunk(Chunk { position, kind, data })
}
