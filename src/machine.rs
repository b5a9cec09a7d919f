//! The epoch protocol as a state machine: one function of (state, event) that returns the
//! effects the core and the driver carry out.
//!
//! The machine holds no connection, no timer and no user code: it decides. The core keeps the
//! installed connection in its slot and moves it as the effects say; the driver performs the
//! I/O (attempts, teardowns, timers) and reports each outcome back as an event. Every rule of
//! the protocol is a guard in [`Machine::step`]: an event of an epoch that is no longer current
//! changes nothing but the count of ignored events.
//!
//! Invariant: a connection is installed only if its attempt's epoch is the clock's value, and
//! any tick (disconnect, suspend, a new attempt) first releases it. So while a connection is
//! installed, `installed == clock`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::epoch::{Clock, Epoch};
use crate::error::{Error, SharedError};
use crate::state::{Ledger, State};
use crate::teardown::CloseCause;

/// What a normal end of the installed connection by the peer means (a [`Monitor`] that
/// completes with `Ok`, or [`Handle::report_closed`]).
///
/// [`Monitor`]: crate::teardown::Monitor
/// [`Handle::report_closed`]: crate::Handle::report_closed
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NormalEnd {
    /// The connection is released and the intent becomes disconnected, as after a
    /// `disconnect()`: no reconnect follows (the default; right for a WebSocket closed with
    /// 1000).
    #[default]
    Idle,
    /// The connection is released and a new attempt starts at once, through the backoff if it
    /// fails (right for an HTTP/2 connection ended by GOAWAY: the server restarts). A
    /// connection ended before it was up for the stable period counts as a failure
    /// ([`Error::EndedEarly`]): it waits out the backoff and counts toward the attempt limit,
    /// so a peer that accepts and ends at once cannot cause a reconnect storm.
    Reconnect,
}

/// Settings the machine applies, fixed when the layer is applied.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Policy {
    pub(crate) max_attempts: Option<NonZeroU32>,
    pub(crate) normal_end: NormalEnd,
    /// The first request connects: no `connect()` is needed before it.
    pub(crate) lazy: bool,
}

/// What happened: an operation of a handle, or an outcome the driver reports.
#[derive(Debug)]
pub(crate) enum Event {
    Connect,
    Disconnect,
    Suspend,
    Resume {
        token: Epoch,
    },
    ReconnectNow,
    /// A service found no connection installed and is waiting for one: in a lazy layer, or
    /// after an idle timeout, this starts an attempt.
    Demand,
    /// No request held the connection installed at `epoch` for the idle timeout (the core
    /// has claimed it: no request can start on it any more).
    IdleTimeout {
        epoch: Epoch,
    },
    /// The driver is about to call the connector for the attempt of `epoch`.
    AttemptStarting {
        epoch: Epoch,
    },
    /// The attempt of `epoch` produced a connection.
    Opened {
        epoch: Epoch,
    },
    /// The attempt of `epoch` failed (a permanent error ends the retries).
    AttemptFailed {
        epoch: Epoch,
        error: SharedError,
        permanent: bool,
    },
    /// The driver dropped a stale attempt before it completed.
    AttemptCancelled,
    /// The connection installed at `epoch` failed.
    Failed {
        epoch: Epoch,
        error: SharedError,
        permanent: bool,
    },
    /// The peer ended the connection installed at `epoch` normally.
    Ended {
        epoch: Epoch,
    },
    /// The backoff timer of the retry of `epoch` is armed, for `delay` when known.
    RetryArmed {
        epoch: Epoch,
        delay: Option<Duration>,
    },
    /// The backoff timer armed at `epoch` fired.
    TimerFired {
        epoch: Epoch,
    },
    /// The connection installed at `epoch` stayed up for the stable period.
    Stable {
        epoch: Epoch,
    },
    /// A teardown completed (or was cut at the close timeout).
    Closed {
        timed_out: bool,
    },
    /// Every handle and service is gone: release what is installed.
    Shutdown,
    /// The driver has stopped: whatever it held is dropped.
    Stopped,
}

/// The machine's answer to the caller of [`Machine::step`].
#[derive(Debug)]
pub(crate) enum Reply {
    /// The epoch of the attempt started (or of the active one), or why not.
    Epoch(Result<Epoch, Error>),
    /// Whether the event took effect (a report of the installed connection, a timer of the
    /// current epoch, an attempt still current, a connection released).
    Took(bool),
    /// `suspend`: the resume token's epoch, if the intent was to be connected.
    Token(Option<Epoch>),
}

/// What the core and the driver must do about a transition.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Call the connector for the attempt of this epoch.
    Attempt(Epoch),
    /// Move the connection the attempt of this epoch produced into the slot, and watch it.
    Install(Epoch),
    /// Close the connection the attempt of this epoch produced: it came in stale (rule 1).
    Discard(Epoch),
    /// Take the installed connection of this epoch out of the slot and close it; `notify`: a
    /// `disconnect()` waits for the close.
    Release {
        epoch: Epoch,
        cause: CloseCause,
        notify: bool,
    },
    /// Arm a backoff timer for the retry of this epoch.
    Retry(Epoch),
    /// Start a new backoff session.
    ResetBackoff,
    /// Arm the stable-period timer of the connection installed at this epoch.
    Stable(Epoch),
    /// Services waiting for a connection should look again: one was installed or released,
    /// or the state became terminal. (The published state needs no effect: the core
    /// publishes it after every step that changed it.)
    Wake,
    /// Stop starting anything: every user is gone.
    Stop,
    /// The driver is gone: empty the slot (what it holds is dropped).
    Evict,
}

#[derive(Debug)]
pub(crate) struct Machine {
    /// Ticked only here, under the core's lock; read by anyone ([`Clock::now`]).
    clock: Arc<Clock>,
    state: State,
    installed: Option<Epoch>,
    /// Attempts started in the current backoff session.
    attempt: u32,
    /// Teardowns queued or running.
    closing: u64,
    ledger: Ledger,
    policy: Policy,
    /// Disconnected without a deliberate intent (a lazy layer before its first request, or a
    /// connection closed as idle): the next request connects. A `disconnect()`, a `suspend()`
    /// or a normal end by the peer under [`NormalEnd::Idle`] clears it (rule 8).
    dormant: bool,
    /// Whether a handle expressed an intent yet (a lazy policy applied later must not make
    /// a connection dormant that a `disconnect()` or `suspend()` put to rest).
    intended: bool,
}

impl Machine {
    pub(crate) fn new(clock: Arc<Clock>, policy: Policy) -> Machine {
        Machine {
            clock,
            state: State::Idle,
            installed: None,
            attempt: 0,
            closing: 0,
            ledger: Ledger::default(),
            policy,
            dormant: policy.lazy,
            intended: false,
        }
    }

    /// Applies the policy of the layer; a lazy one makes a connection that was never used
    /// dormant.
    pub(crate) fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
        if !self.intended {
            self.dormant = policy.lazy;
        }
    }

    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether a request would start an attempt now.
    pub(crate) fn is_dormant(&self) -> bool {
        self.dormant && matches!(self.state, State::Idle | State::Disconnecting { .. })
    }

    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    pub(crate) fn ledger(&self) -> Ledger {
        self.ledger
    }

    pub(crate) fn now(&self) -> Epoch {
        self.clock.now()
    }

    fn is_current(&self, epoch: Epoch) -> bool {
        self.clock.is_current(epoch)
    }

    /// The one transition function: applies `event`, pushes what must be done onto
    /// `effects`, and answers the caller.
    pub(crate) fn step(&mut self, event: Event, effects: &mut Vec<Effect>) -> Reply {
        let shut = matches!(self.state, State::Shutdown);
        self.intended |= matches!(
            event,
            Event::Connect | Event::Disconnect | Event::Suspend | Event::Resume { .. }
        );
        match event {
            // Nothing starts once the driver has stopped.
            Event::Connect | Event::Resume { .. } if shut => Reply::Epoch(Err(Error::Shutdown)),
            // A connect while active is a no-op: the clock does not tick (P1).
            Event::Connect if self.state.is_active() => Reply::Epoch(Ok(self.now())),
            // From idle, disconnecting (rule 6), gave up or refused: a fresh session.
            Event::Connect => {
                self.reset_backoff(effects);
                Reply::Epoch(Ok(self.start_attempt(effects)))
            }
            // Nothing is left to release once the driver has stopped.
            Event::Disconnect if shut => Reply::Took(false),
            // Rule 8: a deliberate disconnect releases, and nothing reconnects.
            Event::Disconnect => Reply::Took(self.release(CloseCause::Disconnect, true, effects)),
            // Rule 5: a token only when the intent was to be connected (P15).
            Event::Suspend if self.state.is_active() => {
                self.release(CloseCause::Suspend, false, effects);
                Reply::Token(Some(self.now()))
            }
            // Not connecting, connected or waiting to retry: nothing to come back to, and a
            // dormant connection is no longer woken by a request (rule 8).
            Event::Suspend => {
                self.dormant = false;
                Reply::Token(None)
            }
            // Rule 5: a resume acts only if nothing changed the intent since its suspend.
            Event::Resume { token } if token != self.now() => {
                Reply::Epoch(Err(Error::StaleResume {
                    token,
                    now: self.now(),
                }))
            }
            // The clock still reads the suspend's epoch: reconnect with a fresh session.
            Event::Resume { .. } => {
                self.reset_backoff(effects);
                Reply::Epoch(Ok(self.start_attempt(effects)))
            }
            // Skips the rest of a backoff wait; the timer of the old epoch goes stale.
            Event::ReconnectNow => match self.state {
                State::WaitingToRetry { .. } => {
                    self.start_attempt(effects);
                    Reply::Took(true)
                }
                _ => Reply::Took(false),
            },
            // A request wakes a dormant connection; a deliberate disconnect stays (rule 8).
            Event::Demand if self.is_dormant() => {
                self.ledger.demanded += 1;
                self.reset_backoff(effects);
                self.start_attempt(effects);
                Reply::Took(true)
            }
            // Active, terminal, or disconnected by intent: a request changes nothing.
            Event::Demand => Reply::Took(false),
            // Idle for the timeout: released as by a disconnect, but dormant.
            Event::IdleTimeout { epoch } if self.installed == Some(epoch) => {
                self.ledger.idled += 1;
                self.release(CloseCause::Idle, false, effects);
                self.dormant = true;
                Reply::Took(true)
            }
            // The connection it was claimed for is gone already.
            Event::IdleTimeout { .. } => Reply::Took(false),
            // The connector is called only for an attempt still current.
            Event::AttemptStarting { epoch } if self.is_current(epoch) => {
                self.ledger.attempts += 1;
                Reply::Took(true)
            }
            // Went stale while the connector was getting ready: it is not called.
            Event::AttemptStarting { .. } => Reply::Took(false),
            // The attempt's epoch is still current: install it.
            Event::Opened { epoch } if self.is_current(epoch) => {
                self.ledger.opened += 1;
                self.ledger.installed += 1;
                self.installed = Some(epoch);
                self.state = State::Connected { epoch };
                effects.extend([Effect::Install(epoch), Effect::Stable(epoch), Effect::Wake]);
                Reply::Took(true)
            }
            // Rule 1: a stale connect is closed, never installed.
            Event::Opened { epoch } => {
                self.ledger.opened += 1;
                self.ledger.discarded += 1;
                self.closing += 1;
                effects.push(Effect::Discard(epoch));
                Reply::Took(false)
            }
            // The current attempt failed: a retry after the backoff, or a terminal state.
            Event::AttemptFailed {
                epoch,
                error,
                permanent,
            } if self.is_current(epoch) => {
                self.ledger.failures += 1;
                self.fail(epoch, error, permanent, effects);
                Reply::Took(true)
            }
            // Rule 3: a late failure of a stale attempt changes nothing.
            Event::AttemptFailed { .. } => {
                self.ledger.ignored += 1;
                Reply::Took(false)
            }
            // A stale attempt dropped by the driver: it opened nothing, and is counted.
            Event::AttemptCancelled => {
                self.ledger.cancelled += 1;
                Reply::Took(true)
            }
            // A failure of the installed connection: released, and a retry follows (rule 8:
            // only while the intent is connected, which an installed connection means).
            Event::Failed {
                epoch,
                error,
                permanent,
            } if self.installed == Some(epoch) => {
                self.ledger.failures += 1;
                self.take_installed(epoch, CloseCause::Failed, false, effects);
                self.fail(epoch, error, permanent, effects);
                Reply::Took(true)
            }
            // Rule 3: a report of a connection no longer installed is ignored.
            Event::Failed { .. } => {
                self.ledger.ignored += 1;
                Reply::Took(false)
            }
            // The peer ended the installed connection normally: the policy decides.
            Event::Ended { epoch } if self.installed == Some(epoch) => {
                self.ledger.ended += 1;
                match self.policy.normal_end {
                    // As after a disconnect: nothing reconnects.
                    // In a lazy layer, the next request connects again (a gRPC channel's idle).
                    NormalEnd::Idle => {
                        self.release(CloseCause::Ended, false, effects);
                        self.dormant = self.policy.lazy;
                    }
                    // Up for the stable period: released, and a new attempt at once.
                    NormalEnd::Reconnect if self.attempt == 0 => {
                        self.take_installed(epoch, CloseCause::Ended, false, effects);
                        self.start_attempt(effects);
                    }
                    // Ended before it was stable: a peer that accepts and says goodbye at once
                    // gets the backoff and the attempt limit, as a failure does.
                    NormalEnd::Reconnect => {
                        self.ledger.failures += 1;
                        self.take_installed(epoch, CloseCause::Ended, false, effects);
                        let early = SharedError::new(Error::EndedEarly);
                        self.fail(epoch, early, false, effects);
                    }
                }
                Reply::Took(true)
            }
            // Rule 3: a normal end of a connection no longer installed is ignored.
            Event::Ended { .. } => {
                self.ledger.ignored += 1;
                Reply::Took(false)
            }
            // The driver armed the backoff timer: the published state carries its delay, if
            // the retry it was armed for is still the one waiting.
            Event::RetryArmed { epoch, delay } => match &mut self.state {
                State::WaitingToRetry {
                    epoch: waiting,
                    delay: armed,
                    ..
                } if *waiting == epoch => {
                    *armed = delay;
                    Reply::Took(true)
                }
                _ => Reply::Took(false),
            },
            // Rule 4: a timer starts an attempt only if the clock still reads its epoch.
            // (While the clock reads the epoch a timer was armed in, the state is the
            // `WaitingToRetry` of that epoch: every way out of it ticks.)
            Event::TimerFired { epoch } if self.is_current(epoch) => {
                self.start_attempt(effects);
                Reply::Took(true)
            }
            // Rule 4: a stale timer does nothing.
            Event::TimerFired { .. } => {
                self.ledger.ignored += 1;
                Reply::Took(false)
            }
            // Up for the stable period: the backoff starts over at the next failure.
            Event::Stable { epoch } if self.installed == Some(epoch) => {
                self.reset_backoff(effects);
                Reply::Took(true)
            }
            // The connection it was armed for is gone: nothing to reset.
            Event::Stable { .. } => Reply::Took(false),
            // Rule 2: a teardown always closed its own connection; it changes the published
            // state only if nothing happened since the release.
            Event::Closed { timed_out } => {
                self.ledger.closed += 1;
                self.ledger.close_timeouts += u64::from(timed_out);
                self.closing = self.closing.saturating_sub(1);
                if let State::Disconnecting { epoch: released } = self.state {
                    if self.closing == 0 && self.is_current(released) {
                        self.state = State::Idle;
                    }
                }
                Reply::Took(true)
            }
            // Every user is gone: release what is installed, start nothing more.
            Event::Shutdown => {
                effects.push(Effect::Stop);
                Reply::Took(self.release(CloseCause::Shutdown, false, effects))
            }
            // The driver is gone, and what it held with it: closed all the same, so the books
            // balance.
            Event::Stopped => {
                effects.push(Effect::Evict);
                self.clock.tick();
                self.ledger.closed += self.closing + u64::from(self.installed.is_some());
                self.closing = 0;
                self.installed = None;
                self.state = State::Shutdown;
                effects.push(Effect::Wake);
                Reply::Took(true)
            }
        }
    }

    fn start_attempt(&mut self, effects: &mut Vec<Effect>) -> Epoch {
        let epoch = self.clock.tick();
        self.attempt += 1;
        self.state = State::Connecting {
            epoch,
            attempt: self.attempt,
        };
        effects.push(Effect::Attempt(epoch));
        epoch
    }

    /// Disconnect, suspend, a normal end, shutdown: tick, release the installed connection
    /// to teardown. Returns whether one was installed.
    fn release(&mut self, cause: CloseCause, notify: bool, effects: &mut Vec<Effect>) -> bool {
        let epoch = self.clock.tick();
        self.dormant = false;
        let released = self.installed.take();
        if let Some(installed) = released {
            self.closing += 1;
            effects.push(Effect::Release {
                epoch: installed,
                cause,
                notify,
            });
        }
        self.state = if self.closing > 0 {
            State::Disconnecting { epoch }
        } else {
            State::Idle
        };
        effects.push(Effect::Wake);
        released.is_some()
    }

    /// The installed connection of `epoch` leaves the slot without a tick (a failure or a
    /// normal end while the intent stays connected).
    fn take_installed(
        &mut self,
        epoch: Epoch,
        cause: CloseCause,
        notify: bool,
        effects: &mut Vec<Effect>,
    ) {
        self.installed = None;
        self.closing += 1;
        // Services waiting on its readiness look again (and fail fast if they should).
        effects.extend([
            Effect::Release {
                epoch,
                cause,
                notify,
            },
            Effect::Wake,
        ]);
    }

    /// A failure of the attempt or connection of `epoch`: terminal if permanent or if the
    /// attempts are used up, else a retry after the backoff.
    fn fail(
        &mut self,
        epoch: Epoch,
        last_error: SharedError,
        permanent: bool,
        effects: &mut Vec<Effect>,
    ) {
        let attempts = self.attempt;
        let used_up = self
            .policy
            .max_attempts
            .is_some_and(|max| attempts >= max.get());
        self.state = if permanent || used_up {
            // Terminal: waiting services fail with it.
            self.reset_backoff(effects);
            effects.push(Effect::Wake);
            if permanent {
                State::Refused { last_error }
            } else {
                State::GaveUp {
                    attempts,
                    last_error,
                }
            }
        } else {
            effects.push(Effect::Retry(epoch));
            State::WaitingToRetry {
                epoch,
                attempt: attempts + 1,
                delay: None,
                last_error,
            }
        };
    }

    fn reset_backoff(&mut self, effects: &mut Vec<Effect>) {
        self.attempt = 0;
        effects.push(Effect::ResetBackoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(lazy: bool) -> Machine {
        let policy = Policy {
            lazy,
            ..Policy::default()
        };
        Machine::new(Arc::new(Clock::new()), policy)
    }

    fn step(machine: &mut Machine, event: Event) -> Reply {
        machine.step(event, &mut Vec::new())
    }

    /// The core asks for a demand when its mirror of `dormant` says so; the machine looks again
    /// under its lock, so that a `disconnect()` that won the race is not undone (rule 8).
    #[test]
    fn a_demand_acts_only_on_a_dormant_machine() {
        let mut eager = machine(false);
        assert!(matches!(
            step(&mut eager, Event::Demand),
            Reply::Took(false)
        ));
        assert!(matches!(eager.state(), State::Idle));

        let mut lazy = machine(true);
        assert!(lazy.is_dormant());
        step(&mut lazy, Event::Disconnect);
        assert!(!lazy.is_dormant());
        assert!(matches!(step(&mut lazy, Event::Demand), Reply::Took(false)));
        assert!(matches!(lazy.state(), State::Idle));

        let mut lazy = machine(true);
        assert!(matches!(step(&mut lazy, Event::Demand), Reply::Took(true)));
        assert!(matches!(lazy.state(), State::Connecting { attempt: 1, .. }));
        assert_eq!(lazy.ledger().demanded, 1);
    }

    /// The idle timer claims, then reports; a failure may release the connection in between.
    /// The report of a connection no longer installed must not release anything (it would tick
    /// the clock and cancel the retry).
    #[test]
    fn an_idle_timeout_of_a_connection_no_longer_installed_changes_nothing() {
        let mut m = machine(false);
        let Reply::Epoch(Ok(epoch)) = step(&mut m, Event::Connect) else {
            panic!("connects");
        };
        step(&mut m, Event::AttemptStarting { epoch });
        step(&mut m, Event::Opened { epoch });
        let error = SharedError::new(std::io::Error::other("reset"));
        step(
            &mut m,
            Event::Failed {
                epoch,
                error,
                permanent: false,
            },
        );
        assert!(matches!(m.state(), State::WaitingToRetry { .. }));
        let now = m.now();
        assert!(matches!(
            step(&mut m, Event::IdleTimeout { epoch }),
            Reply::Took(false)
        ));
        assert!(matches!(m.state(), State::WaitingToRetry { .. }));
        assert_eq!((m.now(), m.ledger().idled), (now, 0));
        assert!(!m.is_dormant());
    }
}
