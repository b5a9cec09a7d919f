//! Observable state: the published [`State`] and the [`Ledger`] of counters.

use std::fmt;
use std::time::Duration;

use crate::epoch::Epoch;
use crate::error::SharedError;

/// The published state of a managed connection.
///
/// Read it with [`Handle::state`](crate::Handle::state) or follow it with
/// [`Handle::subscribe`](crate::Handle::subscribe) (a level-triggered `tokio::sync::watch`
/// receiver: a slow reader sees the latest state, not every step).
///
/// # Transitions
///
/// | from | event | to |
/// |---|---|---|
/// | `Idle`, `Disconnecting`, `GaveUp`, `Refused` | `connect()`, valid `resume(token)` | `Connecting { e', 1 }` (tick) |
/// | `Idle`, `Disconnecting`, dormant | a request (lazy layer, or after an idle timeout) | `Connecting { e', 1 }` (tick) |
/// | `Connected { e }` | no request held `e` for the idle timeout | as `disconnect()`, but dormant |
/// | `Connecting { e, n }` | attempt of `e` succeeds | `Connected { e }` |
/// | `Connecting { e, n }` | attempt of `e` fails, limit not reached | `WaitingToRetry { e, n + 1, .. }` |
/// | `Connecting { e, n }` | attempt of `e` fails, `n` = limit | `GaveUp { n, .. }` |
/// | `Connecting { e, n }`, `Connected { e }` | a permanent error of `e` | `Refused { .. }` |
/// | `Connected { e }` | failure of `e` reported | `WaitingToRetry { e, n + 1, .. }` (or `GaveUp`) |
/// | `Connected { e }` | the peer ends `e` normally, `NormalEnd::Idle` | as `disconnect()` |
/// | `Connected { e }` | the peer ends `e` normally after the stable period, `NormalEnd::Reconnect` | `Connecting { e', 1 }` (tick) |
/// | `Connected { e }` | the peer ends `e` normally before it, `NormalEnd::Reconnect` | as a failure ([`Error::EndedEarly`](crate::Error::EndedEarly)) |
/// | `WaitingToRetry { e, n, .. }` | timer of `e` fires, clock still `e`; or `reconnect_now()` | `Connecting { e', n }` (tick) |
/// | any but `Shutdown` | `disconnect()`, or `suspend()` when active | `Disconnecting { e' }` if a teardown is in flight, else `Idle` (tick) |
/// | `Disconnecting { e }` | last teardown completes, clock still `e` | `Idle` |
/// | any | the driver stops | `Shutdown` |
///
/// `Connecting`, `Connected` and `WaitingToRetry` are the *active* states: the intent is to be
/// connected, and `connect()` is a no-op in them. Events of an older epoch (a late attempt, a
/// late failure report, a stale timer) change nothing.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum State {
    /// Disconnected by intent (or never connected) and no teardown in flight; or *dormant*
    /// ([`Handle::connects_on_demand`](crate::Handle::connects_on_demand)): closed by the idle
    /// timeout, or never used in a lazy layer, and the next request connects.
    #[default]
    Idle,
    /// A connect attempt of this epoch is in flight.
    Connecting {
        /// The attempt's epoch.
        epoch: Epoch,
        /// 1 for the first attempt after a `connect()`, growing with each automatic retry until
        /// the backoff resets.
        attempt: u32,
    },
    /// A connection of this epoch is installed.
    Connected {
        /// The installed connection's epoch.
        epoch: Epoch,
    },
    /// The last attempt or the installed connection failed; a retry is scheduled.
    WaitingToRetry {
        /// The epoch the backoff timer was armed in; the retry happens only if it is still
        /// current when the timer fires.
        epoch: Epoch,
        /// The number of the attempt that will follow.
        attempt: u32,
        /// The backoff delay, when the backoff's future is a `tokio::time::Sleep` (as for every
        /// backoff in this crate and tower's `ExponentialBackoff`); `None` for other timers, and
        /// until the driver has armed the timer (a moment after the failure: the backoff runs
        /// in the driver's task, never in the caller's), when the state is published again with
        /// it.
        delay: Option<Duration>,
        /// What failed.
        last_error: SharedError,
    },
    /// Disconnected by intent; teardown of a released connection is in flight.
    Disconnecting {
        /// The epoch of the `disconnect`/`suspend` that released it.
        epoch: Epoch,
    },
    /// Terminal for the automatic machinery: the configured attempt limit was reached.
    /// `connect()` starts afresh.
    GaveUp {
        /// How many attempts failed in a row.
        attempts: u32,
        /// The last attempt's error.
        last_error: SharedError,
    },
    /// Terminal for the automatic machinery: an error classified as permanent
    /// ([`ReconnectLayer::with_permanent_error`](crate::ReconnectLayer::with_permanent_error)),
    /// such as a malformed target or a handshake refused with 401. `connect()` starts afresh.
    Refused {
        /// The permanent error.
        last_error: SharedError,
    },
    /// Terminal: the driver has stopped.
    Shutdown,
}

impl State {
    /// The epoch the state belongs to, for the states that carry one.
    pub fn epoch(&self) -> Option<Epoch> {
        match self {
            State::Connecting { epoch, .. }
            | State::Connected { epoch }
            | State::WaitingToRetry { epoch, .. }
            | State::Disconnecting { epoch } => Some(*epoch),
            State::Idle | State::GaveUp { .. } | State::Refused { .. } | State::Shutdown => None,
        }
    }

    /// Whether a connection is installed.
    pub fn is_connected(&self) -> bool {
        matches!(self, State::Connected { .. })
    }

    /// Whether the intent is to be connected and the machinery is working on it
    /// (`Connecting`, `Connected` or `WaitingToRetry`).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            State::Connecting { .. } | State::Connected { .. } | State::WaitingToRetry { .. }
        )
    }

    /// Whether the state is terminal (`GaveUp`, `Refused` or `Shutdown`).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            State::GaveUp { .. } | State::Refused { .. } | State::Shutdown
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Idle => f.write_str("idle"),
            State::Connecting { epoch, attempt } => {
                write!(f, "connecting ({epoch}, attempt {attempt})")
            }
            State::Connected { epoch } => write!(f, "connected ({epoch})"),
            State::WaitingToRetry {
                epoch,
                attempt,
                delay,
                last_error,
            } => {
                write!(f, "waiting to retry ({epoch}, attempt {attempt}")?;
                if let Some(delay) = delay {
                    write!(f, " in {delay:?}")?;
                }
                write!(f, "): {last_error}")
            }
            State::Disconnecting { epoch } => write!(f, "disconnecting ({epoch})"),
            State::GaveUp { attempts, .. } => write!(f, "gave up after {attempts} attempts"),
            State::Refused { last_error } => write!(f, "refused: {last_error}"),
            State::Shutdown => f.write_str("shut down"),
        }
    }
}

/// Counters of everything the middleware did, read with [`Handle::ledger`](crate::Handle::ledger).
///
/// At quiescence (no attempt, timer or teardown in flight) the books balance:
/// `opened == installed + discarded` and `closed == opened - (1 if a connection is installed)`.
/// Between those moments, `opened - closed`, less one while a connection is installed, counts
/// the connections still closing (the ledger and the state are read apart, so use
/// `saturating_sub`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ledger {
    /// Connect attempts started (the connector was called).
    pub attempts: u64,
    /// Attempts that produced a connection.
    pub opened: u64,
    /// Connections installed (their attempt's epoch was still current).
    pub installed: u64,
    /// Connections discarded because their attempt's epoch went stale (rule 1).
    pub discarded: u64,
    /// Teardowns completed, whether gracefully or cut at the close timeout.
    pub closed: u64,
    /// Teardowns cut at the close timeout (the connection was dropped).
    pub close_timeouts: u64,
    /// Current failures: failed attempts and failures of the installed connection.
    pub failures: u64,
    /// Stale events ignored: late failure reports, timers and attempt errors of old epochs.
    pub ignored: u64,
    /// Stale attempts dropped before they completed (the driver keeps only the newest few in
    /// flight); they opened nothing.
    pub cancelled: u64,
    /// Installed connections the peer ended normally (see
    /// [`NormalEnd`](crate::NormalEnd)).
    pub ended: u64,
    /// Installed connections closed because no request held them for the idle timeout
    /// ([`ReconnectLayer::with_idle_timeout`](crate::ReconnectLayer::with_idle_timeout)).
    pub idled: u64,
    /// Attempts started by a request on a dormant connection (lazy, or closed as idle).
    pub demanded: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error() -> SharedError {
        SharedError::new(std::io::Error::other("x"))
    }

    #[test]
    fn the_epoch_and_kind_of_each_state() {
        let e = Epoch::from_u64(7);
        let states = [
            (State::Idle, None, false, false),
            (
                State::Connecting {
                    epoch: e,
                    attempt: 1,
                },
                Some(e),
                true,
                false,
            ),
            (State::Connected { epoch: e }, Some(e), true, false),
            (
                State::WaitingToRetry {
                    epoch: e,
                    attempt: 2,
                    delay: None,
                    last_error: error(),
                },
                Some(e),
                true,
                false,
            ),
            (State::Disconnecting { epoch: e }, Some(e), false, false),
            (
                State::GaveUp {
                    attempts: 3,
                    last_error: error(),
                },
                None,
                false,
                true,
            ),
            (
                State::Refused {
                    last_error: error(),
                },
                None,
                false,
                true,
            ),
            (State::Shutdown, None, false, true),
        ];
        for (state, epoch, active, terminal) in states {
            assert_eq!(state.epoch(), epoch, "{state}");
            assert_eq!(state.is_active(), active, "{state}");
            assert_eq!(state.is_terminal(), terminal, "{state}");
            assert_eq!(
                state.is_connected(),
                matches!(state, State::Connected { .. })
            );
        }
    }
}
