//! Deterministic network simulation of the WebSocket client with turmoil: tokio-tungstenite over
//! simulated TCP.
//!
//! Per seed, one [`turmoil::Sim`] with two hosts:
//!
//! - `server`: a tokio-tungstenite server (`accept_async` over turmoil's `TcpListener`) that
//!   answers each text message `<seq>:<payload>` with `ack:<seq>`. What it saw is recorded outside
//!   the host (a crash loses the host's memory, not the test's record): the order in which each
//!   sequence number was first seen, across all of the server's lives.
//! - `client`: a [`WsClient`] in at-least-once mode whose connector dials through turmoil, with a
//!   heartbeat (so that a held link, a half-open connection, is found) and a connect timeout. A
//!   producer sends sequence-numbered messages steadily throughout (mostly `feed_with`, some
//!   `send_with` and `flush` bounded by short timeouts), and a watcher records every state the
//!   client publishes, in simulated time.
//!
//! The test drives the timeline: the server host crashes 5 times (`Sim::crash`, then
//! `Sim::bounce`) and the link between the hosts is held once (`Sim::hold`, then
//! `Sim::release`), at seed-derived moments and for seed-derived durations. An outage starts
//! only once the client has been connected for a settling period after the previous one.
//!
//! Checked for every seed:
//! - after each outage ends, the client is connected again within the connect timeout plus the
//!   maximum backoff (the outage itself excluded), and every crash was noticed;
//! - at-least-once: every sequence number sent was seen by the server (0 lost) and the first-seen
//!   order is increasing (0 reordered); every message was acknowledged;
//! - the end state equals the last intent: a seed-derived sequence of `disconnect`/`connect`
//!   ends either connected (one connection open) or idle (nothing open, on either side).
//!
//! 200 seeds by default; `TOWER_EPOCH_SIM_SEEDS=<n>` runs more (or fewer) and
//! `TOWER_EPOCH_SIM_SEED_BASE=<n>` moves the range. A failure prints its seed; rerun it alone
//! with `TOWER_EPOCH_SIM_SEED_BASE=<seed> TOWER_EPOCH_SIM_SEEDS=1 cargo test --test ws_turmoil
//! -- --nocapture`.
//!
//! Determinism: turmoil's network (latencies, delivery order) and this test's plan derive from
//! the seed, and the backoff is a jitter-free `Schedule`. `tokio::select!` (in the client's
//! connection loop) picks ready branches in a random order unless tokio is built with
//! `--cfg tokio_unstable`, in which case turmoil seeds tokio's RNG from the seed too: build with
//! `RUSTFLAGS="--cfg tokio_unstable"` for a bit-for-bit replay.
#![cfg(feature = "ws")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, timeout};
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{BoxFuture, BoxIo, Dial, Message, WsClient, WsConnector};
use tower_epoch::{Epoch, Handle, State};

const PORT: u16 = 9000;
const URL: &str = "ws://server:9000/socket";
const SERVER: &str = "server";
const CLIENT: &str = "client";

const TICK: Duration = Duration::from_millis(1);
/// Latency of each simulated segment: turmoil's exponential distribution, capped here.
const MAX_LATENCY: Duration = Duration::from_millis(50);

const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
const CLOSE_STEP_TIMEOUT: Duration = Duration::from_millis(200);
const STABLE_AFTER: Duration = Duration::from_secs(1);
/// The backoff schedule (no jitter: deterministic); it repeats its last entry.
const BACKOFF_MS: [u64; 5] = [25, 50, 100, 200, 400];
const MAX_BACKOFF: Duration = Duration::from_millis(400);
/// The reconnect bound after an outage ends.
const RECONNECT_BOUND: Duration = CONNECT_TIMEOUT.saturating_add(MAX_BACKOFF);

/// How long the client must have been connected before the next outage starts: more than a
/// heartbeat round (a ping in flight when a hold ended must be answered or fail first).
const SETTLE: Duration = Duration::from_millis(600);
/// Hard bound on the simulated timeline of one seed.
const SIM_LIMIT: Duration = Duration::from_secs(90);

const CRASHES: usize = 5;
const DEFAULT_SEEDS: u64 = 200;

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

/// Simulated time, from inside a host.
fn now() -> Duration {
    turmoil::sim_elapsed().expect("called from a simulated host")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// SplitMix64: the test's own seed-derived choices (turmoil has its own RNG from the same seed).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5EED_7E57_0F7E_A0C4)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        ms(self.range(lo, hi))
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

// ---------------------------------------------------------------------------------------------
// The plan of one seed.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutageKind {
    /// The server host crashes (its sockets go, its memory too) and restarts.
    Crash,
    /// The link between client and server holds every segment until released: half-open.
    Hold,
}

#[derive(Clone, Copy, Debug)]
struct PlannedOutage {
    kind: OutageKind,
    /// Quiet time after the client settled, before the outage starts.
    gap: Duration,
    duration: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intent {
    Connect,
    Disconnect,
}

#[derive(Clone, Debug)]
struct Plan {
    outages: Vec<PlannedOutage>,
    /// Time between two messages of the producer.
    period: Duration,
    /// The intents the client expresses at the end, each after a delay (possibly zero, inside
    /// the previous intent's teardown).
    finale: Vec<(Duration, Intent)>,
}

impl Plan {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let hold_at = rng.range(0, CRASHES as u64) as usize;
        let outages = (0..=CRASHES)
            .map(|i| {
                let kind = if i == hold_at {
                    OutageKind::Hold
                } else {
                    OutageKind::Crash
                };
                let duration = match kind {
                    // Some restarts are immediate, some longer than several backoff rounds.
                    OutageKind::Crash if rng.chance(20) => rng.ms(0, 30),
                    OutageKind::Crash => rng.ms(30, 1500),
                    // Some holds end before the heartbeat can notice them.
                    OutageKind::Hold if rng.chance(20) => rng.ms(20, 300),
                    OutageKind::Hold => rng.ms(300, 2000),
                };
                PlannedOutage {
                    kind,
                    gap: rng.ms(0, 500),
                    duration,
                }
            })
            .collect();
        let period = rng.ms(15, 45);
        let finale = match rng.range(0, 5) {
            0 => vec![],
            1 | 2 => vec![(ms(0), Intent::Disconnect)],
            3 => vec![
                (ms(0), Intent::Disconnect),
                (rng.ms(0, 300), Intent::Connect),
            ],
            _ => vec![
                (ms(0), Intent::Disconnect),
                (rng.ms(0, 300), Intent::Connect),
                (rng.ms(0, 300), Intent::Disconnect),
            ],
        };
        Plan {
            outages,
            period,
            finale,
        }
    }

    fn last_intent(&self) -> Intent {
        self.finale.last().map_or(Intent::Connect, |(_, i)| *i)
    }
}

// ---------------------------------------------------------------------------------------------
// What the hosts and the test share (outside the hosts: it survives crashes).

#[derive(Default, Debug)]
struct ServerRecord {
    /// Sequence numbers in the order they were first seen, across every life of the server.
    first_seen: Vec<u64>,
    /// How many times each sequence number was seen.
    seen: BTreeMap<u64, u32>,
    /// Sessions (accepted sockets) alive now.
    live_sessions: usize,
    /// Sessions whose WebSocket handshake completed, over all lives.
    sessions: u64,
    /// Times the server software started.
    lives: u32,
}

impl ServerRecord {
    fn saw(&mut self, seq: u64) {
        let count = self.seen.entry(seq).or_insert(0);
        if *count == 0 {
            self.first_seen.push(seq);
        }
        *count += 1;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Idle,
    Connecting,
    Connected,
    WaitingToRetry,
    Disconnecting,
    GaveUp,
    Shutdown,
}

fn kind(state: &State) -> Kind {
    match state {
        State::Idle => Kind::Idle,
        State::Connecting { .. } => Kind::Connecting,
        State::Connected { .. } => Kind::Connected,
        State::WaitingToRetry { .. } => Kind::WaitingToRetry,
        State::Disconnecting { .. } => Kind::Disconnecting,
        State::GaveUp { .. } => Kind::GaveUp,
        _ => Kind::Shutdown,
    }
}

#[derive(Clone, Copy, Debug)]
struct Transition {
    at: Duration,
    kind: Kind,
    epoch: Option<Epoch>,
}

#[derive(Default, Debug)]
struct ClientRecord {
    /// Every state the watcher saw, in simulated time.
    transitions: Vec<Transition>,
    /// Set by the test when the outages are over: the client stops producing and ends.
    finish: bool,
    /// Filled by the client when it is done.
    summary: Option<ClientSummary>,
}

impl ClientRecord {
    /// Since when the client has been connected, if it is.
    fn connected_since(&self) -> Option<Duration> {
        let last = self.transitions.last()?;
        (last.kind == Kind::Connected).then_some(last.at)
    }
}

#[derive(Clone, Debug)]
struct ClientSummary {
    sent: u64,
    acknowledged: u64,
    resent: u64,
    acks_received: u64,
    installed: u64,
    final_state: String,
}

// ---------------------------------------------------------------------------------------------
// The hosts.

/// Dials through turmoil's simulated TCP, counting the streams the client holds open.
///
/// (turmoil's own `established_tcp_stream_count` also counts the sockets of failed and
/// timed-out `connect`s, which it never removes, so it cannot tell what the client holds.)
struct SimDial {
    open: Arc<AtomicUsize>,
}

impl Dial for SimDial {
    fn dial(&self, host: &str, port: u16) -> BoxFuture<io::Result<BoxIo>> {
        let host = host.to_string();
        let open = Arc::clone(&self.open);
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            open.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Counted { stream, open }) as BoxIo)
        })
    }
}

/// A client stream, counted while it exists.
struct Counted {
    stream: turmoil::net::TcpStream,
    open: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

fn parse_ack(message: &Message) -> Option<u64> {
    message.to_text().ok()?.strip_prefix("ack:")?.parse().ok()
}

async fn server(record: Arc<Mutex<ServerRecord>>) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    lock(&record).lives += 1;
    loop {
        let (socket, _) = listener.accept().await?;
        tokio::task::spawn_local(session(socket, Arc::clone(&record)));
    }
}

/// Counts a session alive until it is dropped (a crash drops it with the host's runtime).
struct Live(Arc<Mutex<ServerRecord>>);

impl Live {
    fn new(record: &Arc<Mutex<ServerRecord>>) -> Self {
        lock(record).live_sessions += 1;
        Live(Arc::clone(record))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        lock(&self.0).live_sessions -= 1;
    }
}

async fn session(socket: turmoil::net::TcpStream, record: Arc<Mutex<ServerRecord>>) {
    let _live = Live::new(&record);
    let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else {
        return;
    };
    lock(&record).sessions += 1;
    // Reading also writes what tungstenite queued: pongs and the reply to a Close.
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(text) = message {
            let Some(Ok(seq)) = text.split_once(':').map(|(seq, _)| seq.parse::<u64>()) else {
                continue;
            };
            lock(&record).saw(seq);
            if ws.send(Message::text(format!("ack:{seq}"))).await.is_err() {
                return;
            }
        }
    }
}

type SimResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

async fn client(
    plan: Plan,
    seed: u64,
    record: Arc<Mutex<ClientRecord>>,
    server: Arc<Mutex<ServerRecord>>,
) -> turmoil::Result {
    let open = Arc::new(AtomicUsize::new(0));
    let (client, mut incoming) = WsClient::builder(URL)?
        .connector(WsConnector::new().with_dial(SimDial {
            open: Arc::clone(&open),
        }))
        .heartbeat(HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT)
        .at_least_once(parse_ack)
        .backoff(Schedule::new(BACKOFF_MS.map(ms))?)
        .close_step_timeout(CLOSE_STEP_TIMEOUT)
        .layer(|layer| {
            layer
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_close_timeout(CLOSE_TIMEOUT)
                .with_stable_after(STABLE_AFTER)
        })
        .build()?;
    let handle = client.handle().clone();

    // The watcher: every published state, in simulated time.
    let mut states = handle.subscribe();
    let watcher_record = Arc::clone(&record);
    tokio::spawn(async move {
        loop {
            let state = states.borrow_and_update().clone();
            lock(&watcher_record).transitions.push(Transition {
                at: now(),
                kind: kind(&state),
                epoch: state.epoch(),
            });
            if matches!(state, State::Shutdown) || states.changed().await.is_err() {
                return;
            }
        }
    });
    // Acknowledgements arrive on the incoming stream: read it, or the client stops reading.
    let acks = tokio::spawn(async move {
        let mut acks = 0u64;
        while let Some(received) = incoming.next().await {
            acks += u64::from(parse_ack(&received.message).is_some());
        }
        acks
    });

    handle.connect()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let producer = tokio::spawn(produce(client.clone(), plan.period, seed, stopped));

    while !lock(&record).finish {
        sleep(ms(5)).await;
    }
    stop.send_replace(true);
    producer.await??;
    let sent = client.stats().accepted;

    // Every message acknowledged: the connection is up (the last outage is over).
    let drained = timeout(Duration::from_secs(10), async {
        while client.stats().held > 0 {
            sleep(ms(5)).await;
        }
    })
    .await;
    if drained.is_err() {
        return Err(format!(
            "messages still unacknowledged 10 s after the last outage: {:?}, state {}",
            client.stats(),
            handle.state()
        )
        .into());
    }

    // The finale: the last intent wins.
    let mut disconnects = Vec::new();
    for (delay, intent) in &plan.finale {
        sleep(*delay).await;
        match intent {
            Intent::Connect => {
                handle.connect()?;
            }
            Intent::Disconnect => disconnects.push(handle.disconnect()),
        }
    }
    check_end_state(&plan, &handle, &server, &open, disconnects).await?;

    let stats = client.stats();
    let ledger = handle.ledger();
    let final_state = handle.state().to_string();
    // Dropping the client and every handle stops the driver, which ends the incoming stream.
    drop(client);
    drop(handle);
    let acks_received = timeout(Duration::from_secs(5), acks).await??;
    lock(&record).summary = Some(ClientSummary {
        sent,
        acknowledged: stats.acknowledged,
        resent: stats.resent,
        acks_received,
        installed: ledger.installed,
        final_state,
    });
    Ok(())
}

async fn check_end_state(
    plan: &Plan,
    handle: &Handle,
    server: &Arc<Mutex<ServerRecord>>,
    open: &AtomicUsize,
    disconnects: Vec<tower_epoch::DisconnectFuture>,
) -> SimResult {
    let expected_streams = match plan.last_intent() {
        Intent::Connect => {
            let mut states = handle.subscribe();
            let connected = timeout(
                RECONNECT_BOUND + CLOSE_TIMEOUT,
                states.wait_for(State::is_connected),
            )
            .await;
            if !matches!(connected, Ok(Ok(_))) {
                return Err(format!(
                    "last intent connect, state {} after {:?}",
                    handle.state(),
                    RECONNECT_BOUND + CLOSE_TIMEOUT
                )
                .into());
            }
            1
        }
        Intent::Disconnect => {
            for done in disconnects {
                if timeout(CLOSE_TIMEOUT + ms(100), done).await.is_err() {
                    return Err("a disconnect did not complete within the close timeout".into());
                }
            }
            0
        }
    };
    // Let every teardown and the server's sessions finish.
    sleep(CLOSE_TIMEOUT + ms(200)).await;
    let state = handle.state();
    let ledger = handle.ledger();
    let connected = state.is_connected();
    let ok_state = match plan.last_intent() {
        Intent::Connect => connected,
        Intent::Disconnect => matches!(state, State::Idle),
    };
    if !ok_state {
        return Err(format!(
            "last intent {:?} but the state is {state}",
            plan.last_intent()
        )
        .into());
    }
    if ledger.opened != ledger.installed + ledger.discarded
        || ledger.closed + u64::from(connected) != ledger.opened
    {
        return Err(
            format!("the books do not balance at the end (state {state}): {ledger:?}").into(),
        );
    }
    let streams = open.load(Ordering::SeqCst);
    let sessions = lock(server).live_sessions;
    if streams != expected_streams || sessions != expected_streams {
        return Err(format!(
            "last intent {:?} (state {state}): {streams} streams open on the client, \
             {sessions} server sessions alive, expected {expected_streams}; {ledger:?}",
            plan.last_intent()
        )
        .into());
    }
    Ok(())
}

/// Sends `<seq>:<payload>` steadily until told to stop, never waiting long: mostly `feed_with`
/// (written by the connection's task), sometimes `send_with` or `flush` (written from this task
/// while connected) bounded by a short timeout (dropping the future withdraws nothing).
async fn produce(
    client: WsClient,
    period: Duration,
    seed: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let mut rng = Rng::new(seed.rotate_left(17));
    let text = |seq: u64, how: &str| Message::text(format!("{seq}:{how}"));
    while !*stop.borrow() {
        match rng.range(0, 9) {
            0 | 1 => {
                let send = client.send_with(move |seq| text(seq, "sent"));
                if send.seq().is_none() {
                    return Err(format!("send not accepted at once: {:?}", client.stats()));
                }
                let _ = timeout(rng.ms(0, 10), send).await;
            }
            2 => {
                client
                    .feed_with(|seq| text(seq, "flushed"))
                    .map_err(|e| format!("feed: {e}"))?;
                let _ = timeout(rng.ms(0, 10), client.flush()).await;
            }
            _ => {
                client
                    .feed_with(|seq| text(seq, "fed"))
                    .map_err(|e| format!("feed: {e}"))?;
            }
        }
        sleep(period).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One seed.

#[derive(Clone, Copy, Debug)]
struct Outage {
    kind: OutageKind,
    start: Duration,
    end: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Recovery {
    kind: OutageKind,
    duration: Duration,
    /// From the end of the outage to the start of the connection that lasted.
    reconnect: Duration,
    /// The client left `Connected` during the outage or after it.
    noticed: bool,
}

#[derive(Debug)]
struct SeedReport {
    seed: u64,
    recoveries: Vec<Recovery>,
    sent: u64,
    duplicates: u64,
    resent: u64,
    installed: u64,
    server_lives: u32,
    last_intent: Intent,
    simulated: Duration,
}

fn run_seed(seed: u64) -> Result<SeedReport, String> {
    let plan = Plan::new(seed);
    let server_record = Arc::new(Mutex::new(ServerRecord::default()));
    let client_record = Arc::new(Mutex::new(ClientRecord::default()));

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .tick_duration(TICK)
        .max_message_latency(MAX_LATENCY)
        .simulation_duration(SIM_LIMIT)
        .build();
    let server_for_host = Arc::clone(&server_record);
    sim.host(SERVER, move || server(Arc::clone(&server_for_host)));
    sim.client(
        CLIENT,
        client(
            plan.clone(),
            seed,
            Arc::clone(&client_record),
            Arc::clone(&server_record),
        ),
    );

    let describe = |why: String, record: &ClientRecord, outages: &[Outage]| {
        let mut out = format!("seed {seed}: {why}\n  plan: {plan:?}\n  outages: {outages:?}\n");
        let _ = writeln!(out, "  states:");
        for t in &record.transitions {
            let _ = writeln!(
                out,
                "    {:>6} ms {:?} {}",
                t.at.as_millis(),
                t.kind,
                t.epoch.map(|e| e.to_string()).unwrap_or_default()
            );
        }
        out
    };

    let mut outages: Vec<Outage> = Vec::new();
    let mut next = 0;
    let mut current: Option<(usize, Duration)> = None;
    let mut finish_at = None;
    loop {
        let finished = match sim.step() {
            Ok(finished) => finished,
            Err(error) => {
                return Err(describe(
                    format!("the simulation failed: {error}"),
                    &lock(&client_record),
                    &outages,
                ));
            }
        };
        if finished {
            break;
        }
        let t = sim.elapsed();
        match current {
            Some((i, end)) if t >= end => {
                match plan.outages[i].kind {
                    OutageKind::Crash => sim.bounce(SERVER),
                    OutageKind::Hold => sim.release(CLIENT, SERVER),
                }
                outages[i].end = t;
                current = None;
            }
            Some(_) => {}
            None if finish_at.is_none() => {
                let record = lock(&client_record);
                let quiet_since = outages.last().map_or(Duration::ZERO, |o| o.end);
                let ready = record
                    .connected_since()
                    .map(|since| since.max(quiet_since) + SETTLE);
                let gap = plan.outages.get(next).map_or(ms(100), |o| o.gap);
                match ready {
                    Some(ready) if t >= ready + gap => {
                        drop(record);
                        if let Some(planned) = plan.outages.get(next) {
                            match planned.kind {
                                OutageKind::Crash => sim.crash(SERVER),
                                OutageKind::Hold => sim.hold(CLIENT, SERVER),
                            }
                            outages.push(Outage {
                                kind: planned.kind,
                                start: t,
                                end: t,
                            });
                            current = Some((next, t + planned.duration));
                            next += 1;
                        } else {
                            lock(&client_record).finish = true;
                            finish_at = Some(t);
                        }
                    }
                    _ if t > quiet_since + RECONNECT_BOUND + SETTLE + ms(2000) + gap => {
                        let why = format!(
                            "not reconnected: {:?} after the end of outage {} the client is not \
                             connected",
                            t - quiet_since,
                            outages.len()
                        );
                        return Err(describe(why, &record, &outages));
                    }
                    _ => {}
                }
            }
            None => {}
        }
    }
    let simulated = sim.elapsed();
    drop(sim);

    let record = lock(&client_record);
    let fail = |why: String| Err(describe(why, &record, &outages));
    let Some(summary) = record.summary.clone() else {
        return fail("the client ended without a summary".into());
    };
    let finish_at = finish_at.expect("the client finishes only when told");

    // Reconnect times.
    let mut recoveries = Vec::new();
    for (i, outage) in outages.iter().enumerate() {
        let until = outages.get(i + 1).map_or(finish_at, |o| o.start);
        // The connection that lasted until the next outage (or the finale).
        let Some(last_connected) = record
            .transitions
            .iter()
            .filter(|t| t.at < until)
            .next_back()
            .filter(|t| t.kind == Kind::Connected)
        else {
            return fail(format!("not connected when outage {} began", i + 1));
        };
        let started = record
            .transitions
            .iter()
            .filter(|t| t.at <= last_connected.at && t.kind == Kind::Connected)
            .rev()
            .take_while(|t| t.epoch == last_connected.epoch)
            .last()
            .map_or(last_connected.at, |t| t.at);
        let reconnect = started.saturating_sub(outage.end);
        let noticed = record
            .transitions
            .iter()
            .any(|t| t.at >= outage.start && t.at < until && t.kind != Kind::Connected)
            || record
                .transitions
                .iter()
                .filter(|t| t.at < outage.start)
                .next_back()
                .is_some_and(|t| t.epoch != last_connected.epoch);
        if reconnect > RECONNECT_BOUND {
            return fail(format!(
                "outage {} ({:?}, {:?}): connected again {:?} after it ended, more than the \
                 connect timeout + the maximum backoff ({RECONNECT_BOUND:?})",
                i + 1,
                outage.kind,
                outage.end - outage.start,
                reconnect
            ));
        }
        if outage.kind == OutageKind::Crash && !noticed {
            return fail(format!("the crash of outage {} went unnoticed", i + 1));
        }
        recoveries.push(Recovery {
            kind: outage.kind,
            duration: outage.end - outage.start,
            reconnect,
            noticed,
        });
    }

    // At-least-once: nothing lost, nothing reordered, everything acknowledged.
    let server = lock(&server_record);
    let lost: Vec<u64> = (1..=summary.sent)
        .filter(|seq| !server.seen.contains_key(seq))
        .collect();
    if !lost.is_empty() {
        return fail(format!(
            "{} of {} messages lost: {lost:?}",
            lost.len(),
            summary.sent
        ));
    }
    if let Some(w) = server.first_seen.windows(2).find(|w| w[0] >= w[1]) {
        return fail(format!(
            "reordered: the server first saw {} after {}",
            w[1], w[0]
        ));
    }
    if let Some(unknown) = server.seen.keys().find(|seq| **seq > summary.sent) {
        return fail(format!("the server saw {unknown}, never sent"));
    }
    if summary.acknowledged != summary.sent {
        return fail(format!(
            "{} sent, {} acknowledged",
            summary.sent, summary.acknowledged
        ));
    }
    if server.lives != 1 + CRASHES as u32 {
        return fail(format!("the server started {} times", server.lives));
    }
    let duplicates = server.seen.values().map(|n| u64::from(n - 1)).sum();
    Ok(SeedReport {
        seed,
        recoveries,
        sent: summary.sent,
        duplicates,
        resent: summary.resent,
        installed: summary.installed,
        server_lives: server.lives,
        last_intent: plan.last_intent(),
        simulated,
    })
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

#[test]
fn crashes_and_a_held_link_lose_nothing_and_reconnect_in_time() {
    let count = env_u64("TOWER_EPOCH_SIM_SEEDS", DEFAULT_SEEDS);
    let base = env_u64("TOWER_EPOCH_SIM_SEED_BASE", 0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(count.max(1) as usize);
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let results: Mutex<Vec<Result<SeedReport, String>>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let seed = base + i;
                    let result =
                        catch_unwind(AssertUnwindSafe(|| run_seed(seed))).unwrap_or_else(|panic| {
                            let what = panic
                                .downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| panic.downcast_ref::<&str>().copied())
                                .unwrap_or("(no message)");
                            Err(format!("seed {seed}: panicked: {what}"))
                        });
                    if let Err(error) = &result {
                        eprintln!("FAILED {error}");
                    }
                    lock(&results).push(result);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let (reports, failures): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let reports: Vec<SeedReport> = reports.into_iter().map(Result::unwrap).collect();
    summarize(&reports, started.elapsed());
    if !failures.is_empty() {
        let mut seeds: Vec<u64> = failures
            .iter()
            .filter_map(|f| f.as_ref().err())
            .filter_map(|e| e.strip_prefix("seed ")?.split(':').next()?.parse().ok())
            .collect();
        seeds.sort_unstable();
        panic!(
            "{} of {count} seeds failed: {seeds:?} (rerun one with TOWER_EPOCH_SIM_SEED_BASE=<seed> \
             TOWER_EPOCH_SIM_SEEDS=1 cargo test --test ws_turmoil -- --nocapture)",
            failures.len()
        );
    }
}

fn summarize(reports: &[SeedReport], wall: Duration) {
    if reports.is_empty() {
        return;
    }
    let mut by_kind: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut unnoticed_holds = 0;
    for recovery in reports.iter().flat_map(|r| &r.recoveries) {
        let key = match (recovery.kind, recovery.noticed) {
            (OutageKind::Crash, _) => "crash",
            (OutageKind::Hold, true) => "hold (noticed)",
            (OutageKind::Hold, false) => {
                unnoticed_holds += 1;
                "hold (not noticed)"
            }
        };
        by_kind.entry(key).or_default().push(recovery.reconnect);
    }
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let duplicates: u64 = reports.iter().map(|r| r.duplicates).sum();
    let resent: u64 = reports.iter().map(|r| r.resent).sum();
    let installed: u64 = reports.iter().map(|r| r.installed).sum();
    let simulated: Duration = reports.iter().map(|r| r.simulated).sum();
    let lives: u64 = reports.iter().map(|r| u64::from(r.server_lives)).sum();
    let ends_connected = reports
        .iter()
        .filter(|r| r.last_intent == Intent::Connect)
        .count();
    println!(
        "ws_turmoil: {} seeds ({}..={}) in {wall:.1?} wall, {simulated:.1?} simulated",
        reports.len(),
        reports.iter().map(|r| r.seed).min().unwrap_or(0),
        reports.iter().map(|r| r.seed).max().unwrap_or(0),
    );
    println!(
        "  messages: {sent} sent, 0 lost, 0 reordered, {duplicates} seen twice by the server, \
         {resent} re-sent by the client; {installed} connections installed, {lives} server lives"
    );
    println!(
        "  end: {ends_connected} seeds end connected, {} idle; {unnoticed_holds} holds too short \
         to be noticed",
        reports.len() - ends_connected
    );
    for (what, mut times) in by_kind {
        times.sort_unstable();
        let pick = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        println!(
            "  reconnect after {what:<18} n={:<4} median {:>4} ms, p99 {:>4} ms, max {:>4} ms \
             (bound {} ms, min margin {} ms)",
            times.len(),
            pick(0.5).as_millis(),
            pick(0.99).as_millis(),
            pick(1.0).as_millis(),
            RECONNECT_BOUND.as_millis(),
            (RECONNECT_BOUND - pick(1.0)).as_millis()
        );
    }
}
