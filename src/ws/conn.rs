//! One WebSocket connection as the layer manages it, its per-connection loop (the monitor) and
//! its graceful close (the teardown).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::future::poll_fn;
use std::sync::Mutex as StdMutex;
use std::task::ready;

use futures_util::{SinkExt, StreamExt, future};
use tokio::sync::{Mutex, Notify};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::client::{Drain, Pending, Received, Shared};
use super::connector::WsStream;
use super::error::WsError;
use crate::epoch::Epoch;
use crate::error::BoxError;
use crate::teardown::CloseCause;

/// A managed WebSocket connection: a cheap handle shared by the client's writers, its monitor
/// and its teardown.
#[derive(Clone)]
pub(crate) struct WsConn(Arc<ConnInner>);

pub(crate) struct ConnInner {
    /// The stream, locked for the length of one poll only: the reader and a writer take turns
    /// poll by poll, as a split stream would, without a lock per message.
    ws: StdMutex<WsStream>,
    /// One writer at a time, across polls: batches stay whole and in order.
    writer: Mutex<()>,
    /// The epoch it was installed at (never set for a connection discarded as stale).
    epoch: OnceLock<Epoch>,
    /// A writer failed on this connection: the monitor reports it.
    broken: Notify,
}

impl WsConn {
    pub(crate) fn new(stream: WsStream) -> Self {
        WsConn(Arc::new(ConnInner {
            ws: StdMutex::new(stream),
            writer: Mutex::new(()),
            epoch: OnceLock::new(),
            broken: Notify::new(),
        }))
    }

    fn ws(&self) -> std::sync::MutexGuard<'_, WsStream> {
        self.0.ws.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the writer's turn; hold it across a run of batches.
    pub(crate) async fn writer(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.writer.lock().await
    }

    /// Writes the batch's messages (clones: the batch keeps them until the flush has
    /// completed) and flushes once, taking the stream's lock once per poll rather than once per
    /// message. Call with the writer's turn held.
    pub(crate) async fn write_all(
        &self,
        batch: &VecDeque<Pending>,
    ) -> Result<(), tungstenite::Error> {
        let mut next = 0;
        poll_fn(|cx| {
            let mut ws = self.ws();
            while let Some(pending) = batch.get(next) {
                ready!(ws.poll_ready_unpin(cx))?;
                ws.start_send_unpin(pending.message.clone())?;
                next += 1;
            }
            ws.poll_flush_unpin(cx)
        })
        .await
    }

    /// Sends one message and flushes, taking the writer's turn.
    async fn send(&self, message: Message) -> Result<(), tungstenite::Error> {
        let _turn = self.writer().await;
        let mut message = Some(message);
        poll_fn(|cx| {
            let mut ws = self.ws();
            if message.is_some() {
                ready!(ws.poll_ready_unpin(cx))?;
                ws.start_send_unpin(message.take().expect("checked"))?;
            }
            ws.poll_flush_unpin(cx)
        })
        .await
    }

    /// Flushes what tungstenite has queued (a pong, a close reply), taking the writer's turn.
    async fn flush(&self) -> Result<(), tungstenite::Error> {
        let _turn = self.writer().await;
        poll_fn(|cx| self.ws().poll_flush_unpin(cx)).await
    }

    /// The next incoming message.
    async fn next(&self) -> Option<Result<Message, tungstenite::Error>> {
        poll_fn(|cx| self.ws().poll_next_unpin(cx)).await
    }

    pub(crate) fn mark_broken(&self) {
        self.0.broken.notify_one();
    }
}

/// The monitor: runs while the connection is installed. It re-queues unacknowledged messages
/// (at-least-once), writes what is queued, reads and delivers incoming messages tagged with the
/// epoch, answers pings, sends heartbeats, and ends with `Ok` on a normal close by the peer or
/// `Err` on any failure: the layer turns those into a release or a reconnect for this epoch.
///
/// Writes (the queue, pings, pong replies) run one at a time beside the reader and the
/// deadlines, never in their way: a write stuck on a peer that stopped reading cannot hold
/// back the pong deadline, so a half-open connection is still found.
pub(crate) async fn run(shared: Arc<Shared>, conn: WsConn, epoch: Epoch) -> Result<(), BoxError> {
    let incoming = shared.incoming().clone();
    let _ = conn.0.epoch.set(epoch);
    let _current = shared.install(epoch, conn.clone());

    let heartbeat = shared.settings.heartbeat;
    let mut next_ping = heartbeat.map(|h| Instant::now() + h.interval);
    let mut pong_due: Option<Instant> = None;
    let mut owed = Owed {
        drain: true,
        ..Owed::default()
    };
    let mut writing: Option<Write<'_>> = None;
    loop {
        if writing.is_none() {
            writing = owed
                .next()
                .map(|job| Box::pin(write(&shared, &conn, epoch, job)) as _);
        }
        let ping_at = next_ping.map(sleep_until);
        let pong_at = pong_due.map(sleep_until);
        tokio::select! {
            frame = conn.next() => match frame {
                Some(Ok(message)) => match message {
                    Message::Text(_) | Message::Binary(_) => {
                        shared.received(&message);
                        // Backpressure: a slow consumer slows the reader, nothing is dropped.
                        let _ = incoming.send(Received { epoch, message }).await;
                    }
                    // tungstenite queued the pong; write it out.
                    Message::Ping(_) => owed.flush = true,
                    Message::Pong(_) => pong_due = None,
                    // tungstenite queued the close reply; the teardown writes it.
                    Message::Close(frame) => {
                        return peer_closed(frame, shared.settings.reconnect_on_normal_close);
                    }
                    Message::Frame(_) => {}
                },
                Some(Err(error)) => return Err(WsError::from_transport(error).into()),
                None => return Err(WsError::Dropped.into()),
            },
            written = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                writing = None;
                written?;
            }
            () = shared.wake_writer.notified() => owed.drain = true,
            () = conn.0.broken.notified() => return Err(WsError::Dropped.into()),
            () = maybe(ping_at) => {
                let h = heartbeat.expect("armed only with a heartbeat");
                // The deadline runs from when the ping is due, written or not.
                next_ping = Some(Instant::now() + h.interval);
                pong_due.get_or_insert(Instant::now() + h.timeout);
                owed.ping = true;
            }
            () = maybe(pong_at) => {
                let h = heartbeat.expect("armed only with a heartbeat");
                tracing::debug!(%epoch, "no pong in time");
                return Err(WsError::HeartbeatTimeout(h.timeout).into());
            }
        }
    }
}

/// A write in progress on the connection, polled beside the reader and the deadlines.
type Write<'a> = Pin<Box<dyn Future<Output = Result<(), WsError>> + Send + 'a>>;

/// Writes the monitor owes the connection.
#[derive(Default)]
struct Owed {
    drain: bool,
    ping: bool,
    flush: bool,
}

#[derive(Clone, Copy)]
enum Job {
    Drain,
    Ping,
    Flush,
}

impl Owed {
    fn next(&mut self) -> Option<Job> {
        if std::mem::take(&mut self.ping) {
            Some(Job::Ping)
        } else if std::mem::take(&mut self.drain) {
            Some(Job::Drain)
        } else if std::mem::take(&mut self.flush) {
            Some(Job::Flush)
        } else {
            None
        }
    }
}

async fn write(shared: &Shared, conn: &WsConn, epoch: Epoch, job: Job) -> Result<(), WsError> {
    match job {
        Job::Drain => shared.drain(conn, Drain::Installed(epoch)).await,
        Job::Ping => {
            tracing::trace!(%epoch, "ping");
            conn.send(Message::Ping(Default::default()))
                .await
                .map_err(WsError::from_transport)
        }
        Job::Flush => conn.flush().await.map_err(WsError::from_transport),
    }
}

async fn maybe(sleep: Option<tokio::time::Sleep>) {
    match sleep {
        Some(sleep) => sleep.await,
        None => future::pending().await,
    }
}

fn peer_closed(frame: Option<CloseFrame>, reconnect_on_normal: bool) -> Result<(), BoxError> {
    let (code, reason) = match frame {
        Some(frame) => (frame.code, frame.reason.to_string()),
        None => (CloseCode::Status, String::new()),
    };
    if code == CloseCode::Normal && !reconnect_on_normal {
        Ok(())
    } else {
        Err(WsError::PeerClosed { code, reason }.into())
    }
}

/// The teardown. A deliberate disconnect (or suspend, or shutdown) first writes what is queued
/// (P18), then sends Close with the configured code and reason and waits for the peer's Close;
/// each step is bounded, and the layer's close timeout bounds the whole. A failed connection is
/// dropped at once.
pub(crate) async fn close(shared: Arc<Shared>, conn: WsConn, cause: CloseCause) {
    let settings = &shared.settings;
    let step = settings.close_step_timeout;
    match cause {
        CloseCause::Failed => return,
        CloseCause::Ended => {
            // The peer closed; tungstenite queued the reply.
            let _ = timeout(step, conn.flush()).await;
            return;
        }
        _ => {}
    }
    let deliberate = matches!(
        cause,
        CloseCause::Disconnect | CloseCause::Suspend | CloseCause::Shutdown
    );
    // Only a connection that was installed has messages of its own to write.
    if let (true, Some(&epoch)) = (deliberate, conn.0.epoch.get()) {
        if timeout(step, shared.drain(&conn, Drain::Closing(epoch)))
            .await
            .is_err()
        {
            tracing::debug!("writing the queue before close timed out");
        }
    }
    let frame = CloseFrame {
        code: settings.close_code,
        reason: settings.close_reason.clone().into(),
    };
    let sent = timeout(step, conn.send(Message::Close(Some(frame)))).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let epoch = conn.0.epoch.get().copied();
    let wait = async {
        while let Some(Ok(message)) = conn.next().await {
            match message {
                Message::Close(_) => return,
                Message::Text(_) | Message::Binary(_) => {
                    // Late data of an installed connection still counts (acks, above all).
                    shared.received(&message);
                    if let Some(epoch) = epoch {
                        let _ = shared.incoming().try_send(Received { epoch, message });
                    }
                }
                _ => {}
            }
        }
    };
    if timeout(step, wait).await.is_err() {
        tracing::debug!("the peer did not answer the close in time; dropping the socket");
    }
}

/// Bounds for the heartbeat.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heartbeat {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}
