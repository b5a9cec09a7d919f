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
//!   maximum backoff (the outage itself excluded); every crash, and every hold longer than a
//!   heartbeat round (interval + timeout), was noticed within a heartbeat round;
//! - at-least-once: every sequence number sent was seen by the server (0 lost) and the first-seen
//!   order is increasing (0 reordered); every message was acknowledged;
//! - the end state equals the last intent: a seed-derived sequence of `disconnect`/`connect`
//!   ends either connected (one connection open) or idle (nothing open, on either side); when
//!   the client is dropped, its driver closes everything.
//!
//! turmoil's TCP has a window of 64 segments per direction: the producer (a message every
//! 15-45 ms) stays below it for as long as a held link goes unnoticed (one heartbeat round).
//! Past that window, write backpressure exposed three bugs of `src/ws` (a blocked write held
//! back the heartbeat; a write cancelled mid-batch lost its batch); the scripted tests at the
//! end of this file reproduce each and guard the fixes.
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
use tokio_tungstenite::tungstenite::http::Uri;
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{Incoming, Message, WsClient, WsConnector};
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
/// A half-open connection is found within this long.
const HEARTBEAT_ROUND: Duration = HEARTBEAT_INTERVAL.saturating_add(HEARTBEAT_TIMEOUT);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
const CLOSE_STEP_TIMEOUT: Duration = Duration::from_millis(200);
const STABLE_AFTER: Duration = Duration::from_secs(1);
/// The backoff schedule (no jitter: deterministic); it repeats its last entry.
const BACKOFF_MS: [u64; 5] = [25, 50, 100, 200, 400];
const MAX_BACKOFF: Duration = Duration::from_millis(BACKOFF_MS[BACKOFF_MS.len() - 1]);
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
    installed: u64,
}

// ---------------------------------------------------------------------------------------------
// The hosts.

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

/// The client under test: at-least-once over turmoil, with a heartbeat unless told otherwise.
/// Also returns the count of streams it holds open.
fn new_client(heartbeat: bool) -> SimResult<(WsClient, Incoming, Arc<AtomicUsize>)> {
    new_client_with(heartbeat, true)
}

/// A client with or without at-least-once delivery.
fn new_client_with(
    heartbeat: bool,
    at_least_once: bool,
) -> SimResult<(WsClient, Incoming, Arc<AtomicUsize>)> {
    let open = Arc::new(AtomicUsize::new(0));
    // The transport: turmoil's simulated TCP, counting the streams the client holds open.
    // (turmoil's own `established_tcp_stream_count` also counts the sockets of failed and
    // timed-out `connect`s, which it never removes, so it cannot tell what the client holds.)
    let counted = Arc::clone(&open);
    let transport = tower::service_fn(move |uri: Uri| {
        let open = Arc::clone(&counted);
        async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or_default();
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            open.fetch_add(1, Ordering::SeqCst);
            Ok::<_, io::Error>(Counted { stream, open })
        }
    });
    let builder = WsClient::builder(URL)?
        .connector(WsConnector::new().with_transport(transport))
        .heartbeat(HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT);
    let builder = if heartbeat {
        builder
    } else {
        builder.no_heartbeat()
    };
    let builder = if at_least_once {
        builder.at_least_once(parse_ack)
    } else {
        builder
    };
    let (client, incoming) = builder
        .backoff(Schedule::new(BACKOFF_MS.map(ms))?)
        .close_step_timeout(CLOSE_STEP_TIMEOUT)
        .layer(|layer| {
            layer
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_close_timeout(CLOSE_TIMEOUT)
                .with_stable_after(STABLE_AFTER)
        })
        .build()?;
    Ok((client, incoming, open))
}

async fn client(
    plan: Plan,
    seed: u64,
    record: Arc<Mutex<ClientRecord>>,
    server: Arc<Mutex<ServerRecord>>,
) -> turmoil::Result {
    let (client, mut incoming, open) = new_client(true)?;
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
    let incoming_reader = tokio::spawn(async move { while incoming.next().await.is_some() {} });

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
    // Dropping the client and every handle stops the driver, which ends the incoming stream.
    drop(client);
    drop(handle);
    timeout(Duration::from_secs(5), incoming_reader).await??;
    // The driver closed what was open when it stopped.
    sleep(CLOSE_TIMEOUT).await;
    let streams = open.load(Ordering::SeqCst);
    if streams != 0 {
        return Err(format!("{streams} streams still open after the client shut down").into());
    }
    lock(&record).summary = Some(ClientSummary {
        sent,
        acknowledged: stats.acknowledged,
        resent: stats.resent,
        installed: ledger.installed,
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

/// Sends `<seq>:<payload>` steadily until told to stop, never waiting long: mostly `feed_with`,
/// sometimes `send_with` or `flush` bounded by a short timeout (dropping the future withdraws
/// nothing).
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
    /// From the end of the outage to the start of the connection that lasted.
    reconnect: Duration,
    /// From the start of the outage to the client leaving `Connected`, if it did.
    detected: Option<Duration>,
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
    server_sessions: u64,
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
            .rfind(|t| t.at < until)
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
        // When the client left `Connected` because of the outage (a failure of the installed
        // connection), if it did.
        let detected = record
            .transitions
            .iter()
            .find(|t| t.at >= outage.start && t.at < until && t.kind != Kind::Connected)
            .map(|t| t.at - outage.start);
        let noticed = detected.is_some()
            || record
                .transitions
                .iter()
                .rfind(|t| t.at < outage.start)
                .is_some_and(|t| t.epoch != last_connected.epoch);
        let duration = outage.end - outage.start;
        if reconnect > RECONNECT_BOUND {
            return fail(format!(
                "outage {} ({:?}, {duration:?}): connected again {reconnect:?} after it ended, \
                 more than the connect timeout + the maximum backoff ({RECONNECT_BOUND:?})",
                i + 1,
                outage.kind,
            ));
        }
        // A crash sends FIN (or RST) at once; a hold is found by the heartbeat, within one
        // round, once it lasts longer than a round.
        let must_notice = match outage.kind {
            OutageKind::Crash => true,
            OutageKind::Hold => duration > HEARTBEAT_ROUND + ms(10),
        };
        match detected {
            Some(after) if after > HEARTBEAT_ROUND + ms(10) => {
                return fail(format!(
                    "outage {} ({:?}, {duration:?}) was noticed only {after:?} after it began \
                     (heartbeat round {HEARTBEAT_ROUND:?})",
                    i + 1,
                    outage.kind,
                ));
            }
            None if must_notice => {
                return fail(format!(
                    "outage {} ({:?}, {duration:?}) went unnoticed",
                    i + 1,
                    outage.kind
                ));
            }
            _ => {}
        }
        recoveries.push(Recovery {
            kind: outage.kind,
            reconnect,
            detected,
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
        server_sessions: server.sessions,
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
    let mut reconnects: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut detections: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
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
        reconnects.entry(key).or_default().push(recovery.reconnect);
        if let Some(detected) = recovery.detected {
            detections.entry(key).or_default().push(detected);
        }
    }
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let duplicates: u64 = reports.iter().map(|r| r.duplicates).sum();
    let resent: u64 = reports.iter().map(|r| r.resent).sum();
    let installed: u64 = reports.iter().map(|r| r.installed).sum();
    let sessions: u64 = reports.iter().map(|r| r.server_sessions).sum();
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
         {resent} re-sent by the client"
    );
    println!(
        "  connections: {installed} installed by the client, {sessions} WebSocket sessions on \
         {lives} server lives"
    );
    println!(
        "  end: {ends_connected} seeds end connected, {} idle; {unnoticed_holds} holds too short \
         to be noticed",
        reports.len() - ends_connected
    );
    let quantiles = |times: &mut Vec<Duration>| {
        times.sort_unstable();
        let pick = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        (pick(0.5), pick(0.99), pick(1.0))
    };
    for (what, mut times) in detections {
        let (median, p99, max) = quantiles(&mut times);
        println!(
            "  noticed {what:<18} n={:<5} median {:>4} ms, p99 {:>4} ms, max {:>4} ms after it \
             began (heartbeat round {} ms)",
            times.len(),
            median.as_millis(),
            p99.as_millis(),
            max.as_millis(),
            HEARTBEAT_ROUND.as_millis()
        );
    }
    for (what, mut times) in reconnects {
        let (median, p99, max) = quantiles(&mut times);
        println!(
            "  reconnected after {what:<18} n={:<5} median {:>4} ms, p99 {:>4} ms, max {:>4} ms \
             after it ended (bound {} ms: min margin {} ms)",
            times.len(),
            median.as_millis(),
            p99.as_millis(),
            max.as_millis(),
            RECONNECT_BOUND.as_millis(),
            (RECONNECT_BOUND - max).as_millis()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Reproductions of bugs found in src/ws under write backpressure. turmoil's TCP has a window of
// 64 segments per direction (`Builder::tcp_capacity`): a writer whose peer reads nothing (a held
// link) blocks once 64 segments are in flight, as a real socket blocks once its send buffer is
// full. The randomized test above stays below that window (a message every 15-45 ms, a held link
// noticed within a heartbeat round); these scenarios go past it, each guarding a fix.

/// One scripted client against the server above; `timeline` runs after every step with the
/// simulated time (to hold and release the link).
fn scenario<Fut>(
    seed: u64,
    script: impl FnOnce(Arc<Mutex<ServerRecord>>) -> Fut,
    mut timeline: impl FnMut(&mut turmoil::Sim<'_>, Duration),
) -> Result<(), String>
where
    Fut: std::future::Future<Output = turmoil::Result> + 'static,
{
    let record = Arc::new(Mutex::new(ServerRecord::default()));
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .tick_duration(TICK)
        .max_message_latency(MAX_LATENCY)
        .simulation_duration(Duration::from_secs(30))
        .build();
    let for_host = Arc::clone(&record);
    sim.host(SERVER, move || server(Arc::clone(&for_host)));
    sim.client(CLIENT, script(Arc::clone(&record)));
    loop {
        match sim.step() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => return Err(format!("seed {seed}: {error}")),
        }
        let t = sim.elapsed();
        timeline(&mut sim, t);
    }
}

/// Holds the link from `from` to `to`.
fn hold_between(from: Duration, to: Duration) -> impl FnMut(&mut turmoil::Sim<'_>, Duration) {
    move |sim, t| {
        if t == from {
            sim.hold(CLIENT, SERVER);
        } else if t == to {
            sim.release(CLIENT, SERVER);
        }
    }
}

async fn sleep_until_sim(at: Duration) {
    sleep(at.saturating_sub(now())).await;
}

async fn connected(handle: &Handle) -> SimResult {
    let mut states = handle.subscribe();
    timeout(Duration::from_secs(2), states.wait_for(State::is_connected)).await??;
    Ok(())
}

fn drain_incoming(mut incoming: Incoming) {
    tokio::spawn(async move { while incoming.next().await.is_some() {} });
}

/// Waits for every message to be acknowledged (5 s at most), then lists the sequence numbers
/// the server never saw.
async fn lost_after_acks(client: &WsClient, server: &Mutex<ServerRecord>) -> Vec<u64> {
    let lost = || {
        let sent = client.stats().accepted;
        let server = lock(server);
        (1..=sent)
            .filter(|seq| !server.seen.contains_key(seq))
            .collect::<Vec<_>>()
    };
    // Held until acknowledged (at-least-once) or written; then, without acknowledgements,
    // what was written still has to cross the simulated network.
    let _ = timeout(Duration::from_secs(5), async {
        while client.stats().held > 0 || !lost().is_empty() {
            sleep(ms(5)).await;
        }
    })
    .await;
    lost()
}

/// The heartbeat notices a half-open connection while a write is blocked (a regression test:
/// an earlier client awaited its writes inside the loop that kept the pong deadline, so a
/// chatty client stayed `Connected` for the whole hold of the link, found only by TCP's own
/// retransmission timeout). Writes and deadlines now run side by side in the connection's loop:
/// the failure comes within `interval + timeout` (450 ms here).
#[test]
fn heartbeat_notices_a_held_link_under_write_backpressure() {
    const HOLD: Duration = Duration::from_millis(500);
    const RELEASE: Duration = Duration::from_millis(4500);
    let script = |_server| async move {
        let (client, incoming, _) = new_client(true)?;
        drain_incoming(incoming);
        let handle = client.handle().clone();
        handle.connect()?;
        connected(&handle).await?;
        let feeder = client.clone();
        tokio::spawn(async move {
            while feeder
                .feed_with(|seq| Message::text(format!("{seq}:chatty")))
                .is_ok()
            {
                sleep(ms(2)).await;
            }
        });
        sleep_until_sim(HOLD).await;
        let mut states = handle.subscribe();
        let noticed = timeout(RELEASE - HOLD, states.wait_for(|s| !s.is_connected())).await;
        let after = now() - HOLD;
        let bound = HEARTBEAT_INTERVAL + HEARTBEAT_TIMEOUT + ms(100);
        if noticed.is_err() || after > bound {
            return Err(format!(
                "the link was held at {HOLD:?}; the client noticed {} (heartbeat \
                 {HEARTBEAT_INTERVAL:?} + {HEARTBEAT_TIMEOUT:?}); {:?}",
                if noticed.is_err() {
                    format!("nothing during the {:?} hold", RELEASE - HOLD)
                } else {
                    format!("it only {after:?} later")
                },
                client.stats()
            )
            .into());
        }
        Ok(())
    };
    if let Err(error) = scenario(1, script, hold_between(HOLD, RELEASE)) {
        panic!("{error}");
    }
}

/// A `send` (or `flush`) future dropped while its message is being written loses nothing (a
/// regression test: an earlier client wrote from the caller's task and dropped the batch with
/// the future, so at-least-once could not re-send it and `held` never returned to 0).
///
/// The scenario: no heartbeat (so that the heartbeat plays no part); the link is held from 200 ms to
/// 1500 ms while a message is sent every 2 ms with a 5 ms timeout; at 2 s the server crashes and
/// restarts, the client reconnects and re-sends what was not acknowledged.
#[test]
fn a_dropped_send_future_loses_nothing_under_backpressure() {
    let script = |server: Arc<Mutex<ServerRecord>>| async move {
        let (client, incoming, _) = new_client(false)?;
        drain_incoming(incoming);
        let handle = client.handle().clone();
        handle.connect()?;
        connected(&handle).await?;
        let mut timed_out = 0;
        for _ in 0..200 {
            let send = client.send_with(|seq| Message::text(format!("{seq}:impatient")));
            timed_out += timeout(ms(5), send).await.is_err() as u32;
            sleep(ms(2)).await;
        }
        sleep_until_sim(ms(2500)).await;
        connected(&handle).await?;
        let lost = lost_after_acks(&client, &server).await;
        let flushed = timeout(Duration::from_secs(1), client.flush())
            .await
            .is_ok();
        if !lost.is_empty() || client.stats().held > 0 || !flushed {
            return Err(format!(
                "{timed_out} sends timed out during the hold; after the reconnect {} messages \
                 are lost: {lost:?}; {:?}, flush() {}, state {}",
                lost.len(),
                client.stats(),
                if flushed {
                    "completes"
                } else {
                    "never completes"
                },
                handle.state()
            )
            .into());
        }
        Ok(())
    };
    let mut hold = hold_between(ms(200), ms(1500));
    let timeline = move |sim: &mut turmoil::Sim<'_>, t: Duration| {
        hold(sim, t);
        if t == ms(2000) {
            sim.crash(SERVER);
        } else if t == ms(2100) {
            sim.bounce(SERVER);
        }
    };
    if let Err(error) = scenario(2, script, timeline) {
        panic!("{error}");
    }
}

/// A `disconnect` while the connection's writes are blocked loses nothing (a regression test:
/// an earlier client dropped the batch being written at the release, and the graceful close
/// dropped the next). What a release cuts goes back to the queue and is written, in order, on
/// the next connection.
///
/// The scenario: no heartbeat; the link is held from 100 ms to 1000 ms; 150 messages are fed
/// from 150 ms, one a millisecond (the window fills after 64); `disconnect()` at 400 ms;
/// `connect()` at 1200 ms.
#[test]
fn a_disconnect_during_a_blocked_write_loses_nothing() {
    blocked_write_then_disconnect(true);
}

/// The same without acknowledgements: the cut batch is written again on the next connection.
#[test]
fn a_disconnect_during_a_blocked_write_loses_nothing_without_acknowledgements() {
    blocked_write_then_disconnect(false);
}

fn blocked_write_then_disconnect(at_least_once: bool) {
    let script = move |server: Arc<Mutex<ServerRecord>>| async move {
        let (client, incoming, _) = new_client_with(false, at_least_once)?;
        drain_incoming(incoming);
        let handle = client.handle().clone();
        handle.connect()?;
        connected(&handle).await?;
        sleep_until_sim(ms(150)).await;
        for _ in 0..150 {
            client.feed_with(|seq| Message::text(format!("{seq}:queued")))?;
            sleep(ms(1)).await;
        }
        sleep_until_sim(ms(400)).await;
        handle.disconnect().await;
        sleep_until_sim(ms(1200)).await;
        handle.connect()?;
        connected(&handle).await?;
        let lost = lost_after_acks(&client, &server).await;
        if !lost.is_empty() || client.stats().held > 0 {
            return Err(format!(
                "{} messages lost: {lost:?}; {:?}, state {}",
                lost.len(),
                client.stats(),
                handle.state()
            )
            .into());
        }
        Ok(())
    };
    let timeline = hold_between(ms(100), ms(1000));
    if let Err(error) = scenario(3, script, timeline) {
        panic!("{error}");
    }
}
