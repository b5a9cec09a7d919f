//! A custom transport under `tower-epoch`: a tiny line protocol over TCP.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example custom_transport
//! ```
//!
//! It runs by itself in under two seconds, prints a timeline of what happens, and exits with a
//! non-zero status if anything it checks fails.
//!
//! # What it shows
//!
//! - **A transport of your own.** [`Connector`] is a `tower::Service<SocketAddr>` that opens a
//!   TCP connection and returns a [`LineConn`]: a cheap, `Clone` handle to a per-connection task.
//!   `LineConn` is itself a `tower::Service<String>` that sends one line and returns the reply.
//!   When the socket dies the task ends, `LineConn::poll_ready` fails, and the middleware
//!   reconnects with backoff.
//! - **A `ServiceBuilder` stack** with the timeout outside the reconnect layer, so a request that
//!   waits for a (re)connection is bounded:
//!   `ServiceBuilder::new().timeout(..).buffer(..).layer(reconnect).service(Connector)`.
//!   The buffer matters: tower's timeout only bounds the response future, not `poll_ready`, and
//!   the reconnect layer waits in `poll_ready`. Behind a buffer that wait happens inside the
//!   response future, where the timeout sees it.
//! - **A graceful teardown**: a closure that sends `QUIT` and waits for the server's `BYE`.
//! - **A monitor**: a closure that resolves when the connection's socket task ends, so a dead
//!   connection is noticed and replaced without waiting for the next request.
//! - **A server restart**: the server goes away (listener and every socket closed), the client
//!   waits to retry with backoff, the server comes back on the same port, and a request that was
//!   waiting all along is served by a new connection on a new epoch.
//! - **A disconnect/connect race**: `disconnect()` immediately followed by `connect()` while the
//!   old connection is still saying goodbye (the server's `BYE` is slow). The new connection does
//!   not wait for the old teardown, the old one still closes gracefully, and exactly one
//!   connection, the newest epoch, remains.
//!
//! # The protocol
//!
//! ```text
//! server: HELLO <session>          (on accept)
//! client: ECHO <text>   server: session <session>: <text>
//! client: QUIT          server: BYE (then closes the socket)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tower::timeout::error::Elapsed;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_epoch::backoff::Schedule;
use tower_epoch::teardown::CloseCause;
use tower_epoch::{BoxError, Epoch, Handle, ReconnectLayer, State};

/// How long a request may take, waiting for a connection included (the timeout layer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The bound on every other wait in this example.
const WAIT: Duration = Duration::from_secs(3);
/// How long the server takes to say `BYE` during the disconnect/connect race.
const SLOW_GOODBYE: Duration = Duration::from_millis(300);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Prints a line prefixed with the time since the start of the example.
macro_rules! log {
    ($($arg:tt)*) => {
        println!("[{:>5} ms] {}", started().elapsed().as_millis(), format_args!($($arg)*))
    };
}

/// The start of the example (the first call fixes it).
fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

// ------------------------------------------------------------------------------------------------
// The client side: a connector and the connection it produces.
// ------------------------------------------------------------------------------------------------

/// Opens connections: the service the reconnect layer wraps.
#[derive(Clone, Copy, Debug)]
struct Connector;

impl Service<SocketAddr> for Connector {
    type Response = LineConn;
    type Error = io::Error;
    type Future = BoxFuture<io::Result<LineConn>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, addr: SocketAddr) -> Self::Future {
        Box::pin(LineConn::connect(addr))
    }
}

/// One request waiting for its reply line.
type Request = (String, oneshot::Sender<String>);

/// A connection: a handle to the task that owns the socket. Cloning it is cheap; every clone
/// talks to the same socket. (The reconnect service keeps a clone of the installed connection,
/// which is why the connection type must be `Clone`.)
#[derive(Clone, Debug)]
struct LineConn {
    /// The session number the server greeted us with, to tell connections apart in the output.
    session: u64,
    requests: mpsc::UnboundedSender<Request>,
}

/// The error of a request on a connection whose socket is gone.
#[derive(Debug)]
struct ConnectionLost {
    session: u64,
}

impl fmt::Display for ConnectionLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection to session {} lost", self.session)
    }
}

impl StdError for ConnectionLost {}

impl LineConn {
    async fn connect(addr: SocketAddr) -> io::Result<LineConn> {
        let socket = TcpStream::connect(addr).await?;
        let (read, write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines.next_line().await?.unwrap_or_default();
        let session = greeting
            .strip_prefix("HELLO ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected greeting {greeting:?}")))?;
        log!("client: connected to {addr}, server says this is session {session}");
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(drive_socket(lines, write, queue));
        Ok(LineConn { session, requests })
    }

    /// Sends one line and waits for the reply line.
    fn send(&self, line: String) -> impl Future<Output = Result<String, ConnectionLost>> + use<> {
        let lost = ConnectionLost {
            session: self.session,
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = self.requests.send((line, reply_tx)).is_ok();
        async move {
            if !sent {
                return Err(lost);
            }
            // The task drops `reply_tx` without answering when the socket dies.
            reply_rx.await.map_err(|_| lost)
        }
    }

    /// Resolves once the socket task has ended (the socket is closed).
    async fn closed(&self) {
        self.requests.closed().await;
    }

    /// The graceful teardown: say `QUIT`, wait for `BYE` and for the socket to close.
    ///
    /// Closing explicitly matters: dropping this clone would not close the socket while other
    /// clones (such as the one the reconnect service caches) are still alive.
    async fn close(self, cause: CloseCause) {
        let session = self.session;
        match self.send("QUIT".to_string()).await {
            Ok(bye) => {
                self.closed().await;
                log!("teardown: session {session} ({cause}): server said {bye:?}, socket closed");
            }
            Err(_) => log!("teardown: session {session} ({cause}): socket already gone"),
        }
    }
}

impl Service<String> for LineConn {
    type Response = String;
    type Error = ConnectionLost;
    type Future = BoxFuture<Result<String, ConnectionLost>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectionLost>> {
        // A dead socket shows here: the middleware reports it as a connection failure and
        // reconnects. (A request already sent when the socket dies fails with `ConnectionLost`,
        // which the layer's failure predicate classifies the same way.)
        if self.requests.is_closed() {
            Poll::Ready(Err(ConnectionLost {
                session: self.session,
            }))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, line: String) -> Self::Future {
        Box::pin(self.send(line))
    }
}

/// The per-connection task: writes each request, reads its reply. It ends, closing the socket,
/// when the server closes it (or on any I/O error) or when every `LineConn` clone is gone.
async fn drive_socket(
    mut lines: Lines<BufReader<OwnedReadHalf>>,
    mut write: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Request>,
) {
    loop {
        tokio::select! {
            request = queue.recv() => {
                let Some((line, reply)) = request else { return };
                if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    return;
                }
                match lines.next_line().await {
                    Ok(Some(answer)) => {
                        let _ = reply.send(answer);
                    }
                    _ => return,
                }
            }
            // The server only speaks when spoken to: anything read while idle is end-of-file or
            // an error. (`next_line` is cancel safe, so racing it against `recv` loses nothing.)
            _ = lines.next_line() => return,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The server side: an in-process server that can be stopped and restarted on the same port, and
// keeps a book of its sessions across restarts.
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ServerBook {
    next_session: AtomicU64,
    /// Sessions currently open.
    open: watch::Sender<BTreeSet<u64>>,
    /// Sessions that ended: `true` if they ended with `QUIT`/`BYE`.
    closed: Mutex<BTreeMap<u64, bool>>,
    goodbye_delay: Mutex<Duration>,
}

/// Marks a session open for its lifetime; dropping it (even by aborting the task) records the
/// close.
struct Session {
    id: u64,
    graceful: bool,
    book: Arc<ServerBook>,
}

impl Session {
    fn open(book: &Arc<ServerBook>) -> Session {
        let id = book.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        book.open.send_modify(|open| {
            open.insert(id);
        });
        log!("server: session {id} opened");
        Session {
            id,
            graceful: false,
            book: Arc::clone(book),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let how = if self.graceful {
            "gracefully"
        } else {
            "abruptly"
        };
        log!("server: session {} closed {how}", self.id);
        self.book
            .closed
            .lock()
            .unwrap()
            .insert(self.id, self.graceful);
        self.book.open.send_modify(|open| {
            open.remove(&self.id);
        });
    }
}

struct EchoServer {
    addr: SocketAddr,
    book: Arc<ServerBook>,
    accept: Option<JoinHandle<()>>,
}

impl EchoServer {
    async fn start() -> io::Result<EchoServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut server = EchoServer {
            addr: listener.local_addr()?,
            book: Arc::default(),
            accept: None,
        };
        server.accept = Some(tokio::spawn(accept(listener, Arc::clone(&server.book))));
        log!("server: listening on {}", server.addr);
        Ok(server)
    }

    /// Closes the listener and every accepted socket, and waits until all sessions are closed.
    async fn stop(&mut self) -> Result<(), BoxError> {
        if let Some(accept) = self.accept.take() {
            // Aborting the accept task drops the listener and its `JoinSet`, which aborts every
            // session task; each session's socket is dropped with it.
            accept.abort();
            let _ = accept.await;
        }
        let mut open = self.book.open.subscribe();
        within(
            "the server's sessions to close",
            open.wait_for(BTreeSet::is_empty),
        )
        .await??;
        log!("server: stopped");
        Ok(())
    }

    /// Listens again on the same address, retrying the bind briefly if the port is not free yet.
    async fn restart(&mut self) -> io::Result<()> {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) if tries < 20 => {
                    tries += 1;
                    log!("server: bind {} failed ({error}), retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(error) => return Err(error),
            }
        };
        self.accept = Some(tokio::spawn(accept(listener, Arc::clone(&self.book))));
        log!("server: listening again on {}", self.addr);
        Ok(())
    }

    fn set_goodbye_delay(&self, delay: Duration) {
        *self.book.goodbye_delay.lock().unwrap() = delay;
    }

    fn open_sessions(&self) -> Vec<u64> {
        self.book.open.borrow().iter().copied().collect()
    }

    /// `Some(true)` if the session ended with `QUIT`/`BYE`, `Some(false)` if it was cut,
    /// `None` if it is still open.
    fn ended_gracefully(&self, session: u64) -> Option<bool> {
        self.book.closed.lock().unwrap().get(&session).copied()
    }
}

async fn accept(listener: TcpListener, book: Arc<ServerBook>) {
    let mut sessions = JoinSet::new();
    loop {
        if let Ok((socket, _)) = listener.accept().await {
            sessions.spawn(serve(socket, Arc::clone(&book)));
        }
        while sessions.try_join_next().is_some() {}
    }
}

async fn serve(socket: TcpStream, book: Arc<ServerBook>) {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    // Declared last, so it is dropped (and the close recorded) before the socket closes.
    let mut session = Session::open(&book);
    let greeting = format!("HELLO {}\n", session.id);
    if write.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match line.split_once(' ') {
            Some(("ECHO", text)) => format!("session {}: {text}", session.id),
            None if line == "QUIT" => {
                let delay = *book.goodbye_delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                session.graceful = write.write_all(b"BYE\n").await.is_ok();
                return;
            }
            _ => "ERR unknown command".to_string(),
        };
        if write
            .write_all(format!("{reply}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The demonstration.
// ------------------------------------------------------------------------------------------------

#[tokio::main(flavor = "current_thread")]
async fn main() {
    started();
    if let Err(error) = run().await {
        eprintln!("custom_transport FAILED: {error}");
        std::process::exit(1);
    }
    log!("all checks passed");
}

async fn run() -> Result<(), BoxError> {
    let mut server = EchoServer::start().await?;

    // One layer manages one logical connection. Take its handle before the layer disappears
    // into the stack.
    let reconnect = ReconnectLayer::new(server.addr)
        .with_backoff(Schedule::new([50, 100].map(Duration::from_millis))?)
        .with_connect_timeout(Duration::from_millis(500))
        .with_close_timeout(Duration::from_secs(1))
        .with_teardown(|conn: LineConn, cause: CloseCause| conn.close(cause))
        // Watch the installed connection: a socket that dies is noticed without traffic.
        .with_monitor(|conn: &LineConn, _epoch| {
            let conn = conn.clone();
            async move {
                conn.closed().await;
                Err::<(), BoxError>(
                    ConnectionLost {
                        session: conn.session,
                    }
                    .into(),
                )
            }
        })
        .with_failure_predicate(|error| error.is::<ConnectionLost>());
    let handle = reconnect.handle();

    // Outermost first: timeout ▸ buffer ▸ reconnect ▸ connector. Applying the reconnect layer
    // spawns its driver on the current runtime.
    //
    // The buffer is what lets the timeout bound a wait for a connection (see the top of the
    // file). One caveat: a buffer stops for good at its inner service's first `poll_ready`
    // error, which the reconnect service returns only for terminal states (`GaveUp` with an
    // attempt limit, `Shutdown`). With an attempt limit, `connect()` after `GaveUp` would not
    // revive the buffer: bound `ready()` with `tokio::time::timeout` instead of buffering.
    let svc = ServiceBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .buffer(32)
        .layer(reconnect)
        .service(Connector);

    // The state is a `watch`: level-triggered, so a slow reader sees the latest state rather
    // than every step. Good enough for a timeline.
    let timeline = tokio::spawn(print_timeline(handle.subscribe()));

    // --------------------------------------------------------------------------------------------
    log!("── 1. Not connected yet: a request waits, and the timeout layer bounds the wait");
    let asked = Instant::now();
    let outcome = ask(svc.clone(), "ECHO anyone there?").await;
    let waited = asked.elapsed();
    check(
        matches!(&outcome, Err(error) if error.is::<Elapsed>()) && waited >= REQUEST_TIMEOUT,
        format!(
            "the timeout layer ended the wait after {} ms ({})",
            waited.as_millis(),
            match &outcome {
                Ok(reply) => format!("unexpected reply {reply:?}"),
                Err(error) => error.to_string(),
            }
        ),
    )?;

    // --------------------------------------------------------------------------------------------
    log!("── 2. connect()");
    let epoch = handle.connect()?;
    wait_state(&handle, "connected", State::is_connected).await?;
    let (first_epoch, first) = installed(&handle)?;
    check(first_epoch == epoch, format!("connected on {epoch}"))?;
    let reply = ask(svc.clone(), "ECHO hello").await?;
    check(
        reply == format!("session {}: hello", first.session),
        format!("reply {reply:?} from session {}", first.session),
    )?;

    // --------------------------------------------------------------------------------------------
    log!("── 3. The server restarts");
    server.stop().await?;
    within("the client's socket task to see EOF", first.closed()).await?;
    // No request is needed to notice: the monitor saw the socket task end and reported a
    // failure of that connection's epoch, which starts the reconnect.
    let lost = wait_state(
        &handle,
        "the reconnect after the loss",
        |s| matches!(s, State::WaitingToRetry { epoch, .. } if *epoch == first_epoch),
    )
    .await?;
    log!(
        "  ✔ the monitor noticed session {} died, without traffic: {lost}",
        first.session
    );
    // A request sent now waits for the new connection, within the request timeout.
    let waiting = tokio::spawn(ask(svc.clone(), "ECHO are you back?"));
    let refused = wait_state(&handle, "a refused reconnect attempt", |s| {
        matches!(s, State::WaitingToRetry { last_error, .. }
            if matches!(last_error.downcast_ref(), Some(tower_epoch::Error::Connect(_))))
    })
    .await?;
    check(
        refused.epoch() > Some(first_epoch),
        format!("a reconnect attempt was refused while the server was down: {refused}"),
    )?;
    server.restart().await?;
    let reply = within("the request that waited", waiting).await???;
    let (second_epoch, second) = installed(&handle)?;
    check(
        second_epoch > first_epoch && second.session != first.session,
        format!(
            "reconnected on a new epoch ({first_epoch} → {second_epoch}) and session ({} → {})",
            first.session, second.session
        ),
    )?;
    check(
        reply == format!("session {}: are you back?", second.session),
        format!("the waiting request was served by the new session: {reply:?}"),
    )?;
    check(
        server.ended_gracefully(first.session) == Some(false),
        format!("session {} was cut by the server going away", first.session),
    )?;

    // --------------------------------------------------------------------------------------------
    log!("── 4. disconnect() and connect() at once, while the old connection says goodbye slowly");
    server.set_goodbye_delay(SLOW_GOODBYE);
    let (old_epoch, old) = installed(&handle)?;
    let old_closed = handle.disconnect();
    log!("main: disconnect() → state {}", handle.state());
    let new_epoch = handle.connect()?;
    log!("main: connect()    → state {}", handle.state());
    check(
        matches!(handle.state(), State::Connecting { epoch, .. } if epoch == new_epoch),
        format!("connect() started {new_epoch} without waiting for the old teardown"),
    )?;
    wait_state(&handle, "the new connection", State::is_connected).await?;
    let open = server.open_sessions();
    check(
        open.len() == 2 && open.contains(&old.session),
        format!(
            "the new connection came up while session {} was still closing (open: {open:?})",
            old.session
        ),
    )?;
    within("the old connection's teardown", old_closed).await?;
    log!("main: the disconnect future resolved: the old teardown is done");

    let (epoch, current) = installed(&handle)?;
    check(
        epoch == new_epoch && epoch == handle.epoch() && epoch > old_epoch,
        format!("the installed connection is the newest epoch ({epoch})"),
    )?;
    check(
        server.open_sessions() == [current.session],
        format!(
            "exactly one session is open on the server: {:?}",
            server.open_sessions()
        ),
    )?;
    check(
        server.ended_gracefully(old.session) == Some(true),
        format!(
            "the old session {} closed gracefully (QUIT → BYE)",
            old.session
        ),
    )?;
    let ledger = handle.ledger();
    check(
        ledger.opened - ledger.closed == 1,
        format!(
            "the middleware holds exactly one open connection ({} opened, {} closed)",
            ledger.opened, ledger.closed
        ),
    )?;
    let reply = ask(svc.clone(), "ECHO still there?").await?;
    check(
        reply == format!("session {}: still there?", current.session),
        format!("requests go to the new connection: {reply:?}"),
    )?;

    // --------------------------------------------------------------------------------------------
    log!("── 5. Final disconnect and summary");
    server.set_goodbye_delay(Duration::ZERO);
    within("the final disconnect", handle.disconnect()).await?;
    wait_state(&handle, "idle", |s| matches!(s, State::Idle)).await?;
    let ledger = handle.ledger();
    log!(
        "ledger: {} attempts, {} opened, {} installed, {} discarded, {} closed \
         ({} cut at the close timeout), {} failures, {} stale events ignored",
        ledger.attempts,
        ledger.opened,
        ledger.installed,
        ledger.discarded,
        ledger.closed,
        ledger.close_timeouts,
        ledger.failures,
        ledger.ignored
    );
    check(
        ledger.installed == 3 && ledger.discarded == 0,
        "three connections were installed (first, after the restart, after the race)",
    )?;
    check(
        ledger.opened == ledger.installed + ledger.discarded && ledger.closed == ledger.opened,
        "the books balance: every opened connection was closed",
    )?;
    check(
        ledger.close_timeouts == 0,
        "no teardown had to be cut at the close timeout",
    )?;
    check(
        ledger.failures >= 2,
        format!(
            "failures counted: the lost session and at least one refused attempt ({})",
            ledger.failures
        ),
    )?;
    check(
        server.open_sessions().is_empty(),
        "no session is left open on the server",
    )?;

    // Dropping the last handle and service stops the driver.
    drop(svc);
    drop(handle);
    let last = within("the driver to shut down", timeline).await??;
    check(
        matches!(last, State::Shutdown),
        format!("the driver shut down ({last})"),
    )?;
    server.stop().await?;
    Ok(())
}

/// Prints every state change it sees, with its epoch; returns the last state.
async fn print_timeline(mut states: watch::Receiver<State>) -> State {
    loop {
        let state = states.borrow_and_update().clone();
        match &state {
            State::WaitingToRetry { last_error, .. } => {
                log!("state: {state} [{}]", root_cause(&**last_error));
            }
            _ => log!("state: {state}"),
        }
        if states.changed().await.is_err() {
            return state;
        }
    }
}

/// Sends one line through the stack (a clone of it: tower's `Buffer` is `Send` but not `Sync`).
async fn ask<S>(svc: S, line: &str) -> Result<String, BoxError>
where
    S: Service<String, Response = String, Error = BoxError>,
{
    log!("main: request {line:?}");
    // The stack's timeout already bounds the request; this outer bound only guarantees that the
    // example itself cannot hang.
    let reply = within("a request", svc.oneshot(line.to_string())).await?;
    match &reply {
        Ok(reply) => log!("main: reply {reply:?}"),
        Err(error) => log!("main: request failed: {error}"),
    }
    reply
}

fn installed(handle: &Handle) -> Result<(Epoch, LineConn), BoxError> {
    handle
        .connection::<LineConn>()
        .ok_or_else(|| format!("no connection installed (state: {})", handle.state()).into())
}

async fn wait_state(
    handle: &Handle,
    what: &'static str,
    pred: impl FnMut(&State) -> bool,
) -> Result<State, BoxError> {
    let mut states = handle.subscribe();
    let state = within(what, states.wait_for(pred)).await??;
    Ok(state.clone())
}

async fn within<F: Future>(what: &'static str, future: F) -> Result<F::Output, BoxError> {
    timeout(WAIT, future)
        .await
        .map_err(|_| format!("timed out after {WAIT:?} waiting for {what}").into())
}

fn check(ok: bool, what: impl fmt::Display) -> Result<(), BoxError> {
    if ok {
        log!("  ✔ {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

fn root_cause<'a>(mut error: &'a (dyn StdError + 'static)) -> &'a (dyn StdError + 'static) {
    while let Some(source) = error.source() {
        error = source;
    }
    error
}
