//! `ShardAnnouncement`: what a node tells the swarm about itself, signed with its libp2p ed25519 key.
//!
//! The signature covers canonical bytes (a fixed field order, little-endian, with a domain tag), so any verifier
//! recomputes exactly what was signed. The record stored in the DHT carries the signer's public key; a verifier checks
//! that the key hashes to the peer id inside the announcement and that the signature holds, then checks expiry and that
//! the layer range is inside the model.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};

use crate::span::LayerRange;
use crate::wire::buf::{Reader, Writer};
use crate::wire::frame::{decode_addr, encode_addr};
use crate::wire::{Fingerprint, WireDType, WireError};

/// Domain tag at the start of the signed bytes, so the signature cannot be replayed as any other message.
const DOMAIN: &[u8] = b"shardline/announcement/1";
/// Magic of a DHT record value holding a signed announcement.
const RECORD_MAGIC: &[u8; 4] = b"SLA1";
/// Longest lifetime a verifier accepts: a record claiming more is refused (announcements are meant to be short-lived).
pub const MAX_TTL: Duration = Duration::from_secs(600);
/// Clock skew tolerated between the signer and the verifier.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch, the time unit of announcements.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("malformed announcement: {0}")]
    Malformed(#[from] WireError),
    #[error("announcement signature does not verify")]
    BadSignature,
    #[error("announcement key belongs to {key_peer}, not to the announced peer {announced}")]
    KeyMismatch { announced: String, key_peer: String },
    #[error("announcement key is not ed25519")]
    NotEd25519,
    #[error("announcement expired {ago_ms} ms ago")]
    Expired { ago_ms: u64 },
    #[error("announcement issued {ahead_ms} ms in the future")]
    IssuedInFuture { ahead_ms: u64 },
    #[error("announcement lifetime {ttl_ms} ms is outside 1..={max_ms} ms")]
    BadLifetime { ttl_ms: i128, max_ms: u64 },
    #[error("announced layers {layers} are not inside the model's 0..{n_layers}")]
    LayerRange { layers: LayerRange, n_layers: u32 },
    #[error("announcement is inconsistent: {0}")]
    Inconsistent(String),
    #[error("cannot sign the announcement: {0}")]
    Signing(String),
}

/// A node's offer to the swarm: which layers of which model it serves, where, and how much it can take.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardAnnouncement {
    pub peer_id: PeerId,
    /// Digest of the model's architecture and tensor table (see `model::id`), hex.
    pub model_id: String,
    /// Blocks in the whole model (`N`).
    pub n_layers: u32,
    /// Width of the hidden state, so a route never mixes models of different shapes.
    pub hidden: u32,
    pub layers: LayerRange,
    pub has_embeddings: bool,
    pub has_head: bool,
    /// Where the QUIC stage server listens.
    pub quic_addr: SocketAddr,
    /// SHA-256 of the stage server's DER certificate: clients accept exactly this certificate.
    pub cert_fingerprint: Fingerprint,
    /// Hidden-state dtype the node prefers on the wire.
    pub wire_dtype: WireDType,
    /// Sessions the node admits at once.
    pub max_sessions: u32,
    /// Free KV-cache capacity, in tokens (positions).
    pub free_kv_tokens: u64,
    /// Measured decode speed through the whole shard, tokens per second (one position per step).
    pub decode_tps: f32,
    /// Measured prefill speed through the whole shard, tokens per second.
    pub prefill_tps: f32,
    /// Sessions open at issue time.
    pub active_sessions: u32,
    /// Sessions in the stage's last compute batch at issue time (continuous batching).
    pub batch_sessions: u32,
    /// Input chunks waiting in the stage's session queues at issue time, plus opens waiting for KV cache.
    pub queued: u32,
    pub software_version: String,
    /// Issue and expiry times, Unix milliseconds.
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

impl ShardAnnouncement {
    /// A plausible announcement by `peer_id` of `layers` of the `n_layers`-layer model `model_id` (hidden width 576,
    /// 4 session slots, 4,096 KV tokens, 100 decode tokens/s, a QUIC address on loopback), issued now and valid for
    /// 60 s: for tests and examples, which set what matters to them with struct update syntax.
    pub fn example(peer_id: PeerId, model_id: &str, layers: LayerRange, n_layers: u32) -> Self {
        let now = now_ms();
        ShardAnnouncement {
            peer_id,
            model_id: model_id.into(),
            n_layers,
            hidden: 576,
            layers,
            has_embeddings: layers.start == 0,
            has_head: layers.end == n_layers as usize,
            quic_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 4500)),
            cert_fingerprint: [7; 32],
            wire_dtype: WireDType::F32,
            max_sessions: 4,
            free_kv_tokens: 4096,
            decode_tps: 100.0,
            prefill_tps: 1000.0,
            active_sessions: 0,
            batch_sessions: 0,
            queued: 0,
            software_version: env!("CARGO_PKG_VERSION").into(),
            issued_at_ms: now,
            expires_at_ms: now + 60_000,
        }
    }

    /// The exact bytes that are signed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(DOMAIN)
            .bytes16(&self.peer_id.to_bytes())
            .str16(&self.model_id)
            .u32(self.n_layers)
            .u32(self.hidden)
            .u32(self.layers.start as u32)
            .u32(self.layers.end as u32)
            .u8(self.has_embeddings as u8)
            .u8(self.has_head as u8);
        encode_addr(&mut w, &self.quic_addr);
        w.bytes(&self.cert_fingerprint)
            .u8(self.wire_dtype.payload() as u8)
            .u32(self.max_sessions)
            .u64(self.free_kv_tokens)
            .f32(self.decode_tps)
            .f32(self.prefill_tps)
            .u32(self.active_sessions)
            .u32(self.batch_sessions)
            .u32(self.queued)
            .str16(&self.software_version)
            .u64(self.issued_at_ms)
            .u64(self.expires_at_ms);
        w.finish()
    }

    /// Parses canonical bytes (structure only; no signature or policy check).
    pub fn from_canonical(bytes: &[u8]) -> Result<Self, AnnounceError> {
        let mut r = Reader::new(bytes, "announcement");
        if r.take(DOMAIN.len())? != DOMAIN {
            return Err(AnnounceError::Inconsistent("unknown announcement domain tag".into()));
        }
        let peer_id = PeerId::from_bytes(r.bytes16()?)
            .map_err(|e| AnnounceError::Inconsistent(format!("peer id does not parse: {e}")))?;
        let model_id = r.str16()?;
        let n_layers = r.u32()?;
        let hidden = r.u32()?;
        let layers = LayerRange::new(r.u32()? as usize, r.u32()? as usize);
        let flag = |v: u8, what: &str| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(AnnounceError::Inconsistent(format!("{what} flag is {v}"))),
        };
        let has_embeddings = flag(r.u8()?, "embeddings")?;
        let has_head = flag(r.u8()?, "head")?;
        let quic_addr = decode_addr(&mut r)?;
        let cert_fingerprint = r.array::<32>()?;
        let wire_dtype = WireDType::from_payload(crate::wire::PayloadDType::from_code(r.u8()?)?, "announcement")?;
        let a = ShardAnnouncement {
            peer_id,
            model_id,
            n_layers,
            hidden,
            layers,
            has_embeddings,
            has_head,
            quic_addr,
            cert_fingerprint,
            wire_dtype,
            max_sessions: r.u32()?,
            free_kv_tokens: r.u64()?,
            decode_tps: r.f32()?,
            prefill_tps: r.f32()?,
            active_sessions: r.u32()?,
            batch_sessions: r.u32()?,
            queued: r.u32()?,
            software_version: r.str16()?,
            issued_at_ms: r.u64()?,
            expires_at_ms: r.u64()?,
        };
        r.finish()?;
        Ok(a)
    }

    /// Checks what can be checked without a clock or a key: layer range inside the model, end flags matching it, a
    /// sane lifetime and finite throughput figures.
    pub fn check_structure(&self) -> Result<(), AnnounceError> {
        let n = self.n_layers as usize;
        if self.layers.start >= self.layers.end || self.layers.end > n {
            return Err(AnnounceError::LayerRange { layers: self.layers, n_layers: self.n_layers });
        }
        if self.has_embeddings != (self.layers.start == 0) || self.has_head != (self.layers.end == n) {
            return Err(AnnounceError::Inconsistent(format!(
                "layers {} of {n} with embeddings={} head={}",
                self.layers, self.has_embeddings, self.has_head
            )));
        }
        if self.model_id.is_empty() || self.hidden == 0 {
            return Err(AnnounceError::Inconsistent("empty model id or zero hidden width".into()));
        }
        let ttl = self.expires_at_ms as i128 - self.issued_at_ms as i128;
        if ttl <= 0 || ttl > MAX_TTL.as_millis() as i128 {
            return Err(AnnounceError::BadLifetime { ttl_ms: ttl, max_ms: MAX_TTL.as_millis() as u64 });
        }
        if !(self.decode_tps.is_finite()
            && self.decode_tps >= 0.0
            && self.prefill_tps.is_finite()
            && self.prefill_tps >= 0.0)
        {
            return Err(AnnounceError::Inconsistent("throughput must be finite and non-negative".into()));
        }
        Ok(())
    }

    /// Checks issue and expiry times against `now_ms` (Unix milliseconds).
    pub fn check_time(&self, now_ms: u64) -> Result<(), AnnounceError> {
        if self.expires_at_ms <= now_ms {
            return Err(AnnounceError::Expired { ago_ms: now_ms - self.expires_at_ms });
        }
        let skew = MAX_CLOCK_SKEW.as_millis() as u64;
        if self.issued_at_ms > now_ms.saturating_add(skew) {
            return Err(AnnounceError::IssuedInFuture { ahead_ms: self.issued_at_ms - now_ms });
        }
        Ok(())
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms <= now_ms
    }

    /// Signs the canonical bytes with `key`, which must be the ed25519 key of `self.peer_id`.
    pub fn sign(self, key: &Keypair) -> Result<SignedAnnouncement, AnnounceError> {
        let public = key.public();
        if public.clone().try_into_ed25519().is_err() {
            return Err(AnnounceError::NotEd25519);
        }
        let key_peer = public.to_peer_id();
        if key_peer != self.peer_id {
            return Err(AnnounceError::KeyMismatch {
                announced: self.peer_id.to_string(),
                key_peer: key_peer.to_string(),
            });
        }
        let canonical = self.canonical_bytes();
        let signature = key.sign(&canonical).map_err(|e| AnnounceError::Signing(e.to_string()))?;
        Ok(SignedAnnouncement { announcement: self, public_key: public, canonical, signature })
    }
}

/// An announcement with the key and signature that vouch for it: the value of a node's DHT record.
#[derive(Clone, Debug)]
pub struct SignedAnnouncement {
    pub announcement: ShardAnnouncement,
    public_key: PublicKey,
    canonical: Vec<u8>,
    signature: Vec<u8>,
}

impl SignedAnnouncement {
    /// Record value layout: `"SLA1" | u16 len | protobuf public key | u32 len | canonical bytes | u16 len | signature`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let key = self.public_key.encode_protobuf();
        let mut w = Writer::new();
        w.bytes(RECORD_MAGIC)
            .bytes16(&key)
            .u32(self.canonical.len() as u32)
            .bytes(&self.canonical)
            .bytes16(&self.signature);
        w.finish()
    }

    /// Parses a record value and verifies it completely: ed25519 key, key ↔ peer id, signature, structure, and time
    /// against `now_ms`. Nothing that fails any of these is returned.
    pub fn verify(bytes: &[u8], now_ms: u64) -> Result<SignedAnnouncement, AnnounceError> {
        let signed = Self::verify_signature(bytes)?;
        signed.announcement.check_structure()?;
        signed.announcement.check_time(now_ms)?;
        Ok(signed)
    }

    /// Parses a record value and checks only the key and the signature (for tests of the later checks).
    pub fn verify_signature(bytes: &[u8]) -> Result<SignedAnnouncement, AnnounceError> {
        let mut r = Reader::new(bytes, "announcement record");
        if r.take(4)? != RECORD_MAGIC {
            return Err(AnnounceError::Inconsistent("record is not a shardline announcement".into()));
        }
        let key = PublicKey::try_decode_protobuf(r.bytes16()?).map_err(|_| AnnounceError::NotEd25519)?;
        if key.clone().try_into_ed25519().is_err() {
            return Err(AnnounceError::NotEd25519);
        }
        let len = r.u32()? as usize;
        let canonical = r.take(len)?.to_vec();
        let signature = r.bytes16()?.to_vec();
        r.finish()?;
        let announcement = ShardAnnouncement::from_canonical(&canonical)?;
        let key_peer = key.to_peer_id();
        if key_peer != announcement.peer_id {
            return Err(AnnounceError::KeyMismatch {
                announced: announcement.peer_id.to_string(),
                key_peer: key_peer.to_string(),
            });
        }
        if !key.verify(&canonical, &signature) {
            return Err(AnnounceError::BadSignature);
        }
        Ok(SignedAnnouncement { announcement, public_key: key, canonical, signature })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(key: &Keypair, layers: LayerRange, n_layers: u32) -> ShardAnnouncement {
        let peer = key.public().to_peer_id();
        ShardAnnouncement {
            decode_tps: 120.5,
            active_sessions: 1,
            batch_sessions: 1,
            ..ShardAnnouncement::example(peer, &"ab".repeat(16), layers, n_layers)
        }
    }

    #[test]
    fn signed_record_round_trips_and_verifies() {
        let key = Keypair::generate_ed25519();
        let a = sample(&key, LayerRange::new(10, 20), 30);
        let bytes = a.clone().sign(&key).unwrap().to_bytes();
        let back = SignedAnnouncement::verify(&bytes, now_ms()).unwrap();
        assert_eq!(back.announcement, a);
        assert_eq!(ShardAnnouncement::from_canonical(&a.canonical_bytes()).unwrap(), a);
    }

    #[test]
    fn tampering_with_any_signed_byte_is_detected() {
        let key = Keypair::generate_ed25519();
        let bytes = sample(&key, LayerRange::new(0, 10), 30).sign(&key).unwrap().to_bytes();
        // Flip each byte of the record in turn: nothing but an error may come back.
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(SignedAnnouncement::verify(&t, now_ms()).is_err(), "flip at byte {i} accepted");
        }
        for cut in 0..bytes.len() {
            assert!(SignedAnnouncement::verify(&bytes[..cut], now_ms()).is_err(), "truncation at {cut} accepted");
        }
    }

    #[test]
    fn forged_key_and_policy_violations_are_rejected() {
        let key = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        // Signing another peer's announcement fails locally...
        assert!(matches!(
            sample(&other, LayerRange::new(0, 10), 30).sign(&key),
            Err(AnnounceError::KeyMismatch { .. })
        ));
        // ...and an out-of-range layer range is refused by verification even with a valid signature.
        let mut a = sample(&key, LayerRange::new(20, 40), 30);
        a.has_head = false;
        let bytes = a.sign(&key).unwrap().to_bytes();
        assert!(matches!(SignedAnnouncement::verify(&bytes, now_ms()), Err(AnnounceError::LayerRange { .. })));
        // Expired.
        let mut a = sample(&key, LayerRange::new(0, 30), 30);
        a.issued_at_ms -= 120_000;
        a.expires_at_ms -= 120_000;
        let bytes = a.sign(&key).unwrap().to_bytes();
        assert!(matches!(SignedAnnouncement::verify(&bytes, now_ms()), Err(AnnounceError::Expired { .. })));
        // A lifetime beyond the maximum.
        let mut a = sample(&key, LayerRange::new(0, 30), 30);
        a.expires_at_ms = a.issued_at_ms + MAX_TTL.as_millis() as u64 + 1;
        let bytes = a.sign(&key).unwrap().to_bytes();
        assert!(matches!(SignedAnnouncement::verify(&bytes, now_ms()), Err(AnnounceError::BadLifetime { .. })));
        // Head flag that does not match the range.
        let mut a = sample(&key, LayerRange::new(0, 10), 30);
        a.has_head = true;
        let bytes = a.sign(&key).unwrap().to_bytes();
        assert!(matches!(SignedAnnouncement::verify(&bytes, now_ms()), Err(AnnounceError::Inconsistent(_))));
    }

    #[test]
    fn a_record_signed_by_another_key_is_rejected() {
        let victim = Keypair::generate_ed25519();
        let forger = Keypair::generate_ed25519();
        let a = sample(&victim, LayerRange::new(0, 10), 30);
        // The forger signs the victim's canonical bytes with its own key and ships its own public key.
        let canonical = a.canonical_bytes();
        let sig = forger.sign(&canonical).unwrap();
        let mut w = Writer::new();
        w.bytes(RECORD_MAGIC)
            .bytes16(&forger.public().encode_protobuf())
            .u32(canonical.len() as u32)
            .bytes(&canonical)
            .bytes16(&sig);
        assert!(matches!(SignedAnnouncement::verify(&w.finish(), now_ms()), Err(AnnounceError::KeyMismatch { .. })));
        // Shipping the victim's key with the forger's signature fails the signature check.
        let mut w = Writer::new();
        w.bytes(RECORD_MAGIC)
            .bytes16(&victim.public().encode_protobuf())
            .u32(canonical.len() as u32)
            .bytes(&canonical)
            .bytes16(&sig);
        assert!(matches!(SignedAnnouncement::verify(&w.finish(), now_ms()), Err(AnnounceError::BadSignature)));
    }
}
