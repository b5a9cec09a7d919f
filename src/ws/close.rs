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

use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::conn::WsConn;
use super::shared::Shared;
use crate::teardown::CloseCause;

pub(crate) async fn close(shared: Arc<Shared>, conn: WsConn, cause: CloseCause) {
    let Some(mut wire) = conn.take_wire() else {
        return;
    };
    drop(conn);
    let settings = &shared.settings;
    let step = settings.close_step_timeout;
    match cause {
        CloseCause::Stale => return,
        CloseCause::Failed | CloseCause::Ended => {
            // Data handed to the socket and not flushed goes again on the next connection:
            // flushing the reply to a Close would send it on this one too.
            let clean = wire.is_clean();
            wire.retire();
            if wire.peer_closed() && clean {
                // tungstenite queued the reply to the peer's Close.
                let _ = timeout(step, poll_fn(|cx| wire.poll_flush(cx))).await;
            }
            return;
        }
        CloseCause::Disconnect | CloseCause::Suspend | CloseCause::Idle | CloseCause::Shutdown => {}
    }

    // Released: it writes what it owes, no more pings.
    wire.forget_ping();
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
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }

    let peer = poll_fn(|cx| {
        loop {
            ready!(wire.poll_room(cx));
            match ready!(wire.poll_next(cx)) {
                // Late data of an installed connection still counts (acks, above all).
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    if wire.deliver(message).is_err() {
                        return Poll::Ready(());
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::epoch::{Clock, Epoch};
    use crate::transport::ByteStream;
    use crate::ws::builder::Settings;
    use crate::ws::monitor::Monitor;
    use crate::ws::writer::Wire;

    /// A clock at its first epoch, the client's state with a 1 s close step, an in-memory
    /// WebSocket (the client's wire and the peer's end), and the receiver of `Incoming`.
    async fn connection() -> (
        Arc<Clock>,
        Epoch,
        Arc<Shared>,
        Wire,
        WebSocketStream<tokio::io::DuplexStream>,
        tokio::sync::mpsc::Receiver<crate::ws::Received>,
    ) {
        let clock = Arc::new(Clock::new());
        let epoch = clock.tick();
        let settings = Settings {
            close_step_timeout: Duration::from_secs(1),
            ..Settings::default()
        };
        let shared = Arc::new(Shared::new(settings, Arc::clone(&clock)));
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let ours = WebSocketStream::from_raw_socket(ByteStream::new(ours), Role::Client, None);
        let peer = WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
        let (incoming, rx) = tokio::sync::mpsc::channel(1);
        let wire = Wire::new(ours.await, Arc::clone(&shared), incoming);
        (clock, epoch, shared, wire, peer, rx)
    }

    /// Issue 9, defect 6: the connection's epoch was set at its monitor's first poll, so a
    /// release before that (a quick disconnect) skipped the writes owed before Close. It is
    /// installed when its monitor is made.
    #[tokio::test]
    async fn a_release_before_the_monitor_runs_still_writes_the_queue_before_close() {
        let (clock, epoch, shared, wire, mut peer, _rx) = connection().await;
        for text in ["m1", "m2"] {
            shared.try_reserve().unwrap();
            shared.accept(|_| Message::text(text), false).unwrap();
        }
        let conn = WsConn::new(wire);

        // Installed, and released before the driver polled its monitor even once.
        drop(Monitor::new(&shared, conn.clone(), epoch));
        clock.tick();
        let closing = tokio::spawn(close(Arc::clone(&shared), conn, CloseCause::Disconnect));
        let mut seen = Vec::new();
        while let Some(Ok(message)) = peer.next().await {
            match message {
                Message::Close(_) => {
                    seen.push("Close".to_string());
                    // Answers it: the reply goes out with the next read.
                    while let Some(Ok(_)) = peer.next().await {}
                    break;
                }
                message => seen.push(message.into_text().unwrap().to_string()),
            }
        }
        assert_eq!(seen, ["m1", "m2", "Close"]);
        tokio::time::timeout(Duration::from_secs(2), closing)
            .await
            .expect("the close completes")
            .unwrap();
        let stats = shared.stats();
        assert_eq!((stats.written, stats.held), (2, 0));
    }

    /// A ping the connection owed when it was released is not sent by its close.
    #[tokio::test]
    async fn a_ping_owed_at_the_release_is_not_sent() {
        let (clock, epoch, shared, mut wire, mut peer, _rx) = connection().await;
        wire.install(epoch);
        wire.owe_ping();
        let conn = WsConn::new(wire);
        clock.tick();
        let closing = tokio::spawn(close(Arc::clone(&shared), conn, CloseCause::Disconnect));
        let first = peer.next().await.unwrap().unwrap();
        assert!(matches!(first, Message::Close(_)), "got {first:?}");
        while let Some(Ok(_)) = peer.next().await {}
        closing.await.unwrap();
    }
}
