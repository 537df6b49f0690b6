//! Fuzzing the announcement decoder and verifier (issue 13): random bytes, and signed records with flipped bits and
//! cut tails. At least 10^5 cases per property in the normal test run (`SHARDLINE_FUZZ_CASES` raises it). Nothing
//! may panic; a changed record never verifies (whatever verifies is byte-for-byte the record that was signed); no
//! decoder allocates more than the bytes it was given, plus a small constant.

mod fuzz_common;

use std::sync::LazyLock;

use libp2p::identity::Keypair;
use proptest::prelude::*;
use shardline_proto::announcement::now_ms;
use shardline_proto::wire::WireDType;
use shardline_proto::{LayerRange, ShardAnnouncement, SignedAnnouncement};

#[global_allocator]
static ALLOC: fuzz_common::PeakAlloc = fuzz_common::PeakAlloc;

/// Allocation slack of a decode beyond its input: the parsed key, the peer id and error messages.
const SLACK: usize = 4096;

/// A few fixed keys: generating one per case would cost more than the decoding under test.
static KEYS: LazyLock<Vec<Keypair>> = LazyLock::new(|| (0..4).map(|_| Keypair::generate_ed25519()).collect());

/// A valid announcement by `key` with fields taken from the other arguments.
fn announcement(key: &Keypair, start: u32, len: u32, n: u64, version: &str) -> ShardAnnouncement {
    let n_layers = 30;
    let start = start % n_layers;
    let end = (start + 1 + len % (n_layers - start)).min(n_layers);
    let now = now_ms();
    ShardAnnouncement {
        peer_id: key.public().to_peer_id(),
        model_id: format!("{n:032x}"),
        n_layers,
        hidden: 576,
        layers: LayerRange::new(start as usize, end as usize),
        has_embeddings: start == 0,
        has_head: end == n_layers,
        quic_addr: std::net::SocketAddr::from(([127, 0, 0, 1], (n % 60_000) as u16 + 1)),
        cert_fingerprint: [(n % 251) as u8; 32],
        wire_dtype: [WireDType::F32, WireDType::F16, WireDType::BF16][(n % 3) as usize],
        max_sessions: (n % 64) as u32 + 1,
        free_kv_tokens: n,
        decode_tps: (n % 1000) as f32,
        prefill_tps: (n % 5000) as f32,
        active_sessions: (n % 8) as u32,
        batch_sessions: (n % 5) as u32,
        queued: (n % 7) as u32,
        software_version: version.to_string(),
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
    }
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

proptest! {
    #![proptest_config(fuzz_common::config())]

    #[test]
    fn random_records_never_verify(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let (result, peak) = fuzz_common::largest_allocation(|| SignedAnnouncement::verify(&bytes, now_ms()));
        prop_assert!(peak <= bytes.len() + SLACK, "verifying {} bytes allocated {peak} at once", bytes.len());
        prop_assert!(result.is_err(), "random bytes verified as an announcement");
    }

    #[test]
    fn random_canonical_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (result, peak) = fuzz_common::largest_allocation(|| ShardAnnouncement::from_canonical(&bytes));
        prop_assert!(peak <= bytes.len() + SLACK, "parsing {} bytes allocated {peak} at once", bytes.len());
        if let Ok(a) = result {
            let again = a.canonical_bytes();
            prop_assert_eq!(ShardAnnouncement::from_canonical(&again).map_err(fail)?.canonical_bytes(), again);
        }
    }

    #[test]
    fn changed_records_never_verify(
        key in 0usize..4,
        start in any::<u32>(),
        len in any::<u32>(),
        n in any::<u64>(),
        version in "[a-z0-9.]{0,12}",
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..4),
        keep in proptest::option::of(0usize..400),
    ) {
        let key = &KEYS[key];
        let record = announcement(key, start, len, n, &version).sign(key).map_err(fail)?.to_bytes();
        let verified = SignedAnnouncement::verify(&record, now_ms()).map_err(fail)?;
        prop_assert_eq!(verified.to_bytes(), record.clone(), "a valid record does not round-trip");

        let changed = fuzz_common::mutate(record.clone(), &flips, keep);
        let (result, peak) = fuzz_common::largest_allocation(|| SignedAnnouncement::verify(&changed, now_ms()));
        prop_assert!(peak <= changed.len() + SLACK, "verifying {} bytes allocated {peak} at once", changed.len());
        if result.is_ok() {
            // Only flips that cancel each other leave a record that verifies.
            prop_assert_eq!(changed, record, "a changed record verified");
        }
        // The canonical part alone, changed the same way, parses or fails cleanly.
        let canonical = fuzz_common::mutate(verified.announcement.canonical_bytes(), &flips, keep);
        if let Ok(a) = ShardAnnouncement::from_canonical(&canonical) {
            let _ = a.check_structure();
        }
    }
}
