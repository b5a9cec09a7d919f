//! The WebSocket transport (feature `ws`): a connector over tokio-tungstenite and a
//! Phoenix-style client on the reconnect layer.
//!
//! - [`WsConnector`] is a `tower::Service<Request>` that opens WebSocket connections. It checks
//!   the URL before any socket is opened ([`endpoint`]), so `ws://h:99999` is
//!   [`WsError::PortOutOfRange`] rather than a connection to port 80.
//! - [`WsClient`] manages one logical WebSocket connection with [`ReconnectLayer`]: an
//!   outbound queue that survives disconnects, incoming messages tagged with their epoch,
//!   heartbeats, graceful close, and optional at-least-once delivery.
//!
//! ```no_run
//! use std::time::Duration;
//! use futures_util::StreamExt;
//! use tokio_tungstenite::tungstenite::Message;
//! use tower_epoch::ws::WsClient;
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let (client, mut incoming) = WsClient::builder("ws://127.0.0.1:4000/socket")?
//!     .heartbeat(Duration::from_secs(15), Duration::from_secs(5))
//!     .layer(|layer| layer.with_connect_timeout(Duration::from_secs(5)))
//!     .build()?;
//! client.handle().connect()?;
//! client.send(Message::text("hello")).await?;
//! let reply = incoming.next().await;
//! # drop(reply);
//!
//! let token = client.handle().suspend();        // pagehide
//! if let Some(token) = token {
//!     client.handle().resume(token)?;           // pageshow
//! }
//! client.handle().disconnect().await;           // graceful: queue, Close, peer's Close
//! # Ok(()) }
//! ```
//!
//! [`ReconnectLayer`]: crate::ReconnectLayer

mod client;
mod conn;
mod connector;
mod error;
#[cfg(feature = "tls")]
mod tls;

pub use client::{Incoming, Received, SendFuture, Stats, WhenFull, WsClient, WsClientBuilder};
pub use connector::{
    BoxFuture, BoxIo, Dial, Endpoint, Io, TcpDial, WsConnector, WsStream, endpoint,
};
pub use error::{SendError, WsError};
pub use tokio_tungstenite::tungstenite::Message;
pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
