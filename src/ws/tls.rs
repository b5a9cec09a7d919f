//! `wss`: TLS with rustls (feature `tls`).

use std::io;
use std::sync::{Arc, OnceLock};

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use super::error::WsError;
use super::transport::ByteStream;

/// The default client configuration: the webpki roots, ring, TLS 1.2 and 1.3.
fn default_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        Arc::new(config)
    }))
}

/// Runs the TLS handshake for `host` over `io`.
pub(crate) async fn wrap(
    io: ByteStream,
    host: &str,
    config: Option<Arc<ClientConfig>>,
) -> Result<ByteStream, WsError> {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = ServerName::try_from(host)
        .map_err(|e| WsError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let connector = tokio_rustls::TlsConnector::from(config.unwrap_or_else(default_config));
    let stream = connector.connect(name, io).await.map_err(WsError::Tls)?;
    Ok(ByteStream::new(stream))
}
