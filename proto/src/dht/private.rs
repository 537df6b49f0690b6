//! Private swarms (`--swarm-key FILE`): a libp2p private network, where every DHT connection starts with a
//! handshake proving knowledge of a pre-shared 256-bit key (XSalsa20 over the TCP stream, beneath Noise), so peers
//! without the key cannot connect, read records or be routed to (docs/SECURITY.md, "Private swarms"). The key file
//! is the format other libp2p implementations use (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
//!
//! A private network runs over TCP only: the QUIC transport has its own handshake that the pre-shared key cannot
//! wrap, so it is left out (and QUIC listen or dial addresses are refused with a clear error).

use std::path::{Path, PathBuf};

pub use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, multiaddr::Protocol};

/// Why a swarm key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SwarmKeyError {
    #[error("cannot read the swarm key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a swarm key (expected `/key/swarm/psk/1.0.0/`, `/base16/` and 64 hex digits): {detail}")]
    Parse { path: PathBuf, detail: String },
}

/// Reads a swarm key file.
pub fn read_swarm_key(path: &Path) -> Result<PreSharedKey, SwarmKeyError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| SwarmKeyError::Read { path: path.to_path_buf(), source })?;
    text.trim().parse().map_err(|e: libp2p::pnet::KeyParseError| SwarmKeyError::Parse {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// The text of a swarm key file holding `key` (the key itself: keep the file private).
pub fn swarm_key_file(key: &PreSharedKey) -> String {
    key.to_string()
}

/// The first of `addrs` a private network cannot use (a QUIC address), if any.
pub fn non_tcp<'a>(mut addrs: impl Iterator<Item = &'a Multiaddr>) -> Option<&'a Multiaddr> {
    addrs.find(|a| a.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic | Protocol::Udp(_))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = PreSharedKey::new([0x5a; 32]);
        let path = dir.path().join("swarm.key");
        std::fs::write(&path, swarm_key_file(&key)).unwrap();
        assert!(read_swarm_key(&path).unwrap().fingerprint() == key.fingerprint());
        std::fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nnot-hex").unwrap();
        let e = read_swarm_key(&path).unwrap_err().to_string();
        assert!(e.contains("is not a swarm key"), "{e}");
        let e = read_swarm_key(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn quic_addresses_are_named() {
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        assert_eq!(non_tcp([&tcp].into_iter()), None);
        assert_eq!(non_tcp([&tcp, &quic].into_iter()), Some(&quic));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_peers_holding_the_swarm_key_can_join() {
        use libp2p::identity::Keypair;

        use crate::dht::{DhtClient, DhtConfig};

        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let key = PreSharedKey::new([0x11; 32]);
        let config = |bootstrap: Vec<Multiaddr>, psk: Option<PreSharedKey>| {
            let mut c = DhtConfig::new(Keypair::generate_ed25519(), vec![tcp.clone()], bootstrap);
            c.swarm_key = psk;
            c
        };
        let (a, _ea) = DhtClient::start(config(vec![], Some(key))).await.unwrap();
        let addr = a.listen_addrs().await.unwrap()[0].clone();
        // A member joins through A, and A routes to it.
        let (b, _eb) = DhtClient::start(config(vec![addr.clone()], Some(key))).await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !a.routing_peers().await.unwrap().contains(&b.peer_id()) {
            assert!(tokio::time::Instant::now() < deadline, "A never added the member to its routing table");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Without the key, or with another one, the handshake fails and nothing is learned.
        for psk in [None, Some(PreSharedKey::new([0x22; 32]))] {
            let outsider = DhtClient::start(config(vec![addr.clone()], psk)).await;
            assert!(outsider.is_err(), "a peer without the swarm key ({psk:?}) joined");
        }
        assert!(!a.routing_peers().await.unwrap().iter().any(|p| *p != b.peer_id()), "an outsider reached A");
        // QUIC cannot carry the key's handshake: refused up front.
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        let mut c = DhtConfig::new(Keypair::generate_ed25519(), vec![quic], vec![]);
        c.swarm_key = Some(key);
        let Err(e) = DhtClient::start(c).await else { panic!("a QUIC listener in a private swarm") };
        assert!(e.to_string().contains("TCP only"), "{e}");
    }
}
