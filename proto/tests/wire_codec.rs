//! The stage wire codec: every frame type round-trips (bytes and async streams), and truncated, oversized,
//! wrong-version and otherwise malformed frames give typed errors, never panics.

use shardline_proto::LayerRange;
use shardline_proto::wire::{
    ErrorCode, Expect, Frame, FrameKind, HEADER_LEN, HiddenStates, Hop, Limits, SessionKey, SessionOpen, StageData,
    TokenResult, WireDType, WireError, WireSampling, read_frame, read_frame_expecting, write_frame,
};

fn open_frame() -> Frame {
    Frame::Open {
        session: 0xdead_beef_0102_0304,
        open: SessionOpen {
            model_id: "0123456789abcdef".into(),
            n_layers: 30,
            span: LayerRange::new(0, 10),
            max_tokens: 2048,
            sampling: WireSampling { temperature: 0.7, top_k: 40, top_p: 0.9, seed: 42 },
            n_top: 5,
            wire_dtype: WireDType::F16,
            hidden: 576,
            rest: vec![
                Hop { layers: LayerRange::new(10, 20), addr: "127.0.0.1:7001".parse().unwrap(), fingerprint: [1; 32] },
                Hop { layers: LayerRange::new(20, 30), addr: "[::1]:7002".parse().unwrap(), fingerprint: [2; 32] },
            ],
            attach_key: SessionKey([3; 16]),
            next_key: SessionKey([4; 16]),
            next_record: b"a signed record".to_vec(),
        },
    }
}

fn all_frames() -> Vec<Frame> {
    let hidden: Vec<f32> = (0..3 * 8).map(|i| i as f32 * 0.25 - 1.0).collect();
    let half: Vec<u8> = (0..2 * 8 * 2).map(|i| i as u8).collect();
    vec![
        open_frame(),
        Frame::Opened { session: 1 },
        Frame::Attach { session: 2, dtype: WireDType::BF16, width: 576, key: SessionKey([9; 16]) },
        Frame::Ping { session: 2 },
        Frame::Prefill { session: 3, position: 0, last: false, data: StageData::Tokens(vec![1, 2, 3, 49151]) },
        Frame::Prefill {
            session: 3,
            position: 4,
            last: true,
            data: StageData::Hidden(HiddenStates::from_f32(3, 8, &hidden).unwrap()),
        },
        Frame::Prefill {
            session: 3,
            position: 7,
            last: true,
            data: StageData::Hidden(HiddenStates::from_bytes(WireDType::F16, 2, 8, &half).unwrap()),
        },
        Frame::Decode { session: 4, position: 9, data: StageData::Tokens(vec![77]) },
        Frame::Decode {
            session: 4,
            position: 9,
            data: StageData::Hidden(HiddenStates::from_f32(1, 8, &hidden[..8]).unwrap()),
        },
        Frame::Token {
            session: 5,
            position: 10,
            result: TokenResult { token: 42, logprob: -0.125, top: vec![(42, -0.125), (7, -2.5)] },
        },
        Frame::Token { session: 5, position: 11, result: TokenResult { token: 0, logprob: 0.0, top: vec![] } },
        Frame::Close { session: 6 },
        Frame::Error { session: 7, code: ErrorCode::Busy, message: "KV cache is full: 4 blocks needed, 0 free".into() },
        Frame::Error { session: 7, code: ErrorCode::Other(999), message: String::new() },
        Frame::Error { session: 8, code: ErrorCode::Upstream, message: "NaN".into() },
    ]
}

#[test]
fn every_frame_type_round_trips_through_bytes() {
    let limits = Limits::default();
    let frames = all_frames();
    let kinds: std::collections::HashSet<FrameKind> = frames.iter().map(Frame::kind).collect();
    assert_eq!(kinds.len(), 9, "the fixture covers every kind");
    let mut stream = Vec::new();
    for f in &frames {
        let bytes = f.encode();
        let (back, used) = Frame::decode(&bytes, &limits).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(&back, f);
        stream.extend_from_slice(&bytes);
    }
    // Back to back in one buffer.
    let mut off = 0;
    for f in &frames {
        let (back, used) = Frame::decode(&stream[off..], &limits).unwrap();
        assert_eq!(&back, f);
        off += used;
    }
    assert_eq!(off, stream.len());
}

#[test]
fn hidden_states_are_cast_not_converted() {
    let values: Vec<f32> = (0..16).map(|i| (i as f32).sin()).collect();
    let f = Frame::Prefill {
        session: 1,
        position: 0,
        last: true,
        data: StageData::Hidden(HiddenStates::from_f32(2, 8, &values).unwrap()),
    };
    let (back, _) = Frame::decode(&f.encode(), &Limits::default()).unwrap();
    let Frame::Prefill { data: StageData::Hidden(h), .. } = back else { panic!("not a hidden prefill") };
    assert_eq!(h.as_f32().unwrap(), values.as_slice());
    // Byte layout on the wire is plain little-endian f32.
    let le: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(h.as_bytes(), le.as_slice());
    assert!(HiddenStates::from_bytes(WireDType::F16, 2, 8, &le).is_err(), "length must match the shape");
}

#[tokio::test]
async fn every_frame_type_round_trips_through_an_async_stream() {
    let limits = Limits::default();
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    let frames = all_frames();
    let sent = frames.clone();
    let writer = tokio::spawn(async move {
        for f in &sent {
            write_frame(&mut a, f).await.unwrap();
        }
    });
    for f in &frames {
        let back = read_frame(&mut b, &limits).await.unwrap().expect("a frame");
        assert_eq!(&back, f);
    }
    writer.await.unwrap();
    // Writer dropped: clean end of stream between frames.
    assert!(read_frame(&mut b, &limits).await.unwrap().is_none());
}

#[tokio::test]
async fn a_stream_ending_inside_a_frame_is_truncated() {
    let bytes = open_frame().encode();
    for cut in [1, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
        let mut r = &bytes[..cut];
        let err = read_frame(&mut r, &Limits::default()).await.unwrap_err();
        assert!(matches!(err, WireError::Truncated { .. }), "cut {cut}: {err}");
    }
}

#[test]
fn every_truncation_is_an_error() {
    let limits = Limits::default();
    for f in all_frames() {
        let bytes = f.encode();
        for cut in 0..bytes.len() {
            match Frame::decode(&bytes[..cut], &limits) {
                Err(WireError::Truncated { needed, got }) => assert!(needed > got),
                other => panic!("{:?} cut at {cut}: {other:?}", f.kind()),
            }
        }
    }
}

#[test]
fn wrong_magic_version_kind_and_dtype_are_typed_errors() {
    let limits = Limits::default();
    let good = Frame::Close { session: 1 }.encode();
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::BadMagic(_))));
    // Version 1 (no session keys) and any later version are refused.
    for v in [1, 3] {
        let mut b = good.clone();
        b[2] = v;
        assert!(matches!(Frame::decode(&b, &limits), Err(WireError::UnsupportedVersion(x)) if x == v));
    }
    let mut b = good.clone();
    b[3] = 0;
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::UnknownKind(0))));
    let mut b = good.clone();
    b[3] = 200;
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::UnknownKind(200))));
    let mut b = good.clone();
    b[5] = 9;
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::UnknownDType(9))));
    let mut b = good.clone();
    b[6] = 1;
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::Malformed { .. })));
    let mut b = good;
    b[4] = 0x80;
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::Malformed { .. })));
}

/// A prefill header claiming a payload far beyond the limits: refused from the header alone.
#[tokio::test]
async fn oversized_frames_are_refused_before_allocation() {
    let limits = Limits::default();
    let tokens = Frame::Prefill { session: 1, position: 0, last: false, data: StageData::Tokens(vec![5; 4]) }.encode();
    // n_tokens beyond the limit.
    let mut b = tokens.clone();
    b[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    b[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut r = &b[..HEADER_LEN];
    assert!(matches!(read_frame(&mut r, &limits).await, Err(WireError::Oversized { what: "tokens per frame", .. })));
    // Hidden states whose shape needs more than max_payload bytes (4096 x 65536 x 4 = 1 GiB).
    let hidden = Frame::Prefill {
        session: 1,
        position: 0,
        last: false,
        data: StageData::Hidden(HiddenStates::from_f32(1, 4, &[0.0; 4]).unwrap()),
    }
    .encode();
    let mut b = hidden.clone();
    b[24..28].copy_from_slice(&4096u32.to_le_bytes());
    b[28..32].copy_from_slice(&65_536u32.to_le_bytes());
    let mut r = &b[..HEADER_LEN];
    assert!(matches!(read_frame(&mut r, &limits).await, Err(WireError::Oversized { what: "payload bytes", .. })));
    // Width beyond the limit.
    let mut b = hidden.clone();
    b[28..32].copy_from_slice(&1_000_000u32.to_le_bytes());
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::Oversized { what: "hidden width", .. })));
    // A control frame longer than the control limit.
    let mut b = Frame::Error { session: 1, code: ErrorCode::Busy, message: "x".into() }.encode();
    b[32..36].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let mut r = &b[..HEADER_LEN];
    assert!(matches!(read_frame(&mut r, &limits).await, Err(WireError::Oversized { .. })));
    // A payload length that disagrees with the shape.
    let mut b = tokens;
    b[32..36].copy_from_slice(&12u32.to_le_bytes());
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::Malformed { .. })));
    // A decode step with more than one position.
    let mut b = Frame::Decode { session: 1, position: 0, data: StageData::Tokens(vec![1]) }.encode();
    b[24..28].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(Frame::decode(&b, &limits), Err(WireError::Malformed { .. })));
}

#[test]
fn open_frames_with_a_broken_route_are_malformed() {
    let limits = Limits::default();
    let Frame::Open { session, open } = open_frame() else { unreachable!() };
    let mut gap = open.clone();
    gap.rest[1].layers = LayerRange::new(21, 30);
    let mut short = open.clone();
    short.rest.pop();
    let mut outside = open.clone();
    outside.span = LayerRange::new(0, 40);
    for bad in [gap, short, outside] {
        let bytes = Frame::Open { session, open: bad }.encode();
        assert!(matches!(Frame::decode(&bytes, &limits), Err(WireError::Malformed { .. })));
    }
}

/// Flipping any single bit of any frame yields either another valid frame or an error, never a panic; and a stricter
/// limit set is honoured.
#[test]
fn bit_flips_never_panic() {
    let limits = Limits { max_payload: 1 << 12, max_tokens_per_frame: 64, ..Limits::default() };
    for f in all_frames() {
        let bytes = f.encode();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                let _ = Frame::decode(&b, &limits);
            }
        }
    }
}

#[test]
fn encode_into_reuses_the_buffer_and_matches_encode() {
    let mut out = vec![0xAA; 100_000];
    for f in all_frames() {
        f.encode_into(&mut out);
        assert_eq!(out, f.encode(), "{:?}", f.kind());
    }
    // Hidden states whose byte length is not a multiple of 4 (3 f16 values) copy exactly.
    let bytes = [1u8, 2, 3, 4, 5, 6];
    let h = HiddenStates::from_bytes(WireDType::F16, 1, 3, &bytes).unwrap();
    assert_eq!(h.as_bytes(), &bytes);
    let f = Frame::Decode { session: 1, position: 2, data: StageData::Hidden(h) };
    f.encode_into(&mut out);
    assert_eq!(&out[HEADER_LEN..], &bytes);
    let (back, used) = Frame::decode(&out, &Limits::default()).unwrap();
    assert_eq!((back, used), (f, out.len()));
}

#[tokio::test]
async fn a_frame_the_stream_does_not_expect_is_refused_on_its_header() {
    // A 64 MiB prefill header with no payload behind it: a reader that expects a first frame refuses it at once (had
    // it read on, it would report the stream truncated).
    let data = StageData::Tokens(vec![0; 1]);
    let (mut h, _) = Frame::Prefill { session: 1, position: 0, last: true, data }.parts();
    h.n_tokens = 8192;
    h.dtype = shardline_proto::wire::PayloadDType::F32;
    h.width = 2048;
    h.payload_len = 8192 * 2048 * 4;
    let bytes = h.encode();
    let first = Expect::kinds(&[FrameKind::Open, FrameKind::Attach]).max_payload(64 << 10);
    let err = read_frame_expecting(&mut &bytes[..], &Limits::default(), &first).await.unwrap_err();
    assert!(matches!(err, WireError::Malformed { kind: "prefill", .. }), "{err}");
    // The same header against no expectation reads on and finds the payload missing.
    let err = read_frame(&mut &bytes[..], &Limits::default()).await.unwrap_err();
    assert!(matches!(err, WireError::Truncated { .. }), "{err}");
}
