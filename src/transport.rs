//! The byte streams the transports run over: [`TcpConnector`], the default, and
//! [`ByteStream`], whatever opened it.
//!
//! A transport is any `Service<Uri>` whose response is a tokio `AsyncRead + AsyncWrite`
//! stream (the shape of hyper-util's connectors, with tokio's I/O traits): a proxy, a Unix
//! socket, an in-memory pipe in tests.
//! The connectors take one with `with_transport`
#![cfg_attr(
    feature = "ws",
    doc = "([`WsConnector::with_transport`](crate::ws::WsConnector::with_transport))"
)]
//! and call it with the checked URL's scheme and authority, the port always given.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_service::Service;

/// A transport's stream, as the connector keeps it.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The byte stream a connection runs over: the stream its transport opened (TCP by default),
/// inside TLS for `wss` and `https`.
///
/// It is one type whatever the transport and the features, so that a connector's response
/// type does not change when a dependency turns on `tls`.
pub struct ByteStream(Box<dyn Io>);

impl ByteStream {
    /// `io` behind one box; a `ByteStream` is taken as it is, not boxed again.
    pub(crate) fn new<T: AsyncRead + AsyncWrite + Send + Unpin + 'static>(io: T) -> ByteStream {
        let mut io = Some(io);
        if let Some(stream) =
            (&mut io as &mut dyn std::any::Any).downcast_mut::<Option<ByteStream>>()
        {
            return stream.take().expect("just put in");
        }
        ByteStream(Box::new(io.expect("not taken")))
    }
}

/// Why a URL's authority is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadAuthority {
    /// Not an authority one can connect to, and why.
    Invalid(&'static str),
    EmptyHost,
    /// A port of digits, out of `1..=65535`.
    PortOutOfRange(String),
}

/// The host (an IPv6 address keeps its brackets) and port of a URL's authority, as RFC 3986 and
/// RFC 6455 say: `host [":" port]`; no user info (which would be sent nowhere, or taken for the
/// host by a careless split); an IP literal is an IPv6 address in brackets (IPvFuture names no
/// address one can connect to); a port of digits only (no sign, which `u64::from_str` takes) in
/// `1..=65535`; an empty or absent port is `default_port`.
pub(crate) fn authority_of(
    authority: &str,
    default_port: u16,
) -> Result<(String, u16), BadAuthority> {
    use BadAuthority::Invalid;
    if authority.contains('@') {
        return Err(Invalid("user info is not allowed"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, tail)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(Invalid("not an IPv6 address in brackets"));
                }
                let port = match tail {
                    "" => None,
                    _ => match tail.strip_prefix(':') {
                        Some(port) => Some(port),
                        None => return Err(Invalid("text after the IPv6 host")),
                    },
                };
                (format!("[{v6}]"), port)
            }
            None => return Err(Invalid("unclosed IPv6 host")),
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (authority.to_string(), None),
        },
    };
    if host.is_empty() {
        return Err(BadAuthority::EmptyHost);
    }
    let port = match port {
        None | Some("") => default_port,
        Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => match digits.parse::<u64>() {
            Ok(port @ 1..=65535) => port as u16,
            _ => return Err(BadAuthority::PortOutOfRange(digits.to_string())),
        },
        Some(_) => return Err(Invalid("a port of other than digits")),
    };
    Ok((host, port))
}

/// What a connector calls its transport with: `scheme://host:port/`, the checked URL's scheme
/// and authority with the port always given.
pub(crate) fn transport_uri(scheme: &str, host: &str, port: u16) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(scheme)
        .authority(format!("{host}:{port}"))
        .path_and_query("/")
        .build()
}

/// A transport's error as an `io::Error`: the error itself if it is one, or with the kind of
/// the first `io::Error` among its sources (a refused connect stays `ConnectionRefused` through
/// a wrapper), or `Other`.
pub(crate) fn io_error(error: impl Into<crate::BoxError>) -> io::Error {
    let error = error.into();
    let kind = {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
        loop {
            match source {
                Some(cause) => match cause.downcast_ref::<io::Error>() {
                    Some(io) => break io.kind(),
                    None => source = cause.source(),
                },
                None => break io::ErrorKind::Other,
            }
        }
    };
    match error.downcast::<io::Error>() {
        Ok(io) => *io,
        Err(other) => io::Error::new(kind, other),
    }
}

impl std::fmt::Debug for ByteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteStream").finish_non_exhaustive()
    }
}

impl AsyncRead for ByteStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ByteStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// The default transport of the connectors: a `Service<Uri>` that opens a TCP stream to the
/// URI's host and port, with `TCP_NODELAY` set (WebSocket and HTTP/2 frames are small).
///
/// The port is the URI's, or 80 for `ws` and `http`, 443 for `wss` and `https` (the connector
/// always gives it one). A URI without a host, or without a port and with another scheme, is an
/// [`io::ErrorKind::InvalidInput`] error.
///
/// Write a transport of your own as a `Service<Uri>` whose response is a tokio
/// `AsyncRead + AsyncWrite` stream (a proxy, a Unix socket, an in-memory pipe); wrapping this
/// one with tower's combinators (`map_request`, `map_response`) is often enough.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpConnector;

type TcpFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

impl Service<Uri> for TcpConnector {
    type Response = TcpStream;
    type Error = io::Error;
    type Future = TcpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let target = host_and_port(&uri);
        Box::pin(async move {
            let (host, port) = target?;
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

/// Where a URI says to connect: its host without IPv6 brackets, and its port or its scheme's.
fn host_and_port(uri: &Uri) -> io::Result<(String, u16)> {
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{why}: {uri}"));
    let host = uri
        .host()
        .map(|host| host.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or_default();
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    let port = match uri.port_u16() {
        Some(port) => port,
        None => match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("ws" | "http") => 80,
            Some("wss" | "https") => 443,
            _ => return Err(invalid("no port, and no scheme with a default one")),
        },
    };
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_and_port_of_a_uri() {
        let of = |uri: &str| match host_and_port(&uri.parse().unwrap()) {
            Ok((host, port)) => format!("{host} {port}"),
            Err(e) => format!("{:?}", e.kind()),
        };
        assert_eq!(of("ws://example.com:8080/"), "example.com 8080");
        assert_eq!(of("ws://example.com/"), "example.com 80");
        assert_eq!(of("WS://example.com/"), "example.com 80");
        assert_eq!(of("http://example.com/"), "example.com 80");
        assert_eq!(of("wss://example.com/"), "example.com 443");
        assert_eq!(of("https://example.com/"), "example.com 443");
        assert_eq!(of("ws://[::1]:9/"), "::1 9");
        assert_eq!(of("ftp://example.com/"), "InvalidInput");
        assert_eq!(of("example.com:7"), "example.com 7");
        assert_eq!(of("/just/a/path"), "InvalidInput");
        assert_eq!(of("ws://:80/"), "InvalidInput");
        assert_eq!(of("ws://[]:80/"), "InvalidInput");
    }

    #[tokio::test]
    async fn opens_a_tcp_stream_with_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let uri: Uri = format!("ws://{addr}/").parse().unwrap();
        let stream = TcpConnector.call(uri).await.unwrap();
        assert!(stream.nodelay().unwrap());
        assert_eq!(stream.peer_addr().unwrap(), addr);

        let refused = TcpConnector.call("ftp://127.0.0.1/".parse().unwrap()).await;
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    /// A stream that answers each call in a way of its own, to tell delegation from a default.
    struct Probe;

    impl AsyncRead for Probe {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            buf.put_slice(b"probe");
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Probe {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len().min(3)))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum::<usize>() + 100))
        }
        fn is_write_vectored(&self) -> bool {
            false
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
        }
    }

    #[test]
    fn a_byte_stream_delegates_every_call() {
        let mut stream = ByteStream::new(Probe);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut pinned = Pin::new(&mut stream);
        let mut space = [0; 8];
        let mut buf = ReadBuf::new(&mut space);
        assert!(pinned.as_mut().poll_read(&mut cx, &mut buf).is_ready());
        assert_eq!(buf.filled(), b"probe");
        let wrote = pinned.as_mut().poll_write(&mut cx, b"abcdef");
        assert!(matches!(wrote, Poll::Ready(Ok(3))));
        let slices = [io::IoSlice::new(b"ab")];
        let wrote = pinned.as_mut().poll_write_vectored(&mut cx, &slices);
        assert!(matches!(wrote, Poll::Ready(Ok(102))));
        assert!(!pinned.is_write_vectored());
        let flushed = pinned.as_mut().poll_flush(&mut cx);
        assert!(matches!(flushed, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::WriteZero));
        let shut = pinned.as_mut().poll_shutdown(&mut cx);
        assert!(matches!(shut, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::NotConnected));
    }

    #[test]
    fn a_byte_stream_is_boxed_once() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let once = ByteStream::new(ours);
        let inner: *const dyn Io = &*once.0;
        let again = ByteStream::new(once);
        assert!(std::ptr::addr_eq(inner, &*again.0), "the same box");
    }

    #[test]
    fn a_transport_error_keeps_the_kind_of_its_io_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapper(#[source] io::Error);
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(io_error(refused()).kind(), io::ErrorKind::ConnectionRefused);
        let wrapped = io_error(Wrapper(refused()));
        assert_eq!(wrapped.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(wrapped.to_string(), "wrapped");
        assert_eq!(io_error("no io in here").kind(), io::ErrorKind::Other);
    }

    #[tokio::test]
    async fn a_byte_stream_passes_bytes_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut stream = ByteStream::new(ours);
        assert!(format!("{stream:?}").starts_with("ByteStream"));
        stream.write_all(b"ping").await.unwrap();
        stream.flush().await.unwrap();
        let mut got = [0; 4];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        theirs.write_all(b"pong").await.unwrap();
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        let written = stream
            .write_vectored(&[io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")])
            .await
            .unwrap();
        assert!(written >= 1);
        assert_eq!(stream.is_write_vectored(), theirs.is_write_vectored());
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, &b"abcd"[..written]);
    }
}
