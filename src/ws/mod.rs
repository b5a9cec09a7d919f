//! The WebSocket transport (feature `ws`): a connector over tokio-tungstenite and a
//! Phoenix-style client on the reconnect layer.
//!
//! - [`WsConnector`] is a `tower::Service<Request>` that opens WebSocket connections. It checks
//!   the URL before any socket is opened, so `ws://h:99999` is [`WsError::PortOutOfRange`]
//!   rather than a connection to port 80, and opens the byte stream with a transport of your
//!   choice ([`TcpConnector`](crate::transport::TcpConnector) by default).
//! - [`WsClient`] manages one logical WebSocket connection with [`ReconnectLayer`]: an
//!   outbound queue that survives disconnects, incoming messages tagged with their epoch,
//!   heartbeats, graceful close, and optional at-least-once delivery. [`WsSink`] is the same
//!   client as a `futures::Sink`.
//!
//! What the client promises, and where it is said in full:
//!
//! - **Delivery** ([`WsClient`]): a message accepted is written to a connection, in sequence
//!   order across connections, or given back in an error or by
//!   [`take_unsent`](WsClient::take_unsent); never dropped silently.
//! - **One writer per connection**: only the connection's own task writes its socket; a
//!   release ends its writes at once, and what was not completely written goes back to the
//!   queue, in order.
//! - **Backpressure** ([`Incoming`]): a consumer that reads slowly stops the reading, not the
//!   writing or the heartbeat, and loses nothing.
//! - **Cancellation** ([`SendFuture`], [`WsClient::reserve`]): what dropping a future means
//!   before and after its message is accepted.
//! - **Settings** ([`WsClientBuilder`]): out-of-range values are [`SettingError`]s of `build`.
//!
//! ```
//! use std::time::Duration;
//! use futures_util::StreamExt;
//! use tower_epoch::ws::{Message, WsClient};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let addr = listener.local_addr()?;
//! # tokio::spawn(async move {
//! #     use futures_util::SinkExt;
//! #     while let Ok((socket, _)) = listener.accept().await {
//! #         tokio::spawn(async move {
//! #             let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else { return };
//! #             while let Some(Ok(m)) = ws.next().await {
//! #                 if m.is_text() { let _ = ws.send(m).await; }
//! #             }
//! #         });
//! #     }
//! # });
//! // An echo server listens on `addr`.
//! let (client, mut incoming) = WsClient::builder(format!("ws://{addr}/socket"))?
//!     .heartbeat(Duration::from_secs(15), Duration::from_secs(5))
//!     .layer(|layer| layer.with_connect_timeout(Duration::from_secs(5)))
//!     .build()?;
//! let handle = client.handle();
//! handle.connect()?;
//! client.send(Message::text("hello")).await?;
//! let reply = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await?.unwrap();
//! assert_eq!(reply.message, Message::text("hello"));
//!
//! // Back/forward navigation: pagehide, then pageshow while the old socket still closes.
//! let token = handle.suspend().expect("the intent was to be connected");
//! let resumed = handle.resume(token)?;
//! client.send(Message::text("again")).await?;
//! let reply = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await?.unwrap();
//! assert_eq!(reply.epoch, resumed); // tagged with the new connection's epoch
//!
//! handle.disconnect().await; // graceful: the queue, Close, the peer's Close
//! # Ok(()) }
//! ```
//!
//! [`ReconnectLayer`]: crate::ReconnectLayer

mod builder;
mod client;
mod close;
mod conn;
mod connector;
mod error;
mod future;
mod incoming;
mod monitor;
mod outbox;
mod shared;
mod sink;
mod writer;

pub use builder::{WhenFull, WsClientBuilder};
pub use client::WsClient;
pub use connector::WsConnector;
pub use error::{SendError, SettingError, WsError};
pub use future::{Permit, SendFuture};
pub use incoming::{Incoming, Received};
pub use outbox::Stats;
pub use sink::WsSink;
pub use tokio_tungstenite::tungstenite::Message;
pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
