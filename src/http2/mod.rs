//! The HTTP/2 transport (feature `http2`): a reconnecting channel over hyper, which tonic's
//! generated clients run over unchanged.
//!
//! - [`H2Connector`] is a `tower::Service<Uri>` that opens HTTP/2 connections: it checks the
//!   target before any socket is opened, opens the byte stream with a transport of your choice
//!   ([`TcpConnector`](crate::transport::TcpConnector) by default), and runs the handshake with
//!   its settings (keep-alive pings, flow-control windows, frame size).
//! - [`H2Connection`] is the connection: a cheap-to-clone `Service<http::Request<B>>`.
//! - [`layer`] is the [`ReconnectLayer`](crate::ReconnectLayer) for it: [`H2Monitor`] drives
//!   the connection and reports its end, [`H2Teardown`] closes it for real, a GOAWAY
//!   reconnects at once, and response errors are classified by
//!   [`H2Error::is_connection_failure`].
//!
//! What it promises:
//!
//! - **The crate owns the connection's tasks.** hyper's tasks for a connection (the one that
//!   reads and writes the socket, one per request) run in the connection's monitor while it is
//!   installed and in its teardown after, not on their own. So after `disconnect().await` no
//!   socket is left open, whatever copies of the connection exist.
//! - **A graceful server stop (GOAWAY) reconnects at once**, while the old connection finishes
//!   the calls it had in flight (rule 6 on a real protocol). A server killed outright fails the
//!   connection, and the backoff paces the reconnects.
//! - **Waiting is bounded**: the layer's connect timeout bounds each attempt (the TCP connect,
//!   TLS and the HTTP/2 handshake), its close timeout each teardown, and the keep-alive
//!   ([`H2Connector::keep_alive`]) finds a half-open connection without a request.
//!
//! What it does not do (yet):
//!
//! - **The idle timeout counts calls until their response headers.**
//!   [`with_idle_timeout`](crate::ReconnectLayer::with_idle_timeout) sees a call as done once
//!   its response future is; a response body still streaming then (a gRPC server-streaming
//!   call) is cut by the idle close at the close timeout. Leave the idle timeout off (the
//!   default) for streaming calls, or set it longer than the longest stream.
//! - **Unsent requests are not sent again by the channel.** A request that never reached the
//!   server (its connection was ending) fails with [`H2Error::NotSent`], which a retry layer can
//!   resend safely, idempotent or not.
//! - **A dropped driver closes the connection when its last copy goes.** After the driver is
//!   dropped (not after a disconnect), a copy of the connection kept by a service or by you
//!   keeps its socket, unpolled, until that copy is dropped.
//!
//! # In a `ServiceBuilder` stack
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_epoch::http2::{self, H2Connector};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_epoch::BoxError> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let addr = listener.local_addr()?;
//! # tokio::spawn(async move {
//! #     while let Ok((socket, _)) = listener.accept().await {
//! #         let echo = hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
//! #             let body = request.into_body().collect().await?.to_bytes();
//! #             Ok::<_, hyper::Error>(http::Response::new(Full::new(body)))
//! #         });
//! #         let io = hyper_util::rt::TokioIo::new(socket);
//! #         let server = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
//! #         tokio::spawn(async move { server.serve_connection(io, echo).await });
//! #     }
//! # });
//! // An HTTP/2 echo server listens on `addr`.
//! let reconnect = http2::layer(&format!("http://{addr}"))?
//!     .with_connect_timeout(Duration::from_secs(5));
//! let handle = reconnect.handle();
//! let mut channel = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(10)) // each call, its wait for a connection included...
//!     .buffer(1024) // ...which the buffer's worker does
//!     .concurrency_limit(256) // calls in flight on the connection
//!     .layer(reconnect)
//!     .service(H2Connector::<Full<Bytes>>::new().keep_alive(Duration::from_secs(20), Duration::from_secs(5))?);
//!
//! handle.connect()?;
//! let request = http::Request::post("/echo").body(Full::new(Bytes::from("hello")))?;
//! let response = channel.ready().await?.call(request).await?;
//! assert_eq!(response.into_body().collect().await?.to_bytes(), "hello");
//!
//! handle.disconnect().await; // the connection and its socket are closed
//! # Ok(()) }
//! ```
//!
//! The order of the layers matters:
//!
//! - **`timeout` bounds `poll_ready` only through a `buffer`.** While no connection is
//!   installed, the reconnecting service waits in `poll_ready`, which tower's `Timeout` does
//!   not bound; the buffer moves that wait into the call's future, which it does.
//! - **A `concurrency_limit` inside the buffer** limits the calls on the connection; outside
//!   it, the calls waiting in the buffer too.
//! - **Layers after the reconnect layer wrap the connector**, not the connection: a `timeout`
//!   there bounds each connect attempt (the layer's connect timeout already does).
//! - **A `retry` goes outside the buffer**, and only for idempotent calls: a call that failed
//!   with its connection may have reached the server.
//! - **A `buffer` fails for good at the first error of `poll_ready`**, which the layer returns
//!   only for a terminal state ([`Error::GaveUp`](crate::Error::GaveUp),
//!   [`Error::Refused`](crate::Error::Refused), [`Error::Shutdown`](crate::Error::Shutdown)) or
//!   with [`WhenDisconnected::FailFast`](crate::WhenDisconnected::FailFast).
//!
//! # Beside tonic's `Channel`
//!
//! `tests/http2_grpc.rs` runs both against the same Python grpcio server, calling its health
//! service every 20 ms through a 0.5 s crash (SIGKILL, then a restart on the same port). Four runs
//! on one machine:
//!
//! | | `http2::layer` | tonic's `Channel` |
//! |---|---|---|
//! | calls failed during the outage | 0 to 2: the calls on the wire at the crash; the others wait for the new connection (bounded by the caller's timeout) | 35 to 52: each call fails at once with the refused connect |
//! | restart to the first successful call | 14 to 126 ms: the backoff's next attempt | 15 to 34 ms: it dials again on each call |
//! | backoff between connect attempts | exponential with full jitter (20 to 200 ms here: 12 to 17 attempts in the outage), an attempt limit if set | none: a call that finds no connection dials |
//! | what the application sees | the [`State`](crate::State) with its epoch, every transition as an [event](crate::events) with its cause, the [`Ledger`](crate::Ledger) | `poll_ready` says ready; errors per call |
//! | closing | `disconnect().await` returns once the socket is closed | dropping every clone |
//!
//! # tonic
//!
//! A tonic client takes any `tower::Service<http::Request<tonic::body::Body>>`; the reconnecting
//! service is one, with an [`H2Connector<tonic::body::Body>`](H2Connector). tonic's requests
//! carry only their path: the connection adds its own scheme and authority.
//!
//! ```no_run
//! use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
//! use tower::ServiceBuilder;
//! use tower_epoch::http2::{self, H2Connector};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_epoch::BoxError> {
//! let reconnect = http2::layer("http://127.0.0.1:50051")?;
//! let handle = reconnect.handle();
//! let channel = ServiceBuilder::new()
//!     .layer(reconnect)
//!     .service(H2Connector::<tonic::body::Body>::new());
//! let mut health = HealthClient::new(channel);
//! handle.connect()?;
//! let reply = health.check(HealthCheckRequest::default()).await?;
//! println!("{:?}", reply.into_inner().status());
//! # Ok(()) }
//! ```
//!
//! `examples/grpc_health.rs` runs it against grpcio (or tonic-health in process) through a
//! crash and a graceful restart, and prints the timeline of epochs.

mod connection;
mod connector;
mod error;
mod lifecycle;
mod tasks;

pub use connection::{H2Body, H2Connection};
pub use connector::H2Connector;
pub use error::H2Error;
pub use lifecycle::{H2Monitor, H2Teardown, MonitorFuture, layer};
