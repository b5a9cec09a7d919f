//! The monitor: the installed connection's own loop, the one writer of its socket.
//!
//! The driver polls it while the connection is installed and drops it at the release, which
//! ends its writes at once; its wire (the socket, and the batch it was writing) goes back to
//! the connection for the teardown. In each poll it writes (control frames, then batches of
//! the queue), reads what there is room for in `Incoming`, and keeps the heartbeat; none of
//! them waits for another. It ends with `Ok` on a normal close by the peer and `Err` on any
//! failure: the layer turns those into a release or a reconnect of this epoch.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep, sleep_until};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::builder::Heartbeat;
use super::conn::WsConn;
use super::error::WsError;
use super::shared::Shared;
use super::writer::Wire;
use crate::epoch::Epoch;
use crate::error::BoxError;

/// How many rounds (a frame read, a batch written) one poll runs before it yields, so that a
/// peer that never stops sending cannot hold the driver's task.
const ROUNDS_PER_POLL: usize = 32;

pub(crate) struct Monitor {
    conn: WsConn,
    /// Taken from the connection at the first poll, put back when dropped.
    wire: Option<Wire>,
    epoch: Epoch,
    beat: Option<Beat>,
}

/// The heartbeat: a ping every `interval`, a pong due within `timeout` of it.
struct Beat {
    every: Heartbeat,
    ping: Pin<Box<Sleep>>,
    pong: Pong,
    pong_at: Pin<Box<Sleep>>,
}

enum Pong {
    /// No ping waits for its pong.
    None,
    /// The pong is due at `pong_at`.
    Due,
    /// Not reading (no room in `Incoming`): the deadline waits, with this much time left.
    Paused(Duration),
}

/// `now + by`. `build` refuses a heartbeat for which twice its length overflows a reading of
/// the clock, so this cannot overflow in a process younger than the heartbeat itself.
fn after(by: Duration) -> Instant {
    Instant::now() + by
}

impl Beat {
    fn new(every: Heartbeat) -> Beat {
        Beat {
            every,
            ping: Box::pin(sleep_until(after(every.interval))),
            pong: Pong::None,
            pong_at: Box::pin(sleep_until(after(every.timeout))),
        }
    }

    /// Whether a ping is due now (and arms the next one and the pong deadline).
    fn poll_ping(&mut self, cx: &mut Context<'_>, reading: bool) -> bool {
        let mut due = false;
        // Polled again after the reset: that registers the next deadline.
        while self.ping.as_mut().poll(cx).is_ready() {
            self.ping.as_mut().reset(after(self.every.interval));
            due = true;
        }
        if due && matches!(self.pong, Pong::None) {
            // The deadline runs from when the ping is due, written or not.
            self.pong = Pong::Paused(self.every.timeout);
            self.reading(reading);
        }
        due
    }

    /// Whether the pong is overdue.
    fn poll_overdue(&mut self, cx: &mut Context<'_>) -> bool {
        matches!(self.pong, Pong::Due) && self.pong_at.as_mut().poll(cx).is_ready()
    }

    /// Reading stops or resumes: the pong deadline pauses or resumes with what it had left.
    fn reading(&mut self, reading: bool) {
        match (&self.pong, reading) {
            (Pong::Due, false) => {
                let left = self
                    .pong_at
                    .deadline()
                    .saturating_duration_since(Instant::now());
                self.pong = Pong::Paused(left);
            }
            (Pong::Paused(left), true) => {
                self.pong_at.as_mut().reset(after(*left));
                self.pong = Pong::Due;
            }
            _ => {}
        }
    }
}

impl Monitor {
    pub(crate) fn new(shared: &Shared, conn: WsConn, epoch: Epoch) -> Monitor {
        // Installed now, not at the first poll: a release before that finds it installed.
        conn.install(epoch);
        let beat = shared.settings.heartbeat.map(Beat::new);
        Monitor {
            conn,
            wire: None,
            epoch,
            beat,
        }
    }

    /// Handles one frame read. `Some` ends the monitor.
    fn frame(&mut self, message: Message) -> Option<Result<(), BoxError>> {
        match message {
            Message::Text(_) | Message::Binary(_) => {
                let wire = self.wire.as_mut().expect("reading with the wire");
                if let Err(error) = wire.deliver(message) {
                    return Some(Err(error.into()));
                }
            }
            Message::Pong(_) => {
                if let Some(beat) = &mut self.beat {
                    beat.pong = Pong::None;
                }
            }
            // tungstenite queued the close reply; the teardown writes it.
            Message::Close(frame) => {
                return Some(peer_closed(frame));
            }
            // tungstenite queued the pong; the wire writes it.
            Message::Ping(_) | Message::Frame(_) => {}
        }
        None
    }
}

impl Future for Monitor {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.wire.is_none() {
            match this.conn.take_wire() {
                Some(wire) => this.wire = Some(wire),
                // Only a teardown takes the wire, and the driver drops the monitor first.
                None => return Poll::Ready(Err(WsError::Dropped.into())),
            }
        }
        for _ in 0..ROUNDS_PER_POLL {
            let wire = this.wire.as_mut().expect("taken above");
            let room = wire.poll_room(cx).is_ready();
            if let Some(beat) = &mut this.beat {
                beat.reading(room);
                if beat.poll_ping(cx, room) {
                    wire.owe_ping();
                }
            }
            if let Poll::Ready(Err(error)) = wire.poll_write(cx, false) {
                return Poll::Ready(Err(error.into()));
            }
            if room {
                match wire.poll_next(cx) {
                    Poll::Ready(Some(Ok(message))) => {
                        if let Some(end) = this.frame(message) {
                            return Poll::Ready(end);
                        }
                        // More may be waiting (a pong among them): read on before the
                        // deadline is looked at.
                        continue;
                    }
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                    Poll::Ready(None) => return Poll::Ready(Err(WsError::Dropped.into())),
                    Poll::Pending => {}
                }
            }
            // Everything there was to read has been read: now the deadline means something.
            if let Some(beat) = &mut this.beat {
                if beat.poll_overdue(cx) {
                    tracing::debug!(epoch = %this.epoch, "no pong in time");
                    return Poll::Ready(Err(WsError::HeartbeatTimeout(beat.every.timeout).into()));
                }
            }
            return Poll::Pending;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(wire) = self.wire.take() {
            self.conn.put_wire(wire);
        }
    }
}

/// A Close from the peer: 1000 is a normal end (the layer's [`NormalEnd`] policy decides),
/// any other code a failure.
///
/// [`NormalEnd`]: crate::NormalEnd
pub(crate) fn peer_closed(frame: Option<CloseFrame>) -> Result<(), BoxError> {
    let (code, reason) = match frame {
        Some(frame) => (frame.code, frame.reason.to_string()),
        None => (CloseCode::Status, String::new()),
    };
    if code == CloseCode::Normal {
        Ok(())
    } else {
        Err(WsError::PeerClosed { code, reason }.into())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::task::Waker;

    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::epoch::Clock;
    use crate::transport::ByteStream;
    use crate::ws::builder::Settings;
    use crate::ws::writer::Wire;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    /// The pong deadline pauses while the connection does not read (no room in `Incoming`) and
    /// resumes with the time it had left, never firing while paused.
    #[tokio::test(start_paused = true)]
    async fn the_pong_deadline_pauses_while_not_reading_and_resumes_with_what_it_had_left() {
        let second = Duration::from_secs(1);
        let mut beat = Beat::new(Heartbeat {
            interval: second,
            timeout: second,
        });
        assert!(!beat.poll_ping(&mut cx(), true), "not yet");
        tokio::time::advance(second).await;
        assert!(beat.poll_ping(&mut cx(), true), "due after the interval");
        assert!(matches!(beat.pong, Pong::Due));

        tokio::time::advance(second / 4).await;
        beat.reading(false);
        assert!(matches!(beat.pong, Pong::Paused(left) if left == second * 3 / 4));
        tokio::time::advance(second * 10).await;
        assert!(!beat.poll_overdue(&mut cx()), "paused: never overdue");

        beat.reading(true);
        assert!(matches!(beat.pong, Pong::Due));
        tokio::time::advance(second / 2).await;
        assert!(!beat.poll_overdue(&mut cx()), "a quarter of it left");
        tokio::time::advance(second / 4).await;
        assert!(
            beat.poll_overdue(&mut cx()),
            "overdue once what was left has run out"
        );

        // A pong clears the deadline; a ping due while not reading starts it paused.
        beat.pong = Pong::None;
        assert!(beat.poll_ping(&mut cx(), false));
        assert!(matches!(beat.pong, Pong::Paused(left) if left == second));
    }

    /// The driver's task polled late (the runtime stalled past the pong deadline) while the
    /// pong already waits in the socket: the monitor reads it before it looks at the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_pong_waiting_in_the_socket_after_a_stall_is_no_heartbeat_failure() {
        let clock = Arc::new(Clock::new());
        let epoch = clock.tick();
        let beat = Heartbeat {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(50),
        };
        let settings = Settings {
            heartbeat: Some(beat),
            ..Settings::default()
        };
        let shared = Arc::new(Shared::new(settings, clock));
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let ours = WebSocketStream::from_raw_socket(ByteStream::new(ours), Role::Client, None);
        let mut peer = WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
        let (incoming, _rx) = tokio::sync::mpsc::channel(1);
        let conn = WsConn::new(Wire::new(ours.await, Arc::clone(&shared), incoming));
        let mut monitor = Monitor::new(&shared, conn, epoch);

        assert!(Pin::new(&mut monitor).poll(&mut cx()).is_pending());
        tokio::time::advance(beat.interval).await;
        assert!(Pin::new(&mut monitor).poll(&mut cx()).is_pending(), "pings");
        let ping = peer.next().await.unwrap().unwrap();
        assert!(ping.is_ping());
        peer.flush().await.unwrap(); // the pong tungstenite queued
        // The stall: the deadline passes before the monitor runs again.
        tokio::time::advance(beat.timeout * 2).await;
        assert!(
            Pin::new(&mut monitor).poll(&mut cx()).is_pending(),
            "the pong was read first: no failure"
        );
        // Without a pong, the deadline holds.
        tokio::time::advance(beat.interval).await;
        assert!(
            Pin::new(&mut monitor).poll(&mut cx()).is_pending(),
            "the next ping"
        );
        tokio::time::advance(beat.timeout * 2).await;
        match Pin::new(&mut monitor).poll(&mut cx()) {
            Poll::Ready(Err(error)) => assert!(matches!(
                error.downcast_ref::<WsError>(),
                Some(WsError::HeartbeatTimeout(_))
            )),
            other => panic!("expected a heartbeat failure, got {other:?}"),
        }
    }
}
