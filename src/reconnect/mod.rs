//! The reconnect middleware: [`ReconnectLayer`] builds [`Reconnect`] services.

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::ReconnectLayer;
pub use service::{Reconnect, WhenDisconnected};
