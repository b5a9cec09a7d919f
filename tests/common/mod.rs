//! Test support: a ledger connector that hands out numbered connections, a teardown that counts
//! closes per number, and helpers to drive paused time.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;
use tower_epoch::teardown::CloseCause;
use tower_epoch::{BoxError, Handle, Reconnect, ReconnectLayer, State, backoff::Schedule};

/// What one connect attempt does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Succeeds after this long (zero: at once).
    Ok(Duration),
    /// Fails after this long.
    Fail(Duration),
    /// Never completes (only the connect timeout ends it).
    Hang,
}

/// How one teardown behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    After(Duration),
    Hang,
}

#[derive(Default, Debug)]
pub struct Book {
    /// Connections handed out, by number, with the target they were made for.
    pub opened: BTreeMap<u64, String>,
    /// Completed closes per connection number.
    pub closes: BTreeMap<u64, u32>,
    /// Teardowns started per connection number, with their cause.
    pub teardowns: Vec<(u64, CloseCause)>,
    /// Connections dropped (every clone gone).
    pub dropped: BTreeMap<u64, u32>,
    /// Teardowns cut before they completed (the close timeout dropped them).
    pub cut: BTreeMap<u64, u32>,
    /// Requests served: (connection, request).
    pub served: Vec<(u64, u32)>,
    /// Requests that reached a connection whose teardown had begun: (connection, request).
    pub late: Vec<(u64, u32)>,
    /// Targets seen by attempts, in order.
    pub targets: Vec<String>,
    script: VecDeque<Attempt>,
    default_attempt: Option<Attempt>,
    close_script: VecDeque<Close>,
    default_close: Option<Close>,
    next: u64,
}

impl Book {
    /// Forgets scripted attempts and closes that have not happened yet.
    pub fn clear_scripts(&mut self) {
        self.script.clear();
        self.close_script.clear();
    }
}

/// Shared, inspectable book of everything the connector and teardown did.
#[derive(Clone, Default, Debug)]
pub struct Ledger(pub Arc<Mutex<Book>>);

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.0.lock().unwrap()
    }

    /// Scripts the next attempts, in order; after the script, attempts succeed at once.
    pub fn script(&self, attempts: impl IntoIterator<Item = Attempt>) -> &Self {
        self.book().script.extend(attempts);
        self
    }

    /// What attempts do once the script is exhausted.
    pub fn default_attempt(&self, attempt: Attempt) -> &Self {
        self.book().default_attempt = Some(attempt);
        self
    }

    pub fn close_script(&self, closes: impl IntoIterator<Item = Close>) -> &Self {
        self.book().close_script.extend(closes);
        self
    }

    /// How teardowns behave once the close script is exhausted.
    pub fn default_close(&self, close: Close) -> &Self {
        self.book().default_close = Some(close);
        self
    }

    pub fn opened(&self) -> Vec<u64> {
        self.book().opened.keys().copied().collect()
    }

    pub fn closes(&self, id: u64) -> u32 {
        self.book().closes.get(&id).copied().unwrap_or(0)
    }

    /// Connections opened and neither closed nor cut.
    pub fn open_ids(&self) -> Vec<u64> {
        let book = self.book();
        book.opened
            .keys()
            .copied()
            .filter(|id| !book.closes.contains_key(id) && !book.cut.contains_key(id))
            .collect()
    }

    /// Connections opened whose teardown has not started.
    pub fn untouched_ids(&self) -> Vec<u64> {
        let book = self.book();
        book.opened
            .keys()
            .copied()
            .filter(|id| !book.teardowns.iter().any(|(t, _)| t == id))
            .collect()
    }

    /// Panics if any connection was closed (or cut) more than once, or torn down twice.
    pub fn assert_closed_at_most_once(&self) {
        let book = self.book();
        for id in book.opened.keys() {
            let n = book.closes.get(id).unwrap_or(&0) + book.cut.get(id).unwrap_or(&0);
            assert!(n <= 1, "connection {id} closed {n} times");
            let t = book.teardowns.iter().filter(|(t, _)| t == id).count();
            assert!(t <= 1, "connection {id} torn down {t} times");
        }
    }

    pub fn connector(&self) -> Connector {
        Connector {
            ledger: self.clone(),
        }
    }

    pub fn teardown(&self) -> LedgerTeardown {
        LedgerTeardown {
            ledger: self.clone(),
        }
    }
}

/// The connector: `Service<String>` handing out numbered [`Conn`]s per the script.
#[derive(Clone, Debug)]
pub struct Connector {
    ledger: Ledger,
}

#[derive(Debug, thiserror::Error)]
#[error("connect refused: {0}")]
pub struct ConnectError(pub String);

impl Service<String> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: String) -> Self::Future {
        let ledger = self.ledger.clone();
        let attempt = {
            let mut book = ledger.book();
            book.targets.push(target.clone());
            book.script
                .pop_front()
                .or(book.default_attempt)
                .unwrap_or(Attempt::Ok(Duration::ZERO))
        };
        Box::pin(async move {
            match attempt {
                Attempt::Ok(delay) => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let mut book = ledger.book();
                    book.next += 1;
                    let id = book.next;
                    book.opened.insert(id, target);
                    drop(book);
                    Ok(Conn::new(id, ledger.clone()))
                }
                Attempt::Fail(delay) => {
                    tokio::time::sleep(delay).await;
                    Err(ConnectError(target))
                }
                Attempt::Hang => std::future::pending().await,
            }
        })
    }
}

/// A numbered connection; a `Service<u32>` answering `(number, request)`.
#[derive(Clone, Debug)]
pub struct Conn {
    pub id: u64,
    inner: Arc<ConnInner>,
}

#[derive(Debug)]
struct ConnInner {
    id: u64,
    ledger: Ledger,
    broken: std::sync::atomic::AtomicBool,
    /// `Some(failed)` once the transport ended.
    ended: tokio::sync::watch::Sender<Option<bool>>,
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        *self.ledger.book().dropped.entry(self.id).or_default() += 1;
    }
}

impl Conn {
    fn new(id: u64, ledger: Ledger) -> Self {
        Conn {
            id,
            inner: Arc::new(ConnInner {
                id,
                ledger,
                broken: Default::default(),
                ended: tokio::sync::watch::Sender::new(None),
            }),
        }
    }

    /// The transport ends: with a failure, or normally (the peer said goodbye).
    pub fn end(&self, failed: bool) {
        self.inner.ended.send_replace(Some(failed));
    }

    /// Completes when the transport ends (a monitor).
    pub fn ended(&self) -> impl Future<Output = Result<(), BoxError>> + Send + use<> {
        let mut ended = self.inner.ended.subscribe();
        async move {
            let failed = *ended.wait_for(Option::is_some).await?;
            match failed {
                Some(true) => Err("transport failed".into()),
                _ => Ok(()),
            }
        }
    }

    /// Makes `poll_ready` fail from now on.
    pub fn break_it(&self) {
        self.inner
            .broken
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("connection {0} is broken")]
pub struct Broken(pub u64);

impl Service<u32> for Conn {
    type Response = (u64, u32);
    type Error = Broken;
    type Future = std::future::Ready<Result<(u64, u32), Broken>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Broken>> {
        if self.inner.broken.load(std::sync::atomic::Ordering::SeqCst) {
            Poll::Ready(Err(Broken(self.id)))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, req: u32) -> Self::Future {
        let mut book = self.inner.ledger.book();
        if book.teardowns.iter().any(|(id, _)| *id == self.id) {
            book.late.push((self.id, req));
        }
        book.served.push((self.id, req));
        std::future::ready(Ok((self.id, req)))
    }
}

/// A teardown that follows the close script and counts completed closes per number.
#[derive(Clone, Debug)]
pub struct LedgerTeardown {
    ledger: Ledger,
}

impl tower_epoch::teardown::Teardown<Conn> for LedgerTeardown {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn teardown(&mut self, conn: Conn, cause: CloseCause) -> Self::Future {
        let ledger = self.ledger.clone();
        let close = {
            let mut book = ledger.book();
            book.teardowns.push((conn.id, cause));
            book.close_script
                .pop_front()
                .or(book.default_close)
                .unwrap_or(Close::After(Duration::ZERO))
        };
        let guard = CutGuard {
            id: conn.id,
            ledger: ledger.clone(),
            done: false,
        };
        Box::pin(async move {
            let mut guard = guard;
            match close {
                Close::After(delay) => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    *ledger.book().closes.entry(conn.id).or_default() += 1;
                    guard.done = true;
                }
                Close::Hang => std::future::pending().await,
            }
            drop(conn);
        })
    }
}

/// Records a teardown dropped before it completed.
struct CutGuard {
    id: u64,
    ledger: Ledger,
    done: bool,
}

impl Drop for CutGuard {
    fn drop(&mut self) {
        if !self.done {
            *self.ledger.book().cut.entry(self.id).or_default() += 1;
        }
    }
}

pub const BACKOFF: Duration = Duration::from_millis(100);
pub const SLOW_CLOSE: Duration = Duration::from_secs(3);

/// The usual layer for tests: fixed 100 ms backoff, ledger teardown, 1 s connect timeout,
/// 10 s close timeout, 1 s stable period.
pub fn layer(ledger: &Ledger) -> ReconnectLayer<String, Schedule, LedgerTeardown> {
    ReconnectLayer::new("target".to_string())
        .with_backoff(Schedule::new([BACKOFF]).unwrap())
        .with_teardown(ledger.teardown())
        .with_connect_timeout(Duration::from_secs(1))
        .with_close_timeout(Duration::from_secs(10))
        .with_stable_after(Duration::from_secs(1))
}

/// Builds the service and handle over `ledger` with `layer` and spawns the driver.
pub fn start<W>(
    ledger: &Ledger,
    layer: ReconnectLayer<String, Schedule, LedgerTeardown, W>,
) -> (Reconnect<Conn>, Handle)
where
    W: tower_epoch::teardown::Monitor<Conn> + Clone + Send + 'static,
    W::Future: Send + 'static,
{
    let handle = layer.handle();
    let svc = tower::Layer::layer(&layer, ledger.connector());
    (svc, handle)
}

/// Lets every runnable task run without advancing time.
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Advances paused time by `d` and lets tasks run.
pub async fn advance(d: Duration) {
    settle().await;
    tokio::time::advance(d).await;
    settle().await;
}

/// Waits (bounded by 60 s of paused time) for a state matching `pred`.
pub async fn wait_for(handle: &Handle, pred: impl Fn(&State) -> bool) -> State {
    let mut rx = handle.subscribe();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| pred(s)))
        .await
        .expect("state not reached within 60 s")
        .expect("state channel open")
        .clone()
}

/// Waits until nothing is in flight: no teardown pending (every opened, non-installed
/// connection closed) and the state is settled (connected, idle or gave up).
pub async fn quiesce(handle: &Handle, ledger: &Ledger) {
    for _ in 0..10_000 {
        settle().await;
        let state = handle.state();
        let l = handle.ledger();
        let settled = matches!(
            state,
            State::Idle | State::Connected { .. } | State::GaveUp { .. }
        );
        let installed = u64::from(state.is_connected());
        if settled
            && l.opened == l.closed + installed
            && ledger.book().opened.len() as u64 == l.opened
        {
            return;
        }
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    panic!("no quiescence: {:?} {:?}", handle.state(), handle.ledger());
}

/// Polls the service for readiness once, without blocking.
pub fn poll_ready_now(svc: &mut Reconnect<Conn>) -> Poll<Result<(), BoxError>> {
    let waker = futures_noop_waker();
    let mut cx = Context::from_waker(&waker);
    Service::<u32>::poll_ready(svc, &mut cx)
}

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}
