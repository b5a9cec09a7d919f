//! [`WsConnector`]: a tower service that opens WebSocket connections.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tower_service::Service;

use super::error::WsError;
use crate::BoxError;
use crate::transport::{BadAuthority, ByteStream, TcpConnector, authority_of, io_error};

/// Where a WebSocket connection goes, checked before any socket is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `true` for `wss`.
    pub(crate) secure: bool,
    /// The host, as written in the URL (IPv6 addresses keep their brackets).
    pub(crate) host: String,
    /// The port: explicit, or 80/443 by scheme.
    pub(crate) port: u16,
}

/// Checks a request's URL as RFC 6455 (section 3) and RFC 3986 say: scheme `ws` or `wss`, in
/// any case; a non-empty host, a bracketed IP literal being an IPv6 address; no user info; a
/// port of digits only, in `1..=65535` (empty or absent: 80 or 443); and TLS support compiled
/// in for `wss`.
///
/// tungstenite alone maps an out-of-range port such as `ws://h:99999` to port 80; this check
/// rejects it with [`WsError::PortOutOfRange`].
pub(crate) fn endpoint_of(request: &Request) -> Result<Endpoint, WsError> {
    let uri = request.uri();
    // RFC 3986 3.1: schemes are case-insensitive.
    let secure = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("ws") => false,
        Some(s) if s.eq_ignore_ascii_case("wss") => true,
        other => return Err(WsError::UnsupportedScheme(other.unwrap_or("").to_string())),
    };
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    let (host, port) =
        authority_of(authority, if secure { 443 } else { 80 }).map_err(|bad| match bad {
            BadAuthority::Invalid(why) => WsError::InvalidUrl(format!("{why} in {uri}")),
            BadAuthority::EmptyHost => WsError::EmptyHost,
            BadAuthority::PortOutOfRange(port) => WsError::PortOutOfRange(port),
        })?;
    if secure && !cfg!(feature = "tls") {
        return Err(WsError::TlsUnavailable);
    }
    Ok(Endpoint { secure, host, port })
}

/// A tower service that opens WebSocket connections: `Service<Request>` (an `http` request
/// whose headers, such as an auth token, are sent with the upgrade), answering a
/// `WebSocketStream` over a [`ByteStream`].
///
/// Each call checks the request's URL as RFC 6455 and RFC 3986 say before any socket is opened:
/// scheme `ws` or `wss` in any case, a non-empty host (an IPv6 address in brackets), no user
/// info, a port of digits in `1..=65535`, and the `tls` feature for `wss`. tungstenite alone
/// would take `ws://h:99999` for port 80; here it is [`WsError::PortOutOfRange`]. Then the
/// connector opens the byte stream with its transport, wraps `wss` in TLS (feature `tls`), and
/// performs the upgrade. A rejected upgrade (a 503, say) is [`WsError::Rejected`] with the
/// status, a malformed answer [`WsError::Handshake`]: typed failures that go through the
/// layer's backoff. The whole call is bounded by the layer's connect timeout.
///
/// The transport is any `Service<Uri>` answering a tokio byte stream, [`TcpConnector`] by
/// default: see [`with_transport`](Self::with_transport).
///
/// ```
/// use tower::{Service, ServiceExt};
/// use tower_epoch::ws::{WsConnector, WsError};
/// use tokio_tungstenite::tungstenite::client::IntoClientRequest;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let addr = listener.local_addr()?;
/// # tokio::spawn(async move {
/// #     let (socket, _) = listener.accept().await.unwrap();
/// #     let _ws = tokio_tungstenite::accept_async(socket).await.unwrap();
/// # });
/// let mut connector = WsConnector::new();
///
/// // A WebSocket server listens on `addr`.
/// let request = format!("ws://{addr}/socket").into_client_request()?;
/// let stream = connector.ready().await?.call(request).await?;
/// # drop(stream);
///
/// // Bad input is refused before any socket is opened, with a typed error.
/// let mut refused = async |url: &str| {
///     let request = url.into_client_request().unwrap();
///     connector.ready().await.unwrap().call(request).await.err().unwrap()
/// };
/// assert!(matches!(refused("ws://127.0.0.1:99999/").await, WsError::PortOutOfRange(p) if p == "99999"));
/// assert!(matches!(refused("http://127.0.0.1/").await, WsError::UnsupportedScheme(s) if s == "http"));
/// assert!(matches!(refused("ws://user@127.0.0.1/").await, WsError::InvalidUrl(_)));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WsConnector<T = TcpConnector> {
    transport: T,
    config: WebSocketConfig,
    #[cfg(feature = "tls")]
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Default for WsConnector {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for WsConnector<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsConnector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The read buffer a connection starts with: small, because an idle connection holds it (see
/// [`WsConnector::new`]).
const READ_BUFFER: usize = 4 * 1024;

impl WsConnector {
    /// A connector over TCP with tungstenite's default limits, but a 4 KiB read buffer.
    ///
    /// tungstenite's default read buffer is 128 KiB per connection, allocated when the
    /// connection opens and cleared on every read. 4 KiB keeps an idle connection small (about
    /// 10 KiB in all, see BENCHMARKS.md); the buffer grows for a larger message on demand. For
    /// a connection that reads large messages at a high rate, set a larger one with
    /// [`with_config`](Self::with_config) (`WebSocketConfig::read_buffer_size`).
    pub fn new() -> Self {
        WsConnector {
            transport: TcpConnector,
            config: WebSocketConfig::default().read_buffer_size(READ_BUFFER),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl<T> WsConnector<T> {
    /// Opens byte streams with `transport` instead of TCP: a proxy, a Unix socket, an
    /// in-memory pipe in tests.
    ///
    /// The transport is a `Service<Uri>` whose response is a tokio `AsyncRead + AsyncWrite`
    /// stream: the shape of hyper-util's connectors, with tokio's I/O traits. It is called
    /// with the checked URL's scheme (in lower case) and authority, the port always given,
    /// and the path `/`: `WS://example.com/chat` dials `ws://example.com:80/`. An IPv6 host
    /// keeps its brackets in `uri.host()` (`[::1]`); strip them before resolving, as
    /// [`TcpConnector`] does. Its errors, of `poll_ready` or of the call, are
    /// [`WsError::Io`], with the kind of the first `io::Error` among their sources.
    ///
    /// hyper-util's `HttpConnector` itself answers hyper's I/O traits and refuses schemes
    /// other than `http` by default: to use it, turn `enforce_http` off and map its response
    /// with `TokioIo::into_inner`.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::{Service, ServiceExt, service_fn};
    /// use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::Uri};
    /// use tower_epoch::ws::WsConnector;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// // An in-memory server: each connection is one end of a pipe.
    /// let memory = service_fn(|uri: Uri| async move {
    ///     assert_eq!(uri, "ws://chat.example:80/");
    ///     let (ours, theirs) = tokio::io::duplex(4096);
    ///     tokio::spawn(tokio_tungstenite::accept_async(theirs));
    ///     Ok::<_, Infallible>(ours)
    /// });
    /// let mut connector = WsConnector::new().with_transport(memory);
    /// let request = "ws://chat.example/room".into_client_request()?;
    /// let _stream = connector.ready().await?.call(request).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_transport<U>(self, transport: U) -> WsConnector<U> {
        WsConnector {
            transport,
            config: self.config,
            #[cfg(feature = "tls")]
            tls: self.tls,
        }
    }

    /// tungstenite's protocol settings (message and frame size limits, write and read
    /// buffers). They replace the whole configuration, the 4 KiB read buffer of
    /// [`new`](WsConnector::new) included: set `read_buffer_size` too where memory per
    /// connection matters.
    pub fn with_config(mut self, config: WebSocketConfig) -> Self {
        self.config = config;
        self
    }

    pub(crate) fn config(&self) -> &WebSocketConfig {
        &self.config
    }

    /// The rustls client configuration for `wss` (default: the webpki roots).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn with_tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

/// A transport of any type, as the client's builder keeps it.
pub(crate) type BoxTransport = tower::util::BoxCloneService<Uri, ByteStream, BoxError>;

impl<T> WsConnector<T>
where
    T: Service<Uri> + Clone + Send + 'static,
    T::Response: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
{
    /// The same connector with its transport's type erased.
    pub(crate) fn boxed(self) -> WsConnector<BoxTransport> {
        use tower::ServiceExt;
        let transport = self.transport.clone();
        let transport = transport.map_response(ByteStream::new).map_err(Into::into);
        self.with_transport(tower::util::BoxCloneService::new(transport))
    }
}

/// The WebSocket stream [`WsConnector`] produces.
pub(crate) type WsStream = WebSocketStream<ByteStream>;

/// The future of [`WsConnector`]'s call.
type ConnectFuture = Pin<Box<dyn Future<Output = Result<WsStream, WsError>> + Send>>;

/// Writes the request's scheme in lower case.
fn lower_case_scheme(request: &mut Request, endpoint: &Endpoint) -> Result<(), WsError> {
    let scheme = if endpoint.secure { "wss" } else { "ws" };
    if request.uri().scheme_str() == Some(scheme) {
        return Ok(());
    }
    let mut parts = request.uri().clone().into_parts();
    parts.scheme = Some(
        scheme
            .parse()
            .map_err(|e: http::uri::InvalidUri| WsError::InvalidUrl(e.to_string()))?,
    );
    *request.uri_mut() = Uri::from_parts(parts).map_err(|e| WsError::InvalidUrl(e.to_string()))?;
    Ok(())
}

/// The URI the transport is called with: the endpoint's scheme and authority, nothing else.
fn transport_uri(endpoint: &Endpoint) -> Result<Uri, WsError> {
    let scheme = if endpoint.secure { "wss" } else { "ws" };
    crate::transport::transport_uri(scheme, &endpoint.host, endpoint.port)
        .map_err(|e| WsError::InvalidUrl(e.to_string()))
}

impl<T> Service<Request> for WsConnector<T>
where
    T: Service<Uri>,
    T::Response: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
{
    type Response = WebSocketStream<ByteStream>;
    type Error = WsError;
    type Future =
        Pin<Box<dyn Future<Output = Result<WebSocketStream<ByteStream>, WsError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.transport
            .poll_ready(cx)
            .map_err(|e| WsError::Io(io_error(e)))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let fail = |error| -> ConnectFuture { Box::pin(std::future::ready(Err(error))) };
        let endpoint = match endpoint_of(&request) {
            Ok(endpoint) => endpoint,
            Err(error) => return fail(error),
        };
        // The check takes the scheme in any case (RFC 3986 3.1); tungstenite's handshake takes
        // only lower case.
        if let Err(error) = lower_case_scheme(&mut request, &endpoint) {
            return fail(error);
        }
        let uri = match transport_uri(&endpoint) {
            Ok(uri) => uri,
            Err(error) => return fail(error),
        };
        #[cfg(feature = "tls")]
        let tls = endpoint.secure.then(|| (endpoint.host, self.tls.clone()));
        let opening = self.transport.call(uri);
        let config = self.config;
        Box::pin(async move {
            let io = ByteStream::new(opening.await.map_err(|e| WsError::Io(io_error(e)))?);
            #[cfg(feature = "tls")]
            let io = match tls {
                Some((host, config)) => crate::tls::wrap(io, &host, config, &[])
                    .await
                    .map_err(WsError::Tls)?,
                None => io,
            };
            let (stream, _response) =
                tokio_tungstenite::client_async_with_config(request, io, Some(config))
                    .await
                    .map_err(WsError::from_handshake)?;
            Ok(stream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    /// What the check says of a URL, in short: `host port secure` or the error's kind.
    fn check(url: &str) -> String {
        let checked = url
            .into_client_request()
            .map_err(|e| WsError::InvalidUrl(e.to_string()))
            .and_then(|request| endpoint_of(&request));
        match checked {
            Ok(e) => format!(
                "{} {} {}",
                e.host,
                e.port,
                if e.secure { "wss" } else { "ws" }
            ),
            Err(WsError::InvalidUrl(_)) => "invalid".into(),
            Err(WsError::UnsupportedScheme(s)) => format!("scheme {s}"),
            Err(WsError::EmptyHost) => "empty host".into(),
            Err(WsError::PortOutOfRange(p)) => format!("port {p}"),
            Err(WsError::TlsUnavailable) => "no tls".into(),
            Err(other) => format!("other: {other}"),
        }
    }

    /// RFC 6455 section 3 (the ws URI) and RFC 3986 (scheme, host, port) case by case.
    #[test]
    fn urls_are_checked_as_the_rfcs_say() {
        let wss = |ok: &str| {
            if cfg!(feature = "tls") {
                ok.to_string()
            } else {
                "no tls".into()
            }
        };
        let cases: Vec<(&str, String)> = vec![
            ("ws://example.com/", "example.com 80 ws".into()),
            ("ws://example.com", "example.com 80 ws".into()),
            (
                "ws://example.com:8080/chat?x=1",
                "example.com 8080 ws".into(),
            ),
            ("wss://example.com/", wss("example.com 443 wss")),
            ("wss://example.com:8443/", wss("example.com 8443 wss")),
            // Schemes are case-insensitive (RFC 3986 3.1).
            ("WS://example.com/", "example.com 80 ws".into()),
            ("Ws://example.com/", "example.com 80 ws".into()),
            ("WSS://example.com/", wss("example.com 443 wss")),
            ("wSs://example.com/", wss("example.com 443 wss")),
            // Other schemes.
            ("http://example.com/", "scheme http".into()),
            ("https://example.com/", "scheme https".into()),
            ("ftp://example.com/", "scheme ftp".into()),
            ("wsx://example.com/", "scheme wsx".into()),
            // Ports: digits only, 1 to 65535; empty means the default (RFC 3986 3.2.3).
            ("ws://h:1/", "h 1 ws".into()),
            ("ws://h:65535/", "h 65535 ws".into()),
            ("ws://h:0080/", "h 80 ws".into()),
            ("ws://h:/", "h 80 ws".into()),
            ("ws://h:0/", "port 0".into()),
            ("ws://h:65536/", "port 65536".into()),
            ("ws://h:99999/", "port 99999".into()),
            (
                "ws://h:99999999999999999999999/",
                "port 99999999999999999999999".into(),
            ),
            ("ws://h:+80/", "invalid".into()),
            ("ws://h:-80/", "invalid".into()),
            ("ws://h:8o/", "invalid".into()),
            ("ws://h:80:81/", "invalid".into()),
            // Hosts.
            ("ws://127.0.0.1:9001/", "127.0.0.1 9001 ws".into()),
            ("ws://[::1]/", "[::1] 80 ws".into()),
            ("ws://[::1]:9001/", "[::1] 9001 ws".into()),
            ("ws://[2001:db8::7]:1/", "[2001:db8::7] 1 ws".into()),
            ("ws://[::1/", "invalid".into()),
            ("ws://[]/", "invalid".into()),
            ("ws://[not-v6]/", "invalid".into()),
            ("ws://[v1.fe]/", "invalid".into()),
            ("ws://[::1]x/", "invalid".into()),
            ("ws://:80/", "empty host".into()),
            // No user info in a ws URI (RFC 6455 3): not taken for the host, not dropped.
            ("ws://user@h/", "invalid".into()),
            ("ws://user:pass@h:80/", "invalid".into()),
            ("ws://h:80@evil.example/", "invalid".into()),
            // Not URLs at all.
            ("not a url", "invalid".into()),
            ("ws:///path", "invalid".into()),
        ];
        assert!(cases.len() >= 30);
        for (url, expected) in cases {
            assert_eq!(check(url), expected, "{url}");
        }
    }
}

#[cfg(test)]
mod transport_tests {
    use std::sync::{Arc, Mutex};

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tower::{ServiceExt, service_fn};

    use super::*;

    /// A transport that records the URIs it is called with and fails each call with `error`.
    fn recording(
        error: fn() -> BoxError,
    ) -> (
        Arc<Mutex<Vec<String>>>,
        impl Service<Uri, Response = tokio::io::DuplexStream, Error = BoxError, Future: Send + 'static>
        + Clone,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let transport = service_fn(move |uri: Uri| {
            log.lock().unwrap().push(uri.to_string());
            std::future::ready(Err(error()))
        });
        (seen, transport)
    }

    async fn connect<T>(connector: &mut WsConnector<T>, url: &str) -> WsError
    where
        WsConnector<T>: Service<Request, Response = WsStream, Error = WsError>,
    {
        let request = url.into_client_request().unwrap();
        connector
            .ready()
            .await
            .unwrap()
            .call(request)
            .await
            .err()
            .unwrap()
    }

    #[tokio::test]
    async fn the_transport_gets_the_scheme_and_authority_with_the_port() {
        let (seen, transport) = recording(|| "no network here".into());
        let mut connector = WsConnector::new().with_transport(transport);
        for url in [
            "WS://Example.com/chat?room=1",
            "ws://[::1]:9001/x",
            "ws://h:0080/",
        ] {
            let error = connect(&mut connector, url).await;
            assert!(matches!(&error, WsError::Io(e) if e.to_string() == "no network here"));
        }
        // A refused URL never reaches the transport.
        connect(&mut connector, "ws://h:99999/").await;
        assert_eq!(
            *seen.lock().unwrap(),
            ["ws://Example.com:80/", "ws://[::1]:9001/", "ws://h:80/"]
        );
    }

    #[tokio::test]
    async fn a_scheme_in_upper_case_connects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio_tungstenite::accept_async(socket).await.map(|_| ())
        });
        let mut connector = WsConnector::new();
        let request = format!("WS://{addr}/socket").into_client_request().unwrap();
        let connected = connector.ready().await.unwrap().call(request).await;
        assert!(connected.is_ok(), "{:?}", connected.err());
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_io_error_of_the_transport_keeps_its_kind() {
        let (_, transport) =
            recording(|| std::io::Error::from(std::io::ErrorKind::TimedOut).into());
        let mut connector = WsConnector::new().with_transport(transport);
        let error = connect(&mut connector, "ws://h/").await;
        assert!(matches!(&error, WsError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut));
    }

    #[tokio::test]
    async fn the_transports_readiness_is_the_connectors() {
        #[derive(Clone)]
        struct NotReady;
        impl Service<Uri> for NotReady {
            type Response = tokio::io::DuplexStream;
            type Error = std::io::Error;
            type Future = std::future::Pending<std::io::Result<tokio::io::DuplexStream>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Poll::Ready(Err(std::io::ErrorKind::AddrNotAvailable.into()))
            }
            fn call(&mut self, _: Uri) -> Self::Future {
                std::future::pending()
            }
        }
        let mut connector = WsConnector::new().with_transport(NotReady);
        let error = connector.ready().await.err().unwrap();
        assert!(
            matches!(&error, WsError::Io(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable)
        );
    }
}
