//! Connections to next stages, one per (address, certificate) and reused across sessions.

use std::collections::HashMap;
use std::net::SocketAddr;

use parking_lot::Mutex;

use crate::tls::{self, TlsError};
use crate::wire::Fingerprint;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
}

/// Caches QUIC connections made from one endpoint, keyed by address and pinned fingerprint.
pub struct ConnectionPool {
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<(SocketAddr, Fingerprint), quinn::Connection>>,
}

impl ConnectionPool {
    pub fn new(endpoint: quinn::Endpoint) -> Self {
        Self { endpoint, conns: Mutex::new(HashMap::new()) }
    }

    /// An open connection to `addr` that presented exactly the certificate `fingerprint`.
    pub async fn get(&self, addr: SocketAddr, fingerprint: Fingerprint) -> Result<quinn::Connection, ConnectError> {
        if let Some(c) = self.conns.lock().get(&(addr, fingerprint))
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let cfg = tls::client_config(fingerprint)?;
        let conn = self
            .endpoint
            .connect_with(cfg, addr, tls::SERVER_NAME)
            .map_err(|e| ConnectError::Connect { addr, detail: e.to_string() })?
            .await
            .map_err(|e| ConnectError::Connect { addr, detail: e.to_string() })?;
        self.conns.lock().insert((addr, fingerprint), conn.clone());
        Ok(conn)
    }

    /// Forgets a connection (after a failure), so the next `get` dials again.
    pub fn forget(&self, addr: SocketAddr, fingerprint: Fingerprint) {
        self.conns.lock().remove(&(addr, fingerprint));
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}
