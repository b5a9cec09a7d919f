//! TLS with rustls (feature `tls`), for `wss` and `https`.

use std::io;
use std::sync::{Arc, OnceLock};

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use crate::transport::ByteStream;

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

/// Runs the TLS handshake for `host` (IPv6 brackets allowed) over `io`, offering the ALPN
/// protocols `alpn` when there are any (they replace the configuration's own).
pub(crate) async fn wrap(
    io: ByteStream,
    host: &str,
    config: Option<Arc<ClientConfig>>,
    alpn: &[&[u8]],
) -> io::Result<ByteStream> {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name =
        ServerName::try_from(host).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut config = config.unwrap_or_else(default_config);
    if !alpn.is_empty() {
        let mut with_alpn = (*config).clone();
        with_alpn.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config = Arc::new(with_alpn);
    }
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await?;
    if !alpn.is_empty() {
        // A server that agreed on none would be taken for one that speaks the protocol.
        let agreed = stream.get_ref().1.alpn_protocol();
        if !agreed.is_some_and(|agreed| alpn.contains(&agreed)) {
            let agreed = agreed.map(String::from_utf8_lossy);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the server agreed on no protocol offered by ALPN (it chose {agreed:?})"),
            ));
        }
    }
    Ok(ByteStream::new(stream))
}
