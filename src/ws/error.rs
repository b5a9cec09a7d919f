//! Errors of the WebSocket transport.

use std::io;

use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What can go wrong in the WebSocket transport.
///
/// The first four are rejected before any socket is opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// The URL could not be parsed into a request.
    #[error("invalid websocket url: {0}")]
    InvalidUrl(String),
    /// The scheme is not `ws` or `wss`.
    #[error("unsupported scheme {0:?}: expected ws or wss")]
    UnsupportedScheme(String),
    /// The URL has no host.
    #[error("the url has an empty host")]
    EmptyHost,
    /// The port is not in `1..=65535`.
    #[error("port {0} is out of range 1..=65535")]
    PortOutOfRange(String),
    /// A `wss` URL, but the crate was built without the `tls` feature.
    #[error("wss needs the `tls` feature of tower-epoch")]
    TlsUnavailable,
    /// Opening the byte stream failed.
    #[error("connecting failed")]
    Io(#[source] io::Error),
    /// The TLS handshake failed.
    #[error("tls handshake failed")]
    Tls(#[source] io::Error),
    /// The server answered the upgrade with another status (a 503, say).
    #[error("the server rejected the upgrade with status {status}")]
    Rejected {
        /// The HTTP status of the answer.
        status: u16,
    },
    /// The upgrade failed otherwise: a malformed answer, a protocol error.
    #[error("websocket handshake failed")]
    Handshake(#[source] tungstenite::Error),
    /// Reading or writing an open connection failed.
    #[error("websocket transport failed")]
    Transport(#[source] tungstenite::Error),
    /// The peer closed the connection with a close code other than a normal closure (or with
    /// 1000 when the client reconnects after normal closures).
    #[error("the peer closed the connection ({code}: {reason:?})")]
    PeerClosed {
        /// The close code.
        code: CloseCode,
        /// The close reason.
        reason: String,
    },
    /// The stream ended without a Close frame (an abnormal closure, 1006).
    #[error("the connection dropped without a close frame")]
    Dropped,
    /// No pong arrived within the pong timeout after a ping: the peer is unresponsive or the
    /// connection half-open.
    #[error("no pong within {0:?}: the peer is unresponsive")]
    HeartbeatTimeout(std::time::Duration),
}

impl WsError {
    /// An error reading or writing an open connection: a reset or end of stream without a
    /// Close frame is [`WsError::Dropped`] (an abnormal closure, 1006), whichever side noticed
    /// it; anything else is a transport error.
    pub(crate) fn from_transport(error: tungstenite::Error) -> WsError {
        use tungstenite::error::ProtocolError;
        match &error {
            tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                WsError::Dropped
            }
            tungstenite::Error::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                ) =>
            {
                WsError::Dropped
            }
            _ => WsError::Transport(error),
        }
    }

    pub(crate) fn from_handshake(error: tungstenite::Error) -> WsError {
        match error {
            tungstenite::Error::Http(response) => WsError::Rejected {
                status: response.status().as_u16(),
            },
            tungstenite::Error::Io(error) => WsError::Io(error),
            other => WsError::Handshake(other),
        }
    }
}

/// Why [`WsClient::send`](super::WsClient::send) (or `feed`, or a [`WsSink`](super::WsSink))
/// did not accept or deliver a message. The message comes back with the error: nothing is
/// dropped silently.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The outbound queue is full and the client fails rather than waits
    /// ([`WhenFull::Fail`](super::WhenFull::Fail)).
    #[error("the outbound queue is full ({capacity} messages)")]
    Full {
        /// The message, not sent.
        message: Message,
        /// The queue's capacity.
        capacity: usize,
    },
    /// The message is not a data message (text or binary): control frames are the client's.
    #[error("only text and binary messages can be sent")]
    NotData(Message),
    /// [`WsSink`](super::WsSink) was given a message without a successful `poll_ready` before
    /// it (the `Sink` contract): it has no room reserved for it.
    #[error("`start_send` without a successful `poll_ready` before it")]
    NotReady(Message),
    /// The client has shut down: every handle is gone or its driver stopped. Messages it had
    /// accepted and not written are returned by [`WsClient::take_unsent`](super::WsClient::take_unsent).
    #[error("the websocket client has shut down")]
    Closed,
}
