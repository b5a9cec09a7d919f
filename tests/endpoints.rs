//! The `Endpoints` set as a balancer's `Discover`, over ledger connections in paused time:
//! endpoints enter while connected and leave while not, come back after a reconnect, and are
//! closed when removed; and `Load` for `Reconnect`.

mod common;

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, Load, PendingRequestsDiscover};
use tower::{Service, ServiceExt, service_fn};
use tower_epoch::endpoints::{EndpointChanges, Endpoints};
use tower_epoch::teardown::CloseCause;
use tower_epoch::{EndpointLoad, ReconnectLayer, State, WhenDisconnected};

type Changes = EndpointChanges<&'static str, Conn>;

/// The changes ready now, as ("+" or "-", key).
fn ready_changes(changes: &mut Changes) -> Vec<(&'static str, &'static str)> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut out = Vec::new();
    while let Poll::Ready(Some(Ok(change))) = changes.poll_next_unpin(&mut cx) {
        out.push(match change {
            Change::Insert(key, _) => ("+", key),
            Change::Remove(key) => ("-", key),
        });
    }
    out
}

/// tower's p2c balancer over the set, each endpoint counting its requests in flight.
fn balancer(changes: Changes) -> Balance<PendingRequestsDiscover<Changes>, u32> {
    Balance::new(PendingRequestsDiscover::new(
        changes,
        CompleteOnResponse::default(),
    ))
}

/// Whether the balancer becomes ready within 30 s (of paused time).
async fn ready_in_time(balance: &mut Balance<PendingRequestsDiscover<Changes>, u32>) -> bool {
    let ready = tokio::time::timeout(Duration::from_secs(30), balance.ready()).await;
    ready.is_ok_and(|ready| ready.is_ok())
}

fn endpoint(ledger: &Ledger) -> tower_epoch::Reconnect<Conn> {
    tower::Layer::layer(&layer(ledger), ledger.connector())
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_enters_when_connected_leaves_when_it_fails_and_returns_after_the_backoff() {
    let (endpoints, mut changes) = Endpoints::new();
    let ledger = Ledger::new();
    assert!(endpoints.insert("a", endpoint(&ledger)).is_none());
    assert_eq!(ready_changes(&mut changes), vec![], "not connected yet");
    settle().await;
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);

    let handle = endpoints.handle(&"a").unwrap();
    let (epoch, conn) = handle.connection::<Conn>().unwrap();
    handle.report_failure(epoch, "dropped");
    assert_eq!(ready_changes(&mut changes), vec![("-", "a")]);
    advance(BACKOFF).await;
    assert!(handle.state().is_connected());
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")], "back");
    assert_eq!(ready_changes(&mut changes), vec![], "once");
    drop(conn);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_reconnected_before_the_balancer_looked_is_inserted_again() {
    let (endpoints, mut changes) = Endpoints::new();
    let ledger = Ledger::new();
    endpoints.insert("a", endpoint(&ledger));
    settle().await;
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);
    let handle = endpoints.handle(&"a").unwrap();
    handle.report_failure(handle.epoch(), "dropped");
    advance(BACKOFF).await;
    // The stream saw only the latest state (connected, a new epoch): the balancer's clone is
    // replaced all the same.
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);
}

#[tokio::test(start_paused = true)]
async fn a_removed_endpoint_leaves_the_balancer_and_is_closed() {
    let (endpoints, mut changes) = Endpoints::new();
    let (a, b) = (Ledger::new(), Ledger::new());
    endpoints.insert("a", endpoint(&a));
    endpoints.insert("b", endpoint(&b));
    settle().await;
    let mut entered = ready_changes(&mut changes);
    entered.sort();
    assert_eq!(entered, vec![("+", "a"), ("+", "b")]);
    assert_eq!(endpoints.len(), 2);

    let closed = endpoints.remove(&"a").expect("it was there");
    tokio::time::timeout(Duration::from_secs(60), closed)
        .await
        .expect("closed within the bound");
    assert_eq!(a.book().teardowns, vec![(1, CloseCause::Disconnect)]);
    assert_eq!(a.closes(1), 1);
    assert_eq!(ready_changes(&mut changes), vec![("-", "a")]);
    assert!(endpoints.remove(&"a").is_none());
    assert_eq!(endpoints.keys(), vec!["b"]);
    assert_eq!(format!("{endpoints:?}"), r#"{"b"}"#);
}

#[tokio::test(start_paused = true)]
async fn a_replaced_endpoint_leaves_and_its_successor_enters() {
    let (endpoints, mut changes) = Endpoints::new();
    let (old, new) = (Ledger::new(), Ledger::new());
    endpoints.insert("a", endpoint(&old));
    settle().await;
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);
    let closed = endpoints.insert("a", endpoint(&new)).expect("replaced");
    closed.await;
    assert_eq!(old.closes(1), 1);
    settle().await;
    assert_eq!(ready_changes(&mut changes), vec![("-", "a"), ("+", "a")]);
    assert_eq!(new.opened(), vec![1]);
    assert_eq!(endpoints.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_added_and_removed_before_the_balancer_looks_is_never_seen() {
    let (endpoints, mut changes) = Endpoints::new();
    let ledger = Ledger::new();
    endpoints.insert("a", endpoint(&ledger));
    settle().await;
    endpoints.remove(&"a").unwrap().await;
    assert_eq!(ready_changes(&mut changes), vec![]);
    assert!(endpoints.is_empty());
    // Its watch ends with it: nothing is left behind.
    advance(Duration::from_secs(60)).await;
    assert_eq!(ready_changes(&mut changes), vec![]);
    assert!(format!("{changes:?}").contains("in_balancer: []"));
}

#[tokio::test(start_paused = true)]
async fn a_terminal_endpoint_stays_out_until_connected_again() {
    let (endpoints, mut changes) = Endpoints::new();
    let ledger = Ledger::new();
    let service = tower::Layer::layer(
        &layer(&ledger).with_max_attempts(1.try_into().unwrap()),
        ledger.connector(),
    );
    endpoints.insert("a", service);
    settle().await;
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);
    let handle = endpoints.handle(&"a").unwrap();
    ledger.default_attempt(Attempt::Fail(Duration::ZERO));
    handle.report_failure(handle.epoch(), "dropped");
    advance(BACKOFF * 10).await;
    assert!(matches!(handle.state(), State::GaveUp { .. }));
    assert_eq!(ready_changes(&mut changes), vec![("-", "a")]);
    ledger.default_attempt(Attempt::Ok(Duration::ZERO));
    handle.connect().unwrap();
    settle().await;
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);
}

/// tower's `Balance` drops an endpoint whose `poll_ready` fails (as with `FailFast`); the set
/// gives it back once it is connected again.
#[tokio::test(start_paused = true)]
async fn a_balancer_that_dropped_a_failing_endpoint_gets_it_back() {
    let (endpoints, changes) = Endpoints::new();
    let (a, b) = (Ledger::new(), Ledger::new());
    for (key, ledger) in [("a", &a), ("b", &b)] {
        let layer = layer(ledger).when_disconnected(WhenDisconnected::FailFast);
        endpoints.insert(key, tower::Layer::layer(&layer, ledger.connector()));
    }
    settle().await;
    let mut balance = balancer(changes);
    let mut send = async |n: u32| {
        let ready = tokio::time::timeout(Duration::from_secs(5), balance.ready()).await;
        ready
            .expect("ready in time")
            .unwrap()
            .call(n)
            .await
            .unwrap()
    };
    for n in 0..20 {
        send(n).await;
    }
    assert!(!a.book().served.is_empty() && !b.book().served.is_empty());

    // a's connection breaks: its poll_ready fails, the balancer drops it.
    a.default_attempt(Attempt::Ok(Duration::ZERO));
    endpoints
        .handle(&"a")
        .unwrap()
        .connection::<Conn>()
        .unwrap()
        .1
        .break_it();
    let before = a.book().served.len();
    for n in 100..120 {
        send(n).await;
    }
    assert_eq!(
        a.book().served.len(),
        before,
        "a serves nothing while it is down"
    );
    advance(BACKOFF).await;
    assert!(endpoints.handle(&"a").unwrap().state().is_connected());
    for n in 200..240 {
        send(n).await;
    }
    let served_by_a_after = a
        .book()
        .served
        .iter()
        .filter(|(conn, n)| *conn == 2 && *n >= 200)
        .count();
    assert!(
        served_by_a_after > 0,
        "a serves again on its new connection"
    );
}

/// A connection that measures its own load.
#[derive(Clone)]
struct Weighed(u32);

impl Service<u32> for Weighed {
    type Response = u32;
    type Error = Infallible;
    type Future = std::future::Ready<Result<u32, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, n: u32) -> Self::Future {
        std::future::ready(Ok(n))
    }
}

impl Load for Weighed {
    type Metric = u32;
    fn load(&self) -> u32 {
        self.0
    }
}

#[tokio::test(start_paused = true)]
async fn the_load_is_the_installed_connections_or_disconnected() {
    let connector = service_fn(|()| async { Ok::<_, Infallible>(Weighed(42)) });
    let layer = ReconnectLayer::new(());
    let handle = layer.handle();
    let mut svc = tower::Layer::layer(&layer, connector);
    assert_eq!(svc.load(), EndpointLoad::Disconnected);
    handle.connect().unwrap();
    settle().await;
    assert_eq!(
        svc.load(),
        EndpointLoad::Disconnected,
        "not checked out yet"
    );
    ServiceExt::<u32>::ready(&mut svc).await.unwrap();
    assert_eq!(svc.load(), EndpointLoad::Connected(42));
    handle.disconnect().await;
    assert_eq!(svc.load(), EndpointLoad::Disconnected, "released");
}

/// With an idle timeout, an endpoint closed as idle stays in the balancer, dormant, and the
/// balancer's readiness connects it again; a lazy endpoint enters dormant and connects the
/// same way.
#[tokio::test(start_paused = true)]
async fn dormant_endpoints_stay_in_the_balancer_and_connect_on_its_readiness() {
    let (endpoints, changes) = Endpoints::new();
    let (idle, lazy) = (Ledger::new(), Ledger::new());
    let idle_layer = layer(&idle).with_idle_timeout(Duration::from_secs(10));
    endpoints.insert("idle", tower::Layer::layer(&idle_layer, idle.connector()));
    let lazy_layer = layer(&lazy).connect_on_demand();
    endpoints.insert("lazy", tower::Layer::layer(&lazy_layer, lazy.connector()));
    settle().await;
    let lazy_handle = endpoints.handle(&"lazy").unwrap();
    assert!(lazy_handle.connects_on_demand(), "not connected by insert");
    assert_eq!(lazy.opened(), Vec::<u64>::new());

    let mut balance = balancer(changes);
    let ready = tokio::time::timeout(Duration::from_secs(5), balance.ready()).await;
    ready.expect("ready").unwrap().call(1).await.unwrap();
    settle().await;
    assert_eq!(
        lazy.opened(),
        vec![1],
        "the balancer's readiness connected it"
    );

    // Both go idle without requests... (the lazy one has no idle timeout: it stays)
    let idle_handle = endpoints.handle(&"idle").unwrap();
    for _ in 0..40 {
        advance(Duration::from_secs(1)).await;
    }
    assert!(idle_handle.connects_on_demand(), "{}", idle_handle.state());
    assert_eq!(idle_handle.ledger().idled, 1);

    // ...and the balancer connects it again: requests keep flowing to both.
    for n in 0..20 {
        let ready = tokio::time::timeout(Duration::from_secs(5), balance.ready()).await;
        ready.expect("ready").unwrap().call(n).await.unwrap();
    }
    settle().await;
    assert!(
        idle_handle.state().is_connected(),
        "{}",
        idle_handle.state()
    );
    assert_eq!(idle.opened().len(), 2, "reconnected after the idle close");
}

/// A lazy `FailFast` endpoint: the balancer's first `poll_ready` demands it and fails with
/// `NotConnected`, so tower's `Balance` drops it. Once it is connected, the set inserts a
/// fresh clone (an earlier version assumed the balancer still had its clone, and the
/// balancer had no endpoint although one was connected).
#[tokio::test(start_paused = true)]
async fn a_lazy_fail_fast_endpoint_dropped_by_the_balancer_is_inserted_again_once_connected() {
    let (endpoints, changes) = Endpoints::new();
    let ledger = Ledger::new();
    let layer = layer(&ledger)
        .connect_on_demand()
        .when_disconnected(WhenDisconnected::FailFast);
    endpoints.insert("a", tower::Layer::layer(&layer, ledger.connector()));
    let mut balance = balancer(changes);
    // The first look: the balancer drops the endpoint (its poll_ready failed), and the
    // request started connecting it.
    let _ = tokio::time::timeout(Duration::from_millis(10), balance.ready()).await;
    settle().await;
    let handle = endpoints.handle(&"a").unwrap();
    assert!(handle.state().is_connected(), "{}", handle.state());
    // Connected, in the set, but never given back to the balancer.
    assert!(
        ready_in_time(&mut balance).await,
        "endpoint a is connected but the balancer never got it back"
    );
}

/// The same after an idle close: a `FailFast` endpoint closed as idle is in the balancer,
/// dormant; the balancer's next `poll_ready` fails and the balancer drops it; the set
/// inserts it again once it is connected.
#[tokio::test(start_paused = true)]
async fn an_idle_closed_fail_fast_endpoint_dropped_by_the_balancer_is_inserted_again_once_connected()
 {
    let (endpoints, changes) = Endpoints::new();
    let ledger = Ledger::new();
    let layer = layer(&ledger)
        .with_idle_timeout(Duration::from_secs(10))
        .when_disconnected(WhenDisconnected::FailFast);
    endpoints.insert("a", tower::Layer::layer(&layer, ledger.connector()));
    settle().await;
    let mut balance = balancer(changes);
    balance.ready().await.unwrap().call(1).await.unwrap();
    let handle = endpoints.handle(&"a").unwrap();
    for _ in 0..40 {
        advance(Duration::from_secs(1)).await;
    }
    assert_eq!(handle.ledger().idled, 1, "{}", handle.state());
    // The next request: the balancer's clone demands and fails fast; the balancer drops it.
    let _ = tokio::time::timeout(Duration::from_millis(10), balance.ready()).await;
    settle().await;
    assert!(handle.state().is_connected(), "{}", handle.state());
    assert!(
        ready_in_time(&mut balance).await,
        "endpoint a is connected again but the balancer never got it back"
    );
}

/// A dormant (lazy) endpoint the user disconnects while it is `Idle`: the state does not
/// change, but it no longer connects on demand, and that is published, so it leaves the
/// balancer.
#[tokio::test(start_paused = true)]
async fn a_dormant_endpoint_disconnected_leaves_the_balancer() {
    let (endpoints, mut changes) = Endpoints::new();
    let ledger = Ledger::new();
    let layer = layer(&ledger).connect_on_demand();
    endpoints.insert("a", tower::Layer::layer(&layer, ledger.connector()));
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")], "dormant: in");
    let handle = endpoints.handle(&"a").unwrap();
    handle.disconnect().await;
    assert!(!handle.connects_on_demand());
    settle().await;
    assert_eq!(
        ready_changes(&mut changes),
        vec![("-", "a")],
        "disconnected by intent: out of the balancer"
    );
}

/// tower's `Balance` keeps every endpoint it polled ready, reserved: by tower's readiness
/// contract the reservation holds the connection, so an endpoint the balancer holds ready does
/// not go idle (the docs of `with_idle_timeout` say so). An endpoint the balancer has not
/// reserved does.
#[tokio::test(start_paused = true)]
async fn an_endpoint_the_balancer_holds_ready_keeps_its_connection() {
    let (endpoints, changes) = Endpoints::new();
    let (held, unheld) = (Ledger::new(), Ledger::new());
    let idle = |ledger: &Ledger| layer(ledger).with_idle_timeout(Duration::from_secs(10));
    endpoints.insert("held", tower::Layer::layer(&idle(&held), held.connector()));
    settle().await;
    let mut balance = balancer(changes);
    balance.ready().await.unwrap().call(1).await.unwrap();
    balance.ready().await.unwrap(); // reserved, never called
    let unheld_handle = {
        let service = tower::Layer::layer(&idle(&unheld), unheld.connector());
        let handle = service.handle();
        handle.connect().unwrap();
        handle
    };
    for _ in 0..100 {
        advance(Duration::from_secs(1)).await;
    }
    assert_eq!(endpoints.handle(&"held").unwrap().ledger().idled, 0);
    assert!(endpoints.handle(&"held").unwrap().state().is_connected());
    assert_eq!(unheld_handle.ledger().idled, 1);
}

/// A dormant `FailFast` endpoint the balancer dropped (its first `poll_ready` failed while it
/// connected) that connected and was closed as idle again while nobody polled the balancer:
/// dormant since a new epoch, it is inserted again (an earlier version thought it still in).
#[tokio::test(start_paused = true)]
async fn a_fail_fast_endpoint_dropped_by_the_balancer_and_idle_again_before_it_looked_is_inserted_again()
 {
    let (endpoints, changes) = Endpoints::new();
    let ledger = Ledger::new();
    // The connect takes 100 ms: longer than the first look.
    ledger.default_attempt(Attempt::Ok(Duration::from_millis(100)));
    let layer = layer(&ledger)
        .connect_on_demand()
        .with_idle_timeout(Duration::from_secs(10))
        .when_disconnected(WhenDisconnected::FailFast);
    endpoints.insert("a", tower::Layer::layer(&layer, ledger.connector()));
    let mut balance = balancer(changes);
    // First request, given up after 10 ms: the balancer's poll_ready demanded the endpoint,
    // got NotConnected, and dropped it.
    let first = tokio::time::timeout(Duration::from_millis(10), balance.ready()).await;
    assert!(first.is_err(), "still connecting");
    // No request for a while: the endpoint connects, is never used, and goes idle.
    for _ in 0..40 {
        advance(Duration::from_secs(1)).await;
    }
    let handle = endpoints.handle(&"a").unwrap();
    assert_eq!(handle.ledger().idled, 1, "{}", handle.state());
    assert!(handle.connects_on_demand(), "dormant again");
    // The next request: the endpoint is dormant in the set, so the balancer should be able to
    // poll it (and connect it again).
    assert!(
        ready_in_time(&mut balance).await,
        "endpoint a is dormant in the set but the balancer no longer has it: every request stalls"
    );
    balance.call(1).await.unwrap();
}

/// The same without an idle timeout: a lazy endpoint whose connection the peer ended
/// normally (dormant again) while nobody polled the balancer.
#[tokio::test(start_paused = true)]
async fn a_fail_fast_lazy_endpoint_dropped_by_the_balancer_and_ended_before_it_looked_is_inserted_again()
 {
    let (endpoints, changes) = Endpoints::new();
    let ledger = Ledger::new();
    ledger.default_attempt(Attempt::Ok(Duration::from_millis(100)));
    let layer = layer(&ledger)
        .with_monitor(|conn: &Conn, _| conn.ended())
        .connect_on_demand()
        .when_disconnected(WhenDisconnected::FailFast);
    endpoints.insert("a", tower::Layer::layer(&layer, ledger.connector()));
    let mut balance = balancer(changes);
    let first = tokio::time::timeout(Duration::from_millis(10), balance.ready()).await;
    assert!(first.is_err(), "still connecting");
    advance(Duration::from_secs(1)).await;
    let handle = endpoints.handle(&"a").unwrap();
    let (_, conn) = handle.connection::<Conn>().expect("connected");
    // The server closes the unused keep-alive connection normally.
    conn.end(false);
    drop(conn);
    advance(Duration::from_secs(1)).await;
    assert!(
        handle.connects_on_demand(),
        "dormant again: {}",
        handle.state()
    );
    assert!(
        ready_in_time(&mut balance).await,
        "endpoint a is dormant in the set but the balancer no longer has it: every request stalls"
    );
}

/// A dormant endpoint that the balancer's readiness woke stays in the balancer while it
/// connects (its clone is the one waiting for the connection), and is inserted afresh once
/// connected.
#[tokio::test(start_paused = true)]
async fn a_dormant_endpoint_woken_by_the_balancer_stays_in_while_it_connects() {
    let (endpoints, mut changes) = Endpoints::new();
    let ledger = Ledger::new();
    ledger.script([Attempt::Ok(Duration::from_millis(100))]);
    let layer = layer(&ledger).connect_on_demand();
    endpoints.insert("a", tower::Layer::layer(&layer, ledger.connector()));
    assert!(!endpoints.is_empty());
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut clone = match changes.poll_next_unpin(&mut cx) {
        Poll::Ready(Some(Ok(Change::Insert("a", clone)))) => clone,
        _ => panic!("a dormant endpoint is in"),
    };
    // The balancer's readiness wakes it.
    assert!(poll_ready_now(&mut clone).is_pending());
    settle().await;
    assert!(matches!(
        endpoints.handle(&"a").unwrap().state(),
        State::Connecting { .. }
    ));
    assert_eq!(
        ready_changes(&mut changes),
        vec![],
        "stays in while it connects"
    );
    advance(Duration::from_millis(100)).await;
    assert_eq!(
        ready_changes(&mut changes),
        vec![("+", "a")],
        "connected: a fresh clone"
    );
    assert!(poll_ready_now(&mut clone).is_ready());
}

/// An endpoint closed as idle enters the balancer dormant once, not again when its teardown
/// completes (dormant since the same epoch).
#[tokio::test(start_paused = true)]
async fn an_idle_closed_endpoint_is_inserted_once_however_long_its_teardown() {
    let (endpoints, mut changes) = Endpoints::new();
    let ledger = Ledger::new();
    ledger.close_script([Close::After(Duration::from_secs(3))]);
    let idle = layer(&ledger).with_idle_timeout(Duration::from_secs(10));
    endpoints.insert("a", tower::Layer::layer(&idle, ledger.connector()));
    settle().await;
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);
    for _ in 0..11 {
        advance(Duration::from_secs(1)).await;
    }
    let handle = endpoints.handle(&"a").unwrap();
    assert!(matches!(handle.state(), State::Disconnecting { .. }));
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")], "dormant");
    for _ in 0..4 {
        advance(Duration::from_secs(1)).await;
    }
    assert!(matches!(handle.state(), State::Idle));
    assert_eq!(
        ready_changes(&mut changes),
        vec![],
        "still dormant since the same epoch"
    );
}

/// A service that was polled ready before it was inserted holds its connection; the set's
/// copy drops that reservation, so the endpoint still goes idle.
#[tokio::test(start_paused = true)]
async fn a_reserved_service_inserted_into_the_set_still_goes_idle() {
    let (endpoints, _changes) = Endpoints::new();
    let ledger = Ledger::new();
    let idle = layer(&ledger).with_idle_timeout(Duration::from_secs(10));
    let mut service = tower::Layer::layer(&idle, ledger.connector());
    service.handle().connect().unwrap();
    ServiceExt::<u32>::ready(&mut service).await.unwrap();
    endpoints.insert("a", service);
    for _ in 0..30 {
        advance(Duration::from_secs(1)).await;
    }
    assert_eq!(endpoints.handle(&"a").unwrap().ledger().idled, 1);
}

/// An endpoint that reconnects at once after a normal end (`NormalEnd::Reconnect`, an HTTP/2
/// GOAWAY) goes from connected straight to connecting: it leaves the balancer while it
/// connects, so that requests go to the others, and comes back once connected.
#[tokio::test(start_paused = true)]
async fn an_endpoint_reconnecting_after_a_normal_end_leaves_while_it_connects() {
    let (endpoints, mut changes) = Endpoints::new();
    let ledger = Ledger::new();
    let layer = layer(&ledger)
        .on_normal_end(tower_epoch::NormalEnd::Reconnect)
        .with_monitor(|conn: &Conn, _| conn.ended());
    endpoints.insert("a", tower::Layer::layer(&layer, ledger.connector()));
    settle().await;
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);
    advance(Duration::from_secs(2)).await; // past the stable period
    ledger.script([Attempt::Ok(Duration::from_millis(100))]);
    let handle = endpoints.handle(&"a").unwrap();
    handle.connection::<Conn>().unwrap().1.end(false);
    settle().await;
    assert!(
        matches!(handle.state(), State::Connecting { .. }),
        "{}",
        handle.state()
    );
    assert_eq!(ready_changes(&mut changes), vec![("-", "a")]);
    advance(Duration::from_millis(100)).await;
    assert_eq!(ready_changes(&mut changes), vec![("+", "a")]);
}
