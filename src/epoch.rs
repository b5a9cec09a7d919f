//! The epoch core: an [`Epoch`] newtype, the [`Clock`] that hands them out, and the captured
//! [`Stamp`] that answers "is my epoch still current?" with one atomic load.
//!
//! This module depends on neither tower nor tokio: it is the `connectClock` technique of the
//! Phoenix JavaScript client as a small, reusable guard. Any asynchronous effect that may outlive
//! the intent it was started for (a connect attempt, a teardown, a backoff timer, a failure report)
//! captures a [`Stamp`] when it starts and checks it before it touches shared state.
//!
//! ```
//! use std::sync::Arc;
//! use tower_epoch::epoch::Clock;
//!
//! # futures_executor_block_on(async {
//! let clock = Arc::new(Clock::new());
//! let stamp = clock.stamp();
//! // Something starts work for the current epoch...
//! let work = stamp.guard(async { "a connection" });
//! // ...and the intent changes while it runs.
//! clock.tick();
//! let stale = work.await.unwrap_err();
//! assert_eq!(stale.into_inner(), "a connection"); // hand it to teardown, never install it
//! # });
//! # fn futures_executor_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```
//!
//! # Memory ordering
//!
//! [`Clock::tick`] is a `fetch_add` with `AcqRel` ordering and [`Clock::now`] (and therefore
//! [`Stamp::is_current`]) is a load with `Acquire` ordering. Whatever a thread wrote before it
//! ticked the clock (the new intent, the released slot) is visible to any thread that observes
//! the new epoch. On x86-64 and AArch64 an `Acquire` load compiles to a plain load (`mov`/`ldar`),
//! so the check costs what a bare `AtomicU64::load` costs; `benches/epoch.rs` measures it.
//!
//! The clock is a `u64` that starts at 0 and only grows: at one tick per nanosecond it would take
//! over five centuries to wrap, so wrap-around is not handled.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

/// A value of a [`Clock`]: the generation of intent a deferred effect belongs to.
///
/// Epochs are `Copy + Eq + Ord`. Epoch 0 is the clock's starting value, before any intent; every
/// epoch handed out by [`Clock::tick`] is at least 1. Like tokio's private `watch::Version`, an
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
pub struct Clock {
    now: AtomicU64,
}

impl Clock {
    /// A clock at [`Epoch::ZERO`].
    pub const fn new() -> Self {
        Clock {
            now: AtomicU64::new(0),
        }
    }

    /// The current epoch (`Acquire` load).
    #[inline]
    pub fn now(&self) -> Epoch {
        Epoch(self.now.load(Ordering::Acquire))
    }

    /// Advances the clock and returns the new epoch (`AcqRel` read-modify-write).
    ///
    /// Every effect captured at an earlier epoch is stale from this point on.
    #[inline]
    pub fn tick(&self) -> Epoch {
        Epoch(self.now.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Whether `epoch` is still the current epoch.
    #[inline]
    pub fn is_current(&self, epoch: Epoch) -> bool {
        self.now.load(Ordering::Acquire) == epoch.0
    }

    /// Captures the current epoch in a [`Stamp`] that can travel with a deferred effect.
    pub fn stamp(self: &Arc<Self>) -> Stamp {
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

/// An epoch captured from a [`Clock`], carried by a deferred effect.
///
/// [`Stamp::is_current`] is one `Acquire` load and one comparison.
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

    /// Runs `future`, then reports whether the epoch went stale while it ran.
    ///
    /// The check happens once, when `future` completes: its output is returned as `Ok` if the
    /// clock still reads the captured epoch and as `Err(Stale)` otherwise. The output is never
    /// dropped: a stale connection must still be handed to teardown.
    pub fn guard<F: Future>(self, future: F) -> Guarded<F> {
        Guarded {
            future,
            stamp: self,
        }
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

pin_project_lite::pin_project! {
    /// Future returned by [`Stamp::guard`].
    #[must_use = "futures do nothing unless polled"]
    #[derive(Debug)]
    pub struct Guarded<F> {
        #[pin]
        future: F,
        stamp: Stamp,
    }
}

impl<F: Future> Future for Guarded<F> {
    type Output = Result<F::Output, Stale<F::Output>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let value = std::task::ready!(this.future.poll(cx));
        let now = this.stamp.clock.now();
        Poll::Ready(if now == this.stamp.epoch {
            Ok(value)
        } else {
            Err(Stale {
                value,
                epoch: this.stamp.epoch,
                now,
            })
        })
    }
}

/// The output of an effect whose epoch went stale while it ran.
///
/// It still owns the value: a stale connection must be closed, not dropped on the floor.
pub struct Stale<T> {
    value: T,
    epoch: Epoch,
    now: Epoch,
}

impl<T> Stale<T> {
    /// The epoch the effect started in.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The clock's value when the effect completed.
    pub fn now(&self) -> Epoch {
        self.now
    }

    /// Takes the value back.
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> fmt::Debug for Stale<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stale")
            .field("epoch", &self.epoch)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for Stale<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "effect of epoch {} went stale (clock at {})",
            self.epoch, self.now
        )
    }
}

impl<T> std::error::Error for Stale<T> {}

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

    #[tokio::test]
    async fn a_guarded_effect_keeps_its_value_whether_current_or_stale() {
        let clock = Arc::new(Clock::new());
        assert_eq!(clock.stamp().guard(async { 5 }).await.ok(), Some(5));
        clock.tick();
        let stamp = clock.stamp();
        clock.tick();
        let stale = stamp.guard(async { "conn" }).await.unwrap_err();
        let (e1, e2) = (Epoch::from_u64(1), Epoch::from_u64(2));
        assert_eq!((stale.epoch(), stale.now()), (e1, e2));
        assert_eq!(
            format!("{stale:?}"),
            "Stale { epoch: Epoch(1), now: Epoch(2), .. }"
        );
        assert_eq!(
            stale.to_string(),
            "effect of epoch e1 went stale (clock at e2)"
        );
        assert_eq!(stale.into_inner(), "conn");
    }
}
