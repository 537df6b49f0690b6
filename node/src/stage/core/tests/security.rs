//! The core's defences against hostile peers (`docs/SECURITY.md`, *Stage*), scripted like the other core tests:
//! session keys on `Attach`, next hops only on a signed announcement's word, frame budgets announced with each read,
//! per-peer quotas, the idle reaper with owner pings, and non-finite hidden states blamed on their sender.

use super::*;
use crate::stage::core::auth::HopPolicy;
use shardline_proto::announcement::ShardAnnouncement;
use shardline_proto::wire::header::FLAG_LAST;
use shardline_proto::wire::{Header, KEY_LEN, PayloadDType};

const KEY: SessionKey = SessionKey([0x5a; 16]);

fn accept_from(h: &mut Harness, peer: Peer) -> StreamId {
    let s = StreamId::Accepted(h.next);
    h.next += 1;
    let a = h.event(Event::Accepted { stream: s, peer });
    assert!(matches!(a[..], [Action::Read { stream, .. }] if stream == s), "{a:?}");
    s
}

fn with_open(frame: Frame, edit: impl FnOnce(&mut SessionOpen)) -> Frame {
    let Frame::Open { session, mut open } = frame else { unreachable!() };
    edit(&mut open);
    Frame::Open { session, open }
}

fn attach(session: SessionId, key: SessionKey) -> Frame {
    Frame::Attach { session, dtype: WireDType::F32, width: WIDTH, key }
}

/// The `Expect` of the read asked for on `s` among `a`.
fn expect_on(a: &[Action<FakeKv>], s: StreamId) -> Expect {
    a.iter()
        .find_map(|x| match x {
            Action::Read { stream, expect } if *stream == s => Some(*expect),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no read on {s:?} in {a:?}"))
}

fn header(kind: FrameKind, session: u64, payload_len: u32) -> Header {
    let dtype = if kind == FrameKind::Prefill { PayloadDType::F32 } else { PayloadDType::None };
    let flags = if kind == FrameKind::Prefill { FLAG_LAST } else { 0 };
    Header { kind, flags, dtype, session, position: 0, n_tokens: 1, width: WIDTH, payload_len }
}

#[test]
fn an_outsider_holding_the_session_id_cannot_attach_or_end_the_session() {
    let mut h = Harness::new(config());
    let c = h.accept();
    let a = h.frame(c, with_open(open(1, LayerRange::new(2, 4), vec![]), |o| o.attach_key = KEY));
    assert_opened(&a, c, 1);
    // The outsider knows the id (it is logged) but not the key: refused exactly as an unknown session.
    let mut near = KEY;
    near.0[15] ^= 1;
    for guess in [SessionKey::default(), near] {
        let u = accept_from(&mut h, Peer::numbered(66));
        let (code, _) = error_on(&h.frame(u, attach(1, guess)), u);
        assert_eq!(code, ErrorCode::UnknownSession);
    }
    assert_eq!(h.core.active_sessions(), 1, "the session outlives the failed attaches");
    // The real previous stage still attaches, and hidden states then flow.
    let u = h.accept();
    assert_opened(&h.frame(u, attach(1, KEY)), u, 1);
    let x = HiddenStates::from_f32(1, WIDTH as usize, &[0.25; WIDTH as usize]).unwrap();
    let batch = take_batch(h.frame(u, Frame::Decode { session: 1, position: 0, data: StageData::Hidden(x) }));
    assert_eq!(batch.items.len(), 1);
}

/// A stage of a route learns the session id from its `Open` before the owner opens the stages in front of it. If it
/// opens that id on one of them first, the owner's `Open` there meets a taken id: answered `Busy` (the owner routes
/// around it with a fresh id, nobody banned), not `BadRequest` (which blamed the honest stage).
#[test]
fn an_open_for_an_id_another_peer_took_is_busy_not_the_stages_fault() {
    let mut h = Harness::new(config());
    let squatter = accept_from(&mut h, Peer::numbered(66));
    assert_opened(&h.frame(squatter, open(5, LayerRange::new(0, 2), vec![])), squatter, 5);
    let owner = h.accept();
    let (code, msg) = error_on(&h.frame(owner, open(5, LayerRange::new(0, 2), vec![])), owner);
    assert_eq!(code, ErrorCode::Busy, "{msg}");
    assert!(msg.contains("session id in use"), "{msg}");
    // The owner's fresh id opens.
    let owner = h.accept();
    assert_opened(&h.frame(owner, open(6, LayerRange::new(0, 2), vec![])), owner, 6);
}

#[test]
fn the_stage_presents_the_next_stage_key_in_its_attach() {
    let mut h = Harness::new(config());
    let c = h.accept();
    let a = h.frame(c, with_open(open(1, LayerRange::new(0, 2), vec![hop()]), |o| o.next_key = KEY));
    let Action::Dial { stream: d, .. } = a[0] else { panic!("{a:?}") };
    let a = h.event(Event::Dialed { stream: d, result: Ok(()) });
    assert!(
        a.iter().any(|x| matches!(x, Action::Send { frame: Frame::Attach { key, .. }, .. } if *key == KEY)),
        "{a:?}"
    );
}

/// A signed announcement of model "m" (4 layers, width `WIDTH`) for `layers` at `addr` with certificate `cert`.
fn record(layers: LayerRange, addr: &str, cert: [u8; 32], model: &str) -> Vec<u8> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let a = ShardAnnouncement::example(key.public().to_peer_id(), model, layers, 4);
    let a = ShardAnnouncement {
        hidden: WIDTH,
        quic_addr: addr.parse().unwrap(),
        cert_fingerprint: cert,
        free_kv_tokens: 100,
        decode_tps: 10.0,
        ..a
    };
    a.sign(&key).unwrap().to_bytes()
}

#[test]
fn a_next_hop_is_dialed_only_on_its_signed_announcement() {
    let signed = HopPolicy::Signed;
    let mut h = Harness::new(StageConfig { next_hops: signed, ..config() });
    let hop = hop();
    let addr = hop.addr.to_string();
    let forged = {
        let mut r = record(hop.layers, &addr, hop.fingerprint, "m");
        let n = r.len();
        r[n - 1] ^= 1;
        r
    };
    let refused = [
        (Vec::new(), "without its signed announcement"),
        (record(hop.layers, "127.0.0.1:10", hop.fingerprint, "m"), "not the address and certificate"),
        (record(hop.layers, &addr, [8; 32], "m"), "not the address and certificate"),
        (record(hop.layers, &addr, hop.fingerprint, "other"), "another model"),
        (record(LayerRange::new(3, 4), &addr, hop.fingerprint, "m"), "announces layers"),
        (forged, "does not verify"),
    ];
    // A valid announcement that does not continue this stage's span: a hop for other layers, or any hop after the
    // model's last layer (the last stage answers the owner and dials nobody).
    let whole = || record(LayerRange::new(0, 4), &addr, hop.fingerprint, "m");
    let skewed = [
        (LayerRange::new(0, 2), LayerRange::new(3, 4), "not the ones right after"),
        (LayerRange::new(0, 2), LayerRange::new(1, 4), "not the ones right after"),
        (LayerRange::new(0, 2), LayerRange::new(2, 2), "not the ones right after"),
        (LayerRange::new(2, 4), LayerRange::new(0, 4), "no next hop"),
    ];
    let cases = refused
        .into_iter()
        .map(|(rec, why)| (LayerRange::new(0, 2), hop.clone(), rec, why))
        .chain(skewed.into_iter().map(|(span, layers, why)| (span, Hop { layers, ..hop.clone() }, whole(), why)));
    for (i, (span, hop, rec, why)) in cases.enumerate() {
        let c = h.accept();
        let a = h.frame(c, with_open(open(i as u64, span, vec![hop]), |o| o.next_record = rec));
        assert!(!a.iter().any(|x| matches!(x, Action::Dial { .. })), "{why}: dialed anyway: {a:?}");
        let (code, msg) = error_on(&a, c);
        assert_eq!(code, ErrorCode::BadRequest, "{msg}");
        assert!(msg.contains(why), "{why}: {msg}");
        assert_eq!((h.core.admission().active(), h.kv_in_use()), (0, 0));
    }
    let c = h.accept();
    let good = record(LayerRange::new(1, 4), &addr, hop.fingerprint, "m");
    let a = h.frame(c, with_open(open(9, LayerRange::new(0, 2), vec![hop.clone()]), |o| o.next_record = good));
    assert!(matches!(a[..], [Action::Dial { addr: a, .. }] if a == hop.addr), "{a:?}");
}

#[test]
fn every_read_says_what_the_stream_may_carry_before_its_payload_is_read() {
    let mut h = Harness::new(config());
    let control = h.core.config().limits.max_control_payload as u32;
    let s = StreamId::Accepted(h.next);
    h.next += 1;
    let first = expect_on(&h.event(Event::Accepted { stream: s, peer: Peer::LOCAL }), s);
    // A 64 MiB prefill can never start a session: refused on its 36-byte header.
    assert!(first.check(&header(FrameKind::Prefill, 1, 64 << 20)).is_err());
    assert!(first.check(&header(FrameKind::Open, 1, control + 1)).is_err());
    assert!(first.check(&header(FrameKind::Open, 1, control)).is_ok());
    assert!(first.check(&header(FrameKind::Attach, 1, KEY_LEN as u32)).is_ok());
    // A first stage's control stream takes token chunks of this session, up to the positions it has left.
    let a = h.frame(s, open(1, LayerRange::new(0, 4), vec![]));
    let inputs = expect_on(&a, s);
    assert!(inputs.check(&header(FrameKind::Prefill, 1, 50 * 4)).is_ok());
    assert!(inputs.check(&header(FrameKind::Prefill, 1, 50 * 4 + 4)).is_err(), "max_tokens is 50");
    assert!(inputs.check(&header(FrameKind::Prefill, 2, 4)).is_err(), "another session's frame");
    assert!(inputs.check(&header(FrameKind::Ping, 1, 0)).is_ok());
    assert!(inputs.check(&header(FrameKind::Open, 1, 100)).is_err());
    // A later stage's control stream carries only Close and Ping; its data stream hidden rows of its width.
    let c = h.accept();
    let a = h.frame(c, with_open(open(2, LayerRange::new(2, 4), vec![]), |o| o.max_tokens = 10));
    let ctl = expect_on(&a, c);
    assert!(ctl.check(&header(FrameKind::Prefill, 2, WIDTH * 4)).is_err());
    assert!(ctl.check(&header(FrameKind::Close, 2, 0)).is_ok());
    let u = h.accept();
    let data = expect_on(&h.frame(u, attach(2, SessionKey::default())), u);
    assert!(data.check(&header(FrameKind::Decode, 2, 10 * WIDTH * 4)).is_ok());
    assert!(data.check(&header(FrameKind::Decode, 2, 11 * WIDTH * 4)).is_err());
    assert!(data.check(&header(FrameKind::Ping, 2, 0)).is_err());
}

#[test]
fn one_peer_cannot_hold_every_slot_or_the_whole_cache() {
    let config = StageConfig { max_sessions: 4, max_kv_tokens_per_peer: Some(120), ..config() };
    assert_eq!(config.sessions_per_peer(), 3);
    let mut h = Harness::new(config);
    let greedy = Peer::numbered(1);
    for id in 1..=2 {
        let s = accept_from(&mut h, greedy);
        assert_opened(&h.frame(s, open(id, LayerRange::new(0, 4), vec![])), s, id);
    }
    // A third session of 50 positions would make 150 > 120.
    let s = accept_from(&mut h, greedy);
    let (code, msg) = error_on(&h.frame(s, open(3, LayerRange::new(0, 4), vec![])), s);
    assert_eq!(code, ErrorCode::Busy, "{msg}");
    assert!(msg.contains("KV"), "{msg}");
    let s = accept_from(&mut h, greedy);
    assert_opened(&h.frame(s, with_open(open(3, LayerRange::new(0, 4), vec![]), |o| o.max_tokens = 20)), s, 3);
    // A fourth session: over the session quota though a slot is free.
    let s = accept_from(&mut h, greedy);
    let (code, msg) = error_on(&h.frame(s, with_open(open(4, LayerRange::new(0, 4), vec![]), |o| o.max_tokens = 1)), s);
    assert_eq!(code, ErrorCode::Busy);
    assert!(msg.contains("sessions"), "{msg}");
    // Another peer gets the slot the first one could not take.
    let s = accept_from(&mut h, Peer::numbered(2));
    assert_opened(&h.frame(s, open(5, LayerRange::new(0, 4), vec![])), s, 5);
    assert_eq!(h.core.admission().active(), 4);
}

#[test]
fn an_idle_session_is_reaped_with_its_slot_and_cache_and_pings_keep_it() {
    let mut h = Harness::new(StageConfig { idle_timeout: Duration::from_secs(30), ..config() });
    let s = h.open(1);
    assert_eq!((h.core.admission().active(), h.kv_in_use()), (1, 50));
    // The owner pings every 10 s: a minute passes and the session stays.
    for _ in 0..6 {
        assert!(h.advance(Duration::from_secs(10)).is_empty());
        let a = h.frame(s, Frame::Ping { session: 1 });
        assert!(matches!(a[..], [Action::Read { stream, .. }] if stream == s), "{a:?}");
    }
    assert_eq!(h.core.active_sessions(), 1);
    // The owner goes quiet: 30 s later the session ends, its slot and cache are free.
    assert!(h.advance(Duration::from_secs(29)).is_empty());
    let (code, _) = error_on(&h.advance(Duration::from_secs(1)), s);
    assert_eq!(code, ErrorCode::Timeout);
    assert_eq!((h.core.admission().active(), h.kv_in_use()), (0, 0));
}

#[test]
fn non_finite_hidden_states_are_refused_and_blamed_on_the_previous_stage() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut h = Harness::new(config());
        let c = h.accept();
        assert_opened(&h.frame(c, open(1, LayerRange::new(2, 4), vec![])), c, 1);
        let u = h.accept();
        assert_opened(&h.frame(u, attach(1, SessionKey::default())), u, 1);
        let mut v = vec![0.5; 2 * WIDTH as usize];
        v[WIDTH as usize + 3] = bad;
        let x = HiddenStates::from_f32(2, WIDTH as usize, &v).unwrap();
        let a = h.frame(u, Frame::Prefill { session: 1, position: 0, last: true, data: StageData::Hidden(x) });
        assert!(!a.iter().any(|x| matches!(x, Action::Compute(_))), "nothing is computed from {bad}: {a:?}");
        let (code, msg) = error_on(&a, c);
        assert_eq!(code, ErrorCode::Upstream, "{msg}");
        assert!(msg.contains("position 1, element 3"), "{msg}");
        assert_eq!((h.core.admission().active(), h.kv_in_use()), (0, 0));
    }
}
