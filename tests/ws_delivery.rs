//! Property test of the WebSocket client's delivery rule against adversarial peers.
//!
//! Each case interleaves, in paused time, client operations (awaited sends, feeds, flushes, a
//! sink, permits, futures dropped at once or cut by a timeout, disconnect, connect,
//! suspend/resume, a consumer of `Incoming` that pauses) with what each connection's peer does
//! (stops reading for a while, drops the socket, closes with 1000 or 1001, acknowledges ahead,
//! behind or twice, sends messages of its own). The connections are in-memory streams with a
//! small buffer (writes block and get cut mid-batch), opened by the connector's transport.
//! At the end a well-behaved peer takes over, the client flushes and disconnects, and:
//!
//! 1. every message accepted reached the peer, or was given back; without at-least-once, a
//!    message may also be lost after the client wrote it completely to a connection that then
//!    ended without a graceful close (the peer dropped it unread, or broke on the pong it
//!    owed: what the client cannot see), and only so;
//! 2. each connection received its messages in increasing sequence order, with no repeat;
//! 3. across connections, in the order they were opened, each message's first arrival is in
//!    sequence order;
//! 4. without at-least-once, a message arrived twice only if the connection that first took
//!    it ended without the client's Close (its write was cut, or the connection failed);
//! 5. every send and flush future resolved, within the case's time;
//! 6. `Incoming` delivered of each connection's peer messages a prefix, in order, tagged with
//!    one epoch;
//! 7. no client socket outlives the final disconnect, and the ledger balances.
//!
//! CI runs 256 cases from a fixed seed; more with `TOWER_EPOCH_DELIVERY_CASES=1000`, another seed
//! with `TOWER_EPOCH_DELIVERY_SEED=7`.
#![cfg(feature = "ws")]

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{SendError, WsClient, WsConnector};

const MS: Duration = Duration::from_millis(1);
/// The in-memory streams' buffer: small, so that writes block and batches get cut.
const PIPE: usize = 4096;

// ---- the peer ---------------------------------------------------------------------------

/// How a connection's peer acknowledges (at-least-once cases).
#[derive(Clone, Copy, Debug)]
enum Acks {
    Each,
    /// First `ack:1000000`, then each.
    Ahead,
    /// Each, and an older one after it.
    Behind,
    Twice,
}

/// What one connection's peer does.
#[derive(Clone, Debug)]
struct Script {
    /// After this many messages, stop reading for `pause`.
    stop_after: usize,
    pause: Duration,
    /// After this many messages: drop the socket, or close with this code.
    end_after: Option<(usize, Option<u16>)>,
    acks: Acks,
    /// Messages of its own, sent right after the handshake.
    says: usize,
}

impl Script {
    fn good() -> Script {
        Script {
            stop_after: usize::MAX,
            pause: Duration::ZERO,
            end_after: None,
            acks: Acks::Each,
            says: 0,
        }
    }
}

fn script() -> impl Strategy<Value = Script> {
    let acks = prop_oneof![
        Just(Acks::Each),
        Just(Acks::Ahead),
        Just(Acks::Behind),
        Just(Acks::Twice)
    ];
    let end = prop_oneof![
        2 => Just(None),
        1 => (0usize..12).prop_map(|n| Some((n, None))),
        1 => (0usize..12, prop_oneof![Just(1000u16), Just(1001)]).prop_map(|(n, c)| Some((n, Some(c)))),
    ];
    (0usize..15, 0u64..2_000, end, acks, 0usize..5).prop_map(
        |(stop_after, pause, end_after, acks, says)| Script {
            stop_after,
            pause: Duration::from_millis(pause),
            end_after,
            acks,
            says,
        },
    )
}

/// What the peer saw, over every connection, in the order it happened.
#[derive(Default, Debug)]
struct Record {
    /// Per connection, in the order opened: sequence numbers received.
    received: Vec<Vec<u64>>,
    /// Per connection: the client closed it (its Close arrived, not as the reply to the
    /// peer's own).
    closed_by_client: Vec<bool>,
}

/// Serves each stream the dialler hands over with the next script (then well-behaved ones);
/// ends once the dialler is gone and every session has read its stream to the end.
fn peer(
    mut accepted: mpsc::UnboundedReceiver<DuplexStream>,
    scripts: Vec<Script>,
    record: Arc<Mutex<Record>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0;
        let mut sessions = tokio::task::JoinSet::new();
        while let Some(stream) = accepted.recv().await {
            let script = scripts.get(n).cloned().unwrap_or_else(Script::good);
            {
                let mut record = record.lock().unwrap();
                record.received.push(Vec::new());
                record.closed_by_client.push(false);
            }
            sessions.spawn(session(n, stream, script, Arc::clone(&record)));
            n += 1;
        }
        while sessions.join_next().await.is_some() {}
    })
}

fn seq_of(message: &Message) -> Option<u64> {
    message.to_text().ok()?.split('|').next()?.parse().ok()
}

async fn session(n: usize, stream: DuplexStream, script: Script, record: Arc<Mutex<Record>>) {
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    // One writer task: the peer's messages, acks, its Close, in order.
    let (out, mut outgoing) = mpsc::unbounded_channel::<Option<Message>>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            let sent = match frame {
                Some(frame) => tx.send(frame).await,
                None => tx.flush().await,
            };
            if sent.is_err() {
                return;
            }
        }
    });
    for i in 0..script.says {
        let _ = out.send(Some(Message::text(format!("srv|{n}|{i}"))));
    }
    if let Acks::Ahead = script.acks {
        let _ = out.send(Some(Message::text("ack:1000000")));
    }
    let mut count = 0;
    let mut closing = false;
    while let Some(Ok(message)) = rx.next().await {
        match message {
            Message::Close(_) => {
                record.lock().unwrap().closed_by_client[n] = !closing;
                // The reply tungstenite queued goes out with a flush.
                let _ = out.send(None);
                while let Some(Ok(_)) = rx.next().await {}
                break;
            }
            ref data @ (Message::Text(_) | Message::Binary(_)) => {
                let seq = seq_of(data).expect("every message starts with its sequence number");
                record.lock().unwrap().received[n].push(seq);
                let ack = |upto: u64| Some(Message::text(format!("ack:{upto}")));
                let _ = out.send(ack(seq));
                match script.acks {
                    Acks::Behind => drop(out.send(ack(seq.saturating_sub(3)))),
                    Acks::Twice => drop(out.send(ack(seq))),
                    Acks::Each | Acks::Ahead => {}
                }
                count += 1;
                if count == script.stop_after {
                    tokio::time::sleep(script.pause).await;
                }
                match script.end_after {
                    Some((after, None)) if count >= after => {
                        writer.abort();
                        return;
                    }
                    Some((after, Some(code))) if count >= after => {
                        let frame = CloseFrame {
                            code: CloseCode::from(code),
                            reason: "peer says bye".into(),
                        };
                        let _ = out.send(Some(Message::Close(Some(frame))));
                        closing = true;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    drop(out);
    let _ = writer.await;
}

/// A transport in memory: hands the other end to the peer, counts the client ends still open.
#[derive(Clone)]
struct MemoryTransport {
    accepted: mpsc::UnboundedSender<DuplexStream>,
    open: Arc<AtomicUsize>,
}

struct Counted {
    io: DuplexStream,
    open: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tower::Service<Uri> for MemoryTransport {
    type Response = Counted;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Counted>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let sent = self.accepted.send(theirs);
        self.open.fetch_add(1, Ordering::SeqCst);
        let io = Counted {
            io: ours,
            open: Arc::clone(&self.open),
        };
        std::future::ready(match sent {
            Ok(()) => Ok(io),
            Err(_) => Err(io::Error::from(io::ErrorKind::ConnectionRefused)),
        })
    }
}

// ---- the client's operations ------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// Wait this long before the next operation.
    Wait(u64),
    Feed(usize),
    /// An awaited send, in its own task.
    Send(usize),
    /// A send whose future is dropped after one poll.
    SendDropped(usize),
    /// A send cut by a timeout of this many milliseconds.
    SendCut(usize, u64),
    /// A flush, in its own task.
    Flush,
    /// A message through a sink.
    Sink(usize),
    /// Room taken with `reserve`, then a send with the permit.
    Reserve(usize),
    Disconnect,
    Connect,
    Suspend,
    Resume,
    /// The consumer of `Incoming` stops reading for this many milliseconds.
    PauseReading(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let size = 1usize..3_000;
    prop_oneof![
        4 => (0u64..400).prop_map(Op::Wait),
        4 => size.clone().prop_map(Op::Feed),
        3 => size.clone().prop_map(Op::Send),
        1 => size.clone().prop_map(Op::SendDropped),
        1 => (size.clone(), 0u64..50).prop_map(|(n, t)| Op::SendCut(n, t)),
        1 => Just(Op::Flush),
        2 => size.clone().prop_map(Op::Sink),
        1 => size.prop_map(Op::Reserve),
        1 => Just(Op::Disconnect),
        2 => Just(Op::Connect),
        1 => Just(Op::Suspend),
        1 => Just(Op::Resume),
        1 => (0u64..1_500).prop_map(Op::PauseReading),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    at_least_once: bool,
    capacity: usize,
    scripts: Vec<Script>,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        prop_oneof![Just(4usize), Just(64)],
        prop::collection::vec(script(), 0..6),
        prop::collection::vec(op(), 1..40),
    )
        .prop_map(|(at_least_once, capacity, scripts, ops)| Case {
            at_least_once,
            capacity,
            scripts,
            ops,
        })
}

/// A send's outcome: delivered, or given back (recorded).
fn sent(result: Result<u64, SendError>, given_back: &Mutex<BTreeSet<u64>>) -> Result<(), String> {
    match result {
        Ok(_) => Ok(()),
        Err(SendError::Closed { message: Some(m) }) => {
            given_back.lock().unwrap().insert(seq_of(&m).unwrap());
            Ok(())
        }
        Err(error) => Err(format!("send: {error:?}")),
    }
}

fn message(seq: u64, size: usize) -> Message {
    let mut text = format!("{seq}|");
    text.extend(std::iter::repeat_n('x', size));
    Message::text(text)
}

fn ack_of(message: &Message) -> Option<u64> {
    message.to_text().ok()?.strip_prefix("ack:")?.parse().ok()
}

/// Bound on the final phase's waits.
const SETTLE: Duration = Duration::from_secs(60);

async fn run(case: Case) -> Result<(), TestCaseError> {
    let record = Arc::new(Mutex::new(Record::default()));
    let (accepted_tx, accepted_rx) = mpsc::unbounded_channel();
    let open = Arc::new(AtomicUsize::new(0));
    let peer = peer(accepted_rx, case.scripts.clone(), Arc::clone(&record));
    let transport = MemoryTransport {
        accepted: accepted_tx,
        open: Arc::clone(&open),
    };
    let mut builder = WsClient::builder("ws://peer.invalid/socket")
        .unwrap()
        .connector(WsConnector::new().with_transport(transport))
        .queue_capacity(case.capacity)
        .incoming_capacity(2)
        .heartbeat(500 * MS, 500 * MS)
        .close_step_timeout(300 * MS)
        .reconnect_on_normal_close(true)
        .backoff(Schedule::new([20 * MS, 100 * MS]).unwrap())
        .layer(|l| {
            l.with_connect_timeout(Duration::from_secs(1))
                .with_close_timeout(Duration::from_secs(2))
        });
    if case.at_least_once {
        builder = builder.at_least_once(ack_of);
    }
    let (client, mut incoming) = builder.build().unwrap();
    let handle = client.handle().clone();

    // The consumer of `Incoming`: reads, but pauses when told.
    let (pause_tx, mut pause_rx) = mpsc::unbounded_channel::<Duration>();
    let consumer = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            tokio::select! {
                biased;
                Some(pause) = pause_rx.recv() => tokio::time::sleep(pause).await,
                next = incoming.next() => match next {
                    Some(received) => got.push(received),
                    None => return got,
                },
            }
        }
    });

    // Outcomes of the futures the case awaits in tasks; given-back messages by sequence number.
    let mut waits: Vec<JoinHandle<Result<(), String>>> = Vec::new();
    let given_back = Arc::new(Mutex::new(BTreeSet::new()));
    let mut token = None;
    handle.connect().unwrap();

    for op in case.ops.clone() {
        match op {
            Op::Wait(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Op::Feed(size) => match client.feed_with(|seq| message(seq, size)) {
                Ok(_) | Err(SendError::Full { .. }) => {}
                Err(error) => prop_assert!(false, "feed: {error:?}"),
            },
            Op::Send(size) => {
                let sending = client.send_with(move |seq| message(seq, size));
                let given_back = Arc::clone(&given_back);
                waits.push(tokio::spawn(
                    async move { sent(sending.await, &given_back) },
                ));
            }
            Op::SendDropped(size) => {
                let mut sending = client.send_with(move |seq| message(seq, size));
                let _ = futures_util::poll!(&mut sending);
            }
            Op::SendCut(size, ms) => {
                let _ = tokio::time::timeout(
                    Duration::from_millis(ms),
                    client.send_with(move |seq| message(seq, size)),
                )
                .await;
            }
            Op::Flush => {
                let client = client.clone();
                waits.push(tokio::spawn(async move {
                    client.flush().await.map_err(|e| format!("flush: {e:?}"))
                }));
            }
            Op::Sink(size) => {
                // A sink of its own, in its own task: it waits for room like a `Sink` should.
                let (client, given_back) = (client.clone(), Arc::clone(&given_back));
                waits.push(tokio::spawn(async move {
                    let mut sink = client.sink();
                    let ready = futures_util::future::poll_fn(|cx| sink.poll_ready_unpin(cx)).await;
                    ready.map_err(|e| format!("a sink's readiness: {e:?}"))?;
                    // Nothing runs between here and `start_send`: this is its number.
                    let seq = client.stats().accepted + 1;
                    match sink.start_send_unpin(message(seq, size)) {
                        Ok(()) => sink
                            .flush()
                            .await
                            .map_err(|e| format!("a sink's flush: {e:?}")),
                        Err(error) => sent(Err(error), &given_back),
                    }
                }));
            }
            Op::Reserve(size) => {
                let (client, given_back) = (client.clone(), Arc::clone(&given_back));
                waits.push(tokio::spawn(async move {
                    let permit = client
                        .reserve()
                        .await
                        .map_err(|e| format!("reserve: {e:?}"))?;
                    sent(
                        permit.send_with(move |seq| message(seq, size)).await,
                        &given_back,
                    )
                }));
            }
            Op::Disconnect => drop(handle.disconnect()),
            Op::Connect => drop(handle.connect()),
            Op::Suspend => token = handle.suspend().or(token),
            Op::Resume => {
                if let Some(token) = token.take() {
                    let _ = handle.resume(token);
                }
            }
            Op::PauseReading(ms) => drop(pause_tx.send(Duration::from_millis(ms))),
        }
    }

    // The end: a well-behaved peer (every later connection), everything delivered.
    drop(pause_tx);
    handle.connect().unwrap();
    let flushed = tokio::time::timeout(SETTLE, client.flush()).await;
    prop_assert!(
        matches!(flushed, Ok(Ok(()))),
        "the final flush: {flushed:?}; {:?}",
        client.stats()
    );
    for wait in waits {
        let outcome = tokio::time::timeout(SETTLE, wait).await;
        prop_assert!(
            matches!(outcome, Ok(Ok(Ok(())))),
            "a send or flush: {outcome:?}"
        );
    }
    let accepted = client.stats().accepted;
    prop_assert_eq!(client.stats().held, 0);
    tokio::time::timeout(SETTLE, handle.disconnect())
        .await
        .map_err(|_| TestCaseError::fail("the final disconnect"))?;
    drop(client);
    drop(handle);
    let got = tokio::time::timeout(SETTLE, consumer)
        .await
        .map_err(|_| TestCaseError::fail("the end of `Incoming`"))?
        .unwrap();
    prop_assert_eq!(
        open.load(Ordering::SeqCst),
        0,
        "a client socket outlived its teardown"
    );
    // What the client wrote before it let go, the peer reads (it may have been asleep).
    tokio::time::timeout(SETTLE, peer)
        .await
        .map_err(|_| TestCaseError::fail("the peer's end"))?
        .unwrap();

    let record = record.lock().unwrap();
    let given_back = given_back.lock().unwrap();
    // 1. Nothing lost (but, without at-least-once, what was written to a connection that then
    // ended abnormally).
    let arrived: BTreeSet<u64> = record.received.iter().flatten().copied().collect();
    // Such a message was handed to connection `n` after the last new one that arrived up to
    // it, and before the first new one on any later connection.
    let new_on: Vec<Vec<u64>> = {
        let mut seen = BTreeSet::new();
        let first = |seqs: &Vec<u64>| {
            seqs.iter()
                .copied()
                .filter(|seq| seen.insert(*seq))
                .collect()
        };
        record.received.iter().map(first).collect()
    };
    let lost_with_a_connection = |seq: u64| {
        !case.at_least_once
            && (0..record.received.len()).any(|n| {
                let lo = new_on[..=n].iter().flatten().max().copied().unwrap_or(0);
                let hi = new_on[n + 1..]
                    .iter()
                    .flatten()
                    .min()
                    .copied()
                    .unwrap_or(u64::MAX);
                !record.closed_by_client[n] && lo < seq && seq < hi
            })
    };
    for seq in 1..=accepted {
        prop_assert!(
            arrived.contains(&seq) || given_back.contains(&seq) || lost_with_a_connection(seq),
            "message {seq} neither arrived nor came back: {record:?}"
        );
    }
    // 2. In order on each connection, no repeat.
    for (n, seqs) in record.received.iter().enumerate() {
        prop_assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "connection {n}: {seqs:?}"
        );
    }
    // 3. First arrivals in order across connections; 4. repeats only after a cut.
    let mut first: BTreeMap<u64, usize> = BTreeMap::new();
    let mut last_new = 0;
    for (n, seqs) in record.received.iter().enumerate() {
        for &seq in seqs {
            match first.get(&seq) {
                None => {
                    prop_assert!(
                        seq > last_new,
                        "message {seq} on connection {n} after {last_new}: {record:?}"
                    );
                    last_new = seq;
                    first.insert(seq, n);
                }
                Some(&earlier) if !case.at_least_once => prop_assert!(
                    !record.closed_by_client[earlier],
                    "message {seq} again on {n} though connection {earlier} closed gracefully: {record:?}"
                ),
                Some(_) => {}
            }
        }
    }
    // 6. A prefix of what each peer said, in order, under one epoch.
    let mut said: BTreeMap<usize, (tower_epoch::Epoch, Vec<usize>)> = BTreeMap::new();
    for received in &got {
        let text = received.message.to_text().unwrap();
        let Some(rest) = text.strip_prefix("srv|") else {
            continue;
        };
        let (n, i) = rest.split_once('|').unwrap();
        let entry = said
            .entry(n.parse().unwrap())
            .or_insert((received.epoch, Vec::new()));
        prop_assert_eq!(entry.0, received.epoch, "one epoch per connection");
        entry.1.push(i.parse().unwrap());
    }
    for (n, (_, indices)) in &said {
        prop_assert!(
            indices.iter().enumerate().all(|(k, i)| k == *i),
            "connection {n}'s messages: {indices:?}"
        );
    }
    Ok(())
}

fn config() -> Config {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("TOWER_EPOCH_DELIVERY_CASES").unwrap_or(256) as u32,
        rng_seed: RngSeed::Fixed(env("TOWER_EPOCH_DELIVERY_SEED").unwrap_or(0xde11_7e12)),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_message_is_delivered_in_order_or_given_back(case in case()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(case))?;
    }
}
