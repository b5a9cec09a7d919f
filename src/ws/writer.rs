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
use super::outbox::{Pending, Scope, Take};
use super::shared::Shared;
use crate::epoch::Epoch;

pub(crate) struct Wire {
    ws: WsStream,
    shared: Arc<Shared>,
    /// The epoch it was installed at; never set for a connection discarded as stale.
    epoch: Option<Epoch>,
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
    pub(crate) fn new(ws: WsStream, shared: Arc<Shared>) -> Wire {
        Wire {
            ws,
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

    pub(crate) fn epoch(&self) -> Option<Epoch> {
        self.epoch
    }

    pub(crate) fn owe_ping(&mut self) {
        self.ping = true;
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
        loop {
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
            let fed = self.fed;
            let feeding = self.poll_feed(cx);
            if self.fed > fed {
                self.shared.fed(self.batch[self.fed - 1].seq);
            }
            ready!(feeding)?;
            ready!(self.ws.poll_flush_unpin(cx)).map_err(transport)?;
            self.flush = false;
            self.shared
                .finish(&mut self.batch, self.skipped, &mut self.delivered);
        }
    }

    /// Hands the rest of the batch to the socket.
    fn poll_feed(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let at_least_once = self.shared.at_least_once();
        while let Some(pending) = self.batch.get(self.fed) {
            if at_least_once && pending.writes > 0 && self.shared.is_acked(pending.seq) {
                // Acknowledged while it waited to go again: not written twice.
                self.fed += 1;
                self.skipped += 1;
                continue;
            }
            ready!(self.ws.poll_ready_unpin(cx)).map_err(transport)?;
            let message = pending.message.clone();
            self.ws.start_send_unpin(message).map_err(transport)?;
            self.fed += 1;
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
