//! `wss` against a local TLS server with a certificate generated for the test (feature `tls`).
#![cfg(feature = "tls")]

mod ws_support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tower_epoch::State;
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{Message, WsClient, WsConnector};
use ws_support::{wait_state, ws_error};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS echo server on 127.0.0.1 with a fresh self-signed certificate for that address.
async fn tls_echo_server() -> (std::net::SocketAddr, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, cert)
}

#[tokio::test]
async fn wss_connects_and_echoes_with_a_trusted_certificate() {
    let (addr, cert) = tls_echo_server().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (client, mut incoming) = WsClient::builder(format!("wss://{addr}/secure"))
        .unwrap()
        .connector(WsConnector::new().with_tls(Arc::new(client_config)))
        .no_heartbeat()
        .build()
        .unwrap();
    let epoch = client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    client.send(Message::text("over tls")).await.unwrap();
    let received = timeout(Duration::from_secs(2), incoming.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (received.epoch, received.message),
        (epoch, Message::text("over tls"))
    );
    timeout(Duration::from_secs(2), client.handle().disconnect())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_typed_tls_failure_that_backs_off() {
    let (addr, _cert) = tls_echo_server().await;
    // The default roots (webpki) do not trust the test's self-signed certificate.
    let (client, _incoming) = WsClient::builder(format!("wss://{addr}/"))
        .unwrap()
        .backoff(Schedule::new([Duration::from_millis(20)]).unwrap())
        .no_heartbeat()
        .build()
        .unwrap();
    client.handle().connect().unwrap();
    let state = wait_state(&client, "a failure", |s| {
        matches!(s, State::WaitingToRetry { .. })
    })
    .await;
    assert!(ws_error(&state).unwrap().starts_with("Tls("), "{state}");
    wait_state(&client, "a retry", |s| {
        matches!(s, State::WaitingToRetry { attempt: 3, .. })
    })
    .await;
}
