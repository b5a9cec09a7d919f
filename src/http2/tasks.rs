//! [`Tasks`]: every future hyper runs for one connection, owned by the crate.
//!
//! hyper's HTTP/2 client hands its work to an executor: the task that reads and writes the
//! socket, one task per request that waits for its response, one per streaming request body.
//! With tokio's executor those tasks live on their own, and the socket with them, as long as
//! any stream or handle keeps them going. Here the executor is a channel into the connection's
//! [`Tasks`], and whoever holds the `Tasks` polls them: the connection's monitor while it is
//! installed, then its teardown. Dropping the `Tasks` drops every one of them, and the socket,
//! at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

/// A task hyper spawned.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The connection's own future (hyper's `Connection`, which dispatches the requests).
pub(super) type Dispatch = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// The executor hyper is given: it sends each task to the connection's [`Tasks`]. A task sent
/// after the `Tasks` are dropped is dropped with them: the connection is closed.
#[derive(Clone, Debug)]
pub(super) struct Spawner(mpsc::UnboundedSender<Task>);

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        // A task that panics (one polling a request body of the user's, say) ends alone, as on
        // tokio's executor, instead of taking the connection's other tasks with it.
        let task = std::panic::AssertUnwindSafe(task)
            .catch_unwind()
            .map(|ended| {
                if ended.is_err() {
                    tracing::warn!("a task of an http/2 connection panicked; the others go on");
                }
            });
        let _ = self.0.send(Box::pin(task));
    }
}

/// How many times [`Tasks::poll_all`] goes round (taking new tasks, polling the ready ones)
/// before it yields to the runtime: a burst of requests must not starve the driver's task.
const ROUNDS: usize = 32;

/// Every future of one connection.
pub(super) struct Tasks {
    /// `None` once it completed; its outcome is in `ended`.
    dispatch: Option<Dispatch>,
    ended: Option<Result<(), std::sync::Arc<hyper::Error>>>,
    spawned: FuturesUnordered<Task>,
    incoming: mpsc::UnboundedReceiver<Task>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("dispatching", &self.dispatch.is_some())
            .field("spawned", &self.spawned.len())
            .finish_non_exhaustive()
    }
}

impl Tasks {
    /// A set of tasks and the executor that feeds it.
    pub(super) fn new() -> (Tasks, Spawner) {
        let (tx, rx) = mpsc::unbounded_channel();
        let tasks = Tasks {
            dispatch: None,
            ended: None,
            spawned: FuturesUnordered::new(),
            incoming: rx,
        };
        (tasks, Spawner(tx))
    }

    /// Sets the connection's dispatching future, made by the handshake.
    pub(super) fn dispatch(&mut self, dispatch: Dispatch) {
        self.dispatch = Some(dispatch);
    }

    /// Drops the dispatching future: hyper then closes the connection once its streams are
    /// done.
    pub(super) fn end_dispatch(&mut self) {
        self.dispatch = None;
    }

    /// Polls every task; ready with the dispatching future's outcome once it has one (the
    /// other tasks may go on: streams still in flight after a GOAWAY).
    pub(super) fn poll_ended(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), std::sync::Arc<hyper::Error>>> {
        let _ = self.poll_all(cx);
        match &self.ended {
            Some(ended) => Poll::Ready(ended.clone()),
            None => Poll::Pending,
        }
    }

    /// Polls every task; ready once none is left and none can come (every copy of the
    /// executor is gone).
    pub(super) fn poll_all(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..ROUNDS {
            let mut progress = false;
            if let Some(dispatch) = self.dispatch.as_mut() {
                if let Poll::Ready(ended) = dispatch.as_mut().poll(cx) {
                    self.ended = Some(ended.map_err(std::sync::Arc::new));
                    self.dispatch = None;
                    progress = true;
                }
            }
            let mut closed = false;
            loop {
                match self.incoming.poll_recv(cx) {
                    Poll::Ready(Some(task)) => {
                        self.spawned.push(task);
                        progress = true;
                    }
                    Poll::Ready(None) => {
                        closed = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(Some(())) = self.spawned.poll_next_unpin(cx) {
                progress = true;
            }
            if closed && self.dispatch.is_none() && self.spawned.is_empty() {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: come back after the runtime has run others.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor;

    use super::*;

    #[tokio::test]
    async fn runs_what_is_spawned_until_nothing_is_left() {
        let (mut tasks, spawner) = Tasks::new();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let done = Arc::clone(&done);
            let again = spawner.clone();
            spawner.execute(async move {
                tokio::task::yield_now().await;
                // A task may spawn another, as hyper's do.
                let inner = Arc::clone(&done);
                again.execute(async move {
                    inner.fetch_add(1, Ordering::SeqCst);
                });
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        drop(spawner);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            std::future::poll_fn(|cx| tasks.poll_all(cx)),
        )
        .await
        .expect("all tasks end");
        assert_eq!(done.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn the_dispatch_outcome_is_kept_while_the_rest_go_on() {
        let (mut tasks, spawner) = Tasks::new();
        tasks.dispatch(Box::pin(async { Ok(()) }));
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        spawner.execute(async move {
            let _ = wait.await;
        });
        let ended = std::future::poll_fn(|cx| tasks.poll_ended(cx)).await;
        assert!(ended.is_ok());
        // The spawned task still runs; the set is not done while it does.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(tasks.poll_all(&mut cx).is_pending());
        release.send(()).unwrap();
        drop(spawner);
        std::future::poll_fn(|cx| tasks.poll_all(cx)).await;
        assert!(format!("{tasks:?}").contains("spawned: 0"));
    }

    #[tokio::test]
    async fn a_busy_set_yields_to_the_runtime() {
        let (mut tasks, spawner) = Tasks::new();
        // A task that is always ready again: the set must still return.
        fn forever(spawner: Spawner) {
            let next = spawner.clone();
            spawner.execute(async move { forever(next) });
        }
        forever(spawner);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(tasks.poll_all(&mut cx).is_pending());
    }

    #[test]
    fn a_set_with_nothing_to_do_waits_without_waking_itself() {
        struct Wakes(AtomicUsize);
        impl std::task::Wake for Wakes {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (mut tasks, spawner) = Tasks::new();
        let (_release, wait) = tokio::sync::oneshot::channel::<()>();
        spawner.execute(async move {
            let _ = wait.await;
        });
        // The first poll takes the task in (and FuturesUnordered, having polled every future
        // it holds, asks to be polled again)...
        let noop = futures_util::task::noop_waker();
        assert!(tasks.poll_all(&mut Context::from_waker(&noop)).is_pending());
        // ...the second finds nothing to do.
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        assert!(
            tasks
                .poll_all(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "an idle set must wait for its tasks' wake-ups, not spin"
        );
    }

    #[tokio::test]
    async fn a_task_that_panics_ends_alone() {
        let (mut tasks, spawner) = Tasks::new();
        let done = Arc::new(AtomicUsize::new(0));
        spawner.execute(async { panic!("a body of the user's") });
        let after = Arc::clone(&done);
        spawner.execute(async move {
            tokio::task::yield_now().await;
            after.fetch_add(1, Ordering::SeqCst);
        });
        drop(spawner);
        std::future::poll_fn(|cx| tasks.poll_all(cx)).await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            1,
            "the other task ran to its end"
        );
    }

    #[test]
    fn a_task_sent_after_the_set_is_gone_is_dropped() {
        let (tasks, spawner) = Tasks::new();
        drop(tasks);
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Counted(Arc<AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let guard = Counted(Arc::clone(&dropped));
        spawner.execute(async move {
            let _guard = guard;
        });
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}
