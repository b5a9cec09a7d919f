//! Model-based property test (proptest-state-machine) of the epoch protocol.
//!
//! Random sequences of connect, disconnect, suspend, resume, scripted attempt outcomes
//! (succeeds / fails / hangs, each with a delay), scripted close behaviours (completes after a
//! delay / hangs), failures of the installed connection (reported by a transport or found by the
//! request path), stale failure reports, time advancing and requests. The reference model is
//! the user's intent and the validity of resume tokens; the ledger connector is the oracle:
//!
//! - never more than one connection installed, and never one from a stale epoch;
//! - every connection closed at most once;
//! - a request is only ever served by the installed connection;
//! - at quiescence the last intent holds and every connection not installed is closed exactly
//!   once, and every disconnect future has resolved.
//!
//! CI runs 10,000 cases from a fixed seed. More: `TOWER_EPOCH_MODEL_CASES=200000 cargo test
//! --release --test model`; another seed: `TOWER_EPOCH_MODEL_SEED=7`.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use tower::Service;
use tower_epoch::{DisconnectFuture, Epoch, Handle, Reconnect, ResumeToken, State};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
enum Via {
    Report,
    Request,
    Monitor,
}

#[derive(Clone, Debug)]
enum Op {
    Connect,
    Disconnect,
    Suspend,
    Resume(usize),
    NextAttempt(Attempt),
    NextClose(Close),
    /// The installed connection fails: reported by a transport, found by `poll_ready`, or
    /// noticed by the monitor.
    FailInstalled(Via),
    /// A failure report for an epoch that is not installed.
    StaleReport,
    Advance(Duration),
    Request,
    /// `disconnect()` then `connect()`, this many times, with no task running in between.
    Flip(u8),
}

/// The reference model: intent, and the clock ticks caused by the user's operations.
#[derive(Clone, Debug, Default)]
struct Model {
    connected: bool,
    ticks: u64,
    /// For each outstanding token, `ticks` when it was issued.
    tokens: Vec<u64>,
}

impl ReferenceStateMachine for Model {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Op> {
        let ms = |v: &'static [u64]| proptest::sample::select(v).prop_map(Duration::from_millis);
        let attempt = prop_oneof![
            4 => ms(&[0, 50, 500]).prop_map(Attempt::Ok),
            1 => Just(Attempt::Ok(Duration::from_millis(1500))), // past the connect timeout
            2 => ms(&[0, 300]).prop_map(Attempt::Fail),
            1 => Just(Attempt::Hang),
        ];
        let close = prop_oneof![
            3 => ms(&[0, 500, 3000]).prop_map(Close::After),
            1 => Just(Close::Hang),
        ];
        prop_oneof![
            5 => Just(Op::Connect),
            4 => Just(Op::Disconnect),
            3 => Just(Op::Suspend),
            3 => any::<usize>().prop_map(Op::Resume),
            3 => attempt.prop_map(Op::NextAttempt),
            2 => close.prop_map(Op::NextClose),
            2 => prop_oneof![Just(Via::Report), Just(Via::Request), Just(Via::Monitor)]
                .prop_map(Op::FailInstalled),
            1 => Just(Op::StaleReport),
            5 => ms(&[1, 10, 100, 400, 1000, 2500]).prop_map(Op::Advance),
            2 => Just(Op::Request),
            2 => (1..4u8).prop_map(Op::Flip),
        ]
        .boxed()
    }

    fn apply(mut m: Model, op: &Op) -> Model {
        match op {
            Op::Connect if !m.connected => {
                m.connected = true;
                m.ticks += 1;
            }
            Op::Disconnect => {
                m.connected = false;
                m.ticks += 1;
            }
            Op::Suspend if m.connected => {
                m.connected = false;
                m.ticks += 1;
                m.tokens.push(m.ticks);
            }
            Op::Flip(times) => {
                m.connected = true;
                m.ticks += 2 * u64::from(*times);
            }
            Op::Resume(i) if !m.tokens.is_empty() => {
                let issued = m.tokens.remove(i % m.tokens.len());
                if issued == m.ticks {
                    m.connected = true;
                    m.ticks += 1;
                }
            }
            _ => {}
        }
        m
    }
}

struct Sut {
    rt: tokio::runtime::Runtime,
    ledger: Ledger,
    svc: Reconnect<Conn>,
    handle: Handle,
    tokens: Vec<ResumeToken>,
    closing: Vec<DisconnectFuture>,
    /// The model before the transition being applied.
    before: Model,
}

struct EpochTest;

impl StateMachineTest for EpochTest {
    type SystemUnderTest = Sut;
    type Reference = Model;

    fn init_test(model: &Model) -> Sut {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let ledger = Ledger::new();
        let (svc, handle) = rt.block_on(async {
            start(
                &ledger,
                layer(&ledger)
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_close_timeout(CLOSE_TIMEOUT)
                    .with_monitor(|conn: &Conn, _| conn.ended()),
            )
        });
        Sut {
            rt,
            ledger,
            svc,
            handle,
            tokens: Vec::new(),
            closing: Vec::new(),
            before: model.clone(),
        }
    }

    fn apply(mut sut: Sut, model: &Model, op: Op) -> Sut {
        let before = std::mem::replace(&mut sut.before, model.clone());
        let Sut {
            rt,
            ledger,
            svc,
            handle,
            tokens,
            closing,
            ..
        } = &mut sut;
        rt.block_on(async {
            match op {
                Op::Connect => {
                    let epoch = handle.connect().unwrap();
                    if !before.connected {
                        assert_eq!(epoch, handle.epoch());
                    }
                }
                Op::Disconnect => closing.push(handle.disconnect()),
                Op::Suspend => {
                    let token = handle.suspend();
                    assert_eq!(
                        token.is_some(),
                        before.connected,
                        "suspend gives a token iff connected"
                    );
                    tokens.extend(token);
                }
                Op::Resume(i) => {
                    if !tokens.is_empty() {
                        let token = tokens.remove(i % tokens.len());
                        let valid = model.ticks != before.ticks;
                        assert_eq!(handle.resume(token).is_ok(), valid, "resume validity");
                    }
                }
                Op::NextAttempt(attempt) => {
                    ledger.script([attempt]);
                }
                Op::NextClose(close) => {
                    ledger.close_script([close]);
                }
                Op::FailInstalled(via) => {
                    if let Some((epoch, conn)) = handle.connection::<Conn>() {
                        match via {
                            Via::Report => {
                                assert!(handle.report_failure(epoch, "transport dropped"));
                            }
                            Via::Request => {
                                conn.break_it();
                                let _ = poll_ready_now(svc);
                            }
                            Via::Monitor => {
                                conn.end(true);
                                settle().await;
                            }
                        }
                        assert!(
                            handle.connection::<Conn>().is_none(),
                            "a current failure releases the connection"
                        );
                    }
                }
                Op::StaleReport => {
                    let installed = handle.connection::<Conn>().map(|(e, _)| e);
                    let stale = Epoch::from_u64(handle.epoch().get().saturating_sub(1));
                    if installed != Some(stale) {
                        assert!(!handle.report_failure(stale, "late event"), "rule 3");
                    }
                }
                Op::Advance(d) => advance(d).await,
                Op::Flip(times) => {
                    for _ in 0..times {
                        closing.push(handle.disconnect());
                        handle.connect().unwrap();
                    }
                }
                Op::Request => {
                    if let Poll::Ready(Ok(())) = poll_ready_now(svc) {
                        let installed = handle.connection::<Conn>().map(|(_, c)| c.id);
                        let (served_by, _) = svc.call(7).await.unwrap();
                        assert_eq!(Some(served_by), installed, "served by the installed one");
                    }
                }
            }
            settle().await;
        });
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        let ledger = &sut.ledger;
        let handle = &sut.handle;
        ledger.assert_closed_at_most_once();
        let installed = handle.connection::<Conn>();
        let untouched = ledger.untouched_ids();
        match &installed {
            Some((epoch, conn)) => {
                assert_eq!(
                    *epoch,
                    handle.epoch(),
                    "nothing installed from a stale epoch"
                );
                assert_eq!(
                    untouched,
                    vec![conn.id],
                    "one installed, the rest in teardown"
                );
            }
            None => assert!(
                untouched.is_empty(),
                "not installed, not closing: {untouched:?}"
            ),
        }
        let state = handle.state();
        if model.connected {
            assert!(state.is_active(), "intent connected, state {state}");
        } else {
            assert!(
                matches!(state, State::Idle | State::Disconnecting { .. }),
                "intent disconnected, state {state}"
            );
        }
        let l = handle.ledger();
        let book = ledger.book();
        assert_eq!(l.opened, book.opened.len() as u64);
        assert_eq!(l.installed + l.discarded, l.opened);
        let closed: u32 = book.closes.values().chain(book.cut.values()).sum();
        assert_eq!(l.closed, u64::from(closed));
        assert_eq!(
            l.close_timeouts,
            book.cut.values().map(|n| u64::from(*n)).sum::<u64>()
        );
    }

    fn teardown(mut sut: Sut, model: Model) {
        let Sut {
            rt,
            ledger,
            handle,
            closing,
            ..
        } = &mut sut;
        rt.block_on(async {
            // The peer becomes reachable and closes complete; hung ones are cut by the timeouts.
            ledger.default_attempt(Attempt::Ok(Duration::ZERO));
            ledger.default_close(Close::After(Duration::ZERO));
            {
                let mut book = ledger.book();
                book.clear_scripts();
            }
            quiesce(handle, ledger).await;
            ledger.assert_closed_at_most_once();
            let open = ledger.open_ids();
            if model.connected {
                let (epoch, conn) = handle.connection::<Conn>().expect("last intent: connected");
                assert_eq!(epoch, handle.epoch(), "installed from the newest epoch");
                assert_eq!(open, vec![conn.id], "exactly one open, the installed one");
            } else {
                assert!(
                    handle.connection::<Conn>().is_none(),
                    "last intent: disconnected"
                );
                assert!(open.is_empty(), "nothing open: {open:?}");
                assert!(matches!(handle.state(), State::Idle));
            }
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            for fut in closing.iter_mut() {
                assert!(
                    Pin::new(fut).poll(&mut cx).is_ready(),
                    "every disconnect future resolved"
                );
            }
        });
    }
}

fn config() -> Config {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("TOWER_EPOCH_MODEL_CASES").unwrap_or(10_000) as u32,
        rng_seed: RngSeed::Fixed(env("TOWER_EPOCH_MODEL_SEED").unwrap_or(0x00e9_0c45)),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

prop_state_machine! {
    #![proptest_config(config())]

    #[test]
    fn epoch_protocol_model(sequential 1..40 => EpochTest);
}
