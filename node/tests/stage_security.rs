//! The stage server against hostile peers, over real QUIC on loopback (`docs/SECURITY.md`, *Stage*): an outsider who
//! knows a session id cannot attach to it; an `Open` naming an address no node signed for makes the stage send
//! nothing there; first frames that can never start a session cost no memory for their payload; one peer cannot
//! hold every slot; pings keep a session alive and silence ends it; non-finite hidden states are blamed on their
//! sender.

mod stage_fixture;

use std::time::Duration;

use stage_fixture::{WIDTH, connect, connect_from, open_with, server};

use shardline_node::model::LayerRange;
use shardline_node::stage::StageConfig;
use shardline_proto::wire::{
    ErrorCode, Frame, HiddenStates, Hop, Limits, SessionKey, SessionOpen, StageData, WireDType, read_frame, write_frame,
};

const KEY: SessionKey = SessionKey([0x3c; 16]);

fn open(span: LayerRange, rest: Vec<Hop>) -> SessionOpen {
    open_with(span, rest, KEY)
}

async fn request(conn: &quinn::Connection, frame: Frame) -> (quinn::SendStream, quinn::RecvStream, Option<Frame>) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // A stage that refuses a frame on its header stops reading the stream: the rest of the write may fail.
    let _ = write_frame(&mut send, &frame).await;
    let reply = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv, &Limits::default()))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    (send, recv, reply)
}

fn code(reply: Option<Frame>) -> ErrorCode {
    match reply {
        Some(Frame::Error { code, .. }) => code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

fn hidden(values: &[f32]) -> StageData {
    StageData::Hidden(HiddenStates::from_f32(values.len() / WIDTH, WIDTH, values).unwrap())
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_holding_the_session_id_cannot_attach_or_feed_frames() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), StageConfig::default());
    let owner = connect(&s).await;
    let (_ctl, mut ctl_recv, reply) =
        request(&owner, Frame::Open { session: 7, open: open(LayerRange::new(1, 2), vec![]) }).await;
    assert_eq!(reply, Some(Frame::Opened { session: 7 }));

    // The outsider has the id (owners log it) and its own connection; without the key it is an unknown session.
    let outsider = connect_from(&s, "127.0.0.2").await;
    for key in [SessionKey::default(), SessionKey([0x3c; 16].map(|b| b ^ 1))] {
        let attach = Frame::Attach { session: 7, dtype: WireDType::F32, width: WIDTH as u32, key };
        let (_s, _r, reply) = request(&outsider, attach).await;
        assert_eq!(code(reply), ErrorCode::UnknownSession);
    }
    // Nor can it feed the session by naming it on a stream of its own.
    let (_s, _r, reply) =
        request(&outsider, Frame::Decode { session: 7, position: 0, data: hidden(&[0.1; WIDTH]) }).await;
    assert_eq!(code(reply), ErrorCode::Malformed);
    assert_eq!(s.active_sessions(), 1, "the session is untouched");

    // The previous stage, holding the key, attaches and its hidden states produce the token for the owner.
    let prev = connect(&s).await;
    let attach = Frame::Attach { session: 7, dtype: WireDType::F32, width: WIDTH as u32, key: KEY };
    let (mut data, _data_recv, reply) = request(&prev, attach).await;
    assert_eq!(reply, Some(Frame::Opened { session: 7 }));
    write_frame(&mut data, &Frame::Decode { session: 7, position: 0, data: hidden(&[0.1; WIDTH]) }).await.unwrap();
    match read_frame(&mut ctl_recv, &Limits::default()).await.unwrap() {
        Some(Frame::Token { session: 7, position: 1, .. }) => {}
        other => panic!("expected the token, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_naming_an_unannounced_next_hop_sends_nothing_there() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), StageConfig::default());
    let victim = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let hop = Hop { layers: LayerRange::new(1, 2), addr: victim.local_addr().unwrap(), fingerprint: [9; 32] };
    let conn = connect(&s).await;
    let (_s, _r, reply) =
        request(&conn, Frame::Open { session: 1, open: open(LayerRange::new(0, 1), vec![hop]) }).await;
    match reply {
        Some(Frame::Error { code: ErrorCode::BadRequest, message, .. }) => {
            assert!(message.contains("signed announcement"), "{message}")
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
    assert_eq!(s.active_sessions(), 0);
    let mut buf = [0u8; 2048];
    let got = tokio::time::timeout(Duration::from_millis(500), victim.recv_from(&mut buf)).await;
    assert!(got.is_err(), "the stage sent a packet to the address in the open: {got:?}");
}

/// Resident memory of this process, bytes (Linux `/proc/self/status`).
fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frames_that_cannot_start_a_session_cost_no_memory_for_their_payload() {
    let Some(before) = rss() else {
        eprintln!("skipped: no /proc/self/status on this system to read the resident memory from");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), StageConfig::default());
    let conn = connect(&s).await;
    // Four 64 MiB prefill frames as first frames (4,096 positions x 4,096 f32): each is refused on its header.
    let n = 4096usize;
    let mut header = Frame::Prefill { session: 1, position: 0, last: true, data: hidden(&[0.0; WIDTH]) }.encode();
    header[24..28].copy_from_slice(&(n as u32).to_le_bytes());
    header[28..32].copy_from_slice(&(n as u32).to_le_bytes());
    header[32..36].copy_from_slice(&((n * n * 4) as u32).to_le_bytes());
    // Each sender holds back the last payload byte: a stage that read payloads before checking the kind would hold
    // all four buffers until the streams end.
    let chunk = vec![0x11u8; 1 << 20];
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let (header, chunk) = (header[..36].to_vec(), chunk.clone());
        tasks.push(tokio::spawn(async move {
            let _ = send.write_all(&header).await;
            let writes = async {
                for i in 0..64 {
                    let part = if i == 63 { &chunk[1..] } else { &chunk[..] };
                    if send.write_all(part).await.is_err() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), writes).await;
            let reply = tokio::time::timeout(Duration::from_secs(2), read_frame(&mut recv, &Limits::default())).await;
            (reply, send, recv)
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap());
    }
    let grown = rss().unwrap().saturating_sub(before);
    eprintln!("resident memory grew by {} KiB with four refused 64 MiB first frames open", grown >> 10);
    // Before the budgets, each refused frame's payload was read into memory first (251 MiB for the four).
    assert!(grown < 48 << 20, "resident memory grew by {} MiB while the four streams were open", grown >> 20);
    for (reply, ..) in streams {
        match reply {
            Ok(Ok(Some(Frame::Error { code: ErrorCode::Malformed, .. }))) => {}
            other => panic!("expected Malformed at once, got {other:?}"),
        }
    }
    assert_eq!(s.active_sessions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), StageConfig { max_sessions: 4, ..StageConfig::default() });
    let greedy = connect(&s).await;
    let mut held = Vec::new();
    for id in 1..=3 {
        let (send, recv, reply) =
            request(&greedy, Frame::Open { session: id, open: open(LayerRange::new(0, 2), vec![]) }).await;
        assert_eq!(reply, Some(Frame::Opened { session: id }));
        held.push((send, recv));
    }
    // Its fourth session is refused though a slot is free, over a second connection just the same.
    let again = connect(&s).await;
    for conn in [&greedy, &again] {
        let (_s, _r, reply) =
            request(conn, Frame::Open { session: 4, open: open(LayerRange::new(0, 2), vec![]) }).await;
        assert_eq!(code(reply), ErrorCode::Busy);
    }
    // Another peer gets it.
    let other = connect_from(&s, "127.0.0.2").await;
    let (_s, _r, reply) = request(&other, Frame::Open { session: 5, open: open(LayerRange::new(0, 2), vec![]) }).await;
    assert_eq!(reply, Some(Frame::Opened { session: 5 }));
    assert_eq!(s.active_sessions(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_a_session_and_silence_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = StageConfig { idle_timeout: Duration::from_millis(600), ..StageConfig::default() };
    let s = server(dir.path(), config);
    let total = s.shard().kv_capacity_tokens();
    let conn = connect(&s).await;
    let (mut kept, mut kept_recv, reply) =
        request(&conn, Frame::Open { session: 1, open: open(LayerRange::new(0, 2), vec![]) }).await;
    assert_eq!(reply, Some(Frame::Opened { session: 1 }));
    let (_quiet, mut quiet_recv, reply) =
        request(&conn, Frame::Open { session: 2, open: open(LayerRange::new(0, 2), vec![]) }).await;
    assert_eq!(reply, Some(Frame::Opened { session: 2 }));
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        write_frame(&mut kept, &Frame::Ping { session: 1 }).await.unwrap();
    }
    // 1.5 s later: the quiet session was reaped and its cache freed; the pinged one still runs.
    assert_eq!(code(read_frame(&mut quiet_recv, &Limits::default()).await.unwrap()), ErrorCode::Timeout);
    assert_eq!(s.active_sessions(), 1);
    let prefill = Frame::Prefill { session: 1, position: 0, last: true, data: StageData::Tokens(vec![1, 2]) };
    write_frame(&mut kept, &prefill).await.unwrap();
    assert!(matches!(read_frame(&mut kept_recv, &Limits::default()).await.unwrap(), Some(Frame::Token { .. })));
    drop((kept, kept_recv));
    wait_until("every session reaped", || s.active_sessions() == 0).await;
    assert_eq!(s.shard().free_kv_tokens(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_hidden_states_are_blamed_on_the_previous_stage() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), StageConfig::default());
    let conn = connect(&s).await;
    let (_ctl, mut ctl_recv, reply) =
        request(&conn, Frame::Open { session: 3, open: open(LayerRange::new(1, 2), vec![]) }).await;
    assert_eq!(reply, Some(Frame::Opened { session: 3 }));
    let attach = Frame::Attach { session: 3, dtype: WireDType::F32, width: WIDTH as u32, key: KEY };
    let (mut data, _r, reply) = request(&conn, attach).await;
    assert_eq!(reply, Some(Frame::Opened { session: 3 }));
    let mut v = vec![0.1f32; WIDTH];
    v[5] = f32::NAN;
    write_frame(&mut data, &Frame::Decode { session: 3, position: 0, data: hidden(&v) }).await.unwrap();
    match read_frame(&mut ctl_recv, &Limits::default()).await.unwrap() {
        Some(Frame::Error { code: ErrorCode::Upstream, message, .. }) => {
            assert!(message.contains("non-finite"), "{message}")
        }
        other => panic!("expected an Upstream error instead of a token, got {other:?}"),
    }
    wait_until("session freed", || s.active_sessions() == 0).await;
}
