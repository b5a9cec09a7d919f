//! One WebSocket connection as the layer manages it, its per-connection loop (the monitor) and
//! its graceful close (the teardown).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::future::poll_fn;
use std::sync::Mutex as StdMutex;
use std::task::ready;

use futures_util::{SinkExt, StreamExt, future};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::client::{Drain, Received, Shared};
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
    turn: Turn,
    /// The epoch it was installed at (never set for a connection discarded as stale).
    epoch: OnceLock<Epoch>,
    /// A writer failed on this connection: the monitor reports it.
    broken: Notify,
}

impl WsConn {
    pub(crate) fn new(stream: WsStream) -> Self {
        WsConn(Arc::new(ConnInner {
            ws: StdMutex::new(stream),
            turn: Turn::default(),
            epoch: OnceLock::new(),
            broken: Notify::new(),
        }))
    }

    fn ws(&self) -> std::sync::MutexGuard<'_, WsStream> {
        self.0.ws.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer's turn, if it is free and nobody waits for it.
    pub(crate) fn try_turn(&self) -> Option<WriterTurn> {
        self.0.turn.try_take().then(|| WriterTurn(self.clone()))
    }

    /// Waits for the writer's turn, in line with the other writers that wait; hold it across a
    /// run of batches.
    pub(crate) async fn turn(&self) -> WriterTurn {
        self.0.turn.take().await;
        WriterTurn(self.clone())
    }

    /// Waits for the writer's turn without getting in line: it is taken only when free and
    /// nobody waits for it, so writers that only try keep their fast path. For writers that
    /// drain the queue, which any other draining writer empties anyway.
    pub(crate) async fn free_turn(&self) -> WriterTurn {
        loop {
            if let Some(turn) = self.try_turn() {
                return turn;
            }
            self.0.turn.released().await;
        }
    }

    /// Sends one message and flushes, taking the writer's turn.
    async fn send(&self, message: Message) -> Result<(), tungstenite::Error> {
        let _turn = self.turn().await;
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
        let _turn = self.turn().await;
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

/// The writer's turn on one connection, held while a writer feeds a batch and flushes it.
/// Released when dropped.
pub(crate) struct WriterTurn(WsConn);

impl WriterTurn {
    pub(crate) fn conn(&self) -> &WsConn {
        &self.0
    }

    /// The stream, for a writer's poll (locked for that poll only).
    pub(crate) fn stream(&self) -> std::sync::MutexGuard<'_, WsStream> {
        self.0.ws()
    }
}

impl Drop for WriterTurn {
    fn drop(&mut self) {
        self.0.0.turn.release();
    }
}

/// One writer at a time, as an async mutex would, but cheaper on the path without contention
/// (one compare-and-swap to take, one subtraction to release) and with waiters first: `try_take`
/// fails while a writer waits, so writers that only try (the send fast path) cannot starve one
/// that waits (the monitor's ping, the teardown's Close).
#[derive(Default)]
struct Turn {
    /// [`HELD`], plus [`WAITER`] for each writer waiting.
    state: AtomicUsize,
    /// Writers watching for a release without waiting in line ([`Turn::released`]).
    watchers: AtomicUsize,
    released: Notify,
}

const HELD: usize = 1;
const WAITER: usize = 2;

impl Turn {
    fn try_take(&self) -> bool {
        self.state
            .compare_exchange(0, HELD, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Cancel-safe: dropped while waiting, it holds nothing and waits no more.
    async fn take(&self) {
        self.state.fetch_add(WAITER, Ordering::SeqCst);
        let _waiting = Waiting(self);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check: a release after it wakes us.
            released.as_mut().enable();
            let mut state = self.state.load(Ordering::SeqCst);
            while state & HELD == 0 {
                match self.state.compare_exchange_weak(
                    state,
                    state | HELD,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => return,
                    Err(now) => state = now,
                }
            }
            released.await;
        }
    }

    fn release(&self) {
        let before = self.state.fetch_sub(HELD, Ordering::SeqCst);
        if before != HELD || self.watchers.load(Ordering::SeqCst) > 0 {
            // Writers wait or watch: they race for the turn, and the losers wait again.
            self.released.notify_waiters();
        }
    }

    /// Returns once the turn is free with nobody waiting for it: at once if it is now, or at
    /// the next release (or waiter giving up) otherwise. Holds nothing: cancel-safe.
    async fn released(&self) {
        self.watchers.fetch_add(1, Ordering::SeqCst);
        let _watching = Watching(self);
        let released = self.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if self.state.load(Ordering::SeqCst) != 0 {
            released.await;
        }
    }
}

/// A writer in [`Turn::released`], counted until it returns or gives up.
struct Watching<'a>(&'a Turn);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A writer waiting in [`Turn::take`], counted until it has the turn or gives up.
struct Waiting<'a>(&'a Turn);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let before = self.0.state.fetch_sub(WAITER, Ordering::SeqCst);
        if before == WAITER && self.0.watchers.load(Ordering::SeqCst) > 0 {
            // The last waiter gave up a free turn: watchers may take it now.
            self.0.released.notify_waiters();
        }
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

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn poll_once(future: Pin<&mut impl Future<Output = ()>>) -> Poll<()> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_writer_that_waits_goes_before_one_that_only_tries() {
        let turn = Turn::default();
        assert!(turn.try_take());
        assert!(!turn.try_take(), "held");

        let mut waiting = pin!(turn.take());
        assert!(
            poll_once(waiting.as_mut()).is_pending(),
            "held by the first"
        );
        turn.release();
        assert!(!turn.try_take(), "free, but a writer waits for it");
        assert!(
            poll_once(waiting.as_mut()).is_ready(),
            "the waiter takes it"
        );
        assert!(!turn.try_take(), "held by the waiter");
        turn.release();
        assert!(turn.try_take(), "free, nobody waits");
        turn.release();
        assert_eq!(turn.state.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_writer_that_gives_up_waiting_leaves_nothing_behind() {
        let turn = Turn::default();
        assert!(turn.try_take());
        {
            let mut waiting = pin!(turn.take());
            assert!(poll_once(waiting.as_mut()).is_pending());
        }
        assert!(!turn.try_take(), "still held by the first");
        turn.release();
        assert!(turn.try_take(), "the waiter that gave up no longer counts");
        // Released while a writer waits, which gives up before it runs: the turn is free.
        {
            let mut waiting = pin!(turn.take());
            assert!(poll_once(waiting.as_mut()).is_pending());
            turn.release();
        }
        assert_eq!(turn.state.load(Ordering::SeqCst), 0, "free, no waiter");
        assert!(turn.try_take());
    }

    #[test]
    fn a_writer_that_watches_does_not_get_in_the_way() {
        let turn = Turn::default();
        let mut watching = pin!(turn.released());
        assert!(poll_once(watching.as_mut()).is_ready(), "free: at once");

        assert!(turn.try_take());
        let mut watching = pin!(turn.released());
        assert!(poll_once(watching.as_mut()).is_pending(), "held");
        turn.release();
        assert!(
            turn.try_take(),
            "a watcher does not hold back a writer that tries"
        );
        assert!(
            poll_once(watching.as_mut()).is_ready(),
            "woken by the release"
        );
        turn.release();
    }

    #[test]
    fn a_waiter_that_gives_up_a_free_turn_wakes_the_watchers() {
        let turn = Turn::default();
        assert!(turn.try_take());
        let mut waiting = Box::pin(turn.take());
        assert!(poll_once(waiting.as_mut()).is_pending());
        turn.release(); // to the waiter, which has not run yet
        let mut watching = pin!(turn.released());
        assert!(
            poll_once(watching.as_mut()).is_pending(),
            "free, but a writer waits for it"
        );
        drop(waiting); // gives up before it runs
        assert!(
            poll_once(watching.as_mut()).is_ready(),
            "the turn is free again"
        );
        assert_eq!(turn.state.load(Ordering::SeqCst), 0);
        assert_eq!(
            turn.watchers.load(Ordering::SeqCst),
            0,
            "the watcher is done"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_on_many_threads_hold_the_turn_one_at_a_time() {
        const WRITERS: usize = 8;
        const ROUNDS: usize = 2_000;
        let shared = Arc::new((Turn::default(), AtomicBool::new(false), AtomicUsize::new(0)));
        let writers = (0..WRITERS).map(|i| {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let (turn, inside, turns) = &*shared;
                for round in 0..ROUNDS {
                    // A third of the writers only try, as the send fast path does; a third
                    // watch for a release, as a draining writer does; a third wait in line.
                    match (i + round) % 3 {
                        0 if !turn.try_take() => {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        0 => {}
                        1 => {
                            while !turn.try_take() {
                                turn.released().await;
                            }
                        }
                        _ => turn.take().await,
                    }
                    assert!(!inside.swap(true, Ordering::SeqCst), "two writers at once");
                    tokio::task::yield_now().await;
                    inside.store(false, Ordering::SeqCst);
                    turns.fetch_add(1, Ordering::SeqCst);
                    turn.release();
                }
            })
        });
        let all = futures_util::future::join_all(writers);
        for result in tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("no writer waits forever")
        {
            result.expect("a writer panicked");
        }
        let (turn, _, turns) = &*shared;
        assert!(
            turns.load(Ordering::SeqCst) >= WRITERS * ROUNDS * 2 / 3,
            "every waiter and watcher got its turns"
        );
        assert_eq!(turn.state.load(Ordering::SeqCst), 0, "free, no waiter");
        assert_eq!(turn.watchers.load(Ordering::SeqCst), 0, "no watcher");
    }
}
