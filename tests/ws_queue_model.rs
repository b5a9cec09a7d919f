//! Property test of the outbound queue's room and order, with `feed`, `send`, permits and
//! several `WsSink`s interleaved at random on a client that never connects (no socket is
//! opened).
//!
//! The reference model counts what the client holds and the room each sink and permit holds
//! (a ready sink holds one slot, a permit one). Room is fair: a sink that waits for room gets
//! the next slot freed, before `feed` or another sink can take it. After every step the client must agree with
//! it: `stats().held`, whether `feed` and `send` are refused for want of room, whether a sink
//! is ready, whether `start_send` takes the message, and whether a flush waits. At the end
//! `take_unsent` must give back every message that was not refused, once each, and each
//! sender's in the order it was given.
//!
//! CI runs 2,000 cases from a fixed seed. More: `TOWER_EPOCH_QUEUE_CASES=100000 cargo test
//! --release --test ws_queue_model`; another seed: `TOWER_EPOCH_QUEUE_SEED=7`.
#![cfg(feature = "ws")]

use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use futures_util::Sink;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};
use tower_epoch::ws::{Message, Permit, SendError, WhenFull, WsClient, WsSink};

const SINKS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Feed,
    Send,
    Reserve,
    SendWithPermit,
    DropPermit,
    Ready(usize),
    StartSend(usize),
    Flush(usize),
    Drop(usize),
    TakeUnsent,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Feed),
        2 => Just(Op::Send),
        1 => Just(Op::Reserve),
        1 => Just(Op::SendWithPermit),
        1 => Just(Op::DropPermit),
        3 => (0..SINKS).prop_map(Op::Ready),
        4 => (0..SINKS).prop_map(Op::StartSend),
        1 => (0..SINKS).prop_map(Op::Flush),
        1 => (0..SINKS).prop_map(Op::Drop),
        1 => Just(Op::TakeUnsent),
    ]
}

/// A sink as the model sees it.
#[derive(Default)]
struct ModelSink {
    /// Holds a slot: taken by `poll_ready`, or given while it waited in line.
    slot: bool,
    /// `poll_ready` said so since the last `start_send`.
    ready: bool,
    /// Waits in line for a slot.
    waiting: bool,
    /// The sequence number of the last message it accepted.
    last: u64,
    /// A flush in progress waits for this.
    flushing: Option<u64>,
}

struct Model {
    capacity: usize,
    held: usize,
    permits: usize,
    /// Messages accepted so far (the last sequence number).
    accepted: u64,
    /// Everything up to here has been taken back.
    settled: u64,
    sinks: [ModelSink; SINKS],
}

impl Model {
    fn room(&self) -> usize {
        let ready = self.sinks.iter().filter(|s| s.slot).count();
        self.capacity - self.held - ready - self.permits
    }

    /// `n` slots come free: the sinks waiting in line get them first, in order.
    fn free(&mut self, mut n: usize, line: &mut std::collections::VecDeque<usize>) {
        while n > 0 {
            let Some(i) = line.pop_front() else { return };
            self.sinks[i].waiting = false;
            self.sinks[i].slot = true;
            n -= 1;
        }
    }

    fn accept(&mut self) -> u64 {
        self.held += 1;
        self.accepted += 1;
        self.accepted
    }
}

/// A sender's messages, in the order given and not refused.
type Given = HashMap<String, Vec<String>>;

/// The texts `take_unsent` gives back, in order.
fn unsent(client: &WsClient) -> Vec<String> {
    client
        .take_unsent()
        .into_iter()
        .map(|(_, m)| m.into_text().unwrap().to_string())
        .collect()
}

fn run(capacity: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let (client, _incoming) = WsClient::builder("ws://127.0.0.1:9/never")
        .unwrap()
        .queue_capacity(capacity)
        .when_full(WhenFull::Fail)
        .no_heartbeat()
        .build()
        .unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut model = Model {
        capacity,
        held: 0,
        permits: 0,
        accepted: 0,
        settled: 0,
        sinks: Default::default(),
    };
    let mut sinks: Vec<WsSink> = (0..SINKS).map(|_| client.sink()).collect();
    let mut permits: Vec<Permit> = Vec::new();
    // The sinks waiting for room, in the order they began to wait.
    let mut line = std::collections::VecDeque::new();
    let mut generation = [0usize; SINKS];
    let mut given = Given::new();
    let mut taken: Vec<String> = Vec::new();
    let mut next = 0usize;
    let mut message = |sender: &str| {
        next += 1;
        format!("{sender}:{next}")
    };

    for op in ops {
        match op {
            Op::Feed | Op::Send => {
                let sender = if matches!(op, Op::Feed) {
                    "feed"
                } else {
                    "send"
                };
                let text = message(sender);
                let fits = model.room() > 0;
                let result = if matches!(op, Op::Feed) {
                    client.feed(Message::text(text.clone()))
                } else {
                    // Refused at once, or accepted (and pending: nothing is ever written).
                    let mut sending = pin!(client.send(Message::text(text.clone())));
                    match sending.as_mut().poll(&mut cx) {
                        Poll::Pending => Ok(sending.seq().expect("accepted")),
                        Poll::Ready(result) => result,
                    }
                };
                match result {
                    Ok(seq) => {
                        prop_assert!(fits, "{sender} accepted with no room");
                        prop_assert_eq!(seq, model.accept());
                        given.entry(sender.into()).or_default().push(text);
                    }
                    Err(SendError::Full { message, .. }) => {
                        prop_assert!(!fits, "{sender} refused with room");
                        prop_assert_eq!(message, Message::text(text));
                    }
                    Err(other) => prop_assert!(false, "{sender}: {other:?}"),
                }
            }
            Op::Reserve => {
                let fits = model.room() > 0;
                let mut reserving = pin!(client.reserve());
                match reserving.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(permit)) => {
                        prop_assert!(fits, "a permit with no room");
                        permits.push(permit);
                        model.permits += 1;
                    }
                    Poll::Pending => prop_assert!(!fits, "no permit with room"),
                    Poll::Ready(Err(error)) => prop_assert!(false, "reserve: {error:?}"),
                }
                // Dropped while it waits: nothing is lost, nothing is held.
            }
            Op::SendWithPermit => {
                if let Some(permit) = permits.pop() {
                    model.permits -= 1;
                    let text = message("permit");
                    let mut sending = pin!(permit.send(Message::text(text.clone())));
                    prop_assert!(sending.as_mut().poll(&mut cx).is_pending());
                    prop_assert_eq!(sending.seq(), Some(model.accept()));
                    given.entry("permit".into()).or_default().push(text);
                }
            }
            Op::DropPermit => {
                if permits.pop().is_some() {
                    model.permits -= 1;
                    model.free(1, &mut line);
                }
            }
            Op::Ready(i) => {
                let sink = &model.sinks[i];
                let expect_ready = sink.slot || (!sink.waiting && model.room() > 0);
                match Pin::new(&mut sinks[i]).poll_ready(&mut cx) {
                    Poll::Ready(Ok(())) => {
                        prop_assert!(expect_ready, "sink {i} ready, no room");
                        model.sinks[i].slot = true;
                        model.sinks[i].ready = true;
                    }
                    Poll::Pending => {
                        prop_assert!(!expect_ready, "sink {i} pending with room");
                        if !model.sinks[i].waiting {
                            model.sinks[i].waiting = true;
                            line.push_back(i);
                        }
                    }
                    Poll::Ready(Err(error)) => prop_assert!(false, "poll_ready: {error:?}"),
                }
            }
            Op::StartSend(i) => {
                let sender = format!("sink{i}.{}", generation[i]);
                let text = message(&sender);
                match Pin::new(&mut sinks[i]).start_send(Message::text(text.clone())) {
                    Ok(()) => {
                        prop_assert!(model.sinks[i].ready, "sink {i} took a message unready");
                        model.sinks[i].ready = false;
                        model.sinks[i].slot = false;
                        model.sinks[i].last = model.accept();
                        given.entry(sender).or_default().push(text);
                    }
                    Err(SendError::NotReady(message)) => {
                        prop_assert!(!model.sinks[i].ready, "sink {i} refused when ready");
                        prop_assert_eq!(message, Message::text(text));
                    }
                    Err(other) => prop_assert!(false, "start_send: {other:?}"),
                }
            }
            Op::Flush(i) => {
                let target = *model.sinks[i].flushing.get_or_insert(model.sinks[i].last);
                // Never connected: a flush waits until what it covers is taken back.
                let expect_pending = target > model.settled;
                let pending = Pin::new(&mut sinks[i]).poll_flush(&mut cx).is_pending();
                prop_assert_eq!(pending, expect_pending, "sink {} flush", i);
                if !pending {
                    model.sinks[i].flushing = None;
                }
            }
            Op::Drop(i) => {
                line.retain(|w| *w != i);
                let held_a_slot = model.sinks[i].slot;
                model.sinks[i] = ModelSink::default();
                if held_a_slot {
                    model.free(1, &mut line);
                }
                sinks[i] = client.sink(); // the old one is dropped here, with its slot
                generation[i] += 1;
            }
            Op::TakeUnsent => {
                taken.extend(unsent(&client));
                let freed = model.held;
                model.held = 0;
                model.free(freed, &mut line);
                model.settled = model.accepted;
            }
        }
        prop_assert_eq!(client.stats().held as usize, model.held);
        prop_assert!(model.held + model.permits <= capacity);
    }

    drop(sinks);
    drop(permits);
    taken.extend(unsent(&client));
    prop_assert_eq!(client.stats().held, 0);
    // Every message given (and not refused) comes back once, each sender's in order.
    let mut back = Given::new();
    for text in taken {
        let sender = text.split(':').next().unwrap().to_string();
        back.entry(sender).or_default().push(text);
    }
    prop_assert_eq!(back, given);
    Ok(())
}

fn config() -> Config {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("TOWER_EPOCH_QUEUE_CASES").unwrap_or(2_000) as u32,
        rng_seed: RngSeed::Fixed(env("TOWER_EPOCH_QUEUE_SEED").unwrap_or(0x5eed_0a11)),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn room_order_and_nothing_lost(capacity in prop_oneof![1usize..6, 60usize..80], ops in prop::collection::vec(op(), 1..60)) {
        run(capacity, ops)?;
    }
}
