//! Back/forward navigation over a WebSocket, the way the Phoenix client meets it in a browser.
//!
//! ```text
//! cargo run --example navigation
//! ```
//!
//! An in-process WebSocket server (tokio-tungstenite on 127.0.0.1, an ephemeral port) echoes
//! acknowledgements; a [`WsClient`] talks to it through the reconnect layer, in at-least-once
//! mode, while a producer sends a numbered message every few milliseconds. The timeline:
//!
//! 1. connect;
//! 2. the user navigates back and forward quickly, again and again: `suspend()` (`pagehide`),
//!    then `resume(token)` (`pageshow`) while the old socket's graceful close is still in flight
//!    (the server answers Close slowly), early, midway and late inside that window;
//! 3. `disconnect()` and then a navigation: the stale token must not reconnect;
//! 4. the server crashes (every socket dropped without a Close) and comes back on the same port;
//! 5. the producer stops, every message is acknowledged, the client disconnects.
//!
//! Each state change is printed with its epoch. The summary counts connections (opened,
//! installed, discarded, closed) and messages (sent, acknowledged, lost); lost must be 0, and
//! the program exits non-zero if any check fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{Message, WsClient};
use tower_epoch::{BoxError, State};

/// How long the server takes to answer a Close: the teardown window navigation races.
const SLOW_CLOSE: Duration = Duration::from_millis(300);
/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(5);

fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

macro_rules! say {
    ($($arg:tt)*) => { println!("[{:>5} ms] {}", started().elapsed().as_millis(), format_args!($($arg)*)) };
}

#[tokio::main]
async fn main() {
    started();
    match run().await {
        Ok(()) => say!("all invariants hold"),
        Err(error) => {
            eprintln!("navigation FAILED: {error}");
            std::process::exit(1);
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let server = Server::start().await?;
    let (client, mut incoming) = WsClient::builder(format!("ws://{}/socket", server.addr))?
        .at_least_once(|message| {
            let text = message.to_text().ok()?;
            text.strip_prefix("ack:")?.parse().ok()
        })
        .heartbeat(Duration::from_millis(500), Duration::from_millis(400))
        .backoff(Schedule::phoenix())
        .layer(|layer| {
            layer
                .with_connect_timeout(Duration::from_secs(1))
                .with_close_timeout(Duration::from_secs(1))
                .with_stable_after(Duration::from_millis(500))
        })
        .build()?;
    let handle = client.handle().clone();
    let timeline = tokio::spawn(print_timeline(handle.subscribe()));
    // Acknowledgements arrive on the incoming stream, tagged with their connection's epoch.
    let acks = tokio::spawn(async move {
        let mut per_epoch = BTreeMap::new();
        while let Some(received) = incoming.next().await {
            *per_epoch.entry(received.epoch).or_insert(0u32) += 1;
        }
        per_epoch
    });

    say!("── 1. connect");
    handle.connect()?;
    wait_connected(&handle).await?;
    let producer = Producer::start(client.clone());

    say!("── 2. back/forward navigation inside the teardown window, repeatedly");
    for inside in [10, 150, 290, 40, 220] {
        sleep(Duration::from_millis(120)).await; // the user reads the page
        let token = handle
            .suspend()
            .ok_or("suspend while connected gives a token")?;
        say!("pagehide  → suspend() at {}", token.epoch());
        sleep(Duration::from_millis(inside)).await;
        // Disconnecting: the suspended connection's graceful close is still in flight.
        let closing = matches!(handle.state(), State::Disconnecting { .. });
        let epoch = handle.resume(token)?;
        say!(
            "pageshow  → resume() {inside} ms into a {} ms close ({}) → {epoch}",
            SLOW_CLOSE.as_millis(),
            if closing {
                "still closing"
            } else {
                "already closed"
            }
        );
        wait_connected(&handle).await?;
        check(
            handle.state().epoch() == Some(epoch),
            "the resumed connection is the newest epoch",
        )?;
    }

    say!("── 3. disconnect(), then a navigation: the stale token does nothing");
    let token = handle.suspend().ok_or("connected")?;
    let attempts = handle.ledger().attempts;
    handle.disconnect().await;
    check(
        handle.resume(token).is_err(),
        "resume after a disconnect is refused (a latent Phoenix bug)",
    )?;
    sleep(Duration::from_millis(500)).await;
    check(
        matches!(handle.state(), State::Idle) && handle.ledger().attempts == attempts,
        format!(
            "still idle, no new attempt: the user's disconnect holds ({}, {:?})",
            handle.state(),
            handle.ledger()
        ),
    )?;
    handle.connect()?;
    wait_connected(&handle).await?;

    say!("── 4. the server crashes and comes back");
    server.crash().await;
    sleep(Duration::from_millis(300)).await;
    server.restart().await?;
    wait_connected(&handle).await?;

    say!("── 5. the producer stops; wait for every acknowledgement");
    let sent = producer.stop().await?;
    timeout(WAIT, async {
        while client.stats().held > 0 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .map_err(|_| format!("unacknowledged messages left: {:?}", client.stats()))?;
    handle.disconnect().await;

    let stats = client.stats();
    let ledger = handle.ledger();
    let received = server.received();
    let lost: Vec<u64> = (1..=sent)
        .filter(|seq| !received.contains_key(seq))
        .collect();
    let duplicates: u32 = received.values().map(|n| n - 1).sum();
    drop(client);
    drop(handle);
    let last = timeout(WAIT, timeline).await??;
    let per_epoch = timeout(WAIT, acks).await??;

    say!("── summary");
    say!(
        "connections: {} attempts, {} opened, {} installed, {} discarded, {} closed ({} cut)",
        ledger.attempts,
        ledger.opened,
        ledger.installed,
        ledger.discarded,
        ledger.closed,
        ledger.close_timeouts
    );
    say!(
        "messages:    {sent} sent, {} acknowledged, {} lost; {} re-sent (unacknowledged when their \
         connection ended), {duplicates} of them seen twice by the server",
        stats.acknowledged,
        lost.len(),
        stats.resent
    );
    say!("acks by epoch: {per_epoch:?}");
    check(lost.is_empty(), format!("no message lost ({lost:?})"))?;
    check(stats.acknowledged == sent, "every message acknowledged")?;
    check(
        ledger.opened == ledger.installed + ledger.discarded,
        "every connection installed or discarded",
    )?;
    check(ledger.closed == ledger.opened, "every connection closed")?;
    check(
        ledger.installed >= 8,
        "a connection per navigation and reconnect",
    )?;
    check(
        matches!(last, State::Shutdown),
        "the driver stopped with its last user",
    )?;
    server.stop();
    Ok(())
}

async fn wait_connected(handle: &tower_epoch::Handle) -> Result<(), BoxError> {
    let mut states = handle.subscribe();
    timeout(WAIT, states.wait_for(State::is_connected)).await??;
    Ok(())
}

fn check(ok: bool, what: impl std::fmt::Display) -> Result<(), BoxError> {
    if ok {
        say!("  ✔ {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

async fn print_timeline(mut states: watch::Receiver<State>) -> State {
    loop {
        let state = states.borrow_and_update().clone();
        say!("state: {state}");
        if matches!(state, State::Shutdown) || states.changed().await.is_err() {
            return state;
        }
    }
}

/// Sends `<seq>:<payload>` every 15 ms without waiting: messages queue while disconnected.
struct Producer {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<u64, BoxError>>,
}

impl Producer {
    fn start(client: WsClient) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut last = 0;
            while !*stopped.borrow() {
                last = client.feed_with(|seq| Message::text(format!("{seq}:hello")))?;
                let _ = timeout(Duration::from_millis(15), stopped.changed()).await;
            }
            Ok(last)
        });
        Producer { stop, task }
    }

    async fn stop(self) -> Result<u64, BoxError> {
        self.stop.send_replace(true);
        timeout(WAIT, self.task).await??
    }
}

/// The server: acknowledges every `<seq>:<payload>` with `ack:<seq>`, answers Close slowly, and
/// can crash (drop every socket without a Close) and restart on the same port.
struct Server {
    addr: SocketAddr,
    received: Arc<Mutex<BTreeMap<u64, u32>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Server {
    async fn start() -> Result<Arc<Server>, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let server = Arc::new(Server {
            addr: listener.local_addr()?,
            received: Arc::default(),
            task: Mutex::new(None),
        });
        server.serve(listener);
        say!("server: listening on {}", server.addr);
        Ok(server)
    }

    fn serve(&self, listener: TcpListener) {
        let received = Arc::clone(&self.received);
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                sessions.spawn(session(socket, Arc::clone(&received)));
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    async fn crash(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        say!("server: crashed (every socket dropped without a Close)");
    }

    async fn restart(&self) -> Result<(), BoxError> {
        for _ in 0..50 {
            if let Ok(listener) = TcpListener::bind(self.addr).await {
                self.serve(listener);
                say!("server: back on {}", self.addr);
                return Ok(());
            }
            sleep(Duration::from_millis(20)).await;
        }
        Err("could not bind the server's port again".into())
    }

    fn received(&self) -> BTreeMap<u64, u32> {
        self.received.lock().unwrap().clone()
    }

    fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

async fn session(socket: tokio::net::TcpStream, received: Arc<Mutex<BTreeMap<u64, u32>>>) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else {
        return;
    };
    // Acknowledge cumulatively, every fourth message or after a short pause, like a server
    // that batches its replies: a crash leaves a few messages written and unacknowledged.
    let mut unacked: Option<u64> = None;
    loop {
        let next = match unacked {
            Some(_) => match timeout(Duration::from_millis(40), ws.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let seq = unacked.take().expect("some");
                    if ws.send(Message::text(format!("ack:{seq}"))).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
            None => ws.next().await,
        };
        let Some(Ok(message)) = next else { return };
        match message {
            Message::Text(text) => {
                let Some(Ok(seq)) = text.split_once(':').map(|(seq, _)| seq.parse::<u64>()) else {
                    continue;
                };
                *received.lock().unwrap().entry(seq).or_insert(0) += 1;
                unacked = Some(seq);
                if seq % 4 == 0 {
                    unacked = None;
                    if ws.send(Message::text(format!("ack:{seq}"))).await.is_err() {
                        return;
                    }
                }
            }
            Message::Close(_) => {
                // tungstenite queued the reply; it goes out with the next flush.
                sleep(SLOW_CLOSE).await;
                let _ = ws.flush().await;
                return;
            }
            _ => {}
        }
    }
}
