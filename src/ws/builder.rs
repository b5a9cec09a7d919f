//! [`WsClientBuilder`]: the settings of a [`WsClient`], checked by `build`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tower::ServiceExt;
use tower::retry::backoff::{Backoff, MakeBackoff};
use tower_service::Service;

use crate::BoxError;
use crate::backoff::Exponential;

use super::client::WsClient;
use super::close::close;
use super::conn::WsConn;
use super::connector::{BoxTransport, WsConnector, endpoint_of};
use super::error::{SettingError, WsError};
use super::incoming::Incoming;
use super::monitor::Monitor;
use super::shared::Shared;
use super::writer::Wire;
use crate::epoch::Epoch;
use crate::machine::NormalEnd;
use crate::reconnect::ReconnectLayer;

/// What [`WsClient::send`] does when the outbound queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Wait for room (the default). The message is accepted when room frees up; until then it
    /// is in the [`SendFuture`](super::SendFuture) (see there what dropping it means).
    #[default]
    Wait,
    /// Fail at once with [`SendError::Full`](super::SendError::Full), handing the message back.
    Fail,
}

pub(crate) type AckFn = Arc<dyn Fn(&Message) -> Option<u64> + Send + Sync>;

/// Bounds for the heartbeat.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heartbeat {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// The settings the client's parts read, checked by [`WsClientBuilder::build`].
pub(crate) struct Settings {
    pub(crate) capacity: usize,
    pub(crate) when_full: WhenFull,
    pub(crate) heartbeat: Option<Heartbeat>,
    pub(crate) close_code: CloseCode,
    pub(crate) close_reason: String,
    pub(crate) close_step_timeout: Duration,
    pub(crate) reconnect_on_normal_close: bool,
    pub(crate) ack: Option<AckFn>,
    /// The largest message a connection can take (from the connector's write buffer limits).
    pub(crate) max_message: usize,
}

/// The longest header of a client's frame: 2 bytes, 8 of length, 4 of mask.
const FRAME_HEADER: usize = 14;

type Configure = Box<
    dyn FnOnce(ReconnectLayer<Request, Exponential>) -> ReconnectLayer<Request, Exponential> + Send,
>;

/// Builds a [`WsClient`]. Made by [`WsClient::builder`].
///
/// Every setting is checked by [`build`](Self::build): a zero capacity or a zero or
/// overflowing heartbeat is a [`WsError::Setting`] there, never a panic later.
pub struct WsClientBuilder<B = Exponential> {
    pub(super) request: Arc<dyn Fn() -> Request + Send + Sync>,
    pub(super) connector: WsConnector<BoxTransport>,
    pub(super) backoff: B,
    pub(super) incoming_capacity: usize,
    pub(super) settings: Settings,
    pub(super) configure: Configure,
}

impl<B: fmt::Debug> fmt::Debug for WsClientBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.settings;
        f.debug_struct("WsClientBuilder")
            .field("backoff", &self.backoff)
            .field("capacity", &settings.capacity)
            .field("incoming_capacity", &self.incoming_capacity)
            .field("when_full", &settings.when_full)
            .field("heartbeat", &settings.heartbeat)
            .field("close_code", &settings.close_code)
            .field("at_least_once", &settings.ack.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            capacity: 1024,
            when_full: WhenFull::Wait,
            heartbeat: Some(Heartbeat {
                interval: Duration::from_secs(30),
                timeout: Duration::from_secs(10),
            }),
            close_code: CloseCode::Normal,
            close_reason: String::new(),
            close_step_timeout: Duration::from_secs(2),
            reconnect_on_normal_close: false,
            ack: None,
            max_message: usize::MAX,
        }
    }
}

impl WsClientBuilder {
    pub(super) fn new(request: Arc<dyn Fn() -> Request + Send + Sync>) -> WsClientBuilder {
        WsClientBuilder {
            request,
            connector: WsConnector::new().boxed(),
            backoff: crate::backoff::default_backoff(),
            incoming_capacity: 1024,
            settings: Settings::default(),
            configure: Box::new(|layer| layer),
        }
    }
}

impl<B> WsClientBuilder<B> {
    /// The connector: its transport ([`WsConnector::with_transport`]), TLS settings, protocol
    /// limits and buffer sizes.
    pub fn connector<T>(mut self, connector: WsConnector<T>) -> Self
    where
        T: Service<Uri> + Clone + Send + 'static,
        T::Response: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        T::Error: Into<BoxError>,
        T::Future: Send + 'static,
    {
        self.connector = connector.boxed();
        self
    }

    /// The backoff between reconnect attempts (any `MakeBackoff`).
    pub fn backoff<B2>(self, backoff: B2) -> WsClientBuilder<B2> {
        WsClientBuilder {
            request: self.request,
            connector: self.connector,
            backoff,
            incoming_capacity: self.incoming_capacity,
            settings: self.settings,
            configure: self.configure,
        }
    }

    /// Further settings of the underlying [`ReconnectLayer`]: connect and close timeouts,
    /// stable period, attempt limit.
    pub fn layer(
        mut self,
        configure: impl FnOnce(
            ReconnectLayer<Request, Exponential>,
        ) -> ReconnectLayer<Request, Exponential>
        + Send
        + 'static,
    ) -> Self {
        self.configure = Box::new(configure);
        self
    }

    /// How many messages the client holds at most: queued, being written, or (at-least-once)
    /// waiting for an acknowledgement. Default 1024; at least 1.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.settings.capacity = capacity;
        self
    }

    /// How many received messages wait for the [`Incoming`] stream's reader before the client
    /// stops reading (see [`Incoming`] on backpressure). Default 1024; at least 1.
    pub fn incoming_capacity(mut self, capacity: usize) -> Self {
        self.incoming_capacity = capacity;
        self
    }

    /// What `send` does when the queue is full.
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.settings.when_full = policy;
        self
    }

    /// Pings every `interval`; no pong within `timeout` is a failure of the connection. While
    /// the consumer of [`Incoming`] is behind, the client does not read and the pong deadline
    /// is paused. The ping goes out between two messages, but the peer reads it after what
    /// was written before it: under a sustained backlog, give `timeout` room for the peer to
    /// get through it. Default: every 30 s, 10 s to answer; both must be longer than zero.
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.settings.heartbeat = Some(Heartbeat { interval, timeout });
        self
    }

    /// No heartbeat.
    pub fn no_heartbeat(mut self) -> Self {
        self.settings.heartbeat = None;
        self
    }

    /// The code and reason of the Close frame a deliberate disconnect sends (default 1000, no
    /// reason).
    pub fn close_with(mut self, code: CloseCode, reason: impl Into<String>) -> Self {
        self.settings.close_code = code;
        self.settings.close_reason = reason.into();
        self
    }

    /// Bounds each step of a graceful close (writing what the connection owes, sending Close,
    /// waiting for the peer's Close). Default 2 s. The layer's close timeout bounds the whole.
    pub fn close_step_timeout(mut self, timeout: Duration) -> Self {
        self.settings.close_step_timeout = timeout;
        self
    }

    /// Reconnect after the peer closes with 1000 (normal closure) too: at once, as
    /// [`NormalEnd::Reconnect`] does. Default: no, the client goes idle
    /// ([`NormalEnd::Idle`]).
    pub fn reconnect_on_normal_close(mut self, reconnect: bool) -> Self {
        self.settings.reconnect_on_normal_close = reconnect;
        self
    }

    /// At-least-once delivery: messages stay held until acknowledged, and unacknowledged ones
    /// are re-sent, in order, first thing on the next connection. `ack` reads an incoming
    /// message and returns the highest sequence number it acknowledges (cumulatively: every
    /// message up to it), or `None`. A message counts as written once it has been handed to a
    /// connection's socket: an acknowledgement beyond the last message handed to any
    /// connection is impossible for an honest peer, retires nothing, and is counted in
    /// [`Stats::acks_ignored`](super::Stats::acks_ignored). (One within it is taken at its
    /// word: the client cannot tell a frame the peer received whole from one it did not.) The
    /// function is the caller's code; a panic in it is a failure of the connection that read
    /// the message ([`WsError::AckPanicked`]). Build messages with
    /// [`WsClient::send_with`] to put their sequence number on the wire. A `send` resolves
    /// once its message is acknowledged, a `flush` once everything before it is.
    pub fn at_least_once(
        mut self,
        ack: impl Fn(&Message) -> Option<u64> + Send + Sync + 'static,
    ) -> Self {
        self.settings.ack = Some(Arc::new(ack));
        self
    }

    /// Checks every setting; returns the largest message a connection can take.
    fn check(&self) -> Result<usize, SettingError> {
        let max = Semaphore::MAX_PERMITS;
        for (setting, value) in [
            ("queue_capacity", self.settings.capacity),
            ("incoming_capacity", self.incoming_capacity),
        ] {
            if value == 0 {
                return Err(SettingError::ZeroCapacity { setting });
            }
            if value > max {
                return Err(SettingError::CapacityTooLarge {
                    setting,
                    value,
                    max,
                });
            }
        }
        if let Some(Heartbeat { interval, timeout }) = self.settings.heartbeat {
            for value in [interval, timeout] {
                let setting = "heartbeat";
                if value.is_zero() {
                    return Err(SettingError::ZeroDuration { setting });
                }
                // Twice its length, so that no later reading of the clock overflows with it.
                let twice = value.checked_mul(2);
                if twice.is_none_or(|twice| Instant::now().checked_add(twice).is_none()) {
                    return Err(SettingError::DurationTooLong { setting, value });
                }
            }
        }
        let config = self.connector.config();
        let (write_buffer_size, max_write_buffer_size) =
            (config.write_buffer_size, config.max_write_buffer_size);
        if max_write_buffer_size <= write_buffer_size {
            return Err(SettingError::WriteBuffer {
                write_buffer_size,
                max_write_buffer_size,
            });
        }
        // tungstenite buffers a frame (header included) only while what it holds stays under
        // the maximum, and it may hold up to `write_buffer_size` before it writes.
        Ok(max_write_buffer_size
            .saturating_sub(write_buffer_size)
            .saturating_sub(FRAME_HEADER))
    }

    /// Builds the client and spawns its driver on the current tokio runtime. Nothing connects
    /// until [`Handle::connect`](crate::Handle::connect).
    ///
    /// # Errors
    ///
    /// [`WsError::Setting`] for a setting out of range; for the first request,
    /// [`WsError::UnsupportedScheme`], [`WsError::EmptyHost`], [`WsError::PortOutOfRange`],
    /// [`WsError::TlsUnavailable`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn build(self) -> Result<(WsClient, Incoming), WsError>
    where
        B: MakeBackoff + Clone + Send + 'static,
        B::Backoff: Send,
        <B::Backoff as Backoff>::Future: Send + 'static,
    {
        let max_message = self.check()?;
        endpoint_of(&(self.request)())?;
        let (incoming_tx, incoming_rx) = mpsc::channel(self.incoming_capacity);
        let request = Arc::clone(&self.request);
        let normal_end = if self.settings.reconnect_on_normal_close {
            NormalEnd::Reconnect
        } else {
            NormalEnd::Idle
        };
        let base = (self.configure)(
            ReconnectLayer::with_target_fn(move || request()).on_normal_end(normal_end),
        );
        if let Some(setting) = base.request_path_setting() {
            return Err(SettingError::Unsupported { setting }.into());
        }
        let handle = base.handle();
        let settings = Settings {
            max_message,
            ..self.settings
        };
        let shared = Arc::new(Shared::new(settings, Arc::clone(&handle.core().clock)));
        let monitor = {
            // Dropped with the driver's last copy of this closure: the client closes.
            let alive = Arc::new(Alive(Arc::clone(&shared)));
            move |conn: &WsConn, epoch: Epoch| Monitor::new(&alive.0, conn.clone(), epoch)
        };
        let teardown = {
            let shared = Arc::clone(&shared);
            move |conn: WsConn, cause| close(Arc::clone(&shared), conn, cause)
        };
        let layer = base
            .with_backoff(self.backoff)
            .with_teardown(teardown)
            .with_monitor(monitor);
        let wires = Arc::clone(&shared);
        let connector = self.connector.map_response(move |stream| {
            WsConn::new(Wire::new(stream, Arc::clone(&wires), incoming_tx.clone()))
        });
        let (service, driver) = layer.build(connector);
        drop(service);
        tokio::spawn(driver);
        Ok((WsClient::new(shared, handle), Incoming::new(incoming_rx)))
    }
}

/// Held by the driver's monitor closure: when the driver stops, the client closes.
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.close();
    }
}
