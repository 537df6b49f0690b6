//! TLS for the stage servers: a self-signed certificate generated at start-up (rcgen), and a client verifier that
//! accepts exactly one certificate, the one whose SHA-256 fingerprint the node published in its signed announcement.
//! Trust therefore flows from the node's libp2p key (which signs the fingerprint) to the QUIC connection, without a CA.

use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use crate::wire::Fingerprint;

/// Name the client puts in the TLS handshake; the pinned verifier does not depend on it.
pub const SERVER_NAME: &str = "shardline-stage";
/// ALPN protocol id of the stage protocol, version 2 (the wire version in every frame header must match).
pub const ALPN: &[u8] = b"shardline/2";
/// A QUIC connection that hears nothing from its peer for this long is closed. It is how a stage that vanished without
/// a word (killed, unplugged) is noticed, so it bounds the time before a session fails over; live connections never
/// reach it because both ends send keep-alives every [`KEEP_ALIVE`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Keep-alive interval: several fit in [`IDLE_TIMEOUT`], so a few lost packets do not close a live connection. Short,
/// because a session owner takes a stage that has sent nothing for a few intervals during a late step for dead
/// (`coordinator/src/deadline.rs`); a 40-byte ping every 250 ms per connection is negligible traffic.
pub const KEEP_ALIVE: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate the stage certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    Sha256::digest(der).into()
}

fn provider() -> Arc<CryptoProvider> {
    // An explicit provider, so the process-wide default (which another dependency may have set differently) is never
    // consulted.
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Streams a client lets the server open, and (by default) a server lets one client open at once.
const DEFAULT_STREAMS: u32 = 1024;

/// `streams`: bidirectional streams the peer may have open at once on one connection.
fn transport(streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_concurrent_bidi_streams(streams.into());
    Arc::new(t)
}

/// The stage server's certificate and key, and the fingerprint it announces.
pub struct StageIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: Fingerprint,
}

impl StageIdentity {
    /// A fresh self-signed certificate (ECDSA P-256).
    pub fn generate() -> Result<Self, TlsError> {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let cert = ck.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
        let fingerprint = fingerprint(&cert);
        Ok(Self { cert, key, fingerprint })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// A quinn server configuration presenting this certificate (TLS 1.3, ALPN [`ALPN`]), letting a client open up to
    /// 1,024 streams at once.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        self.server_config_with_streams(DEFAULT_STREAMS)
    }

    /// As [`Self::server_config`], with at most `streams` streams open at once per connection: a stage sizes it to its
    /// session slots (one stream per session per connection), so one connection cannot make it hold thousands of
    /// stream buffers.
    pub fn server_config_with_streams(&self, streams: u32) -> Result<quinn::ServerConfig, TlsError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport(streams));
        Ok(cfg)
    }
}

/// A quinn client configuration that accepts only the certificate with SHA-256 `pinned`.
pub fn client_config(pinned: Fingerprint) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCertVerifier { pinned, provider: provider.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(DEFAULT_STREAMS));
    Ok(cfg)
}

/// Accepts the end-entity certificate whose SHA-256 equals the pinned fingerprint, and checks the handshake
/// signatures with that certificate's key (so the server must hold the private key, not just the certificate).
#[derive(Debug)]
struct PinnedCertVerifier {
    pinned: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "stage certificate {} does not match the announced fingerprint {}",
                hex::encode(fingerprint(end_entity)),
                hex::encode(self.pinned)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn handshake(server: &StageIdentity, pinned: Fingerprint) -> Result<(), String> {
        let endpoint =
            quinn::Endpoint::server(server.server_config().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            if let Some(incoming) = endpoint.accept().await {
                let _ = incoming.await;
            }
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(pinned).unwrap());
        let res = match client.connect(addr, SERVER_NAME) {
            Ok(connecting) => connecting.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        accept.abort();
        res
    }

    #[tokio::test]
    async fn client_accepts_exactly_the_pinned_certificate() {
        let server = StageIdentity::generate().unwrap();
        let other = StageIdentity::generate().unwrap();
        assert_ne!(server.fingerprint(), other.fingerprint());
        handshake(&server, server.fingerprint()).await.expect("pinned certificate accepted");
        let err = handshake(&server, other.fingerprint()).await.expect_err("foreign certificate refused");
        assert!(err.contains("fingerprint") || err.contains("certificate"), "{err}");
    }
}
