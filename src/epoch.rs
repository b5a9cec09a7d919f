//! The epoch core: an [`Epoch`] newtype, the clock that hands them out, and the captured
//! [`Stamp`] that answers "is my epoch still current?" with one atomic load.
//!
//! This is the `connectClock` technique of the Phoenix JavaScript client: any asynchronous
//! effect that may outlive the intent it was started for (a connect attempt, a teardown, a
//! backoff timer, a failure report) captures the epoch when it starts and checks it before it
//! touches shared state. The crate's own effects do this; [`Handle::stamp`](crate::Handle::stamp)
//! gives user code the same check.
//!
//! # Memory ordering
//!
//! A tick is a `fetch_add` with `AcqRel` ordering and a read (and therefore
//! [`Stamp::is_current`]) is a load with `Acquire` ordering. Whatever a thread wrote before it
//! ticked the clock (the new intent, the released slot) is visible to any thread that observes
//! the new epoch. On x86-64 and AArch64 an `Acquire` load compiles to a plain load (`mov`/`ldar`),
//! so the check costs what a bare `AtomicU64::load` costs; `benches/epoch.rs` measures it.
//!
//! The clock is a `u64` that starts at 0 and only grows: at one tick per nanosecond it would take
//! over five centuries to wrap, so wrap-around is not handled.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A value of a connection's clock: the generation of intent a deferred effect belongs to.
///
/// Epochs are `Copy + Eq + Ord`. Epoch 0 is the clock's starting value, before any intent; every
/// epoch a tick hands out is at least 1. Like tokio's private `watch::Version`, an
/// epoch is only meaningful when compared with values of the same clock.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(u64);

impl Epoch {
    /// The clock's starting value, before any intent was expressed.
    pub const ZERO: Epoch = Epoch(0);

    /// Wraps a raw counter value. Mostly useful in tests and for logging round-trips.
    pub const fn from_u64(value: u64) -> Self {
        Epoch(value)
    }

    /// The raw counter value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// A monotonic counter: one per managed connection.
///
/// It ticks on every intent change and every new transport attempt. Reading it is one atomic
/// load; see the [module docs](self) for the memory ordering.
#[derive(Default)]
pub(crate) struct Clock {
    now: AtomicU64,
}

impl Clock {
    /// A clock at [`Epoch::ZERO`].
    pub(crate) const fn new() -> Self {
        Clock {
            now: AtomicU64::new(0),
        }
    }

    /// The current epoch (`Acquire` load).
    #[inline]
    pub(crate) fn now(&self) -> Epoch {
        Epoch(self.now.load(Ordering::Acquire))
    }

    /// Advances the clock and returns the new epoch (`AcqRel` read-modify-write).
    ///
    /// Every effect captured at an earlier epoch is stale from this point on.
    #[inline]
    pub(crate) fn tick(&self) -> Epoch {
        Epoch(self.now.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Whether `epoch` is still the current epoch.
    #[inline]
    pub(crate) fn is_current(&self, epoch: Epoch) -> bool {
        self.now.load(Ordering::Acquire) == epoch.0
    }

    /// Captures the current epoch in a [`Stamp`] that can travel with a deferred effect.
    pub(crate) fn stamp(self: &Arc<Self>) -> Stamp {
        Stamp {
            epoch: self.now(),
            clock: Arc::clone(self),
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock").field("now", &self.now()).finish()
    }
}

/// An epoch captured from a connection's clock, carried by a deferred effect: taken with
/// [`Handle::stamp`](crate::Handle::stamp), it answers whether anything happened to the
/// connection since (a connect, a disconnect, a reconnect attempt, a suspend).
///
/// [`Stamp::is_current`] is one `Acquire` load and one comparison.
///
/// ```
/// use std::convert::Infallible;
/// use tower::service_fn;
/// use tower_epoch::ReconnectLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_epoch::Error> {
/// let layer = ReconnectLayer::new(());
/// let handle = layer.handle();
/// let _svc = tower::Layer::layer(&layer, service_fn(|()| async { Ok::<_, Infallible>(()) }));
///
/// // Work of your own for the current connection, say a slow cache warm-up...
/// let stamp = handle.stamp();
/// handle.connect()?; // ...and the intent changes while it runs:
/// assert!(!stamp.is_current(), "its result belongs to an older epoch: do not apply it");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Stamp {
    clock: Arc<Clock>,
    epoch: Epoch,
}

impl Stamp {
    /// The epoch this stamp captured.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Whether the clock still reads the captured epoch.
    #[inline]
    pub fn is_current(&self) -> bool {
        self.clock.is_current(self.epoch)
    }
}

impl fmt::Debug for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stamp")
            .field("epoch", &self.epoch)
            .field("now", &self.clock.now())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_advances_and_invalidates_stamps() {
        let clock = Arc::new(Clock::new());
        assert_eq!(clock.now(), Epoch::ZERO);
        let stamp = clock.stamp();
        assert!(stamp.is_current());
        assert_eq!(clock.tick(), Epoch::from_u64(1));
        assert!(!stamp.is_current());
        assert!(clock.is_current(Epoch::from_u64(1)));
        assert_eq!(format!("{}", clock.now()), "e1");
        assert_eq!(format!("{:?}", clock.now()), "Epoch(1)");
        assert_eq!(format!("{clock:?}"), "Clock { now: Epoch(1) }");
        assert_eq!(stamp.epoch(), Epoch::ZERO);
        assert_eq!(clock.stamp().epoch(), Epoch::from_u64(1));
        assert_eq!(
            format!("{stamp:?}"),
            "Stamp { epoch: Epoch(0), now: Epoch(1) }"
        );
    }
}
