//! [`WsConnector`]: a tower service that opens WebSocket connections.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tower_service::Service;

use super::error::WsError;

/// A byte stream a WebSocket runs over: TCP, TLS over TCP, or anything a [`Dial`] returns.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// The WebSocket stream [`WsConnector`] produces.
pub type WsStream = WebSocketStream<BoxIo>;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Opens the byte stream to `host:port`. The default, [`TcpDial`], uses tokio's `TcpStream`;
/// tests plug in a simulated network here.
pub trait Dial: Send + Sync + 'static {
    /// Opens a stream to `host:port`.
    fn dial(&self, host: &str, port: u16) -> BoxFuture<io::Result<BoxIo>>;
}

/// Dials with tokio's `TcpStream`, with `TCP_NODELAY` set (WebSocket frames are small).
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpDial;

impl Dial for TcpDial {
    fn dial(&self, host: &str, port: u16) -> BoxFuture<io::Result<BoxIo>> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Box::pin(async move {
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxIo)
        })
    }
}

/// Where a WebSocket connection goes, checked before any socket is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `true` for `wss`.
    pub secure: bool,
    /// The host, as written in the URL (IPv6 addresses keep their brackets).
    pub host: String,
    /// The port: explicit, or 80/443 by scheme.
    pub port: u16,
}

/// Checks a request's URL as RFC 6455 (section 3) and RFC 3986 say: scheme `ws` or `wss`, in
/// any case; a non-empty host, a bracketed IP literal being an IPv6 address; no user info; a
/// port of digits only, in `1..=65535` (empty or absent: 80 or 443); and TLS support compiled
/// in for `wss`.
///
/// tungstenite alone maps an out-of-range port such as `ws://h:99999` to port 80; this check
/// rejects it with [`WsError::PortOutOfRange`].
///
/// ```
/// use tower_epoch::ws::{WsError, endpoint};
///
/// assert!(endpoint(&"ws://127.0.0.1:9001/socket").is_ok());
/// assert!(matches!(endpoint(&"http://127.0.0.1/"), Err(WsError::UnsupportedScheme(_))));
/// assert!(matches!(endpoint(&"ws://h:99999/"), Err(WsError::PortOutOfRange(_))));
/// ```
pub fn endpoint<R: IntoClientRequest + Clone>(request: &R) -> Result<Endpoint, WsError> {
    let request = request
        .clone()
        .into_client_request()
        .map_err(|e| WsError::InvalidUrl(e.to_string()))?;
    endpoint_of(&request)
}

pub(crate) fn endpoint_of(request: &Request) -> Result<Endpoint, WsError> {
    let uri = request.uri();
    // RFC 3986 3.1: schemes are case-insensitive.
    let secure = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("ws") => false,
        Some(s) if s.eq_ignore_ascii_case("wss") => true,
        other => return Err(WsError::UnsupportedScheme(other.unwrap_or("").to_string())),
    };
    let invalid = |why: &str| Err(WsError::InvalidUrl(format!("{why} in {uri}")));
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    // RFC 6455 3: a ws URI is `host [":" port]`, no user info (which would otherwise be sent
    // nowhere, or taken for the host by a careless split).
    if authority.contains('@') {
        return invalid("user info is not allowed");
    }
    let (host, port) = match authority.strip_prefix('[') {
        // RFC 3986 3.2.2: an IP literal is an IPv6 address in brackets (IPvFuture names no
        // address one can connect to).
        Some(rest) => match rest.split_once(']') {
            Some((v6, tail)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return invalid("not an IPv6 address in brackets");
                }
                let port = match tail {
                    "" => None,
                    _ => match tail.strip_prefix(':') {
                        Some(port) => Some(port),
                        None => return invalid("text after the IPv6 host"),
                    },
                };
                (format!("[{v6}]"), port)
            }
            None => return invalid("unclosed IPv6 host"),
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (authority.to_string(), None),
        },
    };
    if host.is_empty() {
        return Err(WsError::EmptyHost);
    }
    let port = match port {
        // RFC 3986 3.2.3: an empty port is the scheme's default.
        None | Some("") => {
            if secure {
                443
            } else {
                80
            }
        }
        // RFC 3986 3.2.3: `port = *DIGIT`, so no sign, no space (which `u64::from_str`
        // would take: `+80`).
        Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => match digits.parse::<u64>() {
            Ok(port @ 1..=65535) => port as u16,
            _ => return Err(WsError::PortOutOfRange(digits.to_string())),
        },
        Some(_) => return invalid("a port of other than digits"),
    };
    if secure && !cfg!(feature = "tls") {
        return Err(WsError::TlsUnavailable);
    }
    Ok(Endpoint { secure, host, port })
}

/// A tower service that opens WebSocket connections: `Service<Request>` (an `http` request
/// whose headers, such as an auth token, are sent with the upgrade), answering a
/// [`WsStream`].
///
/// Each call validates the request with [`endpoint`] before any socket is opened, dials with
/// its [`Dial`], wraps `wss` in TLS (feature `tls`), and performs the upgrade. A rejected
/// upgrade (a 503, say) is [`WsError::Rejected`] with the status, a malformed answer
/// [`WsError::Handshake`]: typed failures that go through the layer's backoff. The whole call
/// is bounded by the layer's connect timeout.
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
/// // Bad input is refused before any socket is opened.
/// let request = "ws://127.0.0.1:99999/".into_client_request()?;
/// let error = connector.ready().await?.call(request).await.err().unwrap();
/// assert!(matches!(error, WsError::PortOutOfRange(port) if port == "99999"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WsConnector {
    dial: Arc<dyn Dial>,
    config: WebSocketConfig,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for WsConnector {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for WsConnector {
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
            dial: Arc::new(TcpDial),
            config: WebSocketConfig::default().read_buffer_size(READ_BUFFER),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Opens byte streams with `dial` instead of TCP.
    pub fn with_dial(mut self, dial: impl Dial) -> Self {
        self.dial = Arc::new(dial);
        self
    }

    /// tungstenite's protocol settings (message and frame size limits, write and read
    /// buffers). They replace the whole configuration, the 4 KiB read buffer of
    /// [`new`](Self::new) included: set `read_buffer_size` too where memory per connection
    /// matters.
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
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    fn connect(&self, request: Request) -> BoxFuture<Result<WsStream, WsError>> {
        let endpoint = match endpoint_of(&request) {
            Ok(endpoint) => endpoint,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let dial = Arc::clone(&self.dial);
        let config = self.config;
        #[cfg(feature = "tls")]
        let tls = self.tls.clone();
        Box::pin(async move {
            let io = dial
                .dial(&endpoint.host, endpoint.port)
                .await
                .map_err(WsError::Io)?;
            #[cfg(feature = "tls")]
            let io = if endpoint.secure {
                super::tls::wrap(io, &endpoint.host, tls).await?
            } else {
                io
            };
            let (stream, _response) =
                tokio_tungstenite::client_async_with_config(request, io, Some(config))
                    .await
                    .map_err(WsError::from_handshake)?;
            Ok(stream)
        })
    }
}

impl Service<Request> for WsConnector {
    type Response = WsStream;
    type Error = WsError;
    type Future = BoxFuture<Result<WsStream, WsError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.connect(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `endpoint` says of a URL, in short: `host port secure` or the error's kind.
    fn check(url: &str) -> String {
        match endpoint(&url) {
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
