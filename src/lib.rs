//! Epoch-guarded reconnection middleware for tower: one logical connection that comes back after
//! it drops, and that no slow teardown, late error or stale timer can ever undo.
//!
//! # Overview
//!
//! [`ReconnectLayer`] wraps any connector (a `Service<Target>` whose response is a connection)
//! and manages one logical connection with it:
//!
//! - a [`Handle`] to [`connect`](Handle::connect), [`disconnect`](Handle::disconnect) (awaitable
//!   until the close completed), [`suspend`](Handle::suspend) and [`resume`](Handle::resume) (the
//!   browser's `pagehide`/`pageshow`), and to observe the [`State`] and a [`Ledger`] of counters;
//! - automatic reconnect with [backoff] after a failure (full jitter by default, so that a herd
//!   of clients dropped at once does not come back at once), reset only once a connection has
//!   stayed up for a stable period, with an optional attempt limit,
//!   [`reconnect_now`](Handle::reconnect_now) to skip a wait, and errors classified as
//!   permanent ([`ReconnectLayer::with_permanent_error`]) that stop the retries;
//! - connect and close timeouts, a pluggable graceful [teardown], and a
//!   [monitor](teardown::Monitor) that notices a dead connection without waiting for a request,
//!   with a policy for a normal end by the peer ([`NormalEnd`]: stay idle after a WebSocket
//!   close 1000, reconnect after an HTTP/2 GOAWAY);
//! - when the connection is itself a `Service<Req>`, the [`Reconnect`] service: a cheap-to-clone
//!   request path whose readiness follows the connection, that can
//!   [connect on the first request](ReconnectLayer::connect_on_demand) and
//!   [close idle connections](ReconnectLayer::with_idle_timeout), and forwards the
//!   connection's [`Load`](tower::load::Load);
//! - every transition as an [event](events) with its cause, and
//!   [`wait_for`](Handle::wait_for) a state with a timeout;
//! - many endpoints: [`endpoints::Endpoints`], a set of managed connections that tower's
//!   balancers discover, each in the balancer while it is connected;
//! - two transports: WebSocket ([`ws`], a Phoenix-style client) and HTTP/2 ([`http2`], a
//!   reconnecting channel over hyper for tonic's clients).
//!
//! Every operation is tagged with an [`Epoch`] of a per-connection clock.
//! This is the `connectClock` of the Phoenix JavaScript client made into a reusable guard: a
//! connect attempt, teardown, backoff timer or failure report started in one epoch can never
//! damage the connection of a newer one.
//!
//! # The epoch protocol
//!
//! The clock ticks on every intent change and every new transport attempt: a `connect()` that
//! starts an attempt, every automatic reconnect attempt, `disconnect()`, and a `suspend()` that
//! acts. A `connect()` that finds the connection connected, connecting or waiting to retry is a
//! no-op and does not tick. Each rule below is a test of the same name in `tests/rules.rs`.
//!
//! 1. **A stale connect is closed, never installed.** An attempt that completes after the
//!    clock moved hands its connection to teardown ([`Ledger::discarded`]).
//! 2. **Teardown always releases, and only touches its own.** Every connection that is not
//!    installed goes through teardown exactly once, bounded by the close timeout; a teardown
//!    changes the published state only if nothing happened since the disconnect that released
//!    its connection.
//! 3. **Stale events are ignored.** A failure report of epoch `e` has an effect only if the
//!    connection of epoch `e` is installed ([`Handle::report_failure`]).
//! 4. **Stale timers do nothing.** A backoff timer starts an attempt only if the clock still
//!    reads the epoch it was armed in.
//! 5. **Suspend / resume.** [`Handle::suspend`] disconnects and returns a single-use
//!    [`ResumeToken`] only if the intent was to be connected; [`Handle::resume`] reconnects only
//!    if the clock still reads the token's epoch.
//! 6. **Connect while closing is allowed.** A `connect()` during a teardown starts an attempt at
//!    once; at most one connection is ever installed, several may be closing.
//! 7. **Last intent wins.** At quiescence, the last intent holds and everything else is closed.
//! 8. **A deliberate disconnect never triggers a reconnect.**
//!
//! ## How the guarantees are kept
//!
//! The protocol is one pure function of (state, event) that returns effects (`src/machine.rs`).
//! Every transition is one step of it, under one mutex, at the moment the operation is called:
//! `disconnect()` has released the installed connection before it returns. No user code runs
//! under that mutex. A background [`Driver`] performs the I/O that transitions ask for
//! (attempts, teardowns, monitors, backoff timers) and reports each outcome back as an event,
//! which the machine compares with the clock. User code the driver runs is contained: a panic
//! in the connector, a teardown, a monitor or the backoff is a failure of that attempt or
//! connection ([`Error::Panicked`]), and the driver goes on. The request path checks that its
//! cached connection is still the installed one with a single atomic load.
//!
//! Where this differs from the letter of Phoenix: the installed slot is released when
//! `disconnect()` is called rather than when the asynchronous close finishes, so a teardown
//! never has a slot to clear, only the published state (`Disconnecting` → `Idle`), which it
//! changes only when nothing happened since. Phoenix's #6103 (a connect ignored because the
//! slot was not yet cleared) cannot happen by construction.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, Service, service_fn};
//! use tower_epoch::ReconnectLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_epoch::BoxError> {
//! // A connector: given a target, produce a connection (here an in-memory echo service).
//! let connector = service_fn(|addr: &'static str| async move {
//!     let conn = service_fn(move |msg: String| async move { Ok::<_, Infallible>(format!("{addr} says {msg}")) });
//!     Ok::<_, Infallible>(conn)
//! });
//!
//! let reconnect = ReconnectLayer::new("echo-1").with_connect_timeout(Duration::from_secs(5));
//! let handle = reconnect.handle(); // take it before the layer disappears into the stack
//! let mut svc = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(10)) // bounds each request, including its wait...
//!     .buffer(64) // ...for a connection: the buffer moves that wait into the request
//!     .layer(reconnect)
//!     .service(connector);
//!
//! handle.connect()?;
//! let reply = svc.ready().await?.call("hi".to_string()).await?;
//! assert_eq!(reply, "echo-1 says hi");
//!
//! handle.disconnect().await; // resolves once the connection is closed
//! assert!(matches!(handle.state(), tower_epoch::State::Idle));
//! # Ok(()) }
//! ```
//!
//! # Where the layer sits in a stack
//!
//! `ServiceBuilder` applies layers outside-in: the first one listed is the outermost. Layers
//! listed after `ReconnectLayer` wrap the *connector*, not the connection; per-request layers
//! (timeouts, retries, concurrency limits) go before it.
//!
//! While no connection is installed, [`Reconnect`] waits in `poll_ready`. tower's `Timeout`
//! bounds only the response future, not `poll_ready`, so a `timeout` directly outside this
//! layer does not bound that wait. Either put a `buffer` between them, as above (the buffer's
//! worker does the waiting and the request's future, which the timeout bounds, waits for it),
//! or bound `ready()` yourself with `tokio::time::timeout`. A `Buffer` stops for good at the
//! first error of `poll_ready`, which this layer returns only for terminal conditions
//! ([`Error::GaveUp`], [`Error::Refused`], [`Error::Shutdown`]) or under
//! [`WhenDisconnected::FailFast`].
//!
//! A layer can be applied many times (one backend each, say): each application manages a
//! connection of its own, controlled by its service's [`Reconnect::handle`]; the layer's own
//! [`handle`](ReconnectLayer::handle) is the first application's.
//!
//! # Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `ws` | yes | the WebSocket transport over tokio-tungstenite: [`WsConnector`], [`WsClient`] (module [`ws`]) |
//! | `tls` | no | `wss` URLs, with rustls (ring) and the webpki roots; turns on `ws` |
//! | `http2` | no | the HTTP/2 transport over hyper, which tonic clients run over: [`http2`] |
//!
//! With no features, the crate is the core alone (the layer, the handle, backoff, teardown,
//! events, endpoints): tower, tokio (`sync`, `time`, `rt`, `macros`), futures-core/-util,
//! pin-project-lite, thiserror and tracing.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.85 (edition 2024), for the library and for its tests, examples and benches. Two checks
//! hold it: clippy's `incompatible_msrv` lint, denied, for the crate's own use of the standard
//! library, and `.ci/msrv`, which fails when any package the lock file resolves declares a newer
//! `rust-version`. The dev-dependencies are held to versions that declare 1.85 or older
//! (criterion 0.7, proptest-state-machine 0.8, proptest below 1.12). Neither check compiles
//! with Rust 1.85 itself, and neither sees language features (a `let` chain needs 1.88).
//! Raising the MSRV is a minor-version change, said in the changelog.
// The WebSocket items are linked in the docs whether or not this build has them.
#![doc = ""]
#![cfg_attr(feature = "http2", doc = "[`http2`]: crate::http2")]
#![cfg_attr(
    not(feature = "http2"),
    doc = "[`http2`]: https://docs.rs/tower-epoch/latest/tower_epoch/http2/index.html"
)]
#![cfg_attr(feature = "ws", doc = "[`ws`]: crate::ws")]
#![cfg_attr(feature = "ws", doc = "[`WsConnector`]: crate::ws::WsConnector")]
#![cfg_attr(feature = "ws", doc = "[`WsClient`]: crate::ws::WsClient")]
#![cfg_attr(
    not(feature = "ws"),
    doc = "[`ws`]: https://docs.rs/tower-epoch/latest/tower_epoch/ws/index.html"
)]
#![cfg_attr(
    not(feature = "ws"),
    doc = "[`WsConnector`]: https://docs.rs/tower-epoch/latest/tower_epoch/ws/struct.WsConnector.html"
)]
#![cfg_attr(
    not(feature = "ws"),
    doc = "[`WsClient`]: https://docs.rs/tower-epoch/latest/tower_epoch/ws/struct.WsClient.html"
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod activity;
mod core;
mod driver;
mod epoch;
mod error;
mod handle;
mod machine;
mod reconnect;
mod state;

pub mod backoff;
pub mod endpoints;
pub mod events;
#[cfg(feature = "http2")]
#[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
pub mod http2;
pub mod teardown;
#[cfg(feature = "tls")]
mod tls;
#[cfg(any(feature = "ws", feature = "http2"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "ws", feature = "http2"))))]
pub mod transport;
#[cfg(feature = "ws")]
#[cfg_attr(docsrs, doc(cfg(feature = "ws")))]
pub mod ws;

pub use crate::core::ResumeToken;
pub use driver::Driver;
pub use epoch::{Epoch, Stamp};
pub use error::{BoxError, Error, SharedError};
pub use handle::{DisconnectFuture, Handle};
pub use machine::NormalEnd;
pub use reconnect::{EndpointLoad, Reconnect, ReconnectLayer, ResponseFuture, WhenDisconnected};
pub use state::{Ledger, State};
