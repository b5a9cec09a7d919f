//! [`Endpoints`]: a set of managed connections that a tower balancer discovers.
//!
//! tower's balancers drop an endpoint for good at its first `poll_ready` error, and a
//! `ServiceList` never gives it back. [`Endpoints`] is a set of managed connections, each with
//! its own [`ReconnectLayer`](crate::ReconnectLayer) application (so its own backoff and
//! state), and [`EndpointChanges`] is its `tower::discover::Discover`: an endpoint is inserted
//! into the balancer while it is connected and removed while it is not, driven by its state,
//! so that one that comes back serves again. Endpoints are added and removed at run time; a
//! removed one is disconnected and closed. A *dormant* endpoint (of a lazy layer, or closed by
//! its idle timeout) is in the balancer too, whose readiness connects it. (An endpoint the
//! balancer holds ready is reserved, and does not go idle: see
//! [`with_idle_timeout`](crate::ReconnectLayer::with_idle_timeout).)
//!
//! # Measured
//!
//! `tests/balance_loopback.rs` runs three backends on 127.0.0.1 behind tower's p2c `Balance`
//! over this set, sequential requests, a backoff from 20 ms to 80 ms. In one run (`cargo test
//! --test balance_loopback -- --nocapture`):
//!
//! | phase | requests to a, b, c | failed |
//! |---|---|---|
//! | all up | 73, 67, 60 | 0 |
//! | b killed (its sockets dropped; its reconnects refused twice) | 101, 0, 99 | 0 (at most the one in flight on b) |
//! | b restarted on its port | 72, 70, 58 | 0 |
//!
//! b was connected again 23.7 ms after it listened again, at the first attempt after the
//! restart (its backoff timer's, with no failure in between), and served its first request
//! 0.2 ms later. A removed endpoint's server-side socket was closed when `remove(..).await`
//! returned (with a teardown that closes the connection for every copy).
//!
//! ```
//! use std::convert::Infallible;
//! use tower::balance::p2c::Balance;
//! use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
//! use tower::{Layer, Service, ServiceExt, service_fn};
//! use tower_epoch::ReconnectLayer;
//! use tower_epoch::endpoints::Endpoints;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = ReconnectLayer::new(());
//! let (endpoints, changes) = Endpoints::new();
//! for name in ["a", "b", "c"] {
//!     let connector = service_fn(move |()| async move {
//!         Ok::<_, Infallible>(service_fn(move |x: u32| async move { Ok::<_, Infallible>((name, x)) }))
//!     });
//!     endpoints.insert(name, layer.layer(connector)); // connects it
//! }
//! // Each endpoint in the balancer counts its requests in flight, for p2c to compare.
//! let mut balance = Balance::new(PendingRequestsDiscover::new(changes, CompleteOnResponse::default()));
//!
//! let (_, x) = balance.ready().await.unwrap().call(7).await.unwrap();
//! assert_eq!(x, 7);
//!
//! // "b" leaves: it is taken out of the balancer, disconnected and closed.
//! endpoints.remove(&"b").unwrap().await;
//! for _ in 0..10 {
//!     let (name, _) = balance.ready().await.unwrap().call(1).await.unwrap();
//!     assert_ne!(name, "b");
//! }
//! # }
//! ```

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use tokio::sync::watch;
use tower::discover::Change;

use crate::core::lock;
use crate::epoch::Epoch;
use crate::handle::{DisconnectFuture, Handle};
use crate::reconnect::Reconnect;
use crate::state::State;

/// The controller of a set of managed endpoints: add and remove them at run time.
///
/// Cheap to clone; every clone controls the same set. Its [`EndpointChanges`] (from
/// [`new`](Self::new)) goes to the balancer.
pub struct Endpoints<K, C> {
    shared: Arc<Shared<K, C>>,
}

/// The set's membership, shared by the controller and the changes stream.
struct Shared<K, C> {
    registry: Mutex<Registry<K, C>>,
    /// The changes stream, woken when the membership changes.
    waker: AtomicWaker,
}

struct Registry<K, C> {
    members: HashMap<K, Member<C>>,
    /// Keys inserted or removed since the changes stream last looked (each once).
    changed: HashSet<K>,
    next_generation: u64,
}

struct Member<C> {
    /// Tells apart two endpoints inserted under the same key.
    generation: u64,
    /// Never polled: cloned for the balancer each time the endpoint connects.
    service: Reconnect<C>,
}

impl<K, C> Endpoints<K, C>
where
    K: Hash + Eq + Clone,
{
    /// An empty set, and the stream of its changes for a balancer
    /// (`tower::balance::p2c::Balance::new(changes)`).
    pub fn new() -> (Endpoints<K, C>, EndpointChanges<K, C>) {
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry {
                members: HashMap::new(),
                changed: HashSet::new(),
                next_generation: 0,
            }),
            waker: AtomicWaker::new(),
        });
        let changes = EndpointChanges {
            shared: Arc::clone(&shared),
            view: HashMap::new(),
            watches: FuturesUnordered::new(),
            out: VecDeque::new(),
        };
        (Endpoints { shared }, changes)
    }

    /// Adds an endpoint under `key` and connects it ([`Handle::connect`]); it enters the
    /// balancer once connected. An endpoint of a layer that
    /// [connects on demand](crate::ReconnectLayer::connect_on_demand) is not connected here: it
    /// enters the balancer dormant, and the balancer's first `poll_ready` connects it. `service` is a fresh application of a
    /// [`ReconnectLayer`](crate::ReconnectLayer), whose settings (backoff, attempt limit,
    /// timeouts) the endpoint keeps.
    ///
    /// An endpoint already under `key` is replaced: it leaves the balancer and is disconnected;
    /// the returned future resolves once it is closed.
    ///
    /// One layer serves every endpoint when the address is the connector's
    /// (`connector.map_request(move |()| addr)` under `ReconnectLayer::new(())`), or one layer
    /// each (`ReconnectLayer::new(addr)`). To follow an endpoint's transitions from the start,
    /// take `service.handle().events()` before inserting it.
    pub fn insert(&self, key: K, mut service: Reconnect<C>) -> Option<DisconnectFuture> {
        let handle = service.handle();
        // The set's copy is only ever cloned, under its lock: with no connection cached, a
        // clone runs no `Clone` of the user's.
        service.forget();
        let replaced = {
            let mut registry = lock(&self.shared.registry);
            let generation = registry.next_generation;
            registry.next_generation += 1;
            registry.changed.insert(key.clone());
            registry.members.insert(
                key,
                Member {
                    generation,
                    service,
                },
            )
        };
        self.shared.waker.wake();
        if !handle.connects_on_demand() {
            // Only `Shutdown` fails, and then the endpoint never connects: nothing to undo.
            let _ = handle.connect();
        }
        replaced.map(|member| member.service.handle().disconnect())
    }

    /// Removes the endpoint under `key`: it leaves the balancer and is disconnected. Returns
    /// `None` if there was none; else a future that resolves once its teardown has closed it.
    /// With [`DropTeardown`](crate::teardown::DropTeardown), "closed" means the middleware's
    /// copy of a cloneable connection is dropped: the balancer's copy lives until the balancer
    /// takes in the removal at its next `poll_ready`. A teardown that closes the connection
    /// for every copy closes it at once (see [`crate::teardown`]).
    pub fn remove(&self, key: &K) -> Option<DisconnectFuture> {
        let removed = {
            let mut registry = lock(&self.shared.registry);
            let removed = registry.members.remove(key)?;
            registry.changed.insert(key.clone());
            removed
        };
        self.shared.waker.wake();
        Some(removed.service.handle().disconnect())
    }

    /// The handle of the endpoint under `key`.
    pub fn handle(&self, key: &K) -> Option<Handle> {
        let registry = lock(&self.shared.registry);
        registry
            .members
            .get(key)
            .map(|member| member.service.handle())
    }

    /// The keys of the endpoints in the set (connected or not), in no particular order.
    pub fn keys(&self) -> Vec<K> {
        lock(&self.shared.registry)
            .members
            .keys()
            .cloned()
            .collect()
    }

    /// How many endpoints the set has (connected or not).
    pub fn len(&self) -> usize {
        lock(&self.shared.registry).members.len()
    }

    /// Whether the set has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K, C> Clone for Endpoints<K, C> {
    fn clone(&self) -> Self {
        Endpoints {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K: fmt::Debug, C> fmt::Debug for Endpoints<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = lock(&self.shared.registry);
        f.debug_set().entries(registry.members.keys()).finish()
    }
}

/// The changes of an [`Endpoints`] set, as a `tower::discover::Discover` for a balancer.
///
/// It yields `Change::Insert` when an endpoint becomes connected (with a fresh clone of its
/// [`Reconnect`] service) and `Change::Remove` when it leaves `Connected` (a failure, a
/// disconnect, a terminal state) or the set. A *dormant* endpoint
/// ([`Handle::connects_on_demand`]: lazy, or closed by the idle timeout) is in the balancer
/// too, so that the balancer's `poll_ready` connects it; it stays in while that attempt runs. An endpoint reconnected under a new epoch is
/// inserted again, which replaces the balancer's old clone. It never ends: the set may grow.
/// It must be polled (the balancer does, in `poll_ready`) for the balancer to see changes.
pub struct EndpointChanges<K, C> {
    shared: Arc<Shared<K, C>>,
    /// What the balancer was told, per endpoint.
    view: HashMap<K, Seen>,
    /// One watch per endpoint (and stale ones for replaced endpoints, which end at their next
    /// state change).
    watches: FuturesUnordered<Watch<K>>,
    /// Changes decided and not yet yielded, in order.
    out: VecDeque<Change<K, Reconnect<C>>>,
}

/// What the balancer knows of an endpoint.
#[derive(Debug)]
struct Seen {
    generation: u64,
    /// How it was inserted, while it is in the balancer.
    inserted: Option<In>,
}

/// Why an endpoint is in the balancer, and since which epoch: every change of it is a fresh
/// `Insert`, because the set cannot know whether the balancer dropped its clone at a failed
/// `poll_ready` meanwhile (under `FailFast`, a dormant endpoint fails its first one while it
/// connects). An `Insert` under a key the balancer has replaces its clone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum In {
    /// Connected with the connection of this epoch.
    Connected(Epoch),
    /// Dormant since this epoch of its clock: the balancer's `poll_ready` connects it.
    Dormant(Epoch),
}

type Watch<K> = Pin<Box<dyn Future<Output = Watched<K>> + Send>>;

/// An endpoint's state changed (or its core is gone: `open` false).
struct Watched<K> {
    key: K,
    generation: u64,
    states: watch::Receiver<State>,
    open: bool,
}

fn watch<K: Send + 'static>(
    key: K,
    generation: u64,
    mut states: watch::Receiver<State>,
) -> Watch<K> {
    Box::pin(async move {
        let open = states.changed().await.is_ok();
        Watched {
            key,
            generation,
            states,
            open,
        }
    })
}

impl<K, C> EndpointChanges<K, C>
where
    K: Hash + Eq + Clone + Send + 'static,
    C: Clone,
{
    /// Takes in the keys inserted or removed since the last look.
    fn membership(&mut self) {
        let registry = &mut *lock(&self.shared.registry);
        for key in std::mem::take(&mut registry.changed) {
            let Some(member) = registry.members.get(&key) else {
                // Removed (or inserted and removed before we looked).
                if let Some(Seen {
                    inserted: Some(_), ..
                }) = self.view.remove(&key)
                {
                    self.out.push_back(Change::Remove(key));
                }
                continue;
            };
            let generation = member.generation;
            let fresh = Seen {
                generation,
                inserted: None,
            };
            // A key changes at most once between two looks (`changed` is a set): an endpoint
            // under a seen key is a new one.
            match self.view.entry(key.clone()) {
                Entry::Occupied(mut seen) => {
                    let replaced = std::mem::replace(seen.get_mut(), fresh);
                    self.out
                        .extend(replaced.inserted.map(|_| Change::Remove(key.clone())));
                }
                Entry::Vacant(vacant) => {
                    vacant.insert(fresh);
                }
            }
            // Looked at at once: it may be connected already.
            let mut states = member.service.handle().subscribe();
            states.mark_changed();
            self.watches.push(watch(key, generation, states));
        }
    }

    /// An endpoint's state changed: in the balancer while connected, out otherwise.
    fn changed(&mut self, watched: Watched<K>) {
        let Watched {
            key,
            generation,
            mut states,
            open,
        } = watched;
        let Some(seen) = self
            .view
            .get_mut(&key)
            .filter(|s| s.generation == generation)
        else {
            // Removed or replaced: this watch ends.
            return;
        };
        let state = states.borrow_and_update().clone();
        let registry = lock(&self.shared.registry);
        let member = registry
            .members
            .get(&key)
            .filter(|m| m.generation == generation);
        let handle = member.map(|m| m.service.handle_ref());
        let now = match state {
            State::Connected { epoch } => Some(In::Connected(epoch)),
            // Woken from dormant by the balancer: stays in while its attempt runs.
            State::Connecting { .. } if matches!(seen.inserted, Some(In::Dormant(_))) => {
                seen.inserted
            }
            // Dormant (lazy, or closed as idle): in, so that the balancer's readiness wakes it.
            _ => handle
                .filter(|h| h.connects_on_demand())
                .map(|h| In::Dormant(h.epoch())),
        };
        match (now, seen.inserted, member) {
            // In, or dormant, for a new reason or since a new epoch: a fresh clone.
            (Some(now), inserted, Some(member)) if inserted != Some(now) => {
                seen.inserted = Some(now);
                self.out
                    .push_back(Change::Insert(key.clone(), member.service.clone()));
            }
            (None, Some(_), _) => {
                seen.inserted = None;
                self.out.push_back(Change::Remove(key.clone()));
            }
            _ => {}
        }
        drop(registry);
        if open {
            self.watches.push(watch(key, generation, states));
        }
    }
}

// Nothing in it is ever pinned: the watches are boxed.
impl<K, C> Unpin for EndpointChanges<K, C> {}

impl<K, C> Stream for EndpointChanges<K, C>
where
    K: Hash + Eq + Clone + Send + 'static,
    C: Clone,
{
    type Item = Result<Change<K, Reconnect<C>>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Before the look, so that a change after it wakes us.
        this.shared.waker.register(cx.waker());
        this.membership();
        while let Poll::Ready(Some(watched)) = this.watches.poll_next_unpin(cx) {
            this.changed(watched);
        }
        match this.out.pop_front() {
            Some(change) => Poll::Ready(Some(Ok(change))),
            None => Poll::Pending,
        }
    }
}

impl<K: fmt::Debug, C> fmt::Debug for EndpointChanges<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointChanges")
            .field(
                "in_balancer",
                &self
                    .view
                    .iter()
                    .filter(|(_, s)| s.inserted.is_some())
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>(),
            )
            .field("pending", &self.out.len())
            .finish_non_exhaustive()
    }
}
