//! The lifecycle of an [`H2Connection`] under the layer: [`H2Monitor`] drives it while it is
//! installed, [`H2Teardown`] closes it, and [`layer`] puts them together.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;

use super::connection::{H2Connection, Shared};
use super::connector::check;
use super::error::{H2Error, is_failure};
use super::tasks::Tasks;
use crate::backoff::Exponential;
use crate::epoch::Epoch;
use crate::machine::NormalEnd;
use crate::reconnect::ReconnectLayer;
use crate::teardown::{CloseCause, Monitor, Teardown};

/// The monitor of an [`H2Connection`]: it drives the connection's socket and hyper's tasks
/// while the connection is installed, and completes when the connection ends: `Ok` for a
/// graceful end (a GOAWAY without an error, the server closing cleanly), which the layer of
/// [`layer`] answers with an immediate reconnect ([`NormalEnd::Reconnect`]), and `Err` with
/// [`H2Error::Connection`] for a failure. Streams still in flight at the end go on in the
/// teardown.
#[derive(Clone, Copy, Debug, Default)]
pub struct H2Monitor;

impl<B> Monitor<H2Connection<B>> for H2Monitor {
    type Future = MonitorFuture;

    fn monitor(&mut self, conn: &H2Connection<B>, _: Epoch) -> MonitorFuture {
        MonitorFuture {
            shared: Arc::clone(conn.shared()),
            tasks: None,
        }
    }
}

/// The future of [`H2Monitor`]: holds the connection's tasks while it runs, and gives them back
/// to the connection when it is dropped (at the release), for the teardown.
pub struct MonitorFuture {
    shared: Arc<Shared>,
    tasks: Option<Tasks>,
}

impl std::fmt::Debug for MonitorFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorFuture")
            .field("tasks", &self.tasks)
            .finish_non_exhaustive()
    }
}

impl Future for MonitorFuture {
    type Output = Result<(), crate::BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.tasks.is_none() {
            self.tasks = self.shared.take_tasks();
        }
        let Some(tasks) = self.tasks.as_mut() else {
            // Nothing to drive: the connection's tasks are gone (its teardown has run).
            return Poll::Ready(Err(H2Error::Closing.into()));
        };
        tasks
            .poll_ended(cx)
            .map_err(|error| H2Error::Connection(error).into())
    }
}

impl Drop for MonitorFuture {
    fn drop(&mut self) {
        if let Some(tasks) = self.tasks.take() {
            self.shared.put_tasks(tasks);
        }
    }
}

/// The teardown of an [`H2Connection`]: it refuses new requests on the connection (copies kept
/// past the release get [`H2Error::Closing`]), lets the requests in flight finish (each until
/// its response body is read to its end or dropped), then ends hyper's dispatch, so that the
/// connection closes, and drops every task and the socket.
///
/// The layer's close timeout bounds it: a request still in flight then is cut with its
/// connection. Either way, once the teardown is over no socket is left, whatever copies of the
/// connection exist.
#[derive(Clone, Copy, Debug, Default)]
pub struct H2Teardown;

impl<B: Send + 'static> Teardown<H2Connection<B>> for H2Teardown {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn teardown(&mut self, conn: H2Connection<B>, cause: CloseCause) -> Self::Future {
        let shared = Arc::clone(conn.shared());
        shared.close();
        drop(conn);
        Box::pin(async move {
            let Some(mut tasks) = shared.take_tasks() else {
                return;
            };
            tracing::debug!(%cause, in_flight = shared.in_flight(), "closing an http/2 connection");
            // The requests in flight finish on the socket, which the tasks keep going.
            tokio::select! {
                () = shared.drained() => {}
                () = std::future::poll_fn(|cx| tasks.poll_all(cx)) => return,
            }
            // Then hyper closes the connection once its dispatch is gone.
            tasks.end_dispatch();
            std::future::poll_fn(|cx| tasks.poll_all(cx)).await;
        })
    }
}

/// The reconnect layer for HTTP/2 to `target` (`http://host:port`, or `https://` with the `tls`
/// feature), checked now: a bad target is an error here, not at the first attempt.
///
/// Its connector is an [`H2Connector`](super::H2Connector). The layer is set up for HTTP/2:
/// [`H2Monitor`] and [`H2Teardown`]; a normal end by the server (a GOAWAY) reconnects at once
/// ([`NormalEnd::Reconnect`]); and a response error counts as a failure of the connection when
/// [`H2Error::is_connection_failure`] says so. Change anything else with the layer's own
/// methods (backoff, timeouts, connecting on demand).
pub fn layer(
    target: &str,
) -> Result<ReconnectLayer<Uri, Exponential, H2Teardown, H2Monitor>, H2Error> {
    let uri: Uri = target
        .parse()
        .map_err(|e: http::uri::InvalidUri| H2Error::InvalidUrl(e.to_string()))?;
    check(&uri)?;
    Ok(ReconnectLayer::new(uri)
        .with_teardown(H2Teardown)
        .with_monitor(H2Monitor)
        .on_normal_end(NormalEnd::Reconnect)
        .with_failure_predicate(is_failure))
}
