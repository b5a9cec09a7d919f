//! [`Activity`]: which requests hold an installed connection, for the idle timeout.
//!
//! One atomic word per installed connection, shared by the services that cached it, their
//! response futures and the driver's idle timer:
//!
//! - the low bits count the *holds*: a service that reserved the connection in `poll_ready`
//!   holds it until its `call`, and the response future from then until it is dropped;
//! - `TOUCHED` says that a hold ended since the idle timer last looked (a hold that is still
//!   on is seen by its count);
//! - `CLAIMED` says that the idle timer took the connection: no hold can begin any more.
//!
//! The timer claims the connection only from the value 0 (no hold, not touched), with one
//! compare-and-swap, and a hold begins with one `fetch_add` on the same word. So of a claim
//! and a hold that race, exactly one wins: either the hold counted first and the claim fails,
//! or the claim came first and the hold sees `CLAIMED` and gives up (the request then waits for
//! a new connection instead of going to one being closed). A request is never sent on a
//! connection the idle timeout released.
//!
//! A request costs two read-modify-writes of this word (and of the `Arc` the response future
//! keeps), and none at all when the idle timeout is off (no `Activity` is made).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const CLAIMED: u64 = 1 << 63;
const TOUCHED: u64 = 1 << 62;
const HOLDS: u64 = TOUCHED - 1;

#[derive(Debug, Default)]
pub(crate) struct Activity(AtomicU64);

/// What the idle timer found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Idle {
    /// No hold since the last look: the connection is claimed, and must be released.
    Claimed,
    /// A hold is active or was since the last look: look again after the timeout.
    Busy,
}

impl Activity {
    /// Begins a hold, unless the idle timer claimed the connection.
    pub(crate) fn hold(self: &Arc<Self>) -> Option<Hold> {
        let before = self.0.fetch_add(1, Ordering::AcqRel);
        if before & CLAIMED != 0 {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Hold(Arc::clone(self)))
    }

    /// Whether the idle timer claimed the connection.
    pub(crate) fn is_claimed(&self) -> bool {
        self.0.load(Ordering::Acquire) & CLAIMED != 0
    }

    /// The idle timer's look: claims the connection if nothing held it since the last look.
    ///
    /// A connection is thus claimed after between one and two timeouts without a hold: the
    /// first look after the last hold ended clears `TOUCHED`, the next one claims.
    pub(crate) fn try_claim(&self) -> Idle {
        let mut seen = self.0.load(Ordering::Acquire);
        loop {
            let (next, outcome) = match seen {
                // Claimed already (a second timer cannot exist, but stay claimed).
                v if v & CLAIMED != 0 => return Idle::Claimed,
                0 => (CLAIMED, Idle::Claimed),
                // Held now, or touched since the last look: forget the touch, keep the holds.
                v => (v & !TOUCHED, Idle::Busy),
            };
            if next == seen {
                return outcome;
            }
            match self
                .0
                .compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return outcome,
                Err(now) => seen = now,
            }
        }
    }

    #[cfg(test)]
    fn holds(&self) -> u64 {
        self.0.load(Ordering::Acquire) & HOLDS
    }
}

/// A request's hold on a connection: released when dropped.
#[derive(Debug)]
pub(crate) struct Hold(Arc<Activity>);

impl Drop for Hold {
    /// Touches and releases in one step: a look between the two would see the connection
    /// unheld and untouched, and claim it at once after a hold that spanned the last look.
    fn drop(&mut self) {
        let released = self
            .0
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                debug_assert!(v & HOLDS != 0, "a hold is released once");
                Some((v - 1) | TOUCHED)
            });
        debug_assert!(released.is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untouched_connection_is_claimed_and_then_refuses_holds() {
        let activity = Arc::new(Activity::default());
        assert!(!activity.is_claimed());
        assert_eq!(activity.try_claim(), Idle::Claimed);
        assert!(activity.is_claimed());
        assert!(activity.hold().is_none(), "no hold after the claim");
        assert_eq!(activity.holds(), 0, "the refused hold is given back");
        assert_eq!(activity.try_claim(), Idle::Claimed, "stays claimed");
    }

    #[test]
    fn a_hold_keeps_the_connection_until_a_full_look_after_it_ends() {
        let activity = Arc::new(Activity::default());
        let hold = activity.hold().expect("not claimed");
        assert_eq!(activity.holds(), 1);
        assert_eq!(activity.try_claim(), Idle::Busy, "held");
        assert_eq!(activity.try_claim(), Idle::Busy, "still held");
        drop(hold);
        assert_eq!(activity.holds(), 0);
        assert_eq!(
            activity.try_claim(),
            Idle::Busy,
            "touched since the last look"
        );
        assert_eq!(
            activity.try_claim(),
            Idle::Claimed,
            "a full look without a hold"
        );
    }

    #[test]
    fn a_hold_begun_and_ended_between_two_looks_counts() {
        let activity = Arc::new(Activity::default());
        drop(activity.hold());
        assert_eq!(activity.try_claim(), Idle::Busy);
        assert_eq!(activity.try_claim(), Idle::Claimed);
    }

    #[test]
    fn two_holds_ended_between_two_looks_count_as_a_touch() {
        let activity = Arc::new(Activity::default());
        let (a, b) = (activity.hold().unwrap(), activity.hold().unwrap());
        drop(a);
        drop(b); // touched already: stays touched
        assert_eq!(activity.try_claim(), Idle::Busy);
        assert_eq!(activity.try_claim(), Idle::Claimed);
    }

    #[test]
    fn holds_count_up_and_down() {
        let activity = Arc::new(Activity::default());
        let holds: Vec<_> = (0..3).map(|_| activity.hold().expect("held")).collect();
        assert_eq!(activity.holds(), 3);
        drop(holds);
        assert_eq!(activity.holds(), 0);
    }

    /// Claims race holds on four threads: every hold that began is on a connection that was
    /// not claimed when it began, and once claimed, no hold begins.
    #[test]
    fn a_claim_and_a_hold_never_both_win() {
        for _ in 0..200 {
            let activity = Arc::new(Activity::default());
            let holders: Vec<_> = (0..3)
                .map(|_| {
                    let activity = Arc::clone(&activity);
                    std::thread::spawn(move || {
                        let mut began = 0;
                        for _ in 0..200 {
                            if let Some(hold) = activity.hold() {
                                began += 1;
                                assert!(!activity.is_claimed(), "claimed while held");
                                drop(hold);
                            }
                        }
                        began
                    })
                })
                .collect();
            let mut claimed = false;
            for _ in 0..400 {
                if activity.try_claim() == Idle::Claimed {
                    claimed = true;
                    break;
                }
            }
            for holder in holders {
                holder.join().expect("no holder panicked");
            }
            if claimed {
                assert!(activity.hold().is_none());
            }
            assert_eq!(activity.holds(), 0);
        }
    }
}
