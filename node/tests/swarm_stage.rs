//! The stage server on its own, driven by a raw QUIC client speaking the wire protocol: a malformed or oversized
//! frame ends only its own stream and session, other sessions carry on; the KV cache is freed on close, on stream
//! reset and after the idle timeout; bad opens are refused with typed errors.

mod stage_fixture;

use std::time::Duration;

use stage_fixture::{connect, open_with, server};

use shardline_node::model::LayerRange;
use shardline_node::stage::StageConfig;
use shardline_proto::wire::{
    ErrorCode, Frame, HEADER_LEN, Limits, SessionKey, StageData, WireDType, read_frame, write_frame,
};

fn open(session: u64) -> Frame {
    let mut open = open_with(LayerRange::new(0, 2), vec![], SessionKey::default());
    open.n_top = 3;
    Frame::Open { session, open }
}

async fn open_session(conn: &quinn::Connection, session: u64) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &open(session)).await.unwrap();
    let reply = read_frame(&mut recv, &Limits::default()).await.unwrap();
    assert_eq!(reply, Some(Frame::Opened { session }));
    (send, recv)
}

async fn token(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, frame: Frame) -> u32 {
    write_frame(send, &frame).await.unwrap();
    match read_frame(recv, &Limits::default()).await.unwrap() {
        Some(Frame::Token { result, .. }) => {
            assert_eq!(result.top.len(), 3);
            result.token
        }
        other => panic!("expected a token, got {other:?}"),
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_end_only_their_own_stream() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), StageConfig::default());
    let conn = connect(&s).await;
    let (mut a_send, mut a_recv) = open_session(&conn, 1).await;
    let prefill = Frame::Prefill { session: 1, position: 0, last: true, data: StageData::Tokens(vec![5, 6, 7]) };
    token(&mut a_send, &mut a_recv, prefill).await;

    // Garbage on a new stream: an error frame, then the stream ends.
    let (mut g_send, mut g_recv) = conn.open_bi().await.unwrap();
    g_send.write_all(&[0xAB; HEADER_LEN]).await.unwrap();
    match read_frame(&mut g_recv, &Limits::default()).await.unwrap() {
        Some(Frame::Error { code: ErrorCode::Malformed, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(read_frame(&mut g_recv, &Limits::default()).await.unwrap(), None);

    // A second session sends an oversized prefill header: it is ended and its KV cache freed.
    let (mut b_send, mut b_recv) = open_session(&conn, 2).await;
    assert_eq!(s.active_sessions(), 2);
    let mut bad = Frame::Prefill { session: 2, position: 0, last: true, data: StageData::Tokens(vec![1]) }.encode();
    bad[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    b_send.write_all(&bad[..HEADER_LEN]).await.unwrap();
    match read_frame(&mut b_recv, &Limits::default()).await.unwrap() {
        Some(Frame::Error { code: ErrorCode::Malformed, session: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    wait_until("session 2 freed", || s.active_sessions() == 1).await;

    // A position that does not follow the session's history is refused too (session 3).
    let (mut c_send, mut c_recv) = open_session(&conn, 3).await;
    let gap = Frame::Prefill { session: 3, position: 5, last: true, data: StageData::Tokens(vec![1]) };
    write_frame(&mut c_send, &gap).await.unwrap();
    assert!(matches!(
        read_frame(&mut c_recv, &Limits::default()).await.unwrap(),
        Some(Frame::Error { code: ErrorCode::BadRequest, .. })
    ));

    // Session 1 never noticed.
    let decode = Frame::Decode { session: 1, position: 3, data: StageData::Tokens(vec![9]) };
    token(&mut a_send, &mut a_recv, decode).await;
    write_frame(&mut a_send, &Frame::Close { session: 1 }).await.unwrap();
    wait_until("every session freed", || s.active_sessions() == 0).await;
    assert_eq!(s.shard().free_kv_tokens(), s.shard().kv_capacity_tokens());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_cache_is_freed_on_reset_and_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = StageConfig { idle_timeout: Duration::from_millis(400), ..StageConfig::default() };
    let s = server(dir.path(), config);
    let total = s.shard().kv_capacity_tokens();
    let conn = connect(&s).await;

    // Reset by the owner.
    let (mut send, _recv) = open_session(&conn, 10).await;
    assert!(s.shard().free_kv_tokens() < total);
    send.reset(7u32.into()).unwrap();
    wait_until("reset session freed", || s.active_sessions() == 0).await;
    assert_eq!(s.shard().free_kv_tokens(), total);

    // Owner goes silent: the stage times the session out and says so.
    let (_send, mut recv) = open_session(&conn, 11).await;
    match read_frame(&mut recv, &Limits::default()).await.unwrap() {
        Some(Frame::Error { code: ErrorCode::Timeout, session: 11, .. }) => {}
        other => panic!("{other:?}"),
    }
    wait_until("idle session freed", || s.active_sessions() == 0).await;
    assert_eq!(s.shard().free_kv_tokens(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_opens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), StageConfig { max_sessions: 1, ..StageConfig::default() });
    let conn = connect(&s).await;
    let refused = |f: Frame| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            write_frame(&mut send, &f).await.unwrap();
            match read_frame(&mut recv, &Limits::default()).await.unwrap() {
                Some(Frame::Error { code, .. }) => code,
                other => panic!("{other:?}"),
            }
        }
    };
    let Frame::Open { open: base, .. } = open(0) else { unreachable!() };
    let mut other_model = base.clone();
    other_model.model_id = "another-model".into();
    assert_eq!(refused(Frame::Open { session: 20, open: other_model }).await, ErrorCode::BadRequest);
    let mut too_long = base.clone();
    too_long.max_tokens = 1_000_000;
    assert_eq!(refused(Frame::Open { session: 21, open: too_long }).await, ErrorCode::BadRequest);
    assert_eq!(
        refused(Frame::Attach { session: 99, dtype: WireDType::F32, width: 64, key: SessionKey::default() }).await,
        ErrorCode::UnknownSession
    );
    // Capacity: one session at a time.
    let (_keep, _r) = open_session(&conn, 22).await;
    assert_eq!(refused(open(23)).await, ErrorCode::Busy);
}
