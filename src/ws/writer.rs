//! [`Wire`]: one connection's socket, owned by whoever runs the connection now (its monitor
//! while it is installed, then its teardown), and the batch it is writing.
//!
//! The only writes to a socket are the ones its wire makes, from the task that polls it; its
//! writes end when it is dropped. Whatever of its batch was not completely written then goes
//! back to the front of the queue, in order, and wakes the next writer.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::futures::OwnedNotified;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::connector::WsStream;
use super::error::WsError;
use super::incoming::{Received, Room};
use super::outbox::{Pending, Scope, Take};
use super::shared::Shared;
use crate::epoch::Epoch;

/// How many batches one poll writes before it yields, so that producers that keep the queue
/// full cannot hold the driver's task (a socket that never blocks, say in memory).
const BATCHES_PER_POLL: usize = 16;

pub(crate) struct Wire {
    ws: WsStream,
    shared: Arc<Shared>,
    /// The epoch it was installed at, set when its monitor is made. (A connection whose
    /// attempt went stale between the driver's look at the clock and the install may get one
    /// too; its teardown drops it at once.)
    epoch: Option<Epoch>,
    /// Its way into `Incoming`, with the message it read and could not deliver yet.
    room: Room,
    /// Holds a place among the writers: from its install until it owes nothing more.
    writer: bool,
    /// Taken off the queue, being written.
    batch: VecDeque<Pending>,
    /// How many of the batch the socket has taken.
    fed: usize,
    /// Of those, how many were skipped: acknowledged while they waited to go again.
    skipped: usize,
    /// A buffer for the messages a finished batch delivers.
    delivered: Vec<Pending>,
    /// A ping is owed.
    ping: bool,
    /// A control frame tungstenite queued (a pong, the reply to a Close) waits for a flush.
    flush: bool,
    /// The peer's Close arrived.
    peer_closed: bool,
    /// Armed while waiting for the queue or for an older writer.
    work: Option<Pin<Box<OwnedNotified>>>,
}

fn transport(error: tokio_tungstenite::tungstenite::Error) -> WsError {
    WsError::from_transport(error)
}

impl Wire {
    pub(crate) fn new(
        ws: WsStream,
        shared: Arc<Shared>,
        incoming: tokio::sync::mpsc::Sender<Received>,
    ) -> Wire {
        Wire {
            ws,
            room: Room::new(incoming, Arc::clone(&shared)),
            shared,
            epoch: None,
            writer: false,
            batch: VecDeque::new(),
            fed: 0,
            skipped: 0,
            delivered: Vec::new(),
            ping: false,
            flush: false,
            peer_closed: false,
            work: None,
        }
    }

    /// The connection is installed at `epoch`: it writes the queue, after the older
    /// connections that still owe writes.
    pub(crate) fn install(&mut self, epoch: Epoch) {
        if self.epoch.is_none() {
            self.epoch = Some(epoch);
            self.writer = true;
            self.shared.register(epoch);
        }
    }

    pub(crate) fn owe_ping(&mut self) {
        self.ping = true;
    }

    /// The connection was released: a ping it still owes is not sent any more.
    pub(crate) fn forget_ping(&mut self) {
        self.ping = false;
    }

    /// Whether everything handed to the socket has been flushed (no batch in progress).
    pub(crate) fn is_clean(&self) -> bool {
        self.batch.is_empty()
    }

    /// Ready once the connection may read the next frame (see [`Room`]).
    pub(crate) fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.room.poll_room(cx)
    }

    /// A text or binary message arrived: it may acknowledge earlier sends, then it goes to
    /// `Incoming` (kept until there is room). Fails if the acknowledgement function panicked.
    pub(crate) fn deliver(&mut self, message: Message) -> Result<(), WsError> {
        self.shared.received(&message)?;
        let epoch = self.epoch.expect("only an installed connection reads");
        self.room.deliver(Received { epoch, message });
        Ok(())
    }

    pub(crate) fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Writes what the connection owes: control frames, then batches of the queue while it
    /// is installed (`closing == false`), or, once released, what was accepted up to its
    /// epoch. `Ready(Ok)` once it owes nothing more; it stays pending while it waits for
    /// messages, an older writer, or the socket.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        closing: bool,
    ) -> Poll<Result<(), WsError>> {
        for _ in 0..BATCHES_PER_POLL {
            if self.ping {
                ready!(self.ws.poll_ready_unpin(cx)).map_err(transport)?;
                self.ws
                    .start_send_unpin(Message::Ping(Bytes::new()))
                    .map_err(transport)?;
                self.ping = false;
                self.flush = true;
            }
            if self.batch.is_empty() {
                if self.flush {
                    ready!(self.ws.poll_flush_unpin(cx)).map_err(transport)?;
                    self.flush = false;
                }
                let (Some(epoch), true) = (self.epoch, self.writer) else {
                    return Poll::Ready(Ok(()));
                };
                let scope = match closing {
                    false => Scope::Installed(epoch),
                    true => Scope::Closing(epoch),
                };
                // Armed before the look, so that work arriving after it wakes us.
                let shared = &self.shared;
                let work = self
                    .work
                    .get_or_insert_with(|| Box::pin(Arc::clone(&shared.work).notified_owned()));
                work.as_mut().enable();
                match shared.take_batch(scope, &mut self.batch) {
                    Take::Batch => {
                        self.fed = 0;
                        self.skipped = 0;
                    }
                    Take::Wait => {
                        ready!(work.as_mut().poll(cx));
                        self.work = None;
                        continue;
                    }
                    Take::Done => return Poll::Ready(Ok(())),
                }
            }
            ready!(self.poll_feed(cx))?;
            ready!(self.ws.poll_flush_unpin(cx)).map_err(transport)?;
            self.flush = false;
            self.shared
                .finish(&mut self.batch, self.skipped, &mut self.delivered);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Hands the rest of the batch to the socket; tells the outbox how far it got, whatever
    /// happens (acknowledgements beyond that are impossible).
    fn poll_feed(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut last = None;
        let fed = self.poll_feed_from(cx, &mut last);
        if let Some(seq) = last {
            self.shared.fed(seq);
        }
        fed
    }

    fn poll_feed_from(
        &mut self,
        cx: &mut Context<'_>,
        last: &mut Option<u64>,
    ) -> Poll<Result<(), WsError>> {
        let at_least_once = self.shared.at_least_once();
        while let Some(pending) = self.batch.get(self.fed) {
            if at_least_once && self.shared.is_acked(pending.seq) {
                // Acknowledged while it waited to go again: not written twice.
                self.fed += 1;
                self.skipped += 1;
                continue;
            }
            ready!(self.ws.poll_ready_unpin(cx)).map_err(transport)?;
            let message = pending.message.clone();
            let seq = pending.seq;
            self.ws.start_send_unpin(message).map_err(transport)?;
            self.fed += 1;
            *last = Some(seq);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads the next frame. tungstenite answers pings (and a Close) by itself; the answer
    /// goes out with the next write or flush.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, WsError>>> {
        let next = ready!(self.ws.poll_next_unpin(cx));
        match &next {
            Some(Ok(Message::Ping(_))) => self.flush = true,
            Some(Ok(Message::Close(_))) => {
                self.peer_closed = true;
                self.flush = true;
            }
            _ => {}
        }
        Poll::Ready(next.map(|r| r.map_err(transport)))
    }

    /// Sends Close with `frame` (taken on the first poll) and flushes.
    pub(crate) fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        frame: &mut Option<CloseFrame>,
    ) -> Poll<Result<(), WsError>> {
        if frame.is_some() {
            ready!(self.ws.poll_ready_unpin(cx)).map_err(transport)?;
            let frame = frame.take();
            self.ws
                .start_send_unpin(Message::Close(frame))
                .map_err(transport)?;
        }
        self.ws.poll_flush_unpin(cx).map_err(transport)
    }

    /// Flushes the control frames tungstenite queued (the reply to the peer's Close).
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.ws.poll_flush_unpin(cx).map_err(transport)
    }

    /// The connection writes no more of the queue: what its batch holds goes back to the
    /// front of the queue, and the next writer may go.
    pub(crate) fn retire(&mut self) {
        self.shared.requeue(&mut self.batch);
        self.fed = 0;
        self.skipped = 0;
        if std::mem::take(&mut self.writer) {
            if let Some(epoch) = self.epoch {
                self.shared.deregister(epoch);
            }
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.retire();
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::task::Waker;
    use std::time::Duration;

    use futures_util::StreamExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

    use super::*;
    use crate::epoch::Clock;
    use crate::transport::ByteStream;
    use crate::ws::builder::Settings;

    async fn pair(
        pipe: usize,
        config: WebSocketConfig,
    ) -> (WsStream, WebSocketStream<tokio::io::DuplexStream>) {
        let (ours, theirs) = tokio::io::duplex(pipe);
        let ours =
            WebSocketStream::from_raw_socket(ByteStream::new(ours), Role::Client, Some(config));
        let theirs = WebSocketStream::from_raw_socket(theirs, Role::Server, None);
        (ours.await, theirs.await)
    }

    /// At-least-once: a message written to a connection that ended goes again on the next, but
    /// not if its acknowledgement arrives before the next connection gets to it.
    #[tokio::test]
    async fn a_message_acknowledged_while_it_waits_to_go_again_is_not_written_twice() {
        let clock = Arc::new(Clock::new());
        let first = clock.tick();
        let ack = |m: &Message| m.to_text().ok()?.strip_prefix("ack:")?.parse().ok();
        let settings = Settings {
            ack: Some(Arc::new(ack)),
            ..Settings::default()
        };
        let shared = Arc::new(Shared::new(settings, Arc::clone(&clock)));
        for n in 1..=2 {
            shared.try_reserve().unwrap();
            let text = format!("{n}|{}", "x".repeat(200));
            shared.accept(|_| Message::text(text), false).unwrap();
        }
        let mut cx = Context::from_waker(Waker::noop());

        // The first connection writes both; they wait for acknowledgements it never sends.
        let (stream, mut peer) = pair(1 << 16, WebSocketConfig::default()).await;
        let (incoming, _rx) = tokio::sync::mpsc::channel(1);
        let mut a = Wire::new(stream, Arc::clone(&shared), incoming.clone());
        a.install(first);
        assert!(
            a.poll_write(&mut cx, false).is_pending(),
            "written; waits for more"
        );
        for _ in 1..=2 {
            assert!(peer.next().await.unwrap().unwrap().is_text());
        }
        assert_eq!(shared.stats().written, 2);
        drop(a); // the connection ends

        // The next one takes both again; its socket takes only part of the first.
        let second = clock.tick();
        let unbuffered = WebSocketConfig::default().write_buffer_size(0);
        let (stream, mut peer) = pair(64, unbuffered).await;
        let mut b = Wire::new(stream, Arc::clone(&shared), incoming);
        b.install(second);
        assert!(
            b.poll_write(&mut cx, false).is_pending(),
            "blocked on the socket"
        );
        // The old connection's acknowledgement of both arrives late: message 1 is already on
        // its way again, message 2 not yet.
        shared.received(&Message::text("ack:2")).unwrap();

        let reading = tokio::spawn(async move { peer.next().await.unwrap().unwrap() });
        tokio::time::timeout(
            Duration::from_secs(2),
            poll_fn(|cx| match b.poll_write(cx, false) {
                Poll::Pending if shared.stats().held == 0 => Poll::Ready(()),
                _ => Poll::Pending,
            }),
        )
        .await
        .expect("the write completes");
        let again = reading.await.unwrap();
        assert!(
            again.to_text().unwrap().starts_with("1|"),
            "message 1 went again"
        );
        let stats = shared.stats();
        assert_eq!(
            (stats.written, stats.acknowledged, stats.held),
            (3, 2, 0),
            "message 2 is not written a second time: {stats:?}"
        );
    }
}
