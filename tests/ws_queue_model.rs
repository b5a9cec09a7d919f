//! Property test of the outbound queue's room and order, with `feed` and several `WsSink`s
//! interleaved at random on a client that never connects (no socket is opened).
//!
//! The reference model counts what the client holds and what each sink has buffered and
//! reserved. After every step the client must agree with it: `stats().held`, whether `feed`
//! is refused for want of room, whether a sink is ready, and whether `start_send` takes the
//! message. At the end every sink is dropped and `take_unsent` must give back every message
//! that was not refused, once each, and each sender's in the order it was given.
//!
//! CI runs 2,000 cases from a fixed seed. More: `TOWER_EPOCH_QUEUE_CASES=100000 cargo test
//! --release --test ws_queue_model`; another seed: `TOWER_EPOCH_QUEUE_SEED=7`.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::Sink;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};
use tower_epoch::ws::{Message, SendError, WhenFull, WsClient, WsSink};

/// What a sink reserves at most at a time (`WsSink`'s documented 128).
const CHUNK: usize = 128;
const SINKS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Feed,
    Ready(usize),
    Send(usize),
    Flush(usize),
    Drop(usize),
    TakeUnsent,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Feed),
        3 => (0..SINKS).prop_map(Op::Ready),
        4 => (0..SINKS).prop_map(Op::Send),
        1 => (0..SINKS).prop_map(Op::Flush),
        1 => (0..SINKS).prop_map(Op::Drop),
        1 => Just(Op::TakeUnsent),
    ]
}

/// A sink as the model sees it.
#[derive(Default)]
struct ModelSink {
    /// Messages taken and not handed over.
    buffered: usize,
    reserved: usize,
    /// Handed over at least one message (a flush then waits for a connection).
    handed_over: bool,
    flushing: bool,
}

struct Model {
    capacity: usize,
    held: usize,
    sinks: [ModelSink; SINKS],
}

impl Model {
    fn room(&self) -> usize {
        let reserved: usize = self.sinks.iter().map(|s| s.reserved).sum();
        self.capacity - self.held - reserved
    }

    /// The sink hands over what it buffered and reserves up to `want`.
    fn hand_over(&mut self, i: usize, want: usize) {
        let sink = &mut self.sinks[i];
        self.held += sink.buffered;
        sink.handed_over |= sink.buffered > 0;
        sink.buffered = 0;
        sink.reserved = 0;
        let reserve = want.min(self.room());
        self.sinks[i].reserved = reserve;
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
        sinks: Default::default(),
    };
    let mut sinks: Vec<WsSink> = (0..SINKS).map(|_| client.sink()).collect();
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
            Op::Feed => {
                let text = message("feed");
                let fits = model.room() > 0;
                match client.feed(Message::text(text.clone())) {
                    Ok(_) => {
                        prop_assert!(fits, "feed accepted with no room");
                        model.held += 1;
                        given.entry("feed".into()).or_default().push(text);
                    }
                    Err(SendError::Full { message, .. }) => {
                        prop_assert!(!fits, "feed refused with room");
                        prop_assert_eq!(message, Message::text(text));
                    }
                    Err(other) => prop_assert!(false, "feed: {other:?}"),
                }
            }
            Op::Ready(i) => {
                let sink = &model.sinks[i];
                if sink.buffered == sink.reserved {
                    model.hand_over(i, CHUNK);
                }
                let expect_ready = model.sinks[i].buffered < model.sinks[i].reserved;
                match Pin::new(&mut sinks[i]).poll_ready(&mut cx) {
                    Poll::Ready(Ok(())) => prop_assert!(expect_ready, "sink {i} ready, no room"),
                    Poll::Pending => prop_assert!(!expect_ready, "sink {i} pending with room"),
                    Poll::Ready(Err(error)) => prop_assert!(false, "poll_ready: {error:?}"),
                }
            }
            Op::Send(i) => {
                let sender = format!("sink{i}.{}", generation[i]);
                let text = message(&sender);
                let slot = model.sinks[i].buffered < model.sinks[i].reserved;
                match Pin::new(&mut sinks[i]).start_send(Message::text(text.clone())) {
                    Ok(()) => {
                        prop_assert!(slot, "sink {i} took a message with no slot");
                        model.sinks[i].buffered += 1;
                        given.entry(sender).or_default().push(text);
                    }
                    Err(SendError::NotReady(message)) => {
                        prop_assert!(!slot, "sink {i} refused a message with a slot");
                        prop_assert_eq!(message, Message::text(text));
                    }
                    Err(other) => prop_assert!(false, "start_send: {other:?}"),
                }
            }
            Op::Flush(i) => {
                if !model.sinks[i].flushing {
                    model.hand_over(i, 0);
                    // Disconnected: a flush of anything handed over waits for a connection.
                    model.sinks[i].flushing = model.sinks[i].handed_over;
                }
                let pending = Pin::new(&mut sinks[i]).poll_flush(&mut cx).is_pending();
                prop_assert_eq!(pending, model.sinks[i].flushing, "sink {} flush", i);
            }
            Op::Drop(i) => {
                model.hand_over(i, 0);
                model.sinks[i] = ModelSink::default();
                sinks[i] = client.sink(); // the old one is dropped here
                generation[i] += 1;
            }
            Op::TakeUnsent => {
                taken.extend(unsent(&client));
                model.held = 0;
            }
        }
        prop_assert_eq!(client.stats().held as usize, model.held);
        prop_assert!(model.held <= capacity);
    }

    drop(sinks); // hands over what they buffered
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
    fn room_order_and_nothing_lost(capacity in prop_oneof![1usize..6, 129usize..200], ops in prop::collection::vec(op(), 1..60)) {
        run(capacity, ops)?;
    }
}
