//! `https` with ALPN `h2` against a local TLS server with a certificate generated for the test
//! (features `http2` and `tls`).
#![cfg(all(feature = "http2", feature = "tls"))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tower::{Service, ServiceExt};
use tower_epoch::State;
use tower_epoch::http2::{self, H2Connector, H2Error};

const WAIT: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTP/2 echo server over TLS on 127.0.0.1 (ALPN `h2` offered), with a fresh self-signed
/// certificate; it records the protocol each handshake agreed on.
async fn tls_server() -> (
    std::net::SocketAddr,
    CertificateDer<'static>,
    Arc<Mutex<Vec<Option<Vec<u8>>>>>,
) {
    tls_server_offering(vec![b"h2".to_vec()]).await
}

/// The same server, offering `alpn` (none: it agrees on no protocol).
async fn tls_server_offering(
    alpn: Vec<Vec<u8>>,
) -> (
    std::net::SocketAddr,
    CertificateDer<'static>,
    Arc<Mutex<Vec<Option<Vec<u8>>>>>,
) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    config.alpn_protocols = alpn;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agreed = Arc::new(Mutex::new(Vec::new()));
    let book = Arc::clone(&agreed);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, book) = (acceptor.clone(), Arc::clone(&book));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(socket).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                book.lock().unwrap().push(alpn);
                let echo = hyper::service::service_fn(
                    |request: http::Request<hyper::body::Incoming>| async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(body)))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), echo)
                        .await;
            });
        }
    });
    (addr, cert, agreed)
}

fn trusting(cert: CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

#[tokio::test]
async fn https_agrees_on_h2_and_calls_flow() {
    let (addr, cert, agreed) = tls_server().await;
    let layer = http2::layer(&format!("https://{addr}")).unwrap();
    let handle = layer.handle();
    let connector = H2Connector::<Full<Bytes>>::new().with_tls(trusting(cert));
    let mut channel = tower::Layer::layer(&layer, connector);
    handle.connect().unwrap();
    handle.wait_for(WAIT, State::is_connected).await.unwrap();
    let request = http::Request::post("/echo")
        .body(Full::new(Bytes::from("secret")))
        .unwrap();
    let response = timeout(WAIT, channel.ready().await.unwrap().call(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "secret"
    );
    assert_eq!(*agreed.lock().unwrap(), [Some(b"h2".to_vec())], "ALPN h2");
    timeout(WAIT, handle.disconnect()).await.unwrap();
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_tls_error() {
    let (addr, _cert, _) = tls_server().await;
    let mut connector = H2Connector::<Full<Bytes>>::new();
    let target = format!("https://{addr}").parse().unwrap();
    let error = connector
        .ready()
        .await
        .unwrap()
        .call(target)
        .await
        .unwrap_err();
    assert!(matches!(error, H2Error::Tls(_)), "{error:?}");
}

#[tokio::test]
async fn a_server_that_agrees_on_no_protocol_is_a_tls_error() {
    let (addr, cert, _) = tls_server_offering(Vec::new()).await;
    let mut connector = H2Connector::<Full<Bytes>>::new().with_tls(trusting(cert));
    let target = format!("https://{addr}").parse().unwrap();
    let error = connector
        .ready()
        .await
        .unwrap()
        .call(target)
        .await
        .unwrap_err();
    let H2Error::Tls(io) = &error else {
        panic!("a TLS error, not {error:?}");
    };
    assert!(io.to_string().contains("ALPN"), "{io}");
}
