//! Per-peer quotas: how many sessions and KV-cache positions one peer may hold, so that a single client cannot take
//! every slot or the whole cache (`docs/SECURITY.md`, *Stage*). Like [`Slot`](super::Slot), a [`PeerLease`] is owned
//! by its session's map entry and gives its share back when dropped.
//!
//! A peer is the source IP address of its QUIC connection (an IPv6 address counts by its /64 prefix, the block one
//! host usually holds). QUIC validates the source address during the handshake, so a peer cannot spoof another's;
//! owners present no certificate, and a fresh key costs nothing, so a key would be no identity to count by.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Who opened a stream, as quotas count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer(u128);

impl Peer {
    /// Streams that do not come over a network (the in-process driver, tests).
    pub const LOCAL: Peer = Peer(0);

    pub fn of_ip(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Peer(u32::from(v4) as u128 | 1 << 64),
            IpAddr::V6(v6) => Peer(u128::from(v6) & !((1u128 << 64) - 1)),
        }
    }

    /// A distinct peer per number (tests).
    pub fn numbered(n: u64) -> Self {
        Peer(n as u128 | 2 << 64)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Held {
    sessions: usize,
    kv_tokens: usize,
}

/// What every peer holds now, against per-peer maxima.
#[derive(Clone, Debug)]
pub struct PeerQuotas {
    held: Arc<Mutex<HashMap<Peer, Held>>>,
    max_sessions: usize,
    max_kv_tokens: usize,
}

impl PeerQuotas {
    pub fn new(max_sessions: usize, max_kv_tokens: usize) -> Self {
        Self { held: Arc::default(), max_sessions, max_kv_tokens }
    }

    /// A lease on one session of `kv_tokens` positions for `peer`, or why not (for a `Busy` answer).
    pub fn try_take(&self, peer: Peer, kv_tokens: usize) -> Result<PeerLease, String> {
        let mut held = lock(&self.held);
        let h = held.entry(peer).or_default();
        if h.sessions >= self.max_sessions {
            return Err(format!("this peer holds {} sessions, the most one peer may hold here", h.sessions));
        }
        if h.kv_tokens.saturating_add(kv_tokens) > self.max_kv_tokens {
            return Err(format!(
                "this peer holds {} KV positions; {kv_tokens} more exceed the {} one peer may hold here",
                h.kv_tokens, self.max_kv_tokens
            ));
        }
        h.sessions += 1;
        h.kv_tokens += kv_tokens;
        Ok(PeerLease { held: self.held.clone(), peer, kv_tokens })
    }

    /// Sessions `peer` holds now.
    pub fn sessions_of(&self, peer: Peer) -> usize {
        lock(&self.held).get(&peer).map_or(0, |h| h.sessions)
    }
}

/// The one place the quota table is locked: a panic while holding it cannot leave the counts half-updated (every
/// update is a pair of additions done before any call that could panic), so a poisoned lock is taken as is.
fn lock(m: &Mutex<HashMap<Peer, Held>>) -> MutexGuard<'_, HashMap<Peer, Held>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One session's share of its peer's quota; dropping it gives the share back.
#[derive(Debug)]
pub struct PeerLease {
    held: Arc<Mutex<HashMap<Peer, Held>>>,
    peer: Peer,
    kv_tokens: usize,
}

impl Drop for PeerLease {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(h) = held.get_mut(&self.peer) {
            h.sessions = h.sessions.saturating_sub(1);
            h.kv_tokens = h.kv_tokens.saturating_sub(self.kv_tokens);
            if h.sessions == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_and_kv_are_bounded_per_peer_and_returned_on_drop() {
        let q = PeerQuotas::new(2, 100);
        let (a, b) = (Peer::numbered(1), Peer::numbered(2));
        let a1 = q.try_take(a, 40).unwrap();
        let a2 = q.try_take(a, 40).unwrap();
        assert!(q.try_take(a, 1).is_err(), "third session of one peer");
        let b1 = q.try_take(b, 100).unwrap();
        assert!(q.try_take(b, 1).is_err(), "KV quota of the other peer");
        drop(a1);
        assert_eq!(q.sessions_of(a), 1);
        assert!(q.try_take(a, 61).is_err(), "40 + 61 > 100");
        let _a3 = q.try_take(a, 60).unwrap();
        drop((a2, b1));
        assert_eq!(q.sessions_of(b), 0);
    }

    #[test]
    fn ipv6_counts_by_its_64_prefix_and_v4_mapped_as_v4() {
        let p = |s: &str| Peer::of_ip(s.parse().unwrap());
        assert_eq!(p("2001:db8:1:2::1"), p("2001:db8:1:2:ffff::9"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
        assert_eq!(p("::ffff:10.0.0.1"), p("10.0.0.1"));
        assert_ne!(p("10.0.0.1"), p("10.0.0.2"));
    }
}
