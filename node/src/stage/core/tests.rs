//! The core driven by scripted events: no sockets, no sleeps, time passed in by hand. A fake model counts the KV
//! positions it has lent out, so each test can see exactly when a session's cache is freed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::*;
use crate::model::LayerRange;
use shardline_proto::wire::{HiddenStates, Hop, SessionKey, TokenResult, WireDType, WireSampling};

const KV_TOKENS: usize = 1000;
const WIDTH: u32 = 4;

/// A model of 4 layers whose KV pool is a counter of free positions.
struct Fake {
    free: Arc<AtomicUsize>,
    /// Most positions one session may open with.
    max_open: u32,
}

#[derive(Debug)]
struct FakeKv {
    tokens: usize,
    free: Arc<AtomicUsize>,
}

impl Drop for FakeKv {
    fn drop(&mut self) {
        self.free.fetch_add(self.tokens, Ordering::SeqCst);
    }
}

impl StageModel for Fake {
    type Kv = FakeKv;

    fn check_open(&self, open: &SessionOpen) -> Result<(), String> {
        if open.model_id != "m" {
            return Err(format!("not model {}", open.model_id));
        }
        if open.max_tokens == 0 || open.max_tokens > self.max_open {
            return Err("max_tokens".into());
        }
        Ok(())
    }

    fn reserve(&self, tokens: usize) -> Result<FakeKv, Failure> {
        self.free
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(tokens))
            .map_err(|_| Failure::new(ErrorCode::Busy, "kv full"))?;
        Ok(FakeKv { tokens, free: self.free.clone() })
    }
}

struct Harness {
    core: StageCore<Fake>,
    free: Arc<AtomicUsize>,
    now: Instant,
    next: u64,
}

fn config() -> StageConfig {
    StageConfig {
        max_sessions: 2,
        idle_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        // These tests name made-up next hops; `tests/security.rs` checks the signed-announcement policy.
        next_hops: auth::HopPolicy::InProcess,
        ..StageConfig::default()
    }
}

impl Harness {
    fn new(config: StageConfig) -> Self {
        Self::with_pool(config, KV_TOKENS, 100)
    }

    /// A harness whose pool holds `kv_tokens` positions and whose model takes opens of up to `max_open`.
    fn with_pool(config: StageConfig, kv_tokens: usize, max_open: u32) -> Self {
        let free = Arc::new(AtomicUsize::new(kv_tokens));
        let fake = Fake { free: free.clone(), max_open };
        Self { core: StageCore::new(fake, config), free, now: Instant::now(), next: 0 }
    }

    fn event(&mut self, e: Event<FakeKv>) -> Vec<Action<FakeKv>> {
        self.core.handle(self.now, e);
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    fn accept(&mut self) -> StreamId {
        let s = StreamId::Accepted(self.next);
        self.next += 1;
        let a = self.event(Event::Accepted { stream: s, peer: Peer::LOCAL });
        assert!(matches!(a[..], [Action::Read { stream, .. }] if stream == s), "{a:?}");
        s
    }

    fn frame(&mut self, stream: StreamId, frame: Frame) -> Vec<Action<FakeKv>> {
        self.event(Event::Frame { stream, frame })
    }

    /// Opens a last-stage session over layers 0..4 on a new stream and checks the `Opened` answer.
    fn open(&mut self, session: SessionId) -> StreamId {
        let s = self.accept();
        let a = self.frame(s, open(session, LayerRange::new(0, 4), vec![]));
        assert_opened(&a, s, session);
        s
    }

    fn kv_in_use(&self) -> usize {
        KV_TOKENS - self.free.load(Ordering::SeqCst)
    }

    fn advance(&mut self, d: Duration) -> Vec<Action<FakeKv>> {
        self.now += d;
        self.event(Event::Tick)
    }
}

fn open(session: SessionId, span: LayerRange, rest: Vec<Hop>) -> Frame {
    Frame::Open {
        session,
        open: SessionOpen {
            model_id: "m".into(),
            n_layers: 4,
            span,
            max_tokens: 50,
            sampling: WireSampling::GREEDY,
            n_top: 2,
            wire_dtype: WireDType::F32,
            hidden: WIDTH,
            rest,
            attach_key: SessionKey::default(),
            next_key: SessionKey::default(),
            next_record: Vec::new(),
        },
    }
}

fn hop() -> Hop {
    Hop { layers: LayerRange::new(2, 4), addr: "127.0.0.1:9".parse().unwrap(), fingerprint: [7; 32] }
}

fn prefill(session: SessionId, position: u64, tokens: &[u32]) -> Frame {
    Frame::Prefill { session, position, last: true, data: StageData::Tokens(tokens.to_vec()) }
}

fn token(t: u32) -> ComputeOutput {
    ComputeOutput::Token(TokenResult { token: t, logprob: -0.5, top: vec![] })
}

fn assert_opened(a: &[Action<FakeKv>], s: StreamId, session: SessionId) {
    match a {
        [Action::Send { stream, frame: Frame::Opened { session: got } }, Action::Read { stream: r, .. }]
            if *stream == s && *got == session && *r == s => {}
        other => panic!("expected Opened then a read on {s:?}, got {other:?}"),
    }
}

/// The error frame sent on `s`, asserting the stream is finished right after.
fn error_on(a: &[Action<FakeKv>], s: StreamId) -> (ErrorCode, String) {
    let i = a
        .iter()
        .position(|x| matches!(x, Action::Send { stream, frame: Frame::Error { .. } } if *stream == s))
        .unwrap_or_else(|| panic!("no error frame on {s:?} in {a:?}"));
    assert!(matches!(a.get(i + 1), Some(Action::Finish { stream }) if *stream == s), "{a:?}");
    match &a[i] {
        Action::Send { frame: Frame::Error { code, message, .. }, .. } => (*code, message.clone()),
        _ => unreachable!(),
    }
}

fn take_batch(a: Vec<Action<FakeKv>>) -> ComputeBatch<FakeKv> {
    let mut batches: Vec<_> = a
        .into_iter()
        .filter_map(|x| match x {
            Action::Compute(b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(batches.len(), 1, "expected one batch");
    batches.remove(0)
}

fn done(batch: ComputeBatch<FakeKv>, out: impl Fn(&ComputeItem<FakeKv>) -> ComputeOutput) -> Event<FakeKv> {
    Event::Computed(
        batch
            .items
            .into_iter()
            .map(|i| {
                let o = out(&i);
                i.finish(Ok(o))
            })
            .collect(),
    )
}

#[test]
fn chunks_run_in_order_and_tokens_go_back_to_the_owner() {
    let mut h = Harness::new(config());
    let s = h.open(1);
    assert_eq!(h.kv_in_use(), 50);
    let batch = take_batch(h.frame(s, prefill(1, 0, &[5, 6, 7])));
    let item = &batch.items[0];
    assert_eq!((item.session, item.start, item.n_positions()), (1, 0, 3));
    assert!(item.sample.is_some_and(|x| x.n_top == 2));
    let a = h.event(done(batch, |_| token(42)));
    match &a[..] {
        [Action::Send { stream, frame: Frame::Token { session: 1, position: 3, result } }] if *stream == s => {
            assert_eq!(result.token, 42)
        }
        other => panic!("{other:?}"),
    }
    // A prefill chunk that is not the last is not sampled.
    let not_last = Frame::Prefill { session: 1, position: 3, last: false, data: StageData::Tokens(vec![1]) };
    let batch = take_batch(h.frame(s, not_last));
    assert!(batch.items[0].sample.is_none());
    assert!(h.event(done(batch, |_| ComputeOutput::Nothing)).is_empty());
    // Close: finished and freed.
    let a = h.frame(s, Frame::Close { session: 1 });
    assert!(matches!(a[..], [Action::Finish { stream }] if stream == s), "{a:?}");
    assert_eq!((h.core.active_sessions(), h.core.admission().active(), h.kv_in_use()), (0, 0, 0));
}

#[test]
fn a_chunk_out_of_order_ends_its_session_after_the_chunks_before_it() {
    let mut h = Harness::new(config());
    let s = h.open(1);
    let batch = take_batch(h.frame(s, prefill(1, 0, &[1, 2])));
    // Position 5 arrives while 0..2 computes: it must wait its turn, then end the session.
    assert!(!h.frame(s, prefill(1, 5, &[3])).iter().any(|a| matches!(a, Action::Send { .. })));
    assert_eq!(h.kv_in_use(), 50);
    let a = h.event(done(batch, |_| token(9)));
    assert!(matches!(&a[0], Action::Send { frame: Frame::Token { position: 2, .. }, .. }), "{a:?}");
    let (code, msg) = error_on(&a, s);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("position 5, expected 2"), "{msg}");
    assert_eq!((h.core.active_sessions(), h.kv_in_use()), (0, 0));
}

#[test]
fn duplicate_session_ids_are_refused_and_the_first_goes_on() {
    let mut h = Harness::new(config());
    let s1 = h.open(1);
    let s2 = h.accept();
    let a = h.frame(s2, open(1, LayerRange::new(0, 4), vec![]));
    // `Busy`, not `BadRequest`: the owner of the second open is not at fault for an id someone else took first.
    assert_eq!(error_on(&a, s2).0, ErrorCode::Busy);
    assert_eq!((h.core.active_sessions(), h.core.admission().active(), h.kv_in_use()), (1, 1, 50));
    let batch = take_batch(h.frame(s1, prefill(1, 0, &[1])));
    assert_eq!(batch.items.len(), 1);
}

#[test]
fn busy_at_capacity_and_the_slot_is_freed_after_close() {
    let mut h = Harness::new(config());
    let s1 = h.open(1);
    h.open(2);
    let s3 = h.accept();
    let a = h.frame(s3, open(3, LayerRange::new(0, 4), vec![]));
    assert_eq!(error_on(&a, s3).0, ErrorCode::Busy);
    h.frame(s1, Frame::Close { session: 1 });
    assert_eq!(h.core.admission().active(), 1);
    h.open(3);
    // A full KV cache is Busy too, and the refused open holds no slot.
    let mut small = Harness::new(config());
    small.free.store(10, Ordering::SeqCst);
    let s = small.accept();
    assert_eq!(error_on(&small.frame(s, open(1, LayerRange::new(0, 4), vec![])), s).0, ErrorCode::Busy);
    assert_eq!(small.core.admission().active(), 0);
}

#[test]
fn bad_opens_and_stray_first_frames_are_refused() {
    let mut h = Harness::new(config());
    let s = h.accept();
    let Frame::Open { open: mut o, .. } = open(1, LayerRange::new(0, 4), vec![]) else { unreachable!() };
    o.model_id = "other".into();
    assert_eq!(error_on(&h.frame(s, Frame::Open { session: 1, open: o }), s).0, ErrorCode::BadRequest);
    let s = h.accept();
    assert_eq!(error_on(&h.frame(s, prefill(1, 0, &[1])), s).0, ErrorCode::Malformed);
    let s = h.accept();
    let a = h.event(Event::Malformed { stream: s, error: "bad magic".into() });
    assert_eq!(error_on(&a, s), (ErrorCode::Malformed, String::from("bad magic")));
    assert_eq!(h.core.admission().active(), 0);
}

#[test]
fn a_reset_during_compute_frees_the_kv_cache_when_compute_returns_and_drops_the_result() {
    let mut h = Harness::new(config());
    let s = h.open(1);
    let batch = take_batch(h.frame(s, prefill(1, 0, &[1, 2, 3])));
    let a = h.event(Event::Lost { stream: s, reason: "reset by peer".into() });
    assert!(matches!(a[..], [Action::Finish { stream }] if stream == s), "{a:?}");
    // The KV handle is out with the batch: the session still holds its slot and its cache.
    assert_eq!((h.core.active_sessions(), h.kv_in_use()), (1, 50));
    // A new open with the same id is refused while it closes.
    let s2 = h.accept();
    assert_eq!(error_on(&h.frame(s2, open(1, LayerRange::new(0, 4), vec![])), s2).0, ErrorCode::Busy);
    let a = h.event(done(batch, |_| token(1)));
    assert!(a.is_empty(), "the result of a closed session is discarded: {a:?}");
    assert_eq!((h.core.active_sessions(), h.core.admission().active(), h.kv_in_use()), (0, 0, 0));
}

#[test]
fn a_close_frame_during_compute_waits_for_the_result() {
    let mut h = Harness::new(config());
    let s = h.open(1);
    let batch = take_batch(h.frame(s, prefill(1, 0, &[1])));
    assert!(h.frame(s, Frame::Close { session: 1 }).is_empty());
    let a = h.event(done(batch, |_| token(3)));
    assert!(matches!(&a[..], [Action::Send { frame: Frame::Token { .. }, .. }, Action::Finish { .. }]), "{a:?}");
    assert_eq!(h.kv_in_use(), 0);
}

#[test]
fn a_downstream_that_never_dials_or_attaches_times_out_as_downstream() {
    for attach in [false, true] {
        let mut h = Harness::new(config());
        let s = h.accept();
        let a = h.frame(s, open(1, LayerRange::new(0, 2), vec![hop()]));
        let d = match a[..] {
            [Action::Dial { stream, addr, fingerprint }] => {
                assert_eq!((addr, fingerprint), (hop().addr, hop().fingerprint));
                stream
            }
            ref other => panic!("{other:?}"),
        };
        if attach {
            let a = h.event(Event::Dialed { stream: d, result: Ok(()) });
            match &a[..] {
                [
                    Action::Send {
                        stream,
                        frame: Frame::Attach { session: 1, dtype: WireDType::F32, width: WIDTH, .. },
                    },
                    Action::Read { stream: r, .. },
                ] if *stream == d && *r == d => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(h.core.next_deadline(), Some(h.now + Duration::from_secs(5)));
        assert!(h.advance(Duration::from_millis(4999)).is_empty());
        let a = h.advance(Duration::from_millis(1));
        let (code, msg) = error_on(&a, s);
        assert_eq!(code, ErrorCode::Downstream);
        assert!(msg.contains("did not accept in time"), "{msg}");
        assert!(a.iter().any(|x| matches!(x, Action::Finish { stream } if *stream == d)));
        assert_eq!((h.core.admission().active(), h.kv_in_use()), (0, 0));
        // A dial that succeeds after the session gave up is closed at once.
        if !attach {
            let a = h.event(Event::Dialed { stream: d, result: Ok(()) });
            assert!(matches!(a[..], [Action::Finish { stream }] if stream == d), "{a:?}");
        }
    }
}

#[test]
fn a_middle_stage_sends_hidden_states_on_and_reports_a_failing_next_stage() {
    let mut h = Harness::new(config());
    let c = h.accept();
    let a = h.frame(c, open(1, LayerRange::new(0, 2), vec![hop()]));
    let Action::Dial { stream: d, .. } = a[0] else { panic!("{a:?}") };
    h.event(Event::Dialed { stream: d, result: Ok(()) });
    // Nothing is told to the owner before the next stage accepts.
    let a = h.frame(d, Frame::Opened { session: 1 });
    match &a[..] {
        [
            Action::Read { stream: r, .. },
            Action::Send { stream, frame: Frame::Opened { session: 1 } },
            Action::Read { .. },
        ] if *r == d && *stream == c => {}
        other => panic!("{other:?}"),
    }
    let batch = take_batch(h.frame(c, prefill(1, 0, &[1, 2])));
    assert!(batch.items[0].sample.is_some(), "the runner samples only when the span ends at the head");
    let hidden = |i: &ComputeItem<FakeKv>| {
        let n = i.n_positions();
        ComputeOutput::Hidden(HiddenStates::from_f32(n, WIDTH as usize, &vec![0.5; n * WIDTH as usize]).unwrap())
    };
    let a = h.event(done(batch, hidden));
    match &a[..] {
        [Action::Send { stream, frame: Frame::Prefill { session: 1, position: 0, last: true, data } }]
            if *stream == d =>
        {
            assert_eq!(data.n_tokens(), 2)
        }
        other => panic!("{other:?}"),
    }
    // The next stage reports an error: the owner hears Downstream, the session ends.
    let a = h.frame(d, Frame::Error { session: 1, code: ErrorCode::Compute, message: "boom".into() });
    let (code, msg) = error_on(&a, c);
    assert_eq!(code, ErrorCode::Downstream);
    assert!(msg.contains("boom"), "{msg}");
    assert!(a.iter().any(|x| matches!(x, Action::Finish { stream } if *stream == d)));
    assert_eq!(h.kv_in_use(), 0);
}

#[test]
fn a_downstream_that_refuses_the_attach_is_reported_to_the_owner() {
    let mut h = Harness::new(config());
    let c = h.accept();
    let a = h.frame(c, open(1, LayerRange::new(0, 2), vec![hop()]));
    let Action::Dial { stream: d, .. } = a[0] else { panic!("{a:?}") };
    let a = h.event(Event::Dialed { stream: d, result: Err("connection refused".into()) });
    assert_eq!(error_on(&a, c), (ErrorCode::Downstream, String::from("connection refused")));
    assert_eq!(h.kv_in_use(), 0);
}

#[test]
fn attach_checks_the_session_and_the_shape() {
    let mut h = Harness::new(config());
    let c = h.accept();
    assert_opened(&h.frame(c, open(1, LayerRange::new(2, 4), vec![])), c, 1);
    let u = h.accept();
    assert_eq!(
        error_on(
            &h.frame(u, Frame::Attach { session: 9, dtype: WireDType::F32, width: WIDTH, key: SessionKey::default() }),
            u
        )
        .0,
        ErrorCode::UnknownSession
    );
    let u = h.accept();
    let (code, msg) = error_on(
        &h.frame(u, Frame::Attach { session: 1, dtype: WireDType::F16, width: WIDTH, key: SessionKey::default() }),
        u,
    );
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("F16"), "{msg}");
    let u = h.accept();
    let u2 = h.accept();
    let a = h.frame(u, Frame::Attach { session: 1, dtype: WireDType::F32, width: WIDTH, key: SessionKey::default() });
    assert_opened(&a, u, 1);
    // Only one previous stage per session.
    let a = h.frame(u2, Frame::Attach { session: 1, dtype: WireDType::F32, width: WIDTH, key: SessionKey::default() });
    assert_eq!(error_on(&a, u2).0, ErrorCode::UnknownSession);
    // Hidden states of the wrong width end the session, and the owner hears that the previous stage sent them.
    let bad = HiddenStates::from_f32(1, 3, &[0.0; 3]).unwrap();
    let a = h.frame(u, Frame::Decode { session: 1, position: 0, data: StageData::Hidden(bad) });
    let (code, msg) = error_on(&a, c);
    assert_eq!(code, ErrorCode::Upstream);
    assert!(msg.contains("BadRequest"), "{msg}");
    assert_eq!(h.kv_in_use(), 0);
}

/// Opens a session over layers 2..4 and attaches a previous stage to it; returns (control, upstream).
fn attached(h: &mut Harness, session: SessionId) -> (StreamId, StreamId) {
    let c = h.accept();
    assert_opened(&h.frame(c, open(session, LayerRange::new(2, 4), vec![])), c, session);
    let u = h.accept();
    assert_opened(
        &h.frame(u, Frame::Attach { session, dtype: WireDType::F32, width: WIDTH, key: SessionKey::default() }),
        u,
        session,
    );
    (c, u)
}

#[test]
fn a_previous_stage_that_ends_the_session_is_named_to_the_owner() {
    let mut h = Harness::new(config());
    // A clean Close on the data stream: the owner must not read a silent end of this stage's control stream (it
    // would blame this stage), but an error naming the previous hop.
    let (c, u) = attached(&mut h, 1);
    let (code, msg) = error_on(&h.frame(u, Frame::Close { session: 1 }), c);
    assert_eq!(code, ErrorCode::Upstream);
    assert!(msg.contains("closed"), "{msg}");
    // The data stream finished without a Close, reset, or malformed: the same.
    let (c, u) = attached(&mut h, 2);
    assert_eq!(error_on(&h.event(Event::Finished { stream: u }), c).0, ErrorCode::Upstream);
    let (c, u) = attached(&mut h, 3);
    assert_eq!(error_on(&h.event(Event::Lost { stream: u, reason: "reset".into() }), c).0, ErrorCode::Upstream);
    let (c, u) = attached(&mut h, 4);
    let a = h.event(Event::Malformed { stream: u, error: "bad magic".into() });
    assert_eq!(error_on(&a, c).0, ErrorCode::Upstream);
    assert_eq!((h.core.active_sessions(), h.kv_in_use()), (0, 0));
    // The owner's own Close ends the session without an error frame.
    let (c, _u) = attached(&mut h, 5);
    let a = h.frame(c, Frame::Close { session: 5 });
    assert!(!a.iter().any(|x| matches!(x, Action::Send { frame: Frame::Error { .. }, .. })), "{a:?}");
    assert_eq!((h.core.active_sessions(), h.kv_in_use()), (0, 0));
}

#[test]
fn a_malformed_frame_ends_only_its_own_session() {
    let mut h = Harness::new(config());
    let s1 = h.open(1);
    let s2 = h.open(2);
    let a = h.event(Event::Malformed { stream: s2, error: "payload over the limit".into() });
    assert_eq!(error_on(&a, s2).0, ErrorCode::Malformed);
    assert_eq!((h.core.active_sessions(), h.kv_in_use()), (1, 50));
    let batch = take_batch(h.frame(s1, prefill(1, 0, &[1])));
    assert_eq!(batch.items[0].session, 1);
    // A frame of another session on this stream, or of an unexpected kind, ends it too.
    h.event(done(batch, |_| token(1)));
    let a = h.frame(s1, Frame::Opened { session: 1 });
    assert_eq!(error_on(&a, s1).0, ErrorCode::Malformed);
}

#[test]
fn an_idle_session_times_out_and_activity_postpones_it() {
    let mut h = Harness::new(config());
    let s = h.open(1);
    assert!(h.advance(Duration::from_secs(20)).is_empty());
    let batch = take_batch(h.frame(s, prefill(1, 0, &[1])));
    // No timeout while computing.
    assert_eq!(h.core.next_deadline(), None);
    h.now += Duration::from_secs(100);
    h.event(done(batch, |_| token(1)));
    assert!(h.advance(Duration::from_secs(29)).is_empty());
    let a = h.advance(Duration::from_secs(1));
    assert_eq!(error_on(&a, s).0, ErrorCode::Timeout);
    assert_eq!((h.core.active_sessions(), h.kv_in_use()), (0, 0));
    assert_eq!(h.core.next_deadline(), None);
}

#[test]
fn reads_stop_when_the_input_queue_is_full_and_resume_as_it_drains() {
    let mut h = Harness::new(config());
    let s = h.open(1);
    let first = take_batch(h.frame(s, prefill(1, 0, &[1])));
    let mut reads = 0;
    for position in 1..=INPUT_QUEUE as u64 {
        let a = h.frame(s, prefill(1, position, &[1]));
        reads = a.iter().filter(|x| matches!(x, Action::Read { .. })).count();
    }
    assert_eq!(reads, 0, "the queue is full: no more reads");
    let a = h.event(done(first, |_| token(1)));
    assert!(a.iter().any(|x| matches!(x, Action::Read { .. })), "a chunk left the queue: read again: {a:?}");
    assert_eq!(take_batch(a).items[0].start, 1);
}

#[test]
fn output_not_written_holds_compute_back() {
    let mut h = Harness::new(config());
    let s = h.open(1);
    // The `Opened` frame counts until the driver reports it written.
    h.event(Event::Sent { stream: s });
    let mut position = 0;
    for i in 0..OUTPUT_WINDOW {
        let batch = take_batch(h.frame(s, prefill(1, position, &[1])));
        position += 1;
        let a = h.event(done(batch, |_| token(i as u32)));
        assert!(a.iter().any(|x| matches!(x, Action::Send { frame: Frame::Token { .. }, .. })));
    }
    let a = h.frame(s, prefill(1, position, &[1]));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{OUTPUT_WINDOW} tokens unwritten: {a:?}");
    let a = h.event(Event::Sent { stream: s });
    assert_eq!(take_batch(a).items[0].start, position);
}

#[test]
fn every_ready_session_goes_into_one_batch() {
    let mut h = Harness::new(config());
    let s1 = h.open(1);
    let s2 = h.open(2);
    // Feed both before polling, as a driver does with everything that is pending.
    h.core.handle(h.now, Event::Frame { stream: s2, frame: prefill(2, 0, &[1, 2, 3]) });
    h.core.handle(h.now, Event::Frame { stream: s1, frame: prefill(1, 0, &[4]) });
    let batch = take_batch(std::iter::from_fn(|| h.core.poll_action()).collect());
    let shape: Vec<_> = batch.items.iter().map(|i| (i.session, i.start, i.n_positions())).collect();
    assert_eq!(shape, vec![(1, 0, 1), (2, 0, 3)]);
    assert_eq!(batch.rows(), 4);
    // While it runs, new chunks wait for the next batch.
    assert!(!h.frame(s1, prefill(1, 1, &[5])).iter().any(|a| matches!(a, Action::Compute(_))));
    let next = take_batch(h.event(done(batch, |_| token(0))));
    assert_eq!(next.items.len(), 1);
}

#[test]
fn a_draining_stage_refuses_opens_keeps_running_sessions_and_cuts_them_off_at_the_deadline() {
    let mut h = Harness::new(config());
    let control = h.open(1);
    let used = h.kv_in_use();
    assert!(used > 0);
    assert!(h.event(Event::Drain).is_empty(), "draining alone touches no session");
    // A new session is refused as busy; the running one keeps its cache.
    let s = h.accept();
    let a = h.frame(s, open(2, LayerRange::new(0, 4), vec![]));
    assert!(
        a.iter().any(
            |x| matches!(x, Action::Send { stream, frame: Frame::Error { code: ErrorCode::Busy, .. } } if *stream == s)
        ),
        "{a:?}"
    );
    assert_eq!(h.kv_in_use(), used);
    assert_eq!(h.core.active_sessions(), 1);
    // The deadline: the running session ends with a busy error frame to its owner and its cache is freed.
    let a = h.event(Event::DrainExpired);
    assert!(
        a.iter().any(|x| matches!(x, Action::Send { stream, frame: Frame::Error { session: 1, code: ErrorCode::Busy, .. } } if *stream == control)),
        "{a:?}"
    );
    assert_eq!(h.kv_in_use(), 0);
    assert_eq!(h.core.active_sessions(), 0);
}

// ---- continuous batching: scripted arrivals against the token budget ----

fn decode(session: SessionId, position: u64, t: u32) -> Frame {
    Frame::Decode { session, position, data: StageData::Tokens(vec![t]) }
}

/// `(session, start, rows, samples)` of each item, in batch order.
fn shape(batch: &ComputeBatch<FakeKv>) -> Vec<(SessionId, u64, usize, bool)> {
    batch.items.iter().map(|i| (i.session, i.start, i.n_positions(), i.sample.is_some())).collect()
}

/// Runs one prefill of `tokens` for `session` alone, answers its token and its write, so it can decode next.
fn prefilled(h: &mut Harness, s: StreamId, session: SessionId, tokens: &[u32]) {
    let batch = take_batch(h.frame(s, prefill(session, 0, tokens)));
    h.event(done(batch, |_| token(1)));
    h.event(Event::Sent { stream: s });
}

#[test]
fn decode_rows_go_first_and_a_long_prompt_is_cut_to_the_token_budget() {
    let mut h = Harness::new(StageConfig { max_sessions: 4, batch_tokens: 8, ..config() });
    let (s1, s2, s3) = (h.open(1), h.open(2), h.open(3));
    prefilled(&mut h, s2, 2, &[1, 2]);
    prefilled(&mut h, s3, 3, &[1, 2]);
    // Arrivals before the driver polls: a 20-token prompt, then two decode steps.
    h.core.handle(h.now, Event::Frame { stream: s1, frame: prefill(1, 0, &[7; 20]) });
    h.core.handle(h.now, Event::Frame { stream: s2, frame: decode(2, 2, 5) });
    h.core.handle(h.now, Event::Frame { stream: s3, frame: decode(3, 2, 6) });
    let batch = take_batch(std::iter::from_fn(|| h.core.poll_action()).collect());
    // Both decode rows, then what is left of the budget (8 − 2) from the prompt, which samples nothing yet.
    assert_eq!(shape(&batch), vec![(2, 2, 1, true), (3, 2, 1, true), (1, 0, 6, false)]);
    let stats = h.core.batch_gauge().read();
    assert_eq!((stats.batch_sessions, stats.batch_rows, stats.queued_chunks), (3, 8, 1));
    // The decoders get their tokens; the prompt goes on alone, a full budget this time.
    let a = h.event(done(batch, |i| if i.sample.is_some() { token(9) } else { ComputeOutput::Nothing }));
    let tokens: Vec<_> = a
        .iter()
        .filter_map(|x| match x {
            Action::Send { stream, frame: Frame::Token { session, position, .. } } => {
                Some((*stream, *session, *position))
            }
            _ => None,
        })
        .collect();
    assert_eq!(tokens, vec![(s2, 2, 3), (s3, 3, 3)]);
    let batch = take_batch(a);
    assert_eq!(shape(&batch), vec![(1, 6, 8, false)]);
    // A decode arriving while that runs joins the next batch ahead of the rest of the prompt.
    h.event(Event::Sent { stream: s2 });
    h.event(Event::Sent { stream: s3 });
    assert!(!h.frame(s2, decode(2, 3, 5)).iter().any(|x| matches!(x, Action::Compute(_))));
    let batch = take_batch(h.event(done(batch, |_| ComputeOutput::Nothing)));
    // The last 6 rows of the prompt fit: that piece is the prompt's last and samples.
    assert_eq!(shape(&batch), vec![(2, 3, 1, true), (1, 14, 6, true)]);
    let a = h.event(done(batch, |_| token(4)));
    assert!(a.iter().any(
        |x| matches!(x, Action::Send { stream, frame: Frame::Token { session: 1, position: 20, .. } } if *stream == s1)
    ));
    assert_eq!(h.core.batch_gauge().read().batches, 5);
}

#[test]
fn older_prompts_are_served_first_and_sessions_join_between_steps() {
    let mut h = Harness::new(StageConfig { max_sessions: 4, batch_tokens: 10, ..config() });
    let (s1, s2) = (h.open(1), h.open(2));
    // Session 2's prompt arrives first on the wire, but session 1 was admitted first.
    h.core.handle(h.now, Event::Frame { stream: s2, frame: prefill(2, 0, &[3; 8]) });
    h.core.handle(h.now, Event::Frame { stream: s1, frame: prefill(1, 0, &[4; 8]) });
    let batch = take_batch(std::iter::from_fn(|| h.core.poll_action()).collect());
    assert_eq!(shape(&batch), vec![(1, 0, 8, true), (2, 0, 2, false)]);
    // A session admitted while the batch runs joins the next step with its decode-free prompt behind session 2.
    let s3 = h.open(3);
    h.core.handle(h.now, Event::Frame { stream: s3, frame: prefill(3, 0, &[5; 4]) });
    let batch =
        take_batch(h.event(done(batch, |i| if i.sample.is_some() { token(1) } else { ComputeOutput::Nothing })));
    assert_eq!(shape(&batch), vec![(2, 2, 6, true), (3, 0, 4, true)]);
}

#[test]
fn a_middle_stage_forwards_a_cut_prompt_as_consecutive_prefill_frames() {
    let mut h = Harness::new(StageConfig { batch_tokens: 8, ..config() });
    let c = h.accept();
    let a = h.frame(c, open(1, LayerRange::new(0, 2), vec![hop()]));
    let Action::Dial { stream: d, .. } = a[0] else { panic!("{a:?}") };
    h.event(Event::Dialed { stream: d, result: Ok(()) });
    h.frame(d, Frame::Opened { session: 1 });
    let hidden = |i: &ComputeItem<FakeKv>| {
        let n = i.n_positions();
        ComputeOutput::Hidden(HiddenStates::from_f32(n, WIDTH as usize, &vec![0.5; n * WIDTH as usize]).unwrap())
    };
    let mut a = h.frame(c, prefill(1, 0, &[1; 20]));
    let mut sent = Vec::new();
    while let Some(batch) =
        a.iter().any(|x| matches!(x, Action::Compute(_))).then(|| take_batch(std::mem::take(&mut a)))
    {
        a = h.event(done(batch, hidden));
        for x in &a {
            if let Action::Send { stream, frame: Frame::Prefill { position, last, data, .. } } = x
                && *stream == d
            {
                sent.push((*position, *last, data.n_tokens()));
            }
        }
        let more = h.event(Event::Sent { stream: d });
        a.extend(more);
    }
    assert_eq!(sent, vec![(0, false, 8), (8, false, 8), (16, true, 4)]);
}

/// The fairness case, scripted: 8 sessions decode, one token per step each, answering every token at once
/// (as the in-process driver's step does: `LocalSwarm::step`); a 1,500-token prompt arrives among them. Every step
/// carries all 8 decode rows and at most the rest of the token budget from the prompt, so each decoder waits one
/// step between tokens, however long the prompt: the prompt is cut into ⌈1500 / (budget − 8)⌉ chunks with a decode
/// row of every decoder beside each.
#[test]
fn decoders_get_a_step_between_the_chunks_of_a_long_prompt() {
    const DECODERS: u64 = 8;
    const LONG: usize = 1500;
    let budget = 128;
    let mut h = Harness::with_pool(StageConfig { max_sessions: 16, batch_tokens: budget, ..config() }, 4000, 2000);
    let decoders: Vec<(SessionId, StreamId)> = (1..=DECODERS).map(|s| (s, h.open(s))).collect();
    for &(s, stream) in &decoders {
        prefilled(&mut h, stream, s, &[1, 2]);
    }
    let long = h.accept();
    let Frame::Open { open: mut o, .. } = open(100, LayerRange::new(0, 4), vec![]) else { unreachable!() };
    o.max_tokens = LONG as u32 + 1;
    assert_opened(&h.frame(long, Frame::Open { session: 100, open: o }), long, 100);
    // The decoders' next inputs and the whole prompt, in one frame, arrive before the driver polls.
    let mut position = 2;
    for &(s, stream) in &decoders {
        h.core.handle(h.now, Event::Frame { stream, frame: decode(s, position, 5) });
    }
    h.core.handle(h.now, Event::Frame { stream: long, frame: prefill(100, 0, &[7; LONG]) });
    let mut prompt_done = 0;
    let mut steps = 0;
    let mut actions: Vec<Action<FakeKv>> = std::iter::from_fn(|| h.core.poll_action()).collect();
    while prompt_done < LONG {
        let batch = take_batch(actions);
        steps += 1;
        let rows = shape(&batch);
        // Every decoder, first, one row at its next position; then the next piece of the prompt, cut to the budget.
        let decode_rows: Vec<_> = decoders.iter().map(|&(s, _)| (s, position, 1, true)).collect();
        assert_eq!(rows[..DECODERS as usize], decode_rows[..], "step {steps}");
        let piece = (budget - DECODERS as usize).min(LONG - prompt_done);
        let last = prompt_done + piece == LONG;
        assert_eq!(rows[DECODERS as usize..], [(100, prompt_done as u64, piece, last)], "step {steps}");
        assert!(batch.rows() <= budget);
        prompt_done += piece;
        // The step's outputs go out (without building the next batch), every decoder answers its token at once.
        h.core.handle(h.now, done(batch, |i| if i.sample.is_some() { token(3) } else { ComputeOutput::Nothing }));
        let sent: Vec<Action<FakeKv>> = std::iter::from_fn(|| h.core.poll_queued()).collect();
        let tokens: Vec<(SessionId, u64)> = sent
            .iter()
            .filter_map(|x| match x {
                Action::Send { frame: Frame::Token { session, position, .. }, .. } => Some((*session, *position)),
                _ => None,
            })
            .collect();
        position += 1;
        let mut expected: Vec<(SessionId, u64)> = decoders.iter().map(|&(s, _)| (s, position)).collect();
        if last {
            expected.push((100, LONG as u64));
        }
        assert_eq!(tokens, expected, "step {steps}: every decoder got its token");
        assert!(!sent.iter().any(|x| matches!(x, Action::Compute(_))));
        for &(s, stream) in &decoders {
            h.core.handle(h.now, Event::Sent { stream });
            h.core.handle(h.now, Event::Frame { stream, frame: decode(s, position, 5) });
        }
        h.core.handle(h.now, Event::Sent { stream: long });
        actions = std::iter::from_fn(|| h.core.poll_action()).collect();
    }
    assert_eq!(steps, LONG.div_ceil(budget - DECODERS as usize), "the prompt took one chunk per step");
    // After the prompt, the decoders' next step is theirs alone.
    let batch = take_batch(actions);
    assert_eq!(batch.rows(), DECODERS as usize);
}

/// The same case with the step times reported (`Event::ComputeTime`), scripted from a machine where a step costs
/// 4 ms + 1 ms a row + 2 µs per attended (query, key) pair — a CPU, where a prompt row costs as much as a decode row.
/// The stage learns that cost and holds every step that carries decode rows to at most `max_step_stretch` (3) times
/// the decode rows alone; the first such step is the probe of `min_prefill` rows it learns a row's cost from. The
/// chunks grow smaller as the prompt goes deeper (its attention costs more), every decoder still gets a token every
/// step, and once the decoders have left, the rest of the prompt goes at the whole budget.
#[test]
fn with_step_times_a_prompt_beside_decoders_is_cut_to_keep_their_steps_short() {
    const DECODERS: u64 = 8;
    const LONG: usize = 1500;
    const DECODE_STEPS: u64 = 40;
    let budget = 128;
    let truth = |b: &ComputeBatch<FakeKv>| {
        let shape = b.items.iter().fold(StepShape::default(), |s, i| s.with(i.start, i.n_positions()));
        Duration::from_secs_f64(4e-3 + 1e-3 * shape.rows as f64 + 2e-6 * shape.attended)
    };
    let config = StageConfig { max_sessions: 16, batch_tokens: budget, max_step_stretch: 3.0, ..config() };
    let mut h = Harness::with_pool(config, 4000, 2000);
    let decoders: Vec<(SessionId, StreamId)> = (1..=DECODERS).map(|s| (s, h.open(s))).collect();
    for &(s, stream) in &decoders {
        prefilled(&mut h, stream, s, &[1, 2]);
    }
    let long = h.accept();
    let Frame::Open { open: mut o, .. } = open(100, LayerRange::new(0, 4), vec![]) else { unreachable!() };
    o.max_tokens = LONG as u32 + 1;
    assert_opened(&h.frame(long, Frame::Open { session: 100, open: o }), long, 100);
    let mut position = 2;
    let mut prompt_done = 0;
    let mut chunks = Vec::new();
    let mut step = 0;
    let mut first_token_step = None;
    loop {
        let decoding = step < DECODE_STEPS;
        if decoding {
            for &(s, stream) in &decoders {
                h.core.handle(h.now, Event::Frame { stream, frame: decode(s, position, 5) });
            }
        }
        // The prompt arrives, whole, after 5 decode-only steps.
        if step == 5 {
            h.core.handle(h.now, Event::Frame { stream: long, frame: prefill(100, 0, &[7; LONG]) });
        }
        let actions: Vec<Action<FakeKv>> = std::iter::from_fn(|| h.core.poll_action()).collect();
        if !actions.iter().any(|a| matches!(a, Action::Compute(_))) {
            break;
        }
        let batch = take_batch(actions);
        let rows = shape(&batch);
        let decode_rows = rows.iter().filter(|r| r.0 != 100).count();
        let prompt_rows: usize = rows.iter().filter(|r| r.0 == 100).map(|r| r.2).sum();
        assert_eq!(decode_rows, if decoding { DECODERS as usize } else { 0 }, "step {step}: every decoder");
        let took = truth(&batch);
        if decoding && prompt_rows > 0 {
            chunks.push(prompt_rows);
            // The step against the decode rows alone, by the true cost.
            let alone = Duration::from_secs_f64(4e-3 + 1e-3 * 8.0 + 2e-6 * 8.0 * (position + 1) as f64);
            if chunks.len() == 1 {
                assert_eq!(prompt_rows, schedule::min_prefill(budget), "the first chunk is the probe");
            } else {
                assert!(took <= alone.mul_f64(3.0 * 1.001), "step {step}: {took:?} against {alone:?} alone");
                assert!(took > alone.mul_f64(2.5), "step {step}: {prompt_rows} rows leave the bound unused");
            }
        }
        if !decoding {
            assert_eq!(prompt_rows, (LONG - prompt_done).min(budget), "step {step}: no decoder, the whole budget");
        }
        prompt_done += prompt_rows;
        h.core.handle(h.now, done(batch, |i| if i.sample.is_some() { token(3) } else { ComputeOutput::Nothing }));
        h.core.handle(h.now, Event::ComputeTime(took));
        let sent: Vec<Action<FakeKv>> = std::iter::from_fn(|| h.core.poll_queued()).collect();
        for a in &sent {
            if let Action::Send { stream, frame: Frame::Token { session, .. } } = a {
                h.core.handle(h.now, Event::Sent { stream: *stream });
                if *session == 100 {
                    first_token_step = Some(step);
                }
            }
        }
        if decoding {
            position += 1;
        }
        step += 1;
    }
    assert_eq!(prompt_done, LONG);
    assert!(first_token_step.is_some(), "the prompt got its token");
    // Deeper chunks attend more positions: the last chunks beside decoders are smaller than the first capped ones.
    assert!(chunks.len() > 10, "{chunks:?}");
    assert!(chunks[chunks.len() - 1] < chunks[1], "{chunks:?}");
    assert!(h.core.step_cost().ready());
}

// ---- gathering a cohort ----

/// Sessions `ids`, opened and prefilled one by one, then decoded once together in one batch whose time is reported as
/// `step`: they form one cohort, and their decode outputs are written. Returns their streams and next position.
fn cohort(h: &mut Harness, ids: &[SessionId], step: Duration) -> (Vec<StreamId>, u64) {
    let streams: Vec<StreamId> = ids.iter().map(|&s| h.open(s)).collect();
    for (&s, &stream) in ids.iter().zip(&streams) {
        prefilled(h, stream, s, &[1, 2]);
    }
    for (&s, &stream) in ids.iter().zip(&streams) {
        h.core.handle(h.now, Event::Frame { stream, frame: decode(s, 2, 5) });
    }
    let batch = take_batch(std::iter::from_fn(|| h.core.poll_action()).collect());
    assert_eq!(batch.items.len(), ids.len(), "one batch of the whole cohort");
    h.core.handle(h.now, done(batch, |_| token(3)));
    h.core.handle(h.now, Event::ComputeTime(step));
    for &stream in &streams {
        h.event(Event::Sent { stream });
    }
    (streams, 3)
}

#[test]
fn a_stage_waits_a_moment_for_the_rest_of_a_cohort_and_no_longer() {
    let step = Duration::from_millis(4);
    let mut h = Harness::new(StageConfig { max_sessions: 4, gather_wait: Duration::from_millis(2), ..config() });
    let (streams, pos) = cohort(&mut h, &[1, 2, 3], step);
    // Session 1's next decode arrives first: the stage holds the batch for a quarter of the last step.
    let a = h.frame(streams[0], decode(1, pos, 5));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{a:?}");
    assert_eq!(h.core.next_deadline(), Some(h.now + step / 4));
    // Session 2's arrives within the window: still one missing, still holding.
    h.now += Duration::from_micros(300);
    let a = h.frame(streams[1], decode(2, pos, 5));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{a:?}");
    // The last one arrives: the batch leaves at once, whole.
    h.now += Duration::from_micros(300);
    let batch = take_batch(h.frame(streams[2], decode(3, pos, 5)));
    assert_eq!(shape(&batch).iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
    h.core.handle(h.now, done(batch, |_| token(3)));
    h.core.handle(h.now, Event::ComputeTime(Duration::from_millis(40)));
    for &stream in &streams {
        h.event(Event::Sent { stream });
    }
    // Next round, session 3 never comes: the wait ends at its bound (the cap, 2 ms: a quarter of 40 ms is more), and
    // the two that came go.
    let pos = pos + 1;
    h.frame(streams[0], decode(1, pos, 5));
    let a = h.frame(streams[1], decode(2, pos, 5));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{a:?}");
    assert_eq!(h.core.next_deadline(), Some(h.now + Duration::from_millis(2)));
    let a = h.advance(Duration::from_micros(1999));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{a:?}");
    let batch = take_batch(h.advance(Duration::from_micros(1)));
    assert_eq!(shape(&batch).iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
    // The deadline is the sessions' idle timeout again.
    assert!(h.core.next_deadline().is_none_or(|d| d > h.now + Duration::from_secs(1)));
}

#[test]
fn the_default_window_is_a_quarter_step_up_to_ten_milliseconds() {
    // CPU stages sharing cores take tens of milliseconds a step, and a preempted hop puts a cohort's decodes
    // milliseconds apart: the default window follows the step (a quarter of it) up to 10 ms.
    let mut h = Harness::new(StageConfig { max_sessions: 4, ..config() });
    let step = Duration::from_millis(24);
    let (streams, pos) = cohort(&mut h, &[1, 2, 3], step);
    let a = h.frame(streams[0], decode(1, pos, 5));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{a:?}");
    assert_eq!(h.core.next_deadline(), Some(h.now + Duration::from_millis(6)), "a quarter of a 24 ms step");
    // Session 2 comes 5 ms later (past the old 2 ms cap), still inside the window; session 3 does not come.
    let a = h.advance(Duration::from_millis(5));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{a:?}");
    let a = h.frame(streams[1], decode(2, pos, 5));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{a:?}");
    let batch = take_batch(h.advance(Duration::from_millis(1)));
    assert_eq!(shape(&batch).iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2], "the window ends, the two go together");
    h.core.handle(h.now, done(batch, |_| token(3)));
    // A slow step (100 ms): the window stops at the 10 ms cap.
    h.core.handle(h.now, Event::ComputeTime(Duration::from_millis(100)));
    for &stream in &streams[..2] {
        h.event(Event::Sent { stream });
    }
    let a = h.frame(streams[0], decode(1, pos + 1, 5));
    assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "{a:?}");
    assert_eq!(h.core.next_deadline(), Some(h.now + Duration::from_millis(10)));
}

#[test]
fn a_lone_session_a_prompt_and_a_full_batch_never_wait() {
    let step = Duration::from_millis(4);
    let mut h = Harness::new(StageConfig { max_sessions: 8, batch_tokens: 2, ..config() });
    // A cohort of one: its decode goes at once.
    let (solo, pos) = cohort(&mut h, &[1], step);
    let batch = take_batch(h.frame(solo[0], decode(1, pos, 5)));
    assert_eq!(batch.items.len(), 1);
    h.core.handle(h.now, done(batch, |_| token(3)));
    h.core.handle(h.now, Event::ComputeTime(step));
    h.event(Event::Sent { stream: solo[0] });
    // Sessions 2 and 3 decode together (a cohort); a prompt arrives while neither's next decode is here: a prompt
    // waits for no one.
    let (pair, pos2) = cohort(&mut h, &[2, 3], step);
    let s4 = h.open(4);
    let batch = take_batch(h.frame(s4, prefill(4, 0, &[1, 2])));
    assert_eq!(shape(&batch), [(4, 0, 2, true)], "the prompt goes at once");
    h.core.handle(h.now, done(batch, |_| token(3)));
    h.core.handle(h.now, Event::ComputeTime(step));
    h.event(Event::Sent { stream: s4 });
    // Session 2's decode and session 1's (another cohort, alone) together fill the budget: no wait for session 3.
    h.core.handle(h.now, Event::Frame { stream: pair[0], frame: decode(2, pos2, 5) });
    let batch = take_batch(h.frame(solo[0], decode(1, pos + 1, 5)));
    assert_eq!(shape(&batch).iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn without_step_times_or_with_no_window_nothing_waits() {
    // No time reported (a driver that does not measure compute): the cohort's first decode goes at once.
    let mut h = Harness::new(StageConfig { max_sessions: 4, ..config() });
    let streams: Vec<StreamId> = [1, 2].iter().map(|&s| h.open(s)).collect();
    for (s, &stream) in [1, 2].into_iter().zip(&streams) {
        prefilled(&mut h, stream, s, &[1, 2]);
    }
    for (s, &stream) in [1, 2].into_iter().zip(&streams) {
        h.core.handle(h.now, Event::Frame { stream, frame: decode(s, 2, 5) });
    }
    let batch = take_batch(std::iter::from_fn(|| h.core.poll_action()).collect());
    assert_eq!(batch.items.len(), 2);
    h.core.handle(h.now, done(batch, |_| token(3)));
    for &stream in &streams {
        h.event(Event::Sent { stream });
    }
    assert_eq!(take_batch(h.frame(streams[0], decode(1, 3, 5))).items.len(), 1);
    // A zero window: the same with times reported.
    let mut h = Harness::new(StageConfig { max_sessions: 4, gather_wait: Duration::ZERO, ..config() });
    let (streams, pos) = cohort(&mut h, &[1, 2], Duration::from_millis(4));
    assert_eq!(take_batch(h.frame(streams[0], decode(1, pos, 5))).items.len(), 1);
}

#[test]
fn decode_groups_split_the_decoders_into_batches_that_keep_together() {
    let mut h = Harness::new(StageConfig { max_sessions: 8, decode_groups: 2, ..config() });
    let ids = [1, 2, 3, 4, 5];
    let streams: Vec<StreamId> = ids.iter().map(|&s| h.open(s)).collect();
    for (&s, &stream) in ids.iter().zip(&streams) {
        prefilled(&mut h, stream, s, &[1, 2]);
    }
    // Five decoders in two groups: at most three decode rows a batch, the oldest first; the rest go next.
    let mut pos = 2;
    for round in 0..3 {
        for (&s, &stream) in ids.iter().zip(&streams) {
            h.core.handle(h.now, Event::Frame { stream, frame: decode(s, pos, 5) });
        }
        let mut groups = Vec::new();
        while let Some(a) = h.core.poll_action() {
            let Action::Compute(batch) = a else { continue };
            groups.push(shape(&batch).iter().map(|r| r.0).collect::<Vec<_>>());
            h.core.handle(h.now, done(batch, |_| token(3)));
            for &stream in &streams {
                h.core.handle(h.now, Event::Sent { stream });
            }
        }
        // The same two groups every round: the first three sessions (the oldest), then the other two.
        assert_eq!(groups, [vec![1, 2, 3], vec![4, 5]], "round {round}");
        pos += 1;
    }
    // The second group's next decodes arrive first: they go first, and the first group, arriving during that
    // batch, goes whole after it.
    for &i in &[3, 4] {
        h.core.handle(h.now, Event::Frame { stream: streams[i], frame: decode(ids[i], pos, 5) });
    }
    let batch = take_batch(std::iter::from_fn(|| h.core.poll_action()).collect());
    assert_eq!(shape(&batch).iter().map(|r| r.0).collect::<Vec<_>>(), [4, 5]);
    for &i in &[0, 1, 2] {
        h.core.handle(h.now, Event::Frame { stream: streams[i], frame: decode(ids[i], pos, 5) });
    }
    h.core.handle(h.now, done(batch, |_| token(3)));
    let batch = take_batch(std::iter::from_fn(|| h.core.poll_action()).collect());
    assert_eq!(shape(&batch).iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
}

// ---- admission by free KV blocks ----

#[test]
fn opens_wait_for_kv_blocks_in_a_bounded_queue_and_get_them_as_sessions_close() {
    let mut h = Harness::new(StageConfig { max_sessions: 8, max_waiting: 1, ..config() });
    // Room for two sessions of 50 positions.
    h.free.store(120, Ordering::SeqCst);
    let s1 = h.open(1);
    let _s2 = h.open(2);
    // The third waits: no answer yet, nothing refused.
    let w = h.accept();
    let a = h.frame(w, open(3, LayerRange::new(0, 4), vec![]));
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(h.core.waiting_opens(), 1);
    // The fourth finds the queue full: Busy at once.
    let x = h.accept();
    let a = h.frame(x, open(4, LayerRange::new(0, 4), vec![]));
    assert_eq!(error_on(&a, x).0, ErrorCode::Busy);
    // Session 1 is closed: its blocks go to session 3, which is told it is open.
    let a = h.frame(s1, Frame::Close { session: 1 });
    assert!(
        a.iter().any(|x| matches!(x, Action::Send { stream, frame: Frame::Opened { session: 3 } } if *stream == w)),
        "{a:?}"
    );
    assert_eq!(h.core.waiting_opens(), 0);
    assert_eq!(h.free.load(Ordering::SeqCst), 20, "sessions 2 and 3 hold 50 positions each");
    // Session 3 runs like any other.
    let batch = take_batch(h.frame(w, prefill(3, 0, &[1, 2])));
    assert_eq!(batch.items[0].session, 3);
}

#[test]
fn an_open_that_waits_too_long_for_kv_blocks_is_refused_busy() {
    let mut h = Harness::new(StageConfig { max_sessions: 8, ..config() });
    h.free.store(60, Ordering::SeqCst);
    let _s1 = h.open(1);
    let w = h.accept();
    assert!(h.frame(w, open(2, LayerRange::new(0, 4), vec![])).is_empty());
    assert_eq!(h.core.next_deadline(), Some(h.now + config().connect_timeout));
    let a = h.advance(config().connect_timeout);
    let (code, msg) = error_on(&a, w);
    assert_eq!(code, ErrorCode::Busy);
    assert!(msg.contains("KV cache full"), "{msg}");
    assert_eq!(h.core.waiting_opens(), 0);
    // The running session was never touched.
    assert_eq!(h.core.active_sessions(), 1);
    assert_eq!(h.free.load(Ordering::SeqCst), 10);
}

mod security;
