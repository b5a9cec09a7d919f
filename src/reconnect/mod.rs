//! The reconnect middleware: [`ReconnectLayer`] builds [`Reconnect`] services.

mod future;
mod layer;
mod load;
mod service;

pub use future::ResponseFuture;
pub use layer::ReconnectLayer;
pub use load::EndpointLoad;
pub use service::{Reconnect, WhenDisconnected};
