//! Errors of the WebSocket transport.

use std::io;

use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What can go wrong in the WebSocket transport.
///
/// The URL errors and [`WsError::Setting`] are found before any socket is opened.
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
    /// The at-least-once acknowledgement function panicked on a message of this connection:
    /// a failure of the connection.
    #[error("the acknowledgement function panicked")]
    AckPanicked,
    /// A setting of [`WsClientBuilder`](super::WsClientBuilder) is out of range; found by
    /// [`build`](super::WsClientBuilder::build).
    #[error("invalid client setting")]
    Setting(#[from] SettingError),
}

/// A setting of [`WsClientBuilder`](super::WsClientBuilder) that
/// [`build`](super::WsClientBuilder::build) refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingError {
    /// A capacity of zero: nothing could ever be sent or received.
    #[error("{setting} must be at least 1")]
    ZeroCapacity {
        /// The setting's builder method.
        setting: &'static str,
    },
    /// A capacity above what the client can count.
    #[error("{setting} of {value} is above the maximum of {max}")]
    CapacityTooLarge {
        /// The setting's builder method.
        setting: &'static str,
        /// The value given.
        value: usize,
        /// The largest value allowed.
        max: usize,
    },
    /// A duration of zero where the client must wait between two things (a heartbeat).
    #[error("{setting} must be longer than zero")]
    ZeroDuration {
        /// The setting's builder method.
        setting: &'static str,
    },
    /// The connector's `WebSocketConfig` has a `max_write_buffer_size` no larger than its
    /// `write_buffer_size`, which tungstenite refuses.
    #[error(
        "max_write_buffer_size ({max_write_buffer_size}) must be larger than \
         write_buffer_size ({write_buffer_size})"
    )]
    WriteBuffer {
        /// The connector's `write_buffer_size`.
        write_buffer_size: usize,
        /// The connector's `max_write_buffer_size`.
        max_write_buffer_size: usize,
    },
    /// A setting of the layer that works through the `Reconnect` service, which the client
    /// does not use: its messages go through its own queue, so no request would hold the
    /// connection or start it.
    #[error("{setting} is not supported by the WebSocket client")]
    Unsupported {
        /// The layer's builder method.
        setting: &'static str,
    },
    /// A duration too long to add to a reading of the clock.
    #[error("{setting} of {value:?} is too long to be a deadline")]
    DurationTooLong {
        /// The setting's builder method.
        setting: &'static str,
        /// The value given.
        value: std::time::Duration,
    },
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

/// Why [`WsClient::send`](super::WsClient::send) (or `feed`, a [`Permit`](super::Permit), a
/// [`WsSink`](super::WsSink)) did not accept or deliver a message. A message the client had
/// not yet delivered comes back with the error, or (for a message nobody waits for any more)
/// through [`WsClient::take_unsent`](super::WsClient::take_unsent): nothing is dropped
/// silently.
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
    /// The message is larger than any connection of this client can take: above the
    /// connector's `max_write_buffer_size`, less its `write_buffer_size` and a frame header.
    #[error("the message of {} bytes is above the client's limit of {max}", message.len())]
    TooLarge {
        /// The message, not sent.
        message: Message,
        /// The largest message the client takes, in bytes.
        max: usize,
    },
    /// [`WsSink`](super::WsSink) was given a message without a successful `poll_ready` before
    /// it (the `Sink` contract): it has no room reserved for it.
    #[error("`start_send` without a successful `poll_ready` before it")]
    NotReady(Message),
    /// The client has shut down (every handle, client and sink is gone, or its driver
    /// stopped), so the message will not be delivered.
    ///
    /// `message` is the message when it comes back with this error: one refused when it was
    /// offered, or one accepted and not yet delivered whose [`SendFuture`](super::SendFuture)
    /// still waited. It is `None` where there was no message to give back: a wait for room or
    /// a flush.
    #[error("the websocket client has shut down")]
    Closed {
        /// The message, not delivered.
        message: Option<Message>,
    },
    /// The message was accepted, then taken back by
    /// [`WsClient::take_unsent`](super::WsClient::take_unsent), which returned it.
    #[error("message {seq} was taken back before it was delivered")]
    Withdrawn {
        /// The message's sequence number.
        seq: u64,
    },
}

impl SendError {
    /// The message this error gives back, if it carries one.
    pub fn into_message(self) -> Option<Message> {
        match self {
            SendError::Full { message, .. }
            | SendError::TooLarge { message, .. }
            | SendError::NotData(message)
            | SendError::NotReady(message) => Some(message),
            SendError::Closed { message } => message,
            SendError::Withdrawn { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_or_an_end_without_close_is_a_drop_and_anything_else_a_transport_error() {
        use io::ErrorKind::*;
        for kind in [
            ConnectionReset,
            ConnectionAborted,
            BrokenPipe,
            UnexpectedEof,
        ] {
            let error = tungstenite::Error::Io(io::Error::from(kind));
            assert!(
                matches!(WsError::from_transport(error), WsError::Dropped),
                "{kind:?}"
            );
        }
        let reset = tungstenite::error::ProtocolError::ResetWithoutClosingHandshake;
        assert!(matches!(
            WsError::from_transport(tungstenite::Error::Protocol(reset)),
            WsError::Dropped
        ));
        for kind in [TimedOut, PermissionDenied, Other] {
            let error = tungstenite::Error::Io(io::Error::from(kind));
            assert!(
                matches!(WsError::from_transport(error), WsError::Transport(_)),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_send_error_gives_back_the_message_it_carries() {
        let m = || Message::text("m");
        let carried = [
            SendError::Full {
                message: m(),
                capacity: 1,
            },
            SendError::NotData(m()),
            SendError::TooLarge {
                message: m(),
                max: 0,
            },
            SendError::NotReady(m()),
            SendError::Closed { message: Some(m()) },
        ];
        for error in carried {
            assert_eq!(error.into_message(), Some(m()));
        }
        assert_eq!(SendError::Closed { message: None }.into_message(), None);
        assert_eq!(SendError::Withdrawn { seq: 3 }.into_message(), None);
    }
}
