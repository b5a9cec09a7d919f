//! [`ReconnectLayer`]: the configuration, and the `Layer` that applies it to a connector.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tower::retry::backoff::{Backoff, MakeBackoff};
use tower_layer::Layer;
use tower_service::Service;

use crate::backoff::{Exponential, Sessions, default_backoff};
use crate::core::{Core, IsPermanent};
use crate::driver::{Driver, Parts, Timeouts};
use crate::error::BoxError;
use crate::handle::Handle;
use crate::machine::{NormalEnd, Policy};
use crate::teardown::{DropTeardown, Monitor, NoMonitor, Teardown};

use super::service::{IsFailure, Reconnect, WhenDisconnected};

/// Applies reconnection to a connector: a `Service<Target>` whose response is a connection.
///
/// Each application of the layer (`Layer::layer`) manages one logical connection of its own:
/// it spawns a [`Driver`] on the current tokio runtime and returns the [`Reconnect`] service,
/// whose [`Reconnect::handle`] controls that connection. Use [`build`](Self::build) instead to
/// get the driver future for another executor.
///
/// The layer's own [`handle`](Self::handle) is for the common case of one application: it
/// controls the connection of the *first* application of this layer or of any clone of it, and
/// can be taken before the layer disappears into a `ServiceBuilder`. Later applications (a layer
/// reused for several backends, as tower layers are) each get a fresh connection; take their
/// handles from their services.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower::{Layer, service_fn};
/// use tower_epoch::ReconnectLayer;
///
/// let layer = ReconnectLayer::new("backend");
/// let connect = || service_fn(|_: &str| async { Ok::<_, std::io::Error>(service_fn(|x: u8| async move { Ok::<_, std::io::Error>(x) })) });
/// let first = layer.layer(connect());
/// let second = layer.layer(connect());
/// assert_eq!(layer.handle().epoch(), first.handle().epoch());
/// second.handle().connect().unwrap(); // the second connection only
/// assert!(!layer.handle().state().is_active());
/// # }
/// ```
///
/// # Panics
///
/// `Layer::layer` panics outside a tokio runtime, as `tokio::spawn` does.
///
/// # Defaults
///
/// | setting | default |
/// |---|---|
/// | backoff | [`default_backoff`](crate::backoff::default_backoff): full jitter, up to 1 s doubling to 30 s |
/// | attempt limit | none |
/// | permanent errors | none: every error is retried |
/// | normal end by the peer | [`NormalEnd::Idle`] |
/// | connect on the first request | no: [`Handle::connect`] first |
/// | idle timeout | none |
/// | stable period (backoff reset) | 5 s |
/// | connect timeout | 10 s |
/// | close timeout | 5 s |
/// | teardown | [`DropTeardown`] |
/// | monitor | [`NoMonitor`] |
/// | while disconnected | [`WhenDisconnected::Wait`] |
/// | failure predicate | none: response errors never count as connection failures |
pub struct ReconnectLayer<T, B = Exponential, D = DropTeardown, W = NoMonitor> {
    /// The connection of the first application, which [`handle`](Self::handle) controls.
    first: Arc<Core>,
    /// Whether `first` is taken (shared by the clones).
    claimed: Arc<AtomicBool>,
    target: Arc<dyn Fn() -> T + Send + Sync>,
    backoff: B,
    teardown: D,
    monitor: W,
    settings: Settings,
}

/// The settings that do not change the layer's type.
#[derive(Clone)]
struct Settings {
    timeouts: Timeouts,
    max_attempts: Option<NonZeroU32>,
    normal_end: NormalEnd,
    lazy: bool,
    when_disconnected: WhenDisconnected,
    is_failure: Option<IsFailure>,
    is_permanent: Option<IsPermanent>,
}

impl<T: Clone + Send + Sync + 'static> ReconnectLayer<T> {
    /// A layer that connects to `target` (a clone of it on every attempt).
    pub fn new(target: T) -> Self {
        Self::with_target_fn(move || target.clone())
    }
}

impl<T> ReconnectLayer<T> {
    /// A layer that calls `target` for a fresh target on every attempt, so that a refreshed
    /// value (an auth token, a re-resolved address) is used by the next reconnect.
    pub fn with_target_fn<F>(target: F) -> Self
    where
        F: Fn() -> T + Send + Sync + 'static,
    {
        ReconnectLayer {
            first: Core::new(Policy::default()),
            claimed: Arc::new(AtomicBool::new(false)),
            target: Arc::new(target),
            backoff: default_backoff(),
            teardown: DropTeardown,
            monitor: NoMonitor,
            settings: Settings {
                timeouts: Timeouts {
                    connect: Duration::from_secs(10),
                    close: Duration::from_secs(5),
                    stable: Duration::from_secs(5),
                    idle: None,
                },
                max_attempts: None,
                normal_end: NormalEnd::Idle,
                lazy: false,
                when_disconnected: WhenDisconnected::Wait,
                is_failure: None,
                is_permanent: None,
            },
        }
    }
}

impl<T, B, D, W> ReconnectLayer<T, B, D, W> {
    /// The handle of the connection of this layer's first application (see the type's docs).
    ///
    /// Operations called before the layer is applied are queued and run when the driver starts.
    pub fn handle(&self) -> Handle {
        Handle::new(Arc::clone(&self.first))
    }

    /// Sets the backoff between attempts: any [`MakeBackoff`], such as
    /// [`Schedule`](crate::backoff::Schedule) or tower's `ExponentialBackoffMaker`.
    pub fn with_backoff<B2>(self, backoff: B2) -> ReconnectLayer<T, B2, D, W> {
        self.with_parts(|_, teardown, monitor| (backoff, teardown, monitor))
    }

    /// Sets how connections are closed (see [`crate::teardown`]).
    pub fn with_teardown<D2>(self, teardown: D2) -> ReconnectLayer<T, B, D2, W> {
        self.with_parts(|backoff, _, monitor| (backoff, teardown, monitor))
    }

    /// Sets how the installed connection is watched, so that a dead connection is noticed
    /// without waiting for the next request (see [`Monitor`]).
    pub fn with_monitor<W2>(self, monitor: W2) -> ReconnectLayer<T, B, D, W2> {
        self.with_parts(|backoff, teardown, _| (backoff, teardown, monitor))
    }

    /// The same layer with new parts of the kinds its type names.
    fn with_parts<B2, D2, W2>(
        self,
        parts: impl FnOnce(B, D, W) -> (B2, D2, W2),
    ) -> ReconnectLayer<T, B2, D2, W2> {
        let (backoff, teardown, monitor) = parts(self.backoff, self.teardown, self.monitor);
        ReconnectLayer {
            first: self.first,
            claimed: self.claimed,
            target: self.target,
            backoff,
            teardown,
            monitor,
            settings: self.settings,
        }
    }

    /// Bounds each connect attempt; an attempt still running then fails with
    /// [`Error::ConnectTimeout`](crate::Error::ConnectTimeout) and goes through backoff.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeouts.connect = timeout;
        self
    }

    /// Bounds each teardown; a teardown still running then is dropped with its connection.
    pub fn with_close_timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeouts.close = timeout;
        self
    }

    /// How long a connection must stay installed before the backoff (delay and attempt count)
    /// resets. Failures before then keep growing the delay.
    pub fn with_stable_after(mut self, period: Duration) -> Self {
        self.settings.timeouts.stable = period;
        self
    }

    /// Gives up (state [`GaveUp`](crate::State::GaveUp)) after this many attempts in one backoff
    /// session without the connection becoming stable.
    pub fn with_max_attempts(mut self, attempts: NonZeroU32) -> Self {
        self.settings.max_attempts = Some(attempts);
        self
    }

    /// What a normal end of the installed connection by the peer means (a [`Monitor`] that
    /// completes with `Ok`, or [`Handle::report_closed`]): stay idle (the default) or reconnect.
    ///
    /// An HTTP/2 server that restarts gracefully sends GOAWAY, and the connection ends
    /// normally: choose [`NormalEnd::Reconnect`] there.
    pub fn on_normal_end(mut self, normal_end: NormalEnd) -> Self {
        self.settings.normal_end = normal_end;
        self
    }

    /// Classifies errors as permanent: when `is_permanent` returns true for the error of an
    /// attempt or of the installed connection, nothing retries. The state becomes
    /// [`Refused`](crate::State::Refused), terminal as after the attempt limit, until the next
    /// `connect()`; waiting services fail with [`Error::Refused`](crate::Error::Refused).
    ///
    /// The predicate sees the cause: the connector's or the connection's own error (downcast
    /// it), or the crate's [`Error`](crate::Error) for timeouts and panics. A panicking
    /// predicate classifies nothing as permanent.
    ///
    /// ```
    /// use tower_epoch::ReconnectLayer;
    ///
    /// let layer = ReconnectLayer::new("ws://127.0.0.1:4000/socket").with_permanent_error(|e| {
    ///     e.downcast_ref::<std::io::Error>()
    ///         .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
    /// });
    /// # drop(layer);
    /// ```
    pub fn with_permanent_error<F>(mut self, is_permanent: F) -> Self
    where
        F: Fn(&(dyn std::error::Error + Send + Sync + 'static)) -> bool + Send + Sync + 'static,
    {
        self.settings.is_permanent = Some(Arc::new(is_permanent));
        self
    }

    /// Connects on the first request: the first `poll_ready` of a service starts the first
    /// attempt, as a gRPC channel does, and no [`Handle::connect`] is needed.
    ///
    /// Only a connection never used, or closed by the [idle timeout](Self::with_idle_timeout),
    /// connects on demand: after a `disconnect()` or a `suspend()`, requests wait (or fail
    /// fast) until the next `connect()` or `resume()`, as rule 8 says.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower::{Layer, ServiceExt, service_fn};
    /// use tower_epoch::ReconnectLayer;
    ///
    /// let connector = service_fn(|()| async {
    ///     Ok::<_, std::io::Error>(service_fn(|x: u8| async move { Ok::<_, std::io::Error>(x) }))
    /// });
    /// let service = ReconnectLayer::new(()).connect_on_demand().layer(connector);
    /// assert!(!service.handle().state().is_active()); // nothing yet
    /// assert_eq!(service.oneshot(7).await.unwrap(), 7); // the request connected
    /// # }
    /// ```
    pub fn connect_on_demand(mut self) -> Self {
        self.settings.lazy = true;
        self
    }

    /// Closes the installed connection once no request has held it for `timeout`, and
    /// connects again on the next request (see [`connect_on_demand`](Self::connect_on_demand)).
    ///
    /// A request holds the connection from the `poll_ready` that reserved it until its
    /// response future is dropped (awaiting it drops it; a future kept after it completed, as
    /// in a `select!` over `&mut future`, holds the connection until it goes). The connection is closed (with
    /// [`CloseCause::Idle`](crate::teardown::CloseCause::Idle), counted in
    /// [`Ledger::idled`](crate::Ledger::idled)) after between one and two `timeout`s without
    /// a hold: the timer looks every `timeout`, and closes at the first look that finds no hold
    /// since the one before. A request that races the close is never sent on the closed
    /// connection: it waits for the next one, which it starts.
    ///
    /// A service that `poll_ready` reserved holds the connection until it calls, as tower's
    /// readiness contract says. So behind tower's `Balance`, which keeps every endpoint it
    /// polled ready, an endpoint in the balancer's ready set does not go idle. To let a
    /// balanced channel go idle as a whole, as a gRPC channel does, put the idle timeout on a
    /// layer whose connection is the balancer (a `Buffer` around a `Balance`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use tower::{Layer, Service, ServiceExt, service_fn};
    /// use tower_epoch::ReconnectLayer;
    ///
    /// let connector = service_fn(|()| async {
    ///     Ok::<_, std::io::Error>(service_fn(|x: u8| async move { Ok::<_, std::io::Error>(x) }))
    /// });
    /// let mut service = ReconnectLayer::new(())
    ///     .with_idle_timeout(Duration::from_secs(60))
    ///     .layer(connector);
    /// let handle = service.handle();
    /// handle.connect().unwrap();
    /// service.ready().await.unwrap().call(1).await.unwrap();
    ///
    /// tokio::time::sleep(Duration::from_secs(121)).await; // no request for two timeouts
    /// assert!(handle.connects_on_demand()); // closed as idle, dormant
    /// service.ready().await.unwrap().call(2).await.unwrap(); // connected again
    /// assert_eq!(handle.ledger().idled, 1);
    /// # }
    /// ```
    ///
    /// Costs about 34 ns per request (two atomic read-modify-writes on the connection's hold
    /// count, and a small allocation the response future owns: `cargo bench --bench
    /// request_path`), and nothing when not set. The
    /// WebSocket client refuses it (`ws::SettingError::Unsupported`):
    /// its messages do not go through the [`Reconnect`] service.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeouts.idle = Some(timeout);
        self
    }

    /// A setting that only works through the [`Reconnect`] service, if one is set (the
    /// WebSocket client refuses them: it sends through its own queue).
    #[cfg_attr(not(feature = "ws"), allow(dead_code))]
    pub(crate) fn request_path_setting(&self) -> Option<&'static str> {
        if self.settings.lazy {
            Some("connect_on_demand")
        } else if self.settings.timeouts.idle.is_some() {
            Some("with_idle_timeout")
        } else {
            None
        }
    }

    /// What the service does while no connection is installed.
    pub fn when_disconnected(mut self, policy: WhenDisconnected) -> Self {
        self.settings.when_disconnected = policy;
        self
    }

    /// Classifies response errors: those for which `is_failure` returns true are reported as a
    /// failure of the connection that served the request (rule 3 applies: a late error from an
    /// old connection is ignored).
    ///
    /// Each response future then carries what it needs to report (a small allocation, about
    /// 22 ns per request: `cargo bench --bench request_path`).
    pub fn with_failure_predicate<F>(mut self, is_failure: F) -> Self
    where
        F: Fn(&(dyn std::error::Error + Send + Sync + 'static)) -> bool + Send + Sync + 'static,
    {
        self.settings.is_failure = Some(Arc::new(is_failure));
        self
    }

    /// Applies the layer to `make` and returns the service and its driver, for an executor of
    /// your choice (see [`Driver`]). Nothing happens until the driver is polled.
    ///
    /// The first application manages the connection of [`handle`](Self::handle); each later
    /// one a fresh connection of its own.
    pub fn build<M>(&self, make: M) -> (Reconnect<M::Response>, Driver)
    where
        M: Service<T, Response: Send + 'static, Error: Into<BoxError>, Future: Send + 'static>
            + Send
            + 'static,
        T: 'static,
        B: MakeBackoff<Backoff: Send + Backoff<Future: Send + 'static>> + Clone + Send + 'static,
        D: Teardown<M::Response, Future: Send + 'static> + Clone + Send + 'static,
        W: Monitor<M::Response, Future: Send + 'static> + Clone + Send + 'static,
    {
        let settings = &self.settings;
        let policy = Policy {
            max_attempts: settings.max_attempts,
            normal_end: settings.normal_end,
            lazy: settings.lazy,
        };
        let core = if self.claimed.swap(true, Ordering::AcqRel) {
            Core::new(policy)
        } else {
            Arc::clone(&self.first)
        };
        core.configure(
            policy,
            settings.is_permanent.clone(),
            settings.timeouts.idle.is_some(),
        );
        let service = Reconnect::new(
            Arc::clone(&core),
            settings.when_disconnected,
            settings.is_failure.clone(),
        );
        let driver = Driver::new(Parts {
            core,
            make,
            target: Arc::clone(&self.target),
            teardown: self.teardown.clone(),
            monitor: self.monitor.clone(),
            retry: Box::new(Sessions::new(self.backoff.clone())),
            timeouts: settings.timeouts,
        });
        (service, driver)
    }
}

impl<M, T, B, D, W> Layer<M> for ReconnectLayer<T, B, D, W>
where
    M: Service<T, Response: Send + 'static, Error: Into<BoxError>, Future: Send + 'static>
        + Send
        + 'static,
    T: 'static,
    B: MakeBackoff<Backoff: Send + Backoff<Future: Send + 'static>> + Clone + Send + 'static,
    D: Teardown<M::Response, Future: Send + 'static> + Clone + Send + 'static,
    W: Monitor<M::Response, Future: Send + 'static> + Clone + Send + 'static,
{
    type Service = Reconnect<M::Response>;

    fn layer(&self, make: M) -> Self::Service {
        let (service, driver) = self.build(make);
        tokio::spawn(driver);
        service
    }
}

impl<T, B: Clone, D: Clone, W: Clone> Clone for ReconnectLayer<T, B, D, W> {
    fn clone(&self) -> Self {
        ReconnectLayer {
            first: Arc::clone(&self.first),
            claimed: Arc::clone(&self.claimed),
            target: Arc::clone(&self.target),
            backoff: self.backoff.clone(),
            teardown: self.teardown.clone(),
            monitor: self.monitor.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<T, B: fmt::Debug, D: fmt::Debug, W: fmt::Debug> fmt::Debug for ReconnectLayer<T, B, D, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.settings;
        f.debug_struct("ReconnectLayer")
            .field("backoff", &self.backoff)
            .field("teardown", &self.teardown)
            .field("monitor", &self.monitor)
            .field("timeouts", &settings.timeouts)
            .field("max_attempts", &settings.max_attempts)
            .field("normal_end", &settings.normal_end)
            .field("connect_on_demand", &settings.lazy)
            .field("permanent_error", &settings.is_permanent.is_some())
            .field("when_disconnected", &settings.when_disconnected)
            .field("failure_predicate", &settings.is_failure.is_some())
            .finish_non_exhaustive()
    }
}
