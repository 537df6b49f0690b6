//! `--allow-peers FILE`: an explicit membership list for a private swarm. The file holds one peer id per line
//! (`12D3KooW…`, as every process prints at start-up); blank lines and `#` comments are ignored. Connections from
//! peers not on the list are closed as soon as they are established (`network.rs`), and a coordinator registers no
//! node outside it (docs/SECURITY.md, "Trust and routing").

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use libp2p::PeerId;

/// A file larger than this is refused before it is read (a million peer ids fit), in bytes.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The peers allowed in a private swarm.
pub type AllowList = Arc<HashSet<PeerId>>;

#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("cannot read the peer list {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the peer list {path} is {len} bytes; at most {MAX_FILE_BYTES} are read")]
    TooLarge { path: String, len: u64 },
    #[error("{path}:{line}: {text:?} is not a peer id: {detail}")]
    BadPeer { path: String, line: usize, text: String, detail: String },
    #[error("the peer list {path} names no peer")]
    Empty { path: String },
}

/// Reads a membership list (see the module comment).
pub fn read_allow_list(path: &Path) -> Result<AllowList, AllowListError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| AllowListError::Io { path: shown.clone(), source })?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(AllowListError::TooLarge { path: shown, len: meta.len() });
    }
    let text = std::fs::read_to_string(path).map_err(|source| AllowListError::Io { path: shown.clone(), source })?;
    parse_allow_list(&text, &shown)
}

/// Parses the text of a membership list; `path` names it in errors.
pub fn parse_allow_list(text: &str, path: &str) -> Result<AllowList, AllowListError> {
    let mut peers = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let peer: PeerId = line.parse().map_err(|e: libp2p::identity::ParseError| AllowListError::BadPeer {
            path: path.to_string(),
            line: i + 1,
            text: line.to_string(),
            detail: e.to_string(),
        })?;
        peers.insert(peer);
    }
    if peers.is_empty() {
        return Err(AllowListError::Empty { path: path.to_string() });
    }
    Ok(Arc::new(peers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_comments_and_blank_lines_and_names_a_bad_line() {
        let a = PeerId::random();
        let b = PeerId::random();
        let text = format!("# members\n{a}\n\n  {b}  # the coordinator\n");
        let list = parse_allow_list(&text, "peers.txt").unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.contains(&a) && list.contains(&b));
        let err = parse_allow_list(&format!("{a}\nnot-a-peer\n"), "peers.txt").unwrap_err();
        assert!(err.to_string().starts_with("peers.txt:2: \"not-a-peer\" is not a peer id"), "{err}");
        assert!(matches!(parse_allow_list("# nobody\n", "p"), Err(AllowListError::Empty { .. })));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_off_the_list_is_disconnected_and_a_member_joins() {
        use libp2p::Multiaddr;
        use libp2p::identity::Keypair;

        use crate::dht::{DhtClient, DhtConfig};

        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let (a, _events) =
            DhtClient::start(DhtConfig::new(Keypair::generate_ed25519(), vec![tcp.clone()], vec![])).await.unwrap();
        let addr = a.listen_addrs().await.unwrap()[0].clone();
        // B admits only some other peer: its connection to A is dropped, so it cannot join through A.
        let mut cfg = DhtConfig::new(Keypair::generate_ed25519(), vec![tcp.clone()], vec![addr.clone()]);
        cfg.allow_peers = Some(Arc::new([PeerId::random()].into()));
        let Err(err) = DhtClient::start(cfg).await else { panic!("joining through a non-member must fail") };
        assert!(err.to_string().contains("not on the allowed peer list"), "{err}");
        // With A on its list, C joins.
        let mut cfg = DhtConfig::new(Keypair::generate_ed25519(), vec![tcp], vec![addr]);
        cfg.allow_peers = Some(Arc::new([a.peer_id()].into()));
        DhtClient::start(cfg).await.unwrap();
    }
}
