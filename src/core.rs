//! [`Core`]: the state shared by the handles, the services and the driver of one managed
//! connection, around the [`Machine`].
//!
//! Every operation is one [`Machine::step`] under the machine's lock, at the moment it is
//! called; the core then carries out the effects that move connections (into the slot, out of
//! it to teardown) and publishes what the machine decided, in one place: the state (a `watch`),
//! the epoch of the installed connection (the request path's one atomic load), the wake-up of
//! the services that wait. Work for the driver goes into a queue it drains.
//!
//! No code of the user runs under the machine's lock: the connection is cloned under the
//! slot's own lock, and wakers are woken, the connector, the teardown, the monitor and the
//! backoff are called after the lock is released.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Waker};

use tokio::sync::{Notify, oneshot, watch};

use crate::activity::{Activity, Idle};
use crate::epoch::{Clock, Epoch};
use crate::error::Error;
use crate::events::{Cause, Events, Hub, Transition};
use crate::machine::{Effect, Event, Machine, Policy, Reply};
use crate::state::{Ledger, State};
use crate::teardown::CloseCause;

/// A connection in the slot or on its way to teardown, type-erased.
pub(crate) type AnyConn = Box<dyn Any + Send>;

/// Work the driver must do about a transition.
pub(crate) enum Work {
    /// Call the connector for an attempt of this epoch.
    Attempt(Epoch),
    /// Close this connection (exactly once), then resolve `done`.
    Close {
        epoch: Epoch,
        conn: AnyConn,
        cause: CloseCause,
        done: Option<oneshot::Sender<()>>,
    },
    /// Arm a backoff timer for the retry of this epoch.
    Retry(Epoch),
    /// Start a new backoff session.
    ResetBackoff,
    /// Arm the stable-period timer of the connection installed at this epoch.
    Stable(Epoch),
    /// Start nothing more: every user is gone.
    Stop,
}

/// The connection in the slot.
struct Installed {
    epoch: Epoch,
    conn: AnyConn,
    /// Its holds, when the layer has an idle timeout.
    activity: Option<Arc<Activity>>,
}

/// The machine and what only moves with it.
struct Locked {
    machine: Machine,
    /// Connections an attempt produced, between the driver's report and the machine's verdict.
    opened: Option<(Epoch, AnyConn)>,
    /// A scratch buffer for the effects of one step.
    effects: Vec<Effect>,
    /// Steps that changed the published state, numbered so that they publish in order.
    steps: u64,
}

pub(crate) struct Core {
    id: u64,
    pub(crate) clock: Arc<Clock>,
    /// Epoch of the installed connection, 0 when none: the request path's one-load check.
    installed: AtomicU64,
    locked: Mutex<Locked>,
    /// The installed connection, apart from the machine: cloning it runs the connection's
    /// own `Clone`.
    slot: Mutex<Option<Installed>>,
    work: Mutex<VecDeque<Work>>,
    wake_driver: Notify,
    /// Services waiting for a connection, by their id.
    waiters: Mutex<HashMap<u64, Waker>>,
    state_tx: watch::Sender<State>,
    /// The last step whose state `state_tx` holds.
    published: AtomicU64,
    users: AtomicUsize,
    next_waiter: AtomicU64,
    /// Classifies errors as permanent; set when the layer is applied.
    is_permanent: Mutex<Option<IsPermanent>>,
    /// Whether installed connections track their holds (the layer has an idle timeout).
    idle: AtomicBool,
    /// The machine's [`Machine::is_dormant`] after the last step: whether a waiting request
    /// starts an attempt.
    dormant: AtomicBool,
    /// The transition events, made when first followed.
    events: OnceLock<Box<Hub>>,
}

/// Whether an error is permanent: the predicate of
/// [`ReconnectLayer::with_permanent_error`](crate::ReconnectLayer::with_permanent_error).
pub(crate) type IsPermanent =
    Arc<dyn Fn(&(dyn std::error::Error + Send + Sync + 'static)) -> bool + Send + Sync>;

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.id)
            .field("clock", &self.clock.now())
            .field("state", &*self.state_tx.borrow())
            .finish_non_exhaustive()
    }
}

/// A single-use token returned by [`Handle::suspend`](crate::Handle::suspend).
///
/// It is consumed by [`Handle::resume`](crate::Handle::resume), which reconnects only if the
/// clock still reads the token's epoch.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a suspended connection comes back only if you resume it with this token"]
pub struct ResumeToken {
    core: u64,
    epoch: Epoch,
}

impl ResumeToken {
    /// The epoch of the `suspend` that issued it.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// Outcome of a service asking for the installed connection.
pub(crate) enum Checkout<C> {
    Installed(Epoch, C, Option<Arc<Activity>>),
    Wait,
}

/// The error a request fails with in a terminal state (it would wait for ever otherwise).
pub(crate) fn terminal_error(state: &State) -> Option<Error> {
    match state {
        State::Shutdown => Some(Error::Shutdown),
        State::GaveUp {
            attempts,
            last_error,
        } => Some(Error::GaveUp {
            attempts: *attempts,
            last_error: last_error.clone(),
        }),
        State::Refused { last_error } => Some(Error::Refused(last_error.clone())),
        _ => None,
    }
}

/// The lock is never held across user code, so a poisoned one only means that another
/// thread panicked in the crate's own code between two consistent states: go on.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Core {
    pub(crate) fn new(policy: Policy) -> Arc<Core> {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let clock = Arc::new(Clock::new());
        Arc::new(Core {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            installed: AtomicU64::new(0),
            locked: Mutex::new(Locked {
                machine: Machine::new(Arc::clone(&clock), policy),
                opened: None,
                effects: Vec::new(),
                steps: 0,
            }),
            clock,
            slot: Mutex::new(None),
            work: Mutex::new(VecDeque::new()),
            wake_driver: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            state_tx: watch::Sender::new(State::Idle),
            published: AtomicU64::new(0),
            users: AtomicUsize::new(0),
            next_waiter: AtomicU64::new(1),
            is_permanent: Mutex::new(None),
            idle: AtomicBool::new(false),
            dormant: AtomicBool::new(policy.lazy),
            events: OnceLock::new(),
        })
    }

    /// Sets the policies of the layer being applied to this core; `idle`: whether it has an
    /// idle timeout.
    pub(crate) fn configure(&self, policy: Policy, is_permanent: Option<IsPermanent>, idle: bool) {
        {
            let mut locked = lock(&self.locked);
            locked.machine.set_policy(policy);
            self.dormant
                .store(locked.machine.is_dormant(), Ordering::Release);
        }
        *lock(&self.is_permanent) = is_permanent;
        self.idle.store(idle, Ordering::Release);
    }

    /// Whether `error` is permanent, by the layer's predicate (run outside every lock; a
    /// panicking predicate classifies nothing as permanent).
    fn is_permanent(&self, error: &Error) -> bool {
        let Some(is_permanent) = lock(&self.is_permanent).clone() else {
            return false;
        };
        let cause: &(dyn std::error::Error + Send + Sync + 'static) = match error {
            Error::Connect(cause) | Error::ConnectionFailed(cause) => &**cause,
            other => other,
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| is_permanent(cause)))
            .unwrap_or(false)
    }

    /// One step of the machine, its effects carried out. Returns the machine's reply and,
    /// for a disconnect that released a connection, the receiver its teardown resolves.
    ///
    /// Under the machine's lock: the step, the moves of connections in and out of the slot (no
    /// clone, no user code), the work queued for the driver (in the order of the steps). After
    /// it: the state published, the driver and the waiting services woken, what was evicted
    /// dropped, the transition logged.
    fn apply(&self, event: Event) -> (Reply, Option<oneshot::Receiver<()>>) {
        tracing::trace!(?event, "step");
        let cause = Cause::of(&event);
        let mut wake = false;
        let mut done = None;
        let mut evicted = None;
        let (reply, publish, queued, before, hub) = {
            let mut locked = lock(&self.locked);
            let Locked {
                machine,
                opened,
                effects,
                steps,
            } = &mut *locked;
            let before = machine.state().clone();
            let was_dormant = machine.is_dormant();
            // Made at the first `events()`: until then, no transition is made.
            let hub = self.events.get();
            let reply = machine.step(event, effects);
            let mut work = Vec::new();
            for effect in effects.drain(..) {
                match effect {
                    Effect::Attempt(epoch) => work.push(Work::Attempt(epoch)),
                    Effect::Install(epoch) => {
                        let conn = opened.take().filter(|(e, _)| *e == epoch);
                        let (_, conn) = conn.expect("installed what the attempt opened");
                        let activity = self
                            .idle
                            .load(Ordering::Acquire)
                            .then(|| Arc::new(Activity::default()));
                        *lock(&self.slot) = Some(Installed {
                            epoch,
                            conn,
                            activity,
                        });
                        self.installed.store(epoch.get(), Ordering::Release);
                    }
                    Effect::Discard(epoch) => {
                        let (_, conn) = opened.take().expect("discarded what the attempt opened");
                        work.push(Work::Close {
                            epoch,
                            conn,
                            cause: CloseCause::Stale,
                            done: None,
                        });
                    }
                    Effect::Release {
                        epoch,
                        cause,
                        notify,
                    } => {
                        self.installed.store(0, Ordering::Release);
                        let Installed { conn, .. } = lock(&self.slot)
                            .take()
                            .filter(|installed| installed.epoch == epoch)
                            .expect("released the installed connection");
                        let tx = notify.then(|| {
                            let (tx, rx) = oneshot::channel();
                            done = Some(rx);
                            tx
                        });
                        work.push(Work::Close {
                            epoch,
                            conn,
                            cause,
                            done: tx,
                        });
                    }
                    Effect::Evict => {
                        self.installed.store(0, Ordering::Release);
                        evicted = lock(&self.slot).take().map(|installed| installed.conn);
                    }
                    Effect::Retry(epoch) => work.push(Work::Retry(epoch)),
                    Effect::ResetBackoff => work.push(Work::ResetBackoff),
                    Effect::Stable(epoch) => work.push(Work::Stable(epoch)),
                    Effect::Stop => work.push(Work::Stop),
                    Effect::Wake => wake = true,
                }
            }
            // Queued in the order of the steps, so the driver never sees an older step's work
            // after a newer one's.
            let queued = !work.is_empty();
            if queued {
                lock(&self.work).extend(work);
            }
            let dormant = machine.is_dormant();
            self.dormant.store(dormant, Ordering::Release);
            let after = machine.state();
            // A change of `dormant` alone (a disconnect or suspend of a dormant connection) is
            // published too: it changes what a request does.
            let changed = !same_state(&before, after) || was_dormant != dormant;
            let publish = changed.then(|| {
                *steps += 1;
                if let (Some(hub), Some(cause)) = (hub, cause) {
                    hub.queue(Transition {
                        seq: *steps,
                        from: before.clone(),
                        to: after.clone(),
                        cause,
                        epoch: machine.now(),
                        attempt: machine.attempt(),
                        at: tokio::time::Instant::now(),
                    });
                }
                (*steps, after.clone())
            });
            (reply, publish, queued, before, hub)
        };
        if let Some((step, state)) = publish {
            tracing::debug!(epoch = %self.clock.now(), from = %before, to = %state, "transition");
            self.publish(step, state);
            if let Some(hub) = hub {
                hub.flush();
            }
        }
        if queued {
            self.wake_driver.notify_one();
        }
        if wake {
            self.wake_waiters();
        }
        drop((evicted, before));
        (reply, done)
    }

    /// Publishes the state of `step`, unless a later step's state is already out (steps publish
    /// after the machine's lock is released, and may race).
    fn publish(&self, step: u64, state: State) {
        let mut replaced = None;
        self.state_tx.send_if_modified(|current| {
            if step <= self.published.load(Ordering::Relaxed) {
                return false;
            }
            self.published.store(step, Ordering::Relaxed);
            replaced = Some(std::mem::replace(current, state));
            true
        });
        drop(replaced);
    }

    fn wake_waiters(&self) {
        let waiters: Vec<Waker> = lock(&self.waiters).drain().map(|(_, w)| w).collect();
        for waker in waiters {
            waker.wake();
        }
    }

    // ----- users and liveness -----

    pub(crate) fn add_user(&self) {
        self.users.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn remove_user(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake_driver.notify_one();
        }
    }

    pub(crate) fn users(&self) -> usize {
        self.users.load(Ordering::Acquire)
    }

    pub(crate) async fn driver_notified(&self) {
        self.wake_driver.notified().await;
    }

    pub(crate) fn next_waiter_id(&self) -> u64 {
        self.next_waiter.fetch_add(1, Ordering::Relaxed)
    }

    // ----- reads -----

    #[inline]
    pub(crate) fn is_installed(&self, epoch: Epoch) -> bool {
        self.installed.load(Ordering::Acquire) == epoch.get()
    }

    pub(crate) fn is_dormant(&self) -> bool {
        self.dormant.load(Ordering::Acquire)
    }

    pub(crate) fn state(&self) -> State {
        self.state_tx.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    pub(crate) fn events(&self) -> Events {
        self.events.get_or_init(|| Box::new(Hub::new())).subscribe()
    }

    pub(crate) fn ledger(&self) -> Ledger {
        lock(&self.locked).machine.ledger()
    }

    /// The installed connection, cloned, if it is a `C`, with its holds.
    fn installed<C: Clone + 'static>(&self) -> Option<(Epoch, C, Option<Arc<Activity>>)> {
        let slot = lock(&self.slot);
        let installed = slot.as_ref()?;
        let conn = installed.conn.downcast_ref::<C>()?;
        Some((installed.epoch, conn.clone(), installed.activity.clone()))
    }

    /// The installed connection, cloned, if it is a `C`.
    pub(crate) fn installed_conn<C: Clone + 'static>(&self) -> Option<(Epoch, C)> {
        self.installed().map(|(epoch, conn, _)| (epoch, conn))
    }

    // ----- handle operations -----

    pub(crate) fn connect(&self) -> Result<Epoch, Error> {
        match self.apply(Event::Connect).0 {
            Reply::Epoch(epoch) => epoch,
            reply => unreachable!("connect replies with an epoch, not {reply:?}"),
        }
    }

    pub(crate) fn disconnect(&self) -> Option<oneshot::Receiver<()>> {
        self.apply(Event::Disconnect).1
    }

    pub(crate) fn suspend(&self) -> Option<ResumeToken> {
        match self.apply(Event::Suspend).0 {
            Reply::Token(epoch) => epoch.map(|epoch| ResumeToken {
                core: self.id,
                epoch,
            }),
            reply => unreachable!("suspend replies with a token, not {reply:?}"),
        }
    }

    pub(crate) fn resume(&self, token: ResumeToken) -> Result<Epoch, Error> {
        if token.core != self.id {
            return Err(Error::ForeignToken);
        }
        match self.apply(Event::Resume { token: token.epoch }).0 {
            Reply::Epoch(epoch) => epoch,
            reply => unreachable!("resume replies with an epoch, not {reply:?}"),
        }
    }

    pub(crate) fn reconnect_now(&self) -> bool {
        self.took(Event::ReconnectNow)
    }

    /// A failure of the connection installed at `epoch` (rule 3: ignored unless installed).
    pub(crate) fn report_failure(&self, epoch: Epoch, error: Error) -> bool {
        let permanent = self.is_permanent(&error);
        self.took(Event::Failed {
            epoch,
            error: crate::error::SharedError::new(error),
            permanent,
        })
    }

    /// The peer ended the connection installed at `epoch` normally.
    pub(crate) fn report_ended(&self, epoch: Epoch) -> bool {
        self.took(Event::Ended { epoch })
    }

    fn took(&self, event: Event) -> bool {
        matches!(self.apply(event).0, Reply::Took(true))
    }

    // ----- request path -----

    pub(crate) fn checkout<C: Clone + 'static>(
        &self,
        waiter: u64,
        cx: &mut Context<'_>,
        fail_fast: bool,
    ) -> Result<Checkout<C>, Error> {
        if !fail_fast {
            // Before the look, so that an install after it wakes us.
            self.register_waiter(waiter, cx);
        }
        match self.installed::<C>() {
            // Claimed by the idle timeout: its release wakes us.
            Some((_, _, Some(activity))) if activity.is_claimed() => {}
            Some((epoch, conn, activity)) => return Ok(Checkout::Installed(epoch, conn, activity)),
            None => {}
        }
        if self.is_dormant() {
            // Its install (or failure) wakes us.
            self.apply(Event::Demand);
        }
        if let Some(error) = terminal_error(&self.state_tx.borrow()) {
            return Err(error);
        }
        if fail_fast {
            Err(Error::NotConnected)
        } else {
            Ok(Checkout::Wait)
        }
    }

    /// The idle timer of the connection installed at `epoch` fired: returns whether to look
    /// again after the timeout (it was held since the last look).
    pub(crate) fn idle_expired(&self, epoch: Epoch) -> bool {
        let activity = {
            let slot = lock(&self.slot);
            match slot.as_ref() {
                Some(installed) if installed.epoch == epoch => installed.activity.clone(),
                _ => None,
            }
        };
        let Some(activity) = activity else {
            return false;
        };
        match activity.try_claim() {
            Idle::Busy => true,
            Idle::Claimed => {
                self.apply(Event::IdleTimeout { epoch });
                false
            }
        }
    }

    /// Wakes `cx` at the next install, release or terminal state.
    pub(crate) fn register_waiter(&self, waiter: u64, cx: &mut Context<'_>) {
        let mut waiters = lock(&self.waiters);
        match waiters.get_mut(&waiter) {
            // `clone_from` keeps the waker it has if it would wake the same task.
            Some(w) => w.clone_from(cx.waker()),
            None => {
                waiters.insert(waiter, cx.waker().clone());
            }
        }
    }

    pub(crate) fn forget_waiter(&self, waiter: u64) {
        lock(&self.waiters).remove(&waiter);
    }

    // ----- driver operations -----

    pub(crate) fn take_work(&self) -> VecDeque<Work> {
        std::mem::take(&mut *lock(&self.work))
    }

    /// Called before the connector is called: false if the attempt went stale meanwhile.
    pub(crate) fn attempt_starting(&self, epoch: Epoch) -> bool {
        self.took(Event::AttemptStarting { epoch })
    }

    /// The attempt of `epoch` produced `conn`: installed if still current, else handed to
    /// teardown (rule 1). Returns whether it was installed.
    pub(crate) fn opened(&self, epoch: Epoch, conn: AnyConn) -> bool {
        lock(&self.locked).opened = Some((epoch, conn));
        self.took(Event::Opened { epoch })
    }

    pub(crate) fn attempt_failed(&self, epoch: Epoch, error: Error) {
        let permanent = self.is_permanent(&error);
        self.apply(Event::AttemptFailed {
            epoch,
            error: crate::error::SharedError::new(error),
            permanent,
        });
    }

    pub(crate) fn attempt_cancelled(&self, epoch: Epoch) {
        tracing::trace!(%epoch, "stale attempt dropped");
        self.apply(Event::AttemptCancelled);
    }

    pub(crate) fn retry_armed(&self, epoch: Epoch, delay: Option<std::time::Duration>) {
        self.apply(Event::RetryArmed { epoch, delay });
    }

    pub(crate) fn timer_fired(&self, epoch: Epoch) {
        self.apply(Event::TimerFired { epoch });
    }

    pub(crate) fn stable(&self, epoch: Epoch) {
        self.apply(Event::Stable { epoch });
    }

    pub(crate) fn closed(&self, epoch: Epoch, timed_out: bool) {
        tracing::trace!(%epoch, timed_out, "teardown done");
        self.apply(Event::Closed { timed_out });
    }

    /// Every user is gone: release what is installed so the driver can close it and stop.
    pub(crate) fn begin_shutdown(&self) {
        self.apply(Event::Shutdown);
    }

    /// The driver has stopped: terminal state; whatever it held is dropped with it.
    pub(crate) fn stopped(&self) {
        self.apply(Event::Stopped);
        // Work the driver will never do: the connections in it are dropped, closed all the same.
        drop(self.take_work());
    }
}

/// Whether two states are the same for subscribers.
///
/// The errors the states carry are not compared: no step replaces the error of a
/// `WaitingToRetry`, `GaveUp` or `Refused` state without changing another field or the
/// variant (a new failure is a new attempt or epoch; a terminal state is left only by a
/// `connect()`). So no user code runs here, not even an error's `PartialEq`.
fn same_state(a: &State, b: &State) -> bool {
    use State::*;
    match (a, b) {
        (Idle, Idle) | (Shutdown, Shutdown) | (Refused { .. }, Refused { .. }) => true,
        (
            Connecting {
                epoch: a,
                attempt: n,
            },
            Connecting {
                epoch: b,
                attempt: m,
            },
        ) => (a, n) == (b, m),
        (Connected { epoch: a }, Connected { epoch: b })
        | (Disconnecting { epoch: a }, Disconnecting { epoch: b }) => a == b,
        (
            WaitingToRetry {
                epoch: a,
                attempt: n,
                delay: d,
                ..
            },
            WaitingToRetry {
                epoch: b,
                attempt: m,
                delay: e,
                ..
            },
        ) => (a, n, d) == (b, m, e),
        (GaveUp { attempts: n, .. }, GaveUp { attempts: m, .. }) => n == m,
        _ => false,
    }
}

pub(crate) fn downcast<C: 'static>(conn: AnyConn) -> C {
    *conn
        .downcast::<C>()
        .expect("the slot only ever holds the driver's connection type")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core with an idle timeout and a connection (a `u8`) installed at the returned epoch.
    fn installed() -> (Arc<Core>, Epoch) {
        let policy = Policy::default();
        let core = Core::new(policy);
        core.configure(policy, None, true);
        let epoch = core.connect().unwrap();
        assert!(core.attempt_starting(epoch));
        assert!(core.opened(epoch, Box::new(7u8)));
        (core, epoch)
    }

    fn checkout(core: &Core) -> Checkout<u8> {
        let mut cx = Context::from_waker(Waker::noop());
        core.checkout::<u8>(1, &mut cx, false).unwrap()
    }

    #[test]
    fn the_idle_timer_of_another_epoch_claims_nothing() {
        let (core, epoch) = installed();
        let stale = Epoch::from_u64(epoch.get() - 1);
        assert!(!core.idle_expired(stale), "nothing to look at again");
        assert!(core.state().is_connected());
        let Checkout::Installed(_, _, Some(activity)) = checkout(&core) else {
            panic!("still installed, with its holds");
        };
        assert!(!activity.is_claimed());
    }

    /// Between the idle timer's claim and the release that follows it, a service that looks
    /// waits for the release instead of checking out a connection it could not hold (and
    /// looking again, in a loop, until the release).
    #[test]
    fn a_claimed_connection_is_not_checked_out() {
        let (core, _) = installed();
        let Checkout::Installed(_, _, Some(activity)) = checkout(&core) else {
            panic!("installed, with its holds");
        };
        assert_eq!(activity.try_claim(), Idle::Claimed);
        assert!(matches!(checkout(&core), Checkout::Wait));
    }
}
