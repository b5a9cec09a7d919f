//! An in-process WebSocket server on 127.0.0.1 whose behaviour each test scripts: echo, close
//! with a code, drop, stop answering, reject, answer garbage; it records what it saw.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tower_epoch::State;
use tower_epoch::ws::WsClient;

/// What the server does with the next connections.
#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    /// Echo text and binary; answer `<seq>:<x>` with `ack:<seq>` when `ack` is set.
    Echo { ack: bool },
    /// Record `<seq>:<x>` messages and acknowledge only every `n`th (cumulatively); hold the
    /// reply to a Close for the given time.
    AckEvery(u64, Duration),
    /// Echo, and close with this code after the first message.
    CloseAfterFirst(u16),
    /// Drop the socket without a Close after the first message.
    DropAfterFirst,
    /// Accept TCP, never answer the upgrade.
    SilentHandshake,
    /// Answer the upgrade with 503.
    Reject503,
    /// Answer the upgrade with garbage.
    Malformed,
    /// Complete the upgrade, then never read again (no pongs, Close never answered).
    StopReading,
    /// Echo, but hold the reply to a Close for this long.
    SlowClose(Duration),
    /// Echo, but answer a Close never (keep reading, never reply).
    IgnoreClose,
}

/// What the server saw, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Accepted(usize),
    Text(usize, String),
    Ping(usize),
    Close(usize, Option<(u16, String)>),
    /// The socket of connection `n` reached end-of-file or was dropped by the server.
    Ended(usize),
}

#[derive(Clone)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
    events: watch::Sender<Vec<Event>>,
    behaviour: Arc<Mutex<Behaviour>>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl TestServer {
    pub async fn start(behaviour: Behaviour) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = TestServer {
            addr: listener.local_addr().unwrap(),
            accepts: Arc::default(),
            events: watch::Sender::new(Vec::new()),
            behaviour: Arc::new(Mutex::new(behaviour)),
            task: Arc::default(),
        };
        server.serve(listener);
        server
    }

    pub fn url(&self) -> String {
        format!("ws://{}/socket", self.addr)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn serve(&self, listener: TcpListener) {
        let server = self.clone();
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                let n = server.accepts.fetch_add(1, Ordering::SeqCst) + 1;
                server.push(Event::Accepted(n));
                let behaviour = server.behaviour.lock().unwrap().clone();
                let events = server.clone();
                sessions.spawn(async move {
                    session(n, socket, behaviour, &events).await;
                    events.push(Event::Ended(n));
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Drops the listener and every socket without a Close.
    pub async fn crash(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    pub async fn restart(&self) {
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(self.addr).await {
                self.serve(listener);
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("could not bind {} again", self.addr);
    }

    fn push(&self, event: Event) {
        self.events.send_modify(|events| events.push(event));
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.borrow().clone()
    }

    /// Texts received, in order, over every connection.
    pub fn texts(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Text(_, t) => Some(t),
                _ => None,
            })
            .collect()
    }

    /// Waits (bounded) until `pred` holds of the events.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Event]) -> bool) {
        let mut rx = self.events.subscribe();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|e| pred(e)))
            .await
            .unwrap_or_else(|_| panic!("server never saw {what}: {:?}", self.events()))
            .unwrap();
    }

    /// Every accepted socket has ended.
    pub async fn wait_all_ended(&self) {
        self.wait_for("every socket end", |events| {
            let accepted = events
                .iter()
                .filter(|e| matches!(e, Event::Accepted(_)))
                .count();
            let ended = events
                .iter()
                .filter(|e| matches!(e, Event::Ended(_)))
                .count();
            accepted == ended
        })
        .await;
    }
}

async fn session(n: usize, mut socket: TcpStream, behaviour: Behaviour, server: &TestServer) {
    match behaviour {
        Behaviour::SilentHandshake => {
            // Read the request and say nothing until the client goes away.
            let mut buf = [0u8; 1024];
            while matches!(socket.read(&mut buf).await, Ok(k) if k > 0) {}
            return;
        }
        Behaviour::Reject503 | Behaviour::Malformed => {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let answer: &[u8] = if behaviour == Behaviour::Reject503 {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nthis is not a websocket upgrade\r\n\r\n"
            };
            let _ = socket.write_all(answer).await;
            let _ = socket.shutdown().await;
            return;
        }
        _ => {}
    }
    let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else {
        return;
    };
    if behaviour == Behaviour::StopReading {
        // Hold the socket and read nothing, for a while.
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(ws);
        return;
    }
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Text(text) => {
                server.push(Event::Text(n, text.to_string()));
                let reply = match (text.split_once(':'), &behaviour) {
                    (Some((seq, _)), Behaviour::Echo { ack: true }) => {
                        Message::text(format!("ack:{seq}"))
                    }
                    (Some((seq, _)), Behaviour::AckEvery(n, _)) => match seq.parse::<u64>() {
                        Ok(seq) if seq % n == 0 => Message::text(format!("ack:{seq}")),
                        _ => continue,
                    },
                    _ => Message::Text(text),
                };
                if ws.send(reply).await.is_err() {
                    return;
                }
                match behaviour {
                    Behaviour::CloseAfterFirst(code) => {
                        let _ = ws
                            .close(Some(CloseFrame {
                                code: CloseCode::from(code),
                                reason: "server says bye".into(),
                            }))
                            .await;
                        // Wait for the client's reply to complete the handshake.
                        while let Some(Ok(_)) = ws.next().await {}
                        return;
                    }
                    Behaviour::DropAfterFirst => return,
                    _ => {}
                }
            }
            Message::Binary(data) => {
                let _ = ws.send(Message::Binary(data)).await;
            }
            Message::Ping(_) => server.push(Event::Ping(n)),
            Message::Close(frame) => {
                server.push(Event::Close(
                    n,
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                ));
                match behaviour {
                    Behaviour::SlowClose(delay) | Behaviour::AckEvery(_, delay) => {
                        tokio::time::sleep(delay).await;
                        let _ = ws.flush().await;
                    }
                    Behaviour::IgnoreClose => {
                        // Never reply: any further read or flush would send tungstenite's
                        // queued reply, so hold the socket untouched for a while.
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        drop(ws);
                        return;
                    }
                    _ => {
                        let _ = ws.flush().await;
                    }
                }
                return;
            }
            _ => {}
        }
    }
}

/// Waits (bounded) for a client state matching `pred`.
pub async fn wait_state(client: &WsClient, what: &str, pred: impl Fn(&State) -> bool) -> State {
    let mut states = client.handle().subscribe();
    tokio::time::timeout(Duration::from_secs(5), states.wait_for(|s| pred(s)))
        .await
        .unwrap_or_else(|_| panic!("state never {what}: {}", client.handle().state()))
        .unwrap()
        .clone()
}

/// The `WsError` behind a `WaitingToRetry` state's last error.
pub fn ws_error(state: &State) -> Option<String> {
    let State::WaitingToRetry { last_error, .. } = state else {
        return None;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&**last_error);
    while let Some(error) = source {
        if let Some(ws) = error.downcast_ref::<tower_epoch::ws::WsError>() {
            return Some(format!("{ws:?}"));
        }
        if let Some(tower_epoch::Error::ConnectTimeout(_)) = error.downcast_ref() {
            return Some("ConnectTimeout".into());
        }
        source = error.source();
    }
    None
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits (bounded) until the client holds exactly `n` messages (queued or unacknowledged).
pub async fn wait_held(client: &WsClient, n: u64) {
    tokio::time::timeout(Duration::from_secs(2), async {
        while client.stats().held != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("holding {:?}, expected {n}", client.stats()));
}

/// Waits (bounded) until the client has written at least `n` messages.
pub async fn wait_written(client: &WsClient, n: u64) {
    tokio::time::timeout(Duration::from_secs(2), async {
        while client.stats().written < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("written {:?}, expected {n}", client.stats()));
}
