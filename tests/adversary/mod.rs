//! A WebSocket peer on 127.0.0.1 that misbehaves on cue: it stops reading and starts again,
//! reads slowly, greets with frames of its own (an acknowledgement ahead of the writes, say),
//! answers a Close with data first, or holds its reply. It records what each connection
//! delivered, by the tag of each message (the text before the first `|`), and when each socket
//! reached its end.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Message;

/// What the peer does on each connection.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// Frames sent right after the handshake.
    pub greet: Vec<Message>,
    /// Echo each data message back.
    pub echo: bool,
    /// Answer each data message `<n>|...` with `ack:<n>`.
    pub ack: bool,
    /// How long to hold the reply to a Close.
    pub close_reply_delay: Duration,
    /// How long to wait before reading each frame (a slow reader).
    pub read_delay: Duration,
}

/// What one connection delivered.
#[derive(Clone, Debug, Default)]
pub struct Conn {
    /// The tags of the data messages received, in order.
    pub tags: Vec<String>,
    /// Pings received.
    pub pings: usize,
    /// Pongs received (answers to pings the peer sent).
    pub pongs: usize,
    /// The code of the client's Close, if one arrived.
    pub close: Option<u16>,
    /// The socket reached its end (EOF, reset, or a completed close).
    pub ended: bool,
}

#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    /// Whether all connections stop reading, and which ones stop whatever that says.
    stopped: watch::Sender<(bool, BTreeSet<usize>)>,
    conns: watch::Sender<Vec<Conn>>,
    say: broadcast::Sender<Message>,
}

/// The tag of a message: its text (or UTF-8 bytes) up to the first `|`.
pub fn tag_of(message: &Message) -> Option<String> {
    let bytes: &[u8] = match message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        _ => return None,
    };
    let end = bytes.iter().position(|b| *b == b'|').unwrap_or(bytes.len());
    Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// A text message `tag|` followed by `pad` bytes of padding.
pub fn tagged(tag: &str, pad: usize) -> Message {
    let mut text = String::with_capacity(tag.len() + 1 + pad);
    text.push_str(tag);
    text.push('|');
    text.extend(std::iter::repeat_n('x', pad));
    Message::text(text)
}

impl Peer {
    pub async fn start(script: Script) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = Peer {
            addr: listener.local_addr().unwrap(),
            script: Arc::new(Mutex::new(script)),
            stopped: watch::Sender::new((false, BTreeSet::new())),
            conns: watch::Sender::new(Vec::new()),
            say: broadcast::Sender::new(16),
        };
        let serving = peer.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let _ = socket.set_nodelay(true);
                let mut n = 0;
                serving.conns.send_modify(|c| {
                    c.push(Conn::default());
                    n = c.len() - 1;
                });
                let script = serving.script.lock().unwrap().clone();
                let peer = serving.clone();
                // Before the handshake: whatever is said once the client is connected arrives.
                let say = serving.say.subscribe();
                tokio::spawn(async move {
                    peer.session(n, socket, script, say).await;
                    peer.conns.send_modify(|c| c[n].ended = true);
                });
            }
        });
        peer
    }

    pub fn url(&self) -> String {
        format!("ws://{}/socket", self.addr)
    }

    /// The script of the connections accepted from now on.
    pub fn set_script(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    /// Every connection, open or to come, stops reading (the client's writes back up) until
    /// [`Peer::read`].
    pub fn stop_reading(&self) {
        self.stopped.send_modify(|(all, _)| *all = true);
    }

    pub fn read(&self) {
        self.stopped.send_modify(|(all, _)| *all = false);
    }

    /// Connection `n` (0 for the first) stops reading until [`Peer::read_on`].
    pub fn stop_reading_on(&self, n: usize) {
        self.stopped.send_modify(|(_, some)| {
            some.insert(n);
        });
    }

    pub fn read_on(&self, n: usize) {
        self.stopped.send_modify(|(_, some)| {
            some.remove(&n);
        });
    }

    /// Every open connection sends `message` now, whether it reads or not.
    pub fn say(&self, message: Message) {
        let _ = self.say.send(message);
    }

    pub fn conns(&self) -> Vec<Conn> {
        self.conns.borrow().clone()
    }

    /// Every tag received, over every connection, in connection order.
    pub fn tags(&self) -> Vec<String> {
        self.conns().into_iter().flat_map(|c| c.tags).collect()
    }

    /// Whether `pred` comes to hold of the connections within `within`.
    pub async fn saw(&self, within: Duration, pred: impl Fn(&[Conn]) -> bool) -> bool {
        let mut rx = self.conns.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| pred(c)))
            .await
            .is_ok()
    }

    /// Waits, at most `within`, until `pred` holds of the connections.
    pub async fn wait_for(&self, within: Duration, what: &str, pred: impl Fn(&[Conn]) -> bool) {
        let mut rx = self.conns.subscribe();
        if tokio::time::timeout(within, rx.wait_for(|c| pred(c)))
            .await
            .is_err()
        {
            panic!(
                "the peer never saw {what} within {within:?}: {:?}",
                summary(&self.conns())
            );
        }
    }

    async fn session(
        &self,
        n: usize,
        socket: tokio::net::TcpStream,
        script: Script,
        mut say: broadcast::Receiver<Message>,
    ) {
        // No size limits: the tests send messages larger than tungstenite's default frame limit.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let Ok(ws) = tokio_tungstenite::accept_async_with_config(socket, Some(config)).await else {
            return;
        };
        let (mut tx, mut rx) = ws.split();
        for frame in &script.greet {
            if tx.send(frame.clone()).await.is_err() {
                return;
            }
        }
        let mut stopped = self.stopped.subscribe();
        loop {
            let frame = tokio::select! {
                said = say.recv() => match said {
                    Ok(message) => {
                        if tx.send(message).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                frame = async {
                    let reads = |(all, some): &(bool, BTreeSet<usize>)| !*all && !some.contains(&n);
                    loop {
                        stopped.wait_for(reads).await.ok()?;
                        if !script.read_delay.is_zero() {
                            tokio::time::sleep(script.read_delay).await;
                        }
                        // A read in progress stops when reading does.
                        tokio::select! {
                            frame = rx.next() => break frame,
                            _ = stopped.wait_for(|s| !reads(s)) => {}
                        }
                    }
                } => frame,
            };
            let Some(Ok(message)) = frame else {
                return;
            };
            match &message {
                Message::Text(_) | Message::Binary(_) => {
                    let tag = tag_of(&message).expect("data");
                    self.conns.send_modify(|c| c[n].tags.push(tag.clone()));
                    let reply = if script.ack {
                        Some(Message::text(format!("ack:{tag}")))
                    } else if script.echo {
                        Some(message.clone())
                    } else {
                        None
                    };
                    if let Some(reply) = reply {
                        if tx.send(reply).await.is_err() {
                            return;
                        }
                    }
                }
                Message::Ping(_) => self.conns.send_modify(|c| c[n].pings += 1),
                Message::Pong(_) => self.conns.send_modify(|c| c[n].pongs += 1),
                Message::Close(frame) => {
                    let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                    self.conns.send_modify(|c| c[n].close = Some(code));
                    if !script.close_reply_delay.is_zero() {
                        tokio::time::sleep(script.close_reply_delay).await;
                    }
                    // tungstenite queued the reply to the Close; flushing sends it.
                    let _ = tx.flush().await;
                    while let Some(Ok(_)) = rx.next().await {}
                    return;
                }
                _ => {}
            }
        }
    }
}

/// Sockets of this process connected to 127.0.0.1:`port`: the client's side of the peer's
/// connections (the peer's own sockets have `port` as their local port).
pub fn sockets_to(port: u16) -> usize {
    let inodes: std::collections::BTreeSet<u64> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let remote = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .filter(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns.len() > 9
                && columns[2] == remote
                && columns[9]
                    .parse::<u64>()
                    .is_ok_and(|inode| inodes.contains(&inode))
        })
        .count()
}

fn summary(conns: &[Conn]) -> Vec<String> {
    conns
        .iter()
        .map(|c| {
            let mut tags = c.tags.clone();
            if tags.len() > 12 {
                let n = tags.len();
                tags.drain(6..n - 6);
                tags.insert(6, format!("...{} more...", n - 12));
            }
            format!("{tags:?} close={:?} ended={}", c.close, c.ended)
        })
        .collect()
}
