//! [`H2Connector`]: a tower service that opens HTTP/2 connections.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use http_body::Body;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::connection::H2Connection;
use super::error::H2Error;
use super::tasks::Tasks;
use crate::BoxError;
use crate::transport::{BadAuthority, ByteStream, TcpConnector, authority_of, io_error};

/// A tower service that opens HTTP/2 connections (prior knowledge over `http`, ALPN `h2` over
/// `https` with the `tls` feature): `Service<Uri>` answering an [`H2Connection<B>`], where `B`
/// is the request body type (`tonic::body::Body` for tonic).
///
/// Each call checks its target before any socket is opened: scheme `http` or
/// `https` in any case, a host, a port in `1..=65535`, no user info, and the `tls` feature for
/// `https`. Then it opens the byte stream with its transport (TCP by default, see
/// [`with_transport`](Self::with_transport)), wraps `https` in TLS, and runs the HTTP/2
/// handshake with its settings.
pub struct H2Connector<B, T = TcpConnector> {
    transport: T,
    settings: Settings,
    #[cfg(feature = "tls")]
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    _body: PhantomData<fn() -> B>,
}

/// The HTTP/2 settings of a connector.
#[derive(Clone, Copy, Debug, Default)]
struct Settings {
    keep_alive: Option<(Duration, Duration)>,
    stream_window: Option<u32>,
    connection_window: Option<u32>,
    adaptive_window: bool,
    max_frame_size: Option<u32>,
}

impl<B, T: Clone> Clone for H2Connector<B, T> {
    fn clone(&self) -> Self {
        H2Connector {
            transport: self.transport.clone(),
            settings: self.settings,
            #[cfg(feature = "tls")]
            tls: self.tls.clone(),
            _body: PhantomData,
        }
    }
}

impl<B, T> fmt::Debug for H2Connector<B, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Connector")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<B> Default for H2Connector<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B> H2Connector<B> {
    /// A connector over TCP with hyper's default HTTP/2 settings and no keep-alive pings.
    pub fn new() -> Self {
        H2Connector {
            transport: TcpConnector,
            settings: Settings::default(),
            #[cfg(feature = "tls")]
            tls: None,
            _body: PhantomData,
        }
    }
}

/// The largest flow-control window HTTP/2 allows (RFC 9113, 6.9.1).
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// The smallest window the connector takes: HTTP/2's initial one (RFC 9113, 6.9.2). h2 opens a
/// window as the data it let in is read, so a window of 0 would never open.
const MIN_WINDOW: u32 = 65_535;
/// The longest keep-alive interval or timeout.
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(365 * 24 * 3600);
/// The frame sizes HTTP/2 allows (RFC 9113, 6.5.2).
const FRAME_SIZES: std::ops::RangeInclusive<u32> = (1 << 14)..=((1 << 24) - 1);

impl<B, T> H2Connector<B, T> {
    /// Opens byte streams with `transport` instead of TCP: any `Service<Uri>` whose response is
    /// a tokio `AsyncRead + AsyncWrite` stream (see [`crate::transport`]). It is called with the
    /// checked target's scheme (in lower case) and authority, the port always given.
    pub fn with_transport<U>(self, transport: U) -> H2Connector<B, U> {
        H2Connector {
            transport,
            settings: self.settings,
            #[cfg(feature = "tls")]
            tls: self.tls,
            _body: PhantomData,
        }
    }

    /// Sends a keep-alive ping every `interval`, also while no request is in flight, and
    /// fails the connection when its pong has not come within `timeout`: a half-open
    /// connection is found without waiting for a request. Both must be longer than zero and at
    /// most a year (hyper adds them to instants, which a larger one overflows).
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Result<Self, H2Error> {
        let fits = |d: Duration| !d.is_zero() && d <= MAX_KEEP_ALIVE;
        if !fits(interval) || !fits(timeout) {
            return Err(H2Error::Setting(format!(
                "keep_alive({interval:?}, {timeout:?}): both must be longer than zero and at \
                 most {MAX_KEEP_ALIVE:?}"
            )));
        }
        self.settings.keep_alive = Some((interval, timeout));
        Ok(self)
    }

    /// The initial flow-control windows of each stream and of the connection, in bytes: from
    /// 65,535 (HTTP/2's initial window) to 2^31 - 1. Turns the adaptive window off.
    pub fn window_sizes(mut self, stream: u32, connection: u32) -> Result<Self, H2Error> {
        for (name, size) in [("stream", stream), ("connection", connection)] {
            if !(MIN_WINDOW..=MAX_WINDOW).contains(&size) {
                return Err(H2Error::Setting(format!(
                    "{name} window of {size} bytes is outside {MIN_WINDOW}..={MAX_WINDOW}"
                )));
            }
        }
        self.settings.stream_window = Some(stream);
        self.settings.connection_window = Some(connection);
        self.settings.adaptive_window = false;
        Ok(self)
    }

    /// Sizes the flow-control windows from the measured bandwidth-delay product (BDP), in
    /// place of fixed ones.
    pub fn adaptive_window(mut self) -> Self {
        self.settings.adaptive_window = true;
        self.settings.stream_window = None;
        self.settings.connection_window = None;
        self
    }

    /// The largest frame the connection accepts, in bytes: from 2^14 to 2^24 - 1.
    pub fn max_frame_size(mut self, size: u32) -> Result<Self, H2Error> {
        if !FRAME_SIZES.contains(&size) {
            return Err(H2Error::Setting(format!(
                "max_frame_size of {size} bytes is outside {}..={}",
                FRAME_SIZES.start(),
                FRAME_SIZES.end()
            )));
        }
        self.settings.max_frame_size = Some(size);
        Ok(self)
    }

    /// The rustls client configuration for `https` (default: the webpki roots). ALPN is set to
    /// `h2` whatever the configuration says.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn with_tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    fn builder(
        &self,
        spawner: super::tasks::Spawner,
    ) -> hyper::client::conn::http2::Builder<super::tasks::Spawner> {
        let mut builder = hyper::client::conn::http2::Builder::new(spawner);
        builder.timer(TokioTimer::new());
        let s = &self.settings;
        if let Some((interval, timeout)) = s.keep_alive {
            builder
                .keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
        }
        if s.adaptive_window {
            builder.adaptive_window(true);
        }
        builder
            .initial_stream_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size);
        builder
    }
}

/// A checked target: where the connector connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) secure: bool,
    /// The host as written (IPv6 addresses keep their brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Target {
    fn scheme(&self) -> Scheme {
        if self.secure {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        }
    }

    fn authority(&self) -> Result<Authority, H2Error> {
        Authority::try_from(format!("{}:{}", self.host, self.port))
            .map_err(|e| H2Error::InvalidUrl(e.to_string()))
    }

    /// What the transport is called with: the scheme and authority, nothing else.
    fn transport_uri(&self) -> Result<Uri, H2Error> {
        crate::transport::transport_uri(self.scheme().as_str(), &self.host, self.port)
            .map_err(|e| H2Error::InvalidUrl(e.to_string()))
    }
}

/// Checks an HTTP/2 target: scheme `http` or `https` in any case, a host, no user info, a port
/// of digits in `1..=65535` (absent: 80 or 443), and the `tls` feature for `https`.
pub(crate) fn check(uri: &Uri) -> Result<Target, H2Error> {
    let secure = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => false,
        Some(s) if s.eq_ignore_ascii_case("https") => true,
        other => return Err(H2Error::UnsupportedScheme(other.unwrap_or("").to_string())),
    };
    let authority = uri.authority().map(Authority::as_str).unwrap_or("");
    let (host, port) =
        authority_of(authority, if secure { 443 } else { 80 }).map_err(|bad| match bad {
            BadAuthority::Invalid(why) => H2Error::InvalidUrl(format!("{why} in {uri}")),
            BadAuthority::EmptyHost => H2Error::InvalidUrl(format!("no host in {uri}")),
            BadAuthority::PortOutOfRange(port) => H2Error::PortOutOfRange(port),
        })?;
    if secure && !cfg!(feature = "tls") {
        return Err(H2Error::TlsUnavailable);
    }
    Ok(Target { secure, host, port })
}

impl<B, T> Service<Uri> for H2Connector<B, T>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    T: Service<Uri>,
    T::Response: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
{
    type Response = H2Connection<B>;
    type Error = H2Error;
    type Future = Pin<Box<dyn Future<Output = Result<H2Connection<B>, H2Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H2Error>> {
        self.transport
            .poll_ready(cx)
            .map_err(|e| H2Error::Io(io_error(e)))
    }

    fn call(&mut self, target: Uri) -> Self::Future {
        let checked = check(&target).and_then(|t| Ok((t.transport_uri()?, t.authority()?, t)));
        let (uri, authority, target) = match checked {
            Ok(checked) => checked,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let (mut tasks, spawner) = Tasks::new();
        let builder = self.builder(spawner);
        let scheme = target.scheme();
        #[cfg(feature = "tls")]
        let tls = target
            .secure
            .then(|| (target.host.clone(), self.tls.clone()));
        let opening = self.transport.call(uri);
        Box::pin(async move {
            let io = ByteStream::new(opening.await.map_err(|e| H2Error::Io(io_error(e)))?);
            #[cfg(feature = "tls")]
            let io = match tls {
                Some((host, config)) => crate::tls::wrap(io, &host, config, &[b"h2"])
                    .await
                    .map_err(H2Error::Tls)?,
                None => io,
            };
            let (send, dispatch) = builder
                .handshake::<_, B>(TokioIo::new(io))
                .await
                .map_err(H2Error::Handshake)?;
            tasks.dispatch(Box::pin(dispatch));
            Ok(H2Connection::new(send, scheme, authority, tasks))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(target: &str) -> String {
        let uri: Uri = match target.parse() {
            Ok(uri) => uri,
            Err(_) => return "unparsable".into(),
        };
        match check(&uri) {
            Ok(t) => format!(
                "{} {} {}",
                if t.secure { "https" } else { "http" },
                t.host,
                t.port
            ),
            Err(H2Error::InvalidUrl(_)) => "invalid".into(),
            Err(H2Error::UnsupportedScheme(s)) => format!("scheme {s}"),
            Err(H2Error::PortOutOfRange(p)) => format!("port {p}"),
            Err(H2Error::TlsUnavailable) => "no tls".into(),
            Err(other) => format!("other: {other}"),
        }
    }

    #[test]
    fn targets_are_checked_before_any_socket_is_opened() {
        let https = |ok: &str| {
            if cfg!(feature = "tls") {
                ok.to_string()
            } else {
                "no tls".into()
            }
        };
        let cases: Vec<(&str, String)> = vec![
            ("http://example.com", "http example.com 80".into()),
            ("http://example.com:50051/", "http example.com 50051".into()),
            ("HTTP://example.com/", "http example.com 80".into()),
            ("https://example.com/", https("https example.com 443")),
            ("http://[::1]:50051", "http [::1] 50051".into()),
            ("http://[::1]", "http [::1] 80".into()),
            ("http://h:/", "http h 80".into()),
            ("http://h:0/", "port 0".into()),
            ("http://h:65536/", "port 65536".into()),
            ("http://h:99999/", "port 99999".into()),
            ("ws://h/", "scheme ws".into()),
            ("grpc://h/", "scheme grpc".into()),
            ("/just/a/path", "scheme ".into()),
            ("http://user@h/", "invalid".into()),
            ("http://[]:80/", "invalid".into()),
            ("http://[zz]/", "invalid".into()),
            ("http://[1.2.3.4]/", "invalid".into()),
            ("http://[fe80::1%25eth0]/", "invalid".into()),
            ("http://[::1]x:80/", "invalid".into()),
            ("http://h:+80/", "invalid".into()),
            ("http://h:8o/", "invalid".into()),
        ];
        for (target, expected) in cases {
            assert_eq!(of(target), expected, "{target}");
        }
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let c = || H2Connector::<http_body_util::Empty<Bytes>>::new();
        assert!(
            c().keep_alive(Duration::ZERO, Duration::from_secs(1))
                .is_err()
        );
        assert!(
            c().keep_alive(Duration::from_secs(1), Duration::ZERO)
                .is_err()
        );
        assert!(
            c().keep_alive(Duration::from_secs(10), Duration::from_secs(2))
                .is_ok()
        );
        assert!(c().window_sizes(MAX_WINDOW + 1, 65_535).is_err());
        assert!(c().window_sizes(65_535, MAX_WINDOW + 1).is_err());
        assert!(c().window_sizes(MAX_WINDOW, MAX_WINDOW).is_ok());
        assert!(c().window_sizes(MIN_WINDOW, MIN_WINDOW).is_ok());
        assert!(c().window_sizes(0, MIN_WINDOW).is_err());
        assert!(c().window_sizes(MIN_WINDOW, MIN_WINDOW - 1).is_err());
        // A year, at most: 365 days of 86,400 seconds.
        let year = Duration::from_secs(31_536_000);
        assert!(c().keep_alive(year, year).is_ok());
        assert!(
            c().keep_alive(Duration::MAX, Duration::from_secs(5))
                .is_err()
        );
        assert!(
            c().keep_alive(Duration::from_secs(5), year + Duration::from_secs(1))
                .is_err()
        );
        assert!(c().max_frame_size((1 << 14) - 1).is_err());
        assert!(c().max_frame_size(1 << 24).is_err());
        assert!(c().max_frame_size(1 << 14).is_ok());
        assert!(
            c().keep_alive(year + Duration::from_nanos(1), Duration::from_secs(5))
                .is_err()
        );
        let error = c().window_sizes(u32::MAX, 1).unwrap_err().to_string();
        assert_eq!(
            error,
            "invalid http/2 setting: stream window of 4294967295 bytes is outside 65535..=2147483647"
        );
    }

    #[test]
    fn a_connector_shows_its_settings() {
        let connector = H2Connector::<http_body_util::Empty<Bytes>>::new()
            .keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .unwrap();
        let shown = format!("{connector:?}");
        assert!(
            shown.starts_with("H2Connector { settings: Settings { keep_alive: Some((1s, 2s))"),
            "{shown}"
        );
    }

    /// A transport that is not ready when first asked, then fails.
    struct Unready(usize);

    impl Service<Uri> for Unready {
        type Response = tokio::io::DuplexStream;
        type Error = std::io::Error;
        type Future = std::future::Ready<std::io::Result<tokio::io::DuplexStream>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.0 += 1;
            if self.0 == 1 {
                Poll::Pending
            } else {
                Poll::Ready(Err(std::io::ErrorKind::ConnectionRefused.into()))
            }
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            std::future::ready(Err(std::io::Error::other("called without readiness")))
        }
    }

    #[test]
    fn the_connector_is_ready_when_its_transport_is() {
        let mut connector =
            H2Connector::<http_body_util::Empty<Bytes>>::new().with_transport(Unready(0));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(connector.poll_ready(&mut cx).is_pending());
        match connector.poll_ready(&mut cx) {
            Poll::Ready(Err(H2Error::Io(e))) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
            }
            other => panic!("the transport's error, not {other:?}"),
        }
    }

    use bytes::Bytes;
}
