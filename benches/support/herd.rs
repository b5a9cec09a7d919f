//! A thundering herd under paused tokio time, shared by `tests/herd.rs`, `benches/herd.rs` and
//! `benches/many.rs`.
//!
//! [`CLIENTS`] managed connections (or any number, with [`simulate_n`]) with the default
//! backoff, over one in-memory server, are connected; at t = 0 the server drops them all (each
//! connection reports a failure) and refuses connections until it is back, `down` later. Every
//! connect attempt after t = 0 is recorded with its time.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::backoff::{Backoff, MakeBackoff};
use tower::{Layer, service_fn};
use tower_epoch::{Handle, ReconnectLayer};

/// How many clients the herd has.
pub const CLIENTS: usize = 1_000;

/// What one simulation saw.
#[derive(Debug)]
pub struct Herd {
    /// Offsets from the drop of every connect attempt, sorted.
    pub attempts: Vec<Duration>,
    /// Clients connected at the end.
    pub connected: usize,
    /// When the last client was connected again.
    pub all_back: Duration,
}

impl Herd {
    /// The largest number of attempts in any window of `width` (sliding).
    pub fn busiest(&self, width: Duration) -> usize {
        let mut busiest = 0;
        let mut start = 0;
        for (end, t) in self.attempts.iter().enumerate() {
            while *t - self.attempts[start] >= width {
                start += 1;
            }
            busiest = busiest.max(end + 1 - start);
        }
        busiest
    }

    /// The largest number of attempts in any window of `width` (sliding), as a share of all.
    pub fn busiest_share(&self, width: Duration) -> f64 {
        self.busiest(width) as f64 / self.attempts.len().max(1) as f64
    }
}

/// Runs the herd of [`CLIENTS`] with the default backoff against a server down for `down`;
/// must run under paused time.
pub async fn simulate(down: Duration) -> Herd {
    simulate_with(down, tower_epoch::backoff::default_backoff()).await
}

/// Runs the herd of [`CLIENTS`] with `backoff`.
pub async fn simulate_with<B>(down: Duration, backoff: B) -> Herd
where
    B: MakeBackoff + Clone + Send + 'static,
    B::Backoff: Send,
    <B::Backoff as Backoff>::Future: Send + 'static,
{
    simulate_n_with(CLIENTS, down, backoff).await
}

/// Runs a herd of `clients` with the default backoff.
pub async fn simulate_n(clients: usize, down: Duration) -> Herd {
    simulate_n_with(clients, down, tower_epoch::backoff::default_backoff()).await
}

/// Runs a herd of `clients` with `backoff`.
///
/// Each step of paused time is followed by `max(10, clients / 100)` yields of the runtime
/// (each runs up to 61 tasks, tokio's event interval), so that the drivers woken in a step
/// run in it: 10 for [`CLIENTS`], as before `clients` was a parameter.
pub async fn simulate_n_with<B>(clients: usize, down: Duration, backoff: B) -> Herd
where
    B: MakeBackoff + Clone + Send + 'static,
    B::Backoff: Send,
    <B::Backoff as Backoff>::Future: Send + 'static,
{
    let yields = (clients / 100).max(10);
    let log: Arc<Mutex<Vec<Instant>>> = Arc::default();
    // `None` while the clients are first connecting; then the time the server comes back.
    let back: Arc<Mutex<Option<Instant>>> = Arc::default();
    let handles: Vec<Handle> = (0..clients)
        .map(|_| {
            let (log, back) = (Arc::clone(&log), Arc::clone(&back));
            let connector = service_fn(move |(): ()| {
                let now = Instant::now();
                let back = *back.lock().unwrap();
                let up = match back {
                    None => true,
                    Some(back) => {
                        log.lock().unwrap().push(now);
                        now >= back
                    }
                };
                let conn = service_fn(|x: u32| async move { Ok::<_, Infallible>(x) });
                std::future::ready(if up { Ok(conn) } else { Err("server down") })
            });
            let layer = ReconnectLayer::new(()).with_backoff(backoff.clone());
            let handle = layer.handle();
            drop(layer.layer(connector));
            handle.connect().expect("a fresh connection connects");
            handle
        })
        .collect();
    for _ in 0..1_000 {
        if handles.iter().all(|h| h.state().is_connected()) {
            break;
        }
        settle(yields).await;
    }
    assert!(
        handles.iter().all(|h| h.state().is_connected()),
        "connected before the drop"
    );

    let dropped = Instant::now();
    *back.lock().unwrap() = Some(dropped + down);
    for handle in &handles {
        let epoch = handle.epoch();
        assert!(handle.report_failure(epoch, "the server went away"));
    }
    let step = Duration::from_millis(1);
    let limit = Duration::from_secs(300);
    // The clients not yet back. Nothing fails once the server is back, so a client that is
    // connected stays connected: only these need looking at after each step.
    let mut waiting: Vec<&Handle> = handles.iter().collect();
    waiting.retain(|h| !h.state().is_connected());
    while !waiting.is_empty() && dropped.elapsed() < limit {
        tokio::time::advance(step).await;
        settle(yields).await;
        waiting.retain(|h| !h.state().is_connected());
    }
    let all_back = dropped.elapsed();
    let mut attempts: Vec<Duration> = log.lock().unwrap().iter().map(|t| *t - dropped).collect();
    attempts.sort();
    Herd {
        attempts,
        connected: handles.iter().filter(|h| h.state().is_connected()).count(),
        all_back,
    }
}

async fn settle(yields: usize) {
    for _ in 0..yields {
        tokio::task::yield_now().await;
    }
}
