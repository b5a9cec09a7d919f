//! Epoch-guarded reconnection middleware for tower.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod core;
mod driver;
mod handle;
mod reconnect;
mod state;

pub mod backoff;
pub mod epoch;
pub mod error;
pub mod teardown;

pub use crate::core::ResumeToken;
pub use driver::Driver;
pub use epoch::Epoch;
pub use error::{BoxError, Error, SharedError};
pub use handle::{DisconnectFuture, Handle};
pub use reconnect::{Reconnect, ReconnectLayer, ResponseFuture, WhenDisconnected};
pub use state::{Ledger, State};
