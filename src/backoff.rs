//! Backoff between reconnect attempts.
//!
//! Any [`tower::retry::backoff::MakeBackoff`] works: each failure run is one backoff *session*
//! (`make_backoff`), each retry waits for the session's next future. The session is reset (a
//! new one is made) only after a connection has stayed installed for the stable period, so a
//! peer that accepts and then drops at once does not cause a reconnect storm.
//!
//! Two makers ship with the crate:
//! - [`Exponential`]: exponential backoff with *full jitter* (each delay uniformly random
//!   between zero and a ceiling that doubles), the default of
//!   [`ReconnectLayer`](crate::ReconnectLayer) through [`default_backoff`] (ceilings 1 s,
//!   2 s, 4 s, ... up to 30 s). Full jitter spreads a herd: when a server drops 1,000 clients
//!   at once, their first retries are spread over a whole second, not bunched in one window;
//!   tower's `ExponentialBackoffMaker`, which adds jitter on top of a fixed delay, does not;
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

use tower::retry::backoff::{Backoff, MakeBackoff};
use tower::util::rng::{HasherRng, Rng};

/// The default backoff: [`Exponential`] with full jitter, ceilings from 1 s doubling to 30 s.
///
/// The first retry comes after half a second on average (between 0 and 1 s): the price of a
/// spread herd. For a quicker first retry of a single client, choose
/// [`Schedule::phoenix`] or an [`Exponential`] with a smaller first ceiling.
pub fn default_backoff() -> Exponential {
    Exponential::new(Duration::from_secs(1), Duration::from_secs(30))
        .expect("constant backoff parameters are valid")
}

/// The error of [`Exponential::new`]: the first ceiling must be positive and at most the
/// largest one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid exponential backoff: first ceiling {first:?}, largest {max:?} (need 0 < first <= max)"
)]
pub struct InvalidBackoff {
    /// The first ceiling given.
    pub first: Duration,
    /// The largest ceiling given.
    pub max: Duration,
}

/// Exponential backoff with full jitter (the AWS architecture note "Exponential Backoff And
/// Jitter"): retry `n` (from 0) waits a delay drawn uniformly from `0..=min(max, first × 2ⁿ)`.
///
/// Implements [`MakeBackoff`]; its timers are `tokio::time::Sleep`, so the published
/// [`State::WaitingToRetry`](crate::State::WaitingToRetry) carries the delay.
///
/// ```
/// use std::time::Duration;
/// use tower_epoch::backoff::Exponential;
///
/// let backoff = Exponential::new(Duration::from_millis(200), Duration::from_secs(10))?;
/// # drop(backoff);
/// # Ok::<(), tower_epoch::backoff::InvalidBackoff>(())
/// ```
#[derive(Clone, Debug)]
pub struct Exponential {
    first: Duration,
    max: Duration,
}

impl Exponential {
    /// Ceilings from `first`, doubling up to `max`.
    ///
    /// # Errors
    ///
    /// [`InvalidBackoff`] unless `0 < first <= max`.
    pub fn new(first: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if first.is_zero() || first > max {
            return Err(InvalidBackoff { first, max });
        }
        Ok(Exponential { first, max })
    }

    /// The ceiling of retry `n` (from 0): `min(max, first × 2ⁿ)`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }
}

impl MakeBackoff for Exponential {
    type Backoff = ExponentialBackoff;

    fn make_backoff(&mut self) -> ExponentialBackoff {
        ExponentialBackoff {
            params: self.clone(),
            next: 0,
            rng: HasherRng::default(),
        }
    }
}

/// One session of an [`Exponential`] backoff.
#[derive(Debug, Clone)]
pub struct ExponentialBackoff {
    params: Exponential,
    next: u32,
    rng: HasherRng,
}

impl Backoff for ExponentialBackoff {
    type Future = tokio::time::Sleep;

    fn next_backoff(&mut self) -> tokio::time::Sleep {
        let ceiling = self.params.ceiling(self.next);
        self.next = self.next.saturating_add(1);
        tokio::time::sleep(ceiling.mul_f64(self.rng.next_f64()))
    }
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
        let jitter = base.mul_f64(self.rng.next_f64() * self.schedule.jitter);
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
    fn phoenix_is_phoenixs_list() {
        let ms: Vec<u64> = Schedule::phoenix()
            .delays()
            .iter()
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(ms, [10, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000]);
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
        let mut jittered = 0;
        for _ in 0..100 {
            let delay = retry.next().1.unwrap();
            assert!(delay >= Duration::from_millis(100) && delay <= Duration::from_millis(150));
            jittered += u32::from(delay > Duration::from_millis(101));
        }
        assert!(
            jittered > 50,
            "the jitter is drawn: {jittered} of 100 above 101 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_jitter_stays_under_a_doubling_ceiling() {
        let backoff = default_backoff();
        let ceilings: Vec<_> = (0..7).map(|n| backoff.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(30));
        let mut retry = Sessions::new(backoff);
        let mut below_half = 0;
        for _ in 0..200 {
            retry.reset();
            let first = retry.next().1.unwrap();
            let second = retry.next().1.unwrap();
            assert!(first <= Duration::from_secs(1), "{first:?}");
            assert!(second <= Duration::from_secs(2), "{second:?}");
            below_half += u32::from(first < Duration::from_millis(500));
        }
        // Uniform over the whole range, not a fixed delay plus a little jitter.
        assert!(
            (50..=150).contains(&below_half),
            "{below_half} of 200 below 500 ms"
        );
    }

    #[test]
    fn exponential_refuses_a_zero_or_inverted_range() {
        let s = Duration::from_secs;
        assert!(Exponential::new(Duration::ZERO, s(1)).is_err());
        assert_eq!(
            Exponential::new(s(2), s(1)).unwrap_err(),
            InvalidBackoff {
                first: s(2),
                max: s(1)
            }
        );
        assert!(Exponential::new(s(1), s(1)).is_ok());
    }
}
