//! Errors of the HTTP/2 transport, and which of them mean the connection failed.

use std::error::Error as StdError;
use std::io;
use std::sync::Arc;

/// What can go wrong in the HTTP/2 transport.
///
/// The URL and setting errors are found before any socket is opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum H2Error {
    /// The target is not a URL with a host.
    #[error("invalid http/2 target: {0}")]
    InvalidUrl(String),
    /// The scheme is not `http` or `https`.
    #[error("unsupported scheme {0:?}: expected http or https")]
    UnsupportedScheme(String),
    /// The port is not in `1..=65535`.
    #[error("port {0} is out of range 1..=65535")]
    PortOutOfRange(String),
    /// An `https` target, but the crate was built without the `tls` feature.
    #[error("https needs the `tls` feature of tower-epoch")]
    TlsUnavailable,
    /// A setting of [`H2Connector`](super::H2Connector) is out of range.
    #[error("invalid http/2 setting: {0}")]
    Setting(String),
    /// Opening the byte stream failed.
    #[error("connecting failed")]
    Io(#[source] io::Error),
    /// The TLS handshake failed.
    #[error("tls handshake failed")]
    Tls(#[source] io::Error),
    /// The HTTP/2 handshake failed.
    #[error("http/2 handshake failed")]
    Handshake(#[source] hyper::Error),
    /// The connection failed: an I/O error, a GOAWAY with an error code, a keep-alive ping that
    /// was not answered in time. Its monitor reports it; a reconnect follows.
    #[error("the http/2 connection failed")]
    Connection(#[source] Arc<hyper::Error>),
    /// A request failed. [`H2Error::is_connection_failure`] says whether its connection failed
    /// with it.
    #[error("the http/2 request failed")]
    Request(#[source] hyper::Error),
    /// The request never reached the server: its connection was ending (a GOAWAY, or the
    /// socket closed before hyper wrote it), or the server refused the stream unprocessed
    /// (`REFUSED_STREAM`, or above the last stream of a GOAWAY without an error code, RFC 9113
    /// 8.7; h2 gives a stream above the last one of a GOAWAY with an error code the same error
    /// as one below it, so such a request is a failed [`H2Error::Request`]). Sending it again, on
    /// the next connection, is safe even for a call that is not idempotent.
    #[error("the http/2 request was not sent")]
    NotSent(#[source] hyper::Error),
    /// The request was made on a connection that has been released (a copy kept past its
    /// connection's end): make it again through the reconnecting service.
    #[error("the http/2 connection is closing")]
    Closing,
}

impl H2Error {
    /// The error of a request: [`H2Error::NotSent`] when hyper gave the request back
    /// (`unsent`) or the server refused it unprocessed, [`H2Error::Request`] otherwise.
    pub(super) fn of_request(error: hyper::Error, unsent: bool) -> H2Error {
        if unsent || unprocessed(&error) {
            H2Error::NotSent(error)
        } else {
            H2Error::Request(error)
        }
    }

    /// Whether this error means the connection failed, not only the request: the default
    /// failure predicate of [`layer`](super::layer).
    ///
    /// Connection-level: an I/O error, a GOAWAY with an error code, a connection error of the
    /// protocol, a keep-alive timeout.
    /// Not: a stream reset by the peer (`RST_STREAM`), [`H2Error::NotSent`] (a graceful end:
    /// the monitor reports it, and the layer reconnects at once), a request canceled or cut by
    /// the connection's end without an error of its own (the monitor reports that end, as a
    /// failure or not), errors of the request's own body or headers, and
    /// [`H2Error::Closing`].
    pub fn is_connection_failure(&self) -> bool {
        match self {
            H2Error::Connection(_) => true,
            H2Error::Request(error) => is_connection_level(error),
            _ => false,
        }
    }
}

/// The h2 error among `error`'s sources, if any.
fn h2_error(error: &hyper::Error) -> Option<&h2::Error> {
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = cause.source();
    }
    None
}

/// Whether the server refused the request before processing it.
fn unprocessed(error: &hyper::Error) -> bool {
    h2_error(error).is_some_and(|h2| {
        (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
            || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM))
    })
}

fn is_connection_level(error: &hyper::Error) -> bool {
    if error.is_timeout() {
        return true;
    }
    if let Some(h2) = h2_error(error) {
        if h2.is_io() {
            return true;
        }
        if h2.is_go_away() {
            return h2.reason() != Some(h2::Reason::NO_ERROR);
        }
        // A reset stream is the request's; any other h2 error is the connection's.
        return !h2.is_reset();
    }
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(cause) = source {
        if cause.is::<io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The failure predicate the HTTP/2 layer is built with: [`H2Error::is_connection_failure`]
/// on a response error of the connection.
pub(super) fn is_failure(error: &(dyn StdError + Send + Sync + 'static)) -> bool {
    error
        .downcast_ref::<H2Error>()
        .is_some_and(H2Error::is_connection_failure)
}
