//! The teardown: how a released WebSocket connection closes.
//!
//! A deliberate release (disconnect, suspend, shutdown) closes gracefully, each step bounded
//! by the close-step timeout and the whole by the layer's close timeout:
//!
//! 1. The connection writes what it still owes: the rest of the batch it was writing, then
//!    whatever was accepted while it was installed (P18). Newer connections wait for it, so
//!    the order holds across connections. If this step is cut, what it held goes back to
//!    the front of the queue for the next connection, and the socket is dropped.
//! 2. It sends Close with the configured code and reason.
//! 3. It waits for the peer's Close. Messages that arrive before it go to `Incoming`, read
//!    only once there is room for them, as on an installed connection.
//!
//! A connection that failed, or that the peer closed, writes nothing more: its batch goes
//! back to the queue at once, and the reply to a Close the peer began is flushed. A connection
//! never installed (a stale attempt, rule 1) is dropped. In every case the socket is closed
//! when the teardown ends.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, ready};

use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::conn::WsConn;
use super::incoming::{Received, Room};
use super::shared::Shared;
use crate::teardown::CloseCause;

pub(crate) async fn close(
    shared: Arc<Shared>,
    conn: WsConn,
    cause: CloseCause,
    incoming: mpsc::Sender<Received>,
) {
    let Some(mut wire) = conn.take_wire() else {
        return;
    };
    drop(conn);
    let settings = &shared.settings;
    let step = settings.close_step_timeout;
    match cause {
        CloseCause::Stale => return,
        CloseCause::Failed | CloseCause::Ended => {
            wire.retire();
            if wire.peer_closed() {
                // tungstenite queued the reply to the peer's Close.
                let _ = timeout(step, poll_fn(|cx| wire.poll_flush(cx))).await;
            }
            return;
        }
        CloseCause::Disconnect | CloseCause::Suspend | CloseCause::Shutdown => {}
    }

    let drained = timeout(step, poll_fn(|cx| wire.poll_write(cx, true))).await;
    wire.retire();
    match drained {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(%error, "writing the queue before close failed");
            return;
        }
        Err(_) => {
            tracing::debug!("writing the queue before close timed out; dropping the socket");
            return;
        }
    }

    let mut frame = Some(CloseFrame {
        code: settings.close_code,
        reason: settings.close_reason.clone().into(),
    });
    let sent = timeout(step, poll_fn(|cx| wire.poll_close(cx, &mut frame))).await;
    let (Ok(Ok(())), Some(epoch)) = (sent, wire.epoch()) else {
        return;
    };

    let mut room = Room::new(incoming);
    let peer = poll_fn(|cx| {
        loop {
            ready!(room.poll_room(cx));
            match ready!(wire.poll_next(cx)) {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    // Late data of an installed connection still counts (acks, above all).
                    shared.received(&message);
                    if !room.deliver(Received { epoch, message }) {
                        shared.undelivered();
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Poll::Ready(()),
                Some(Ok(_)) => {}
            }
        }
    });
    if timeout(step, peer).await.is_err() {
        tracing::debug!("the peer did not answer the close in time; dropping the socket");
    }
}
