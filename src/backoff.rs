//! Backoff between reconnect attempts.
//!
//! Any [`tower::retry::backoff::MakeBackoff`] works: each failure run is one backoff *session*
//! (`make_backoff`), each retry waits for the session's next future. The session is reset (a
//! new one is made) only after a connection has stayed installed for the stable period, so a
//! peer that accepts and then drops at once does not cause a reconnect storm.
//!
//! Two makers ship with the crate:
//! - [`default_backoff`]: tower's jittered [`ExponentialBackoffMaker`] from 100 ms to 30 s,
//!   the default of [`ReconnectLayer`](crate::ReconnectLayer);
//! - [`Schedule`]: a fixed list of delays that repeats its last entry, like Phoenix's
//!   `reconnectAfterMs`, with optional jitter ([`Schedule::phoenix`] is Phoenix's own list).
//!
//! ```
//! use tower_epoch::{ReconnectLayer, backoff::Schedule};
//!
//! let layer = ReconnectLayer::new("ws://127.0.0.1:4000/socket")
//!     .with_backoff(Schedule::phoenix())
//!     .with_max_attempts(std::num::NonZeroU32::new(20).unwrap());
//! # drop(layer);
//! ```

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tower::retry::backoff::{Backoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::{HasherRng, Rng};

/// The default backoff: tower's [`ExponentialBackoffMaker`], 100 ms doubling to 30 s, with up to
/// 50% random jitter added to each delay.
pub fn default_backoff() -> ExponentialBackoffMaker {
    ExponentialBackoffMaker::new(
        Duration::from_millis(100),
        Duration::from_secs(30),
        0.5,
        HasherRng::default(),
    )
    .expect("constant backoff parameters are valid")
}

/// The error of [`Schedule::new`]: a schedule needs at least one delay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a backoff schedule needs at least one delay")]
pub struct EmptySchedule;

/// A fixed list of delays: retry `n` waits `delays[n]`, and every retry past the end waits the
/// last entry. Jitter is off unless set with [`Schedule::with_jitter`].
///
/// Implements [`MakeBackoff`]; its timers are `tokio::time::Sleep`, so the published
/// [`State::WaitingToRetry`](crate::State::WaitingToRetry) carries the delay.
#[derive(Clone, Debug)]
pub struct Schedule {
    delays: Arc<[Duration]>,
    jitter: f64,
}

impl Schedule {
    /// A schedule of `delays`, without jitter.
    pub fn new(delays: impl Into<Vec<Duration>>) -> Result<Self, EmptySchedule> {
        let delays: Vec<Duration> = delays.into();
        if delays.is_empty() {
            return Err(EmptySchedule);
        }
        Ok(Schedule {
            delays: delays.into(),
            jitter: 0.0,
        })
    }

    /// Phoenix's `reconnectAfterMs`: 10, 50, 100, 150, 200, 250, 500 ms, 1 s, 2 s, then 5 s.
    pub fn phoenix() -> Self {
        Self::new([10, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000].map(Duration::from_millis))
            .expect("non-empty")
    }

    /// Adds up to `ratio` × the delay of random jitter to each delay (`ratio` is clamped to
    /// `0.0..=1.0`; NaN means no jitter).
    pub fn with_jitter(mut self, ratio: f64) -> Self {
        self.jitter = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        self
    }

    /// The delays, in order.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }
}

impl MakeBackoff for Schedule {
    type Backoff = ScheduleBackoff;

    fn make_backoff(&mut self) -> ScheduleBackoff {
        ScheduleBackoff {
            schedule: self.clone(),
            next: 0,
            rng: HasherRng::default(),
        }
    }
}

/// One session of a [`Schedule`].
#[derive(Debug, Clone)]
pub struct ScheduleBackoff {
    schedule: Schedule,
    next: usize,
    rng: HasherRng,
}

impl Backoff for ScheduleBackoff {
    type Future = tokio::time::Sleep;

    fn next_backoff(&mut self) -> tokio::time::Sleep {
        let delays = &self.schedule.delays;
        let base = delays[self.next.min(delays.len() - 1)];
        self.next = self.next.saturating_add(1);
        let jitter = if self.schedule.jitter > 0.0 {
            base.mul_f64(self.rng.next_f64() * self.schedule.jitter)
        } else {
            Duration::ZERO
        };
        tokio::time::sleep(base + jitter)
    }
}

/// A backoff timer, boxed so the state machine need not be generic.
pub(crate) type Timer = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A [`MakeBackoff`] behind a trait object, holding the current session.
pub(crate) trait Retry: Send {
    /// The next timer of the current session (made if there is none), and its delay when known.
    fn next(&mut self) -> (Timer, Option<Duration>);
    /// Ends the current session: the next failure starts a fresh one.
    fn reset(&mut self);
}

pub(crate) struct Sessions<B: MakeBackoff> {
    make: B,
    session: Option<B::Backoff>,
}

impl<B: MakeBackoff> Sessions<B> {
    pub(crate) fn new(make: B) -> Self {
        Sessions {
            make,
            session: None,
        }
    }
}

impl<B> Retry for Sessions<B>
where
    B: MakeBackoff + Send,
    B::Backoff: Send,
    <B::Backoff as Backoff>::Future: Send + 'static,
{
    fn next(&mut self) -> (Timer, Option<Duration>) {
        let make = &mut self.make;
        let timer = self
            .session
            .get_or_insert_with(|| make.make_backoff())
            .next_backoff();
        // Every backoff in this crate and tower's own are `Sleep`s: read their deadline, to the
        // millisecond (the resolution of tokio's timers; it hides the time spent since `now`).
        let delay = (&timer as &dyn Any)
            .downcast_ref::<tokio::time::Sleep>()
            .map(|sleep| {
                let left = sleep
                    .deadline()
                    .saturating_duration_since(tokio::time::Instant::now());
                Duration::from_millis((left.as_micros() as u64).div_ceil(1000))
            });
        (Box::pin(timer), delay)
    }

    fn reset(&mut self) {
        self.session = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn schedule_repeats_its_last_delay_and_reports_it() {
        let mut retry = Sessions::new(Schedule::new([1, 2].map(Duration::from_secs)).unwrap());
        let delays: Vec<_> = (0..4).map(|_| retry.next().1.unwrap()).collect();
        assert_eq!(delays, [1, 2, 2, 2].map(Duration::from_secs));
        retry.reset();
        assert_eq!(retry.next().1, Some(Duration::from_secs(1)));
    }

    #[test]
    fn empty_schedule_is_an_error() {
        assert_eq!(Schedule::new(Vec::new()).unwrap_err(), EmptySchedule);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_stays_within_ratio() {
        let mut retry = Sessions::new(
            Schedule::new([Duration::from_millis(100)])
                .unwrap()
                .with_jitter(0.5),
        );
        for _ in 0..100 {
            let delay = retry.next().1.unwrap();
            assert!(delay >= Duration::from_millis(100) && delay <= Duration::from_millis(150));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn default_backoff_grows() {
        let mut retry = Sessions::new(default_backoff());
        let first = retry.next().1.unwrap();
        let second = retry.next().1.unwrap();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(150));
        assert!(second >= Duration::from_millis(200) && second <= Duration::from_millis(300));
    }
}
