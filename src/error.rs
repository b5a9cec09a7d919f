//! The crate's one error type.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use crate::epoch::Epoch;

/// A type-erased error, as tower uses for middleware errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A shared, cloneable error: how the published [`State`](crate::State) and [`Error`] carry a
/// cause.
///
/// It dereferences to the error itself (`dyn Error`), so `downcast_ref` reaches the original
/// type, and as the `source()` of an [`Error`] it is that original error, not a wrapper.
#[derive(Clone)]
pub struct SharedError(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl SharedError {
    /// Shares `error`.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        SharedError(Arc::new(error))
    }
}

impl From<BoxError> for SharedError {
    fn from(error: BoxError) -> Self {
        SharedError(Arc::from(error))
    }
}

impl Deref for SharedError {
    type Target = dyn std::error::Error + Send + Sync + 'static;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

/// Everything that can go wrong in `tower-epoch`.
///
/// Errors of the wrapped connection pass through the request path unchanged (boxed, as tower
/// middleware does); this enum covers the conditions the middleware itself detects. Downcast a
/// [`BoxError`] to `Error` to tell them apart.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A connect attempt did not finish within the configured connect timeout.
    #[error("connect attempt timed out after {0:?}")]
    ConnectTimeout(Duration),

    /// The connector failed to produce a connection (its readiness or its call failed).
    #[error("connect attempt failed")]
    Connect(#[source] SharedError),

    /// The installed connection failed: its readiness failed, a response error was classified
    /// as a connection failure, or a transport reported it.
    #[error("connection failed")]
    ConnectionFailed(#[source] SharedError),

    /// No connection is installed and the service was configured to fail fast
    /// ([`WhenDisconnected::FailFast`](crate::WhenDisconnected::FailFast)).
    #[error("not connected")]
    NotConnected,

    /// Reconnecting gave up after the configured number of consecutive failed attempts.
    #[error("gave up after {attempts} failed connect attempts")]
    GaveUp {
        /// How many attempts failed in a row.
        attempts: u32,
        /// The error of the last attempt.
        #[source]
        last_error: SharedError,
    },

    /// The connection was refused with an error classified as permanent
    /// ([`ReconnectLayer::with_permanent_error`](crate::ReconnectLayer::with_permanent_error)):
    /// nothing retries until the next `connect()`.
    #[error("refused with a permanent error")]
    Refused(#[source] SharedError),

    /// The peer ended the connection normally before it was up for the stable period, under
    /// [`NormalEnd::Reconnect`](crate::NormalEnd::Reconnect): the reconnect goes through the
    /// backoff, as after a failure.
    #[error("the peer ended the connection before it was stable")]
    EndedEarly,

    /// User code the middleware ran (the connector, a teardown, a monitor, the backoff)
    /// panicked. The panic is contained: it counts as a failure of that attempt or connection.
    #[error("the {what} panicked: {message}")]
    Panicked {
        /// Which piece of user code: `"connector"`, `"teardown"`, `"monitor"` or `"backoff"`.
        what: &'static str,
        /// The panic's message, when it was a string.
        message: String,
    },

    /// The driver has stopped (its future was dropped or its runtime shut down), so nothing can
    /// connect any more.
    #[error("the reconnect driver has shut down")]
    Shutdown,

    /// [`Handle::wait_for`](crate::Handle::wait_for) waited this long and the state never
    /// satisfied its predicate.
    #[error("waited {0:?} for a state that did not come")]
    WaitTimeout(Duration),

    /// [`Handle::resume`](crate::Handle::resume) was given a token whose epoch is no longer
    /// current: something else changed the intent after the matching `suspend`.
    #[error("resume token of epoch {token} is stale (clock at {now})")]
    StaleResume {
        /// The epoch the token was issued in.
        token: Epoch,
        /// The clock when `resume` was called.
        now: Epoch,
    },

    /// [`Handle::resume`](crate::Handle::resume) was given a token issued by another managed
    /// connection.
    #[error("resume token belongs to another connection")]
    ForeignToken,
}

impl Error {
    /// A failure of the installed connection, caused by `error`.
    pub fn connection_failed(error: impl Into<BoxError>) -> Error {
        Error::ConnectionFailed(SharedError::from(error.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_error_shows_and_is_the_original() {
        let shared = SharedError::new(std::io::Error::other("reset"));
        let original = std::io::Error::other("reset");
        assert_eq!(format!("{shared:?}"), format!("{original:?}"));
        assert_eq!(shared.to_string(), "reset");
        assert!(shared.downcast_ref::<std::io::Error>().is_some());
    }
}
