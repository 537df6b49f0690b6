//! Fuzzing the stage wire decoder (issue 13): random bytes, and valid frames of every kind with flipped bits and
//! cut tails, through both the buffer decoder and the async stream reader. At least 10^5 cases per property in the
//! normal test run (`SHARDLINE_FUZZ_CASES` raises it; `docs/RELIABILITY.md` has the long run). Nothing may panic,
//! whatever parses must re-encode to the same bytes it decodes from again, and no decoder may allocate more than
//! the bytes it was given or a bound it checked first.

mod fuzz_common;

use proptest::prelude::*;
use shardline_proto::LayerRange;
use shardline_proto::wire::{
    ErrorCode, Frame, HEADER_LEN, HiddenStates, Hop, Limits, SessionKey, SessionOpen, StageData, TokenResult,
    WireDType, WireSampling, read_frame,
};

#[global_allocator]
static ALLOC: fuzz_common::PeakAlloc = fuzz_common::PeakAlloc;

/// Allocation slack of a decode beyond the bytes it was given: the frame's own small structures and error message,
/// and the hop list of an `Open`, reserved up to the checked `max_hops` before the hops are read.
fn slack(limits: &Limits) -> usize {
    4096 + limits.max_hops * std::mem::size_of::<Hop>()
}

const DTYPES: [WireDType; 3] = [WireDType::F32, WireDType::F16, WireDType::BF16];

/// A valid frame of kind `kind % 11` (the eight kinds, with token and hidden-state variants of every dtype), its sizes
/// and contents taken from the other arguments.
fn frame(kind: u8, session: u64, position: u64, n: usize, bytes: &[u8]) -> Frame {
    // At least one token: a prefill chunk is never empty.
    let tokens = || {
        StageData::Tokens(
            bytes.chunks(4).chain([&[7u8][..]]).map(|c| c.iter().fold(0u32, |a, &b| a << 8 | b as u32)).collect(),
        )
    };
    let hidden = |dtype: WireDType, rows: usize| {
        let width = 1 + n % 16;
        let data: Vec<u8> =
            (0..rows * width * dtype.size()).map(|i| bytes.get(i % bytes.len().max(1)).copied().unwrap_or(0)).collect();
        StageData::Hidden(HiddenStates::from_bytes(dtype, rows, width, &data).expect("sizes agree"))
    };
    match kind % 11 {
        0 => Frame::Open {
            session,
            open: SessionOpen {
                model_id: hex_of(bytes),
                n_layers: 30,
                span: LayerRange::new(n % 10, 10),
                max_tokens: position as u32,
                sampling: WireSampling { temperature: 0.5, top_k: n as u32, top_p: 0.9, seed: position },
                n_top: (n % 8) as u8,
                wire_dtype: DTYPES[n % 3],
                hidden: 1 + (n % 1024) as u32,
                // The rest of the route tiles layers 10..30 in `1 + n % 4` hops.
                rest: {
                    let hops = 1 + n % 4;
                    (0..hops)
                        .map(|i| Hop {
                            layers: LayerRange::new(10 + 20 * i / hops, 10 + 20 * (i + 1) / hops),
                            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)),
                            fingerprint: [i as u8; 32],
                        })
                        .collect()
                },
                attach_key: SessionKey([n as u8; 16]),
                next_key: SessionKey([kind; 16]),
                next_record: bytes.iter().take(64).copied().collect(),
            },
        },
        1 => Frame::Opened { session },
        2 => Frame::Attach { session, dtype: DTYPES[n % 3], width: 1 + n as u32, key: SessionKey([n as u8; 16]) },
        3 => Frame::Prefill { session, position, last: n.is_multiple_of(2), data: tokens() },
        4 => Frame::Prefill { session, position, last: n % 2 == 1, data: hidden(DTYPES[n % 3], 1 + bytes.len() % 4) },
        5 => Frame::Decode { session, position, data: StageData::Tokens(vec![n as u32]) },
        6 => Frame::Decode { session, position, data: hidden(DTYPES[n % 3], 1) },
        7 => Frame::Token {
            session,
            position,
            result: TokenResult {
                token: n as u32,
                logprob: -(n as f32) / 7.0,
                top: (0..n % 6).map(|i| (i as u32, -(i as f32))).collect(),
            },
        },
        8 => Frame::Close { session },
        10 => Frame::Ping { session },
        9 => Frame::Error { session, code: ErrorCode::from_code(n as u16 % 10), message: hex_of(bytes) },
        _ => Frame::Prefill { session, position, last: true, data: StageData::Tokens(vec![n as u32]) },
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().take(24).map(|b| format!("{b:02x}")).collect()
}

/// Decodes `bytes` with the buffer decoder, checking the properties every input must keep.
fn check_decode(bytes: &[u8], limits: &Limits) -> Result<(), TestCaseError> {
    let (result, peak) = fuzz_common::largest_allocation(|| Frame::decode(bytes, limits));
    prop_assert!(peak <= bytes.len() + slack(limits), "decoding {} bytes allocated {peak} at once", bytes.len());
    if let Ok((frame, used)) = result {
        prop_assert!(used <= bytes.len() && used >= HEADER_LEN);
        let again = frame.encode();
        let (reparsed, used_again) = Frame::decode(&again, limits).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(used_again, again.len());
        prop_assert_eq!(reparsed.encode(), again, "re-encoding is not stable");
    }
    Ok(())
}

/// Reads `bytes` as a stream with the async reader: no panic, and no allocation beyond the payload bound the header
/// was checked against.
fn check_stream(rt: &tokio::runtime::Runtime, bytes: &[u8], limits: &Limits) -> Result<(), TestCaseError> {
    let (_, peak) = fuzz_common::largest_allocation(|| {
        rt.block_on(async {
            let mut reader = bytes;
            while let Ok(Some(_)) = read_frame(&mut reader, limits).await {}
        })
    });
    let bound = limits.max_payload.max(limits.max_control_payload) + slack(limits);
    prop_assert!(peak <= bound, "stream reader allocated {peak} bytes at once (bound {bound})");
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime")
}

proptest! {
    #![proptest_config(fuzz_common::config())]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_decode(&bytes, &Limits::default())?;
    }

    #[test]
    fn mutated_frames_never_panic(
        kind in any::<u8>(),
        session in any::<u64>(),
        position in any::<u64>(),
        n in 0usize..64,
        content in proptest::collection::vec(any::<u8>(), 0..48),
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..6),
        keep in proptest::option::of(0usize..200),
    ) {
        let valid = frame(kind, session, position, n, &content).encode();
        let (parsed, _) = Frame::decode(&valid, &Limits::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.encode(), valid.clone(), "a valid frame does not round-trip");
        check_decode(&fuzz_common::mutate(valid, &flips, keep), &Limits::default())?;
    }

    /// A header whose every field is arbitrary (payload lengths up to 4 GiB) followed by a short payload: the stream
    /// reader must refuse or stop at the end of input without allocating what the header merely claims.
    #[test]
    fn arbitrary_headers_on_a_stream(
        header in proptest::array::uniform32(any::<u8>()),
        tail in proptest::array::uniform4(any::<u8>()),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        magic_ok in any::<bool>(),
    ) {
        let mut bytes: Vec<u8> = header.iter().chain(tail.iter()).copied().collect();
        if magic_ok {
            // Keep a valid magic and version so the later fields are reached.
            let valid = Frame::Close { session: 1 }.encode();
            bytes[..4].copy_from_slice(&valid[..4]);
        }
        bytes.extend_from_slice(&body);
        let rt = runtime();
        check_stream(&rt, &bytes, &Limits::default())?;
        check_decode(&bytes, &Limits::default())?;
    }
}
