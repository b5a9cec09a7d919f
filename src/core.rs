//! The state machine shared by the handle, the services and the driver.
//!
//! Every transition happens synchronously under one mutex, at the moment the operation is called;
//! the driver only performs the I/O the transitions ask for ([`Effect`]s) and reports the outcome
//! back through the same transitions. The machine is not generic: the installed connection is
//! kept type-erased, so [`Handle`](crate::Handle) needs no type parameters.
//!
//! Invariant: a connection is installed only if its attempt's epoch is the clock's current value,
//! and any tick (disconnect, suspend, a new attempt) first releases it. So while a connection is
//! installed, `installed == clock`.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Waker};

use tokio::sync::{Notify, oneshot, watch};

use crate::backoff::{Retry, Timer};
use crate::epoch::{Clock, Epoch};
use crate::error::{Error, SharedError};
use crate::state::{Ledger, State};
use crate::teardown::CloseCause;

/// A connection in the slot or on its way to teardown, type-erased.
pub(crate) type AnyConn = Box<dyn Any + Send>;

/// I/O the driver must perform on behalf of a transition.
pub(crate) enum Effect {
    /// Call the connector for an attempt of this epoch.
    Attempt { epoch: Epoch },
    /// Close this connection (exactly once), then resolve `done`.
    Close {
        epoch: Epoch,
        conn: AnyConn,
        cause: CloseCause,
        done: Option<oneshot::Sender<()>>,
    },
    /// Wait for `timer`, then report [`Core::timer_fired`] with `epoch`.
    Retry { epoch: Epoch, timer: Timer },
    /// Start the stable-period timer for the connection installed at `epoch`.
    Stable { epoch: Epoch },
}

/// Settings the machine needs, fixed when the layer is applied.
pub(crate) struct MachineConfig {
    pub(crate) retry: Box<dyn Retry>,
    pub(crate) max_attempts: Option<NonZeroU32>,
}

struct Machine {
    state: State,
    slot: Option<(Epoch, AnyConn)>,
    /// Attempts started in the current backoff session.
    attempt: u32,
    /// Teardowns queued or running.
    closing: usize,
    retry: Option<Box<dyn Retry>>,
    max_attempts: Option<NonZeroU32>,
    effects: VecDeque<Effect>,
    waiters: HashMap<u64, Waker>,
    ledger: Ledger,
}

impl Machine {
    /// Starts a new backoff session: the attempt count and the delays begin again.
    fn reset_backoff(&mut self) {
        self.attempt = 0;
        if let Some(retry) = self.retry.as_mut() {
            retry.reset();
        }
    }
}

/// Shared by every handle, service clone and the driver of one managed connection.
pub(crate) struct Core {
    id: u64,
    pub(crate) clock: Arc<Clock>,
    /// Epoch of the installed connection, 0 when none: the request path's one-load check.
    installed: AtomicU64,
    machine: Mutex<Machine>,
    state_tx: watch::Sender<State>,
    wake_driver: Notify,
    users: AtomicUsize,
    claimed: AtomicBool,
    next_waiter: AtomicU64,
    /// The driver's runtime: backoff timers are made in it, whichever thread reports a failure.
    runtime: OnceLock<tokio::runtime::Handle>,
}

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
    Installed(Epoch, C),
    Wait,
}

impl Core {
    pub(crate) fn new() -> Arc<Core> {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let (state_tx, _) = watch::channel(State::Idle);
        Arc::new(Core {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            clock: Arc::new(Clock::new()),
            installed: AtomicU64::new(0),
            machine: Mutex::new(Machine {
                state: State::Idle,
                slot: None,
                attempt: 0,
                closing: 0,
                retry: None,
                max_attempts: None,
                effects: VecDeque::new(),
                waiters: HashMap::new(),
                ledger: Ledger::default(),
            }),
            state_tx,
            wake_driver: Notify::new(),
            users: AtomicUsize::new(0),
            claimed: AtomicBool::new(false),
            next_waiter: AtomicU64::new(1),
            runtime: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        // A panic while holding the lock cannot leave the machine half-updated in a way that
        // matters more than stopping: keep going with the data as it is.
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches the driver's settings; panics if the layer was already applied.
    pub(crate) fn claim(&self, config: MachineConfig) {
        assert!(
            !self.claimed.swap(true, Ordering::AcqRel),
            "ReconnectLayer applied twice: one layer manages one connection, \
             create a new ReconnectLayer for each connector"
        );
        let mut m = self.lock();
        m.retry = Some(config.retry);
        m.max_attempts = config.max_attempts;
    }

    /// Called by the driver when it starts: the runtime its timers live in.
    pub(crate) fn set_runtime(&self, runtime: tokio::runtime::Handle) {
        let _ = self.runtime.set(runtime);
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

    pub(crate) fn state(&self) -> State {
        self.state_tx.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    pub(crate) fn ledger(&self) -> Ledger {
        self.lock().ledger
    }

    pub(crate) fn installed_conn<C: Clone + 'static>(&self) -> Option<(Epoch, C)> {
        let m = self.lock();
        m.slot
            .as_ref()
            .map(|(e, c)| (*e, downcast_ref::<C>(c).clone()))
    }

    // ----- handle operations -----

    pub(crate) fn connect(&self) -> Result<Epoch, Error> {
        let mut m = self.lock();
        match &m.state {
            State::Shutdown => Err(Error::Shutdown),
            s if s.is_active() => {
                tracing::trace!(epoch = %self.clock.now(), "connect: already active, no-op");
                Ok(self.clock.now())
            }
            _ => {
                m.reset_backoff();
                Ok(self.start_attempt(&mut m))
            }
        }
    }

    pub(crate) fn disconnect(&self) -> Option<oneshot::Receiver<()>> {
        let mut m = self.lock();
        if matches!(m.state, State::Shutdown) {
            return None;
        }
        self.release(&mut m, CloseCause::Disconnect)
    }

    pub(crate) fn suspend(&self) -> Option<ResumeToken> {
        let mut m = self.lock();
        if !m.state.is_active() {
            tracing::debug!(epoch = %self.clock.now(), "suspend: intent is not connected, no token");
            return None;
        }
        self.release(&mut m, CloseCause::Suspend);
        Some(ResumeToken {
            core: self.id,
            epoch: self.clock.now(),
        })
    }

    pub(crate) fn resume(&self, token: ResumeToken) -> Result<Epoch, Error> {
        if token.core != self.id {
            return Err(Error::ForeignToken);
        }
        let mut m = self.lock();
        if matches!(m.state, State::Shutdown) {
            return Err(Error::Shutdown);
        }
        let now = self.clock.now();
        if now != token.epoch {
            tracing::debug!(epoch = %now, token = %token.epoch, "resume: stale token, no reconnect");
            return Err(Error::StaleResume {
                token: token.epoch,
                now,
            });
        }
        m.reset_backoff();
        Ok(self.start_attempt(&mut m))
    }

    /// A failure of the connection installed at `epoch` (rule 3: ignored unless it is installed).
    pub(crate) fn report_failure(&self, epoch: Epoch, error: Error) -> bool {
        let error = SharedError::new(error);
        let mut m = self.lock();
        match m.slot.take_if(|(e, _)| *e == epoch) {
            Some((_, conn)) => {
                self.installed.store(0, Ordering::Release);
                m.ledger.failures += 1;
                tracing::debug!(%epoch, %error, "installed connection failed");
                self.queue_close(&mut m, epoch, conn, CloseCause::Failed, None);
                self.schedule_retry(&mut m, epoch, error);
                Self::wake_waiters(&mut m);
                true
            }
            None => {
                m.ledger.ignored += 1;
                tracing::debug!(%epoch, now = %self.clock.now(), %error, "stale failure report ignored");
                false
            }
        }
    }

    /// The peer ended the connection installed at `epoch` normally: release it, no reconnect.
    pub(crate) fn report_closed(&self, epoch: Epoch) -> bool {
        let mut m = self.lock();
        if m.slot.as_ref().is_some_and(|(e, _)| *e == epoch) {
            tracing::debug!(%epoch, "installed connection ended by the peer");
            self.release(&mut m, CloseCause::Ended);
            true
        } else {
            m.ledger.ignored += 1;
            tracing::debug!(%epoch, now = %self.clock.now(), "stale close report ignored");
            false
        }
    }

    // ----- request path -----

    pub(crate) fn checkout<C: Clone + 'static>(
        &self,
        waiter: u64,
        cx: &mut Context<'_>,
        fail_fast: bool,
    ) -> Result<Checkout<C>, Error> {
        let mut m = self.lock();
        if let Some((epoch, conn)) = &m.slot {
            return Ok(Checkout::Installed(*epoch, downcast_ref::<C>(conn).clone()));
        }
        match &m.state {
            State::Shutdown => return Err(Error::Shutdown),
            State::GaveUp {
                attempts,
                last_error,
            } => {
                return Err(Error::GaveUp {
                    attempts: *attempts,
                    last_error: last_error.clone(),
                });
            }
            _ if fail_fast => return Err(Error::NotConnected),
            _ => {}
        }
        Self::register(&mut m, waiter, cx);
        Ok(Checkout::Wait)
    }

    /// Wakes `cx` at the next install, release or terminal state.
    pub(crate) fn register_waiter(&self, waiter: u64, cx: &mut Context<'_>) {
        Self::register(&mut self.lock(), waiter, cx);
    }

    pub(crate) fn forget_waiter(&self, waiter: u64) {
        self.lock().waiters.remove(&waiter);
    }

    fn register(m: &mut Machine, waiter: u64, cx: &mut Context<'_>) {
        match m.waiters.get_mut(&waiter) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => w.clone_from(cx.waker()),
            None => {
                m.waiters.insert(waiter, cx.waker().clone());
            }
        }
    }

    // ----- driver operations -----

    pub(crate) fn take_effects(&self) -> VecDeque<Effect> {
        std::mem::take(&mut self.lock().effects)
    }

    /// Called before the connector is called: false if the attempt went stale while queued.
    pub(crate) fn attempt_started(&self, epoch: Epoch) -> bool {
        let mut m = self.lock();
        if self.clock.is_current(epoch) {
            m.ledger.attempts += 1;
            tracing::debug!(%epoch, attempt = m.attempt, "connect attempt started");
            true
        } else {
            tracing::trace!(%epoch, "queued attempt went stale before it started");
            false
        }
    }

    /// Returns whether the connection was installed.
    pub(crate) fn attempt_done(&self, epoch: Epoch, outcome: Result<AnyConn, Error>) -> bool {
        let mut m = self.lock();
        let current = self.clock.is_current(epoch);
        match outcome {
            Ok(conn) if current => {
                m.ledger.opened += 1;
                m.ledger.installed += 1;
                m.slot = Some((epoch, conn));
                self.installed.store(epoch.get(), Ordering::Release);
                m.effects.push_back(Effect::Stable { epoch });
                self.set_state(&mut m, State::Connected { epoch });
                Self::wake_waiters(&mut m);
                return true;
            }
            Ok(conn) => {
                // Rule 1: a stale connect is closed, never installed.
                m.ledger.opened += 1;
                m.ledger.discarded += 1;
                tracing::debug!(%epoch, now = %self.clock.now(), "stale connection discarded");
                self.queue_close(&mut m, epoch, conn, CloseCause::Stale, None);
            }
            Err(error) if current => {
                m.ledger.failures += 1;
                tracing::debug!(%epoch, %error, "connect attempt failed");
                self.schedule_retry(&mut m, epoch, SharedError::new(error));
            }
            Err(error) => {
                m.ledger.ignored += 1;
                tracing::debug!(%epoch, %error, "stale attempt failure ignored");
            }
        }
        false
    }

    pub(crate) fn teardown_done(&self, epoch: Epoch, timed_out: bool) {
        let mut m = self.lock();
        m.ledger.closed += 1;
        m.closing -= 1;
        if timed_out {
            m.ledger.close_timeouts += 1;
            tracing::warn!(%epoch, "close timed out; connection dropped");
        } else {
            tracing::debug!(%epoch, "connection closed");
        }
        // Rule 2: the teardown always closed its own connection; it changes shared state only
        // if nothing happened since the disconnect that released it.
        if let State::Disconnecting { epoch: released } = m.state {
            if m.closing == 0 && self.clock.is_current(released) {
                self.set_state(&mut m, State::Idle);
            }
        }
    }

    pub(crate) fn timer_fired(&self, epoch: Epoch) {
        let mut m = self.lock();
        // Rule 4: a stale timer does nothing.
        let current = self.clock.is_current(epoch)
            && matches!(m.state, State::WaitingToRetry { epoch: e, .. } if e == epoch);
        if current {
            self.start_attempt(&mut m);
        } else {
            m.ledger.ignored += 1;
            tracing::debug!(%epoch, now = %self.clock.now(), "stale backoff timer ignored");
        }
    }

    pub(crate) fn stable(&self, epoch: Epoch) {
        let mut m = self.lock();
        if self.is_installed(epoch) {
            tracing::debug!(%epoch, "connection stable; backoff reset");
            m.reset_backoff();
        }
    }

    /// Every user is gone: release what is installed so the driver can close it and stop.
    pub(crate) fn begin_shutdown(&self) {
        let mut m = self.lock();
        self.release(&mut m, CloseCause::Shutdown);
    }

    /// The driver has stopped: terminal state; whatever is left is dropped.
    pub(crate) fn stopped(&self) {
        let mut m = self.lock();
        self.clock.tick();
        self.installed.store(0, Ordering::Release);
        let dropped = usize::from(m.slot.take().is_some())
            + m.effects
                .drain(..)
                .filter(|e| matches!(e, Effect::Close { .. }))
                .count();
        m.ledger.closed += dropped as u64;
        self.set_state(&mut m, State::Shutdown);
        Self::wake_waiters(&mut m);
    }

    // ----- transitions -----

    fn start_attempt(&self, m: &mut Machine) -> Epoch {
        let epoch = self.clock.tick();
        m.attempt += 1;
        m.effects.push_back(Effect::Attempt { epoch });
        self.set_state(
            m,
            State::Connecting {
                epoch,
                attempt: m.attempt,
            },
        );
        self.wake_driver.notify_one();
        epoch
    }

    /// Disconnect and suspend: tick, release the slot to teardown.
    fn release(&self, m: &mut Machine, cause: CloseCause) -> Option<oneshot::Receiver<()>> {
        let epoch = self.clock.tick();
        let released = m.slot.take();
        self.installed.store(0, Ordering::Release);
        let released_epoch = released.as_ref().map(|(e, _)| *e);
        let waiter = released.map(|(conn_epoch, conn)| {
            let (tx, rx) = oneshot::channel();
            self.queue_close(m, conn_epoch, conn, cause, Some(tx));
            rx
        });
        let next = if m.closing > 0 {
            State::Disconnecting { epoch }
        } else {
            State::Idle
        };
        tracing::debug!(%epoch, %cause, released = ?released_epoch, "released");
        self.set_state(m, next);
        Self::wake_waiters(m);
        waiter
    }

    fn queue_close(
        &self,
        m: &mut Machine,
        epoch: Epoch,
        conn: AnyConn,
        cause: CloseCause,
        done: Option<oneshot::Sender<()>>,
    ) {
        m.closing += 1;
        m.effects.push_back(Effect::Close {
            epoch,
            conn,
            cause,
            done,
        });
        self.wake_driver.notify_one();
    }

    fn schedule_retry(&self, m: &mut Machine, epoch: Epoch, last_error: SharedError) {
        if let Some(max) = m.max_attempts {
            if m.attempt >= max.get() {
                tracing::warn!(%epoch, attempts = m.attempt, %last_error, "giving up");
                let attempts = m.attempt;
                m.reset_backoff();
                self.set_state(
                    m,
                    State::GaveUp {
                        attempts,
                        last_error,
                    },
                );
                Self::wake_waiters(m);
                return;
            }
        }
        // A failure may be reported from any thread: make the timer in the driver's runtime.
        let _runtime = self.runtime.get().map(|rt| rt.enter());
        let (timer, delay) = m
            .retry
            .as_mut()
            .expect("attempts start only after the layer was applied")
            .next();
        m.effects.push_back(Effect::Retry { epoch, timer });
        self.set_state(
            m,
            State::WaitingToRetry {
                epoch,
                attempt: m.attempt + 1,
                delay,
                last_error,
            },
        );
        self.wake_driver.notify_one();
    }

    fn set_state(&self, m: &mut Machine, next: State) {
        tracing::debug!(epoch = %self.clock.now(), from = %m.state, to = %next, "transition");
        m.state = next.clone();
        self.state_tx.send_replace(next);
    }

    fn wake_waiters(m: &mut Machine) {
        for (_, waker) in m.waiters.drain() {
            waker.wake();
        }
    }
}

fn downcast_ref<C: 'static>(conn: &AnyConn) -> &C {
    conn.downcast_ref::<C>()
        .expect("the slot only ever holds the driver's connection type")
}

pub(crate) fn downcast<C: 'static>(conn: AnyConn) -> C {
    *conn
        .downcast::<C>()
        .expect("the slot only ever holds the driver's connection type")
}
