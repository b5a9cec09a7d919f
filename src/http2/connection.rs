//! [`H2Connection`]: one HTTP/2 connection as a cloneable `Service<Request<B>>`, and
//! [`H2Body`], its response bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2::SendRequest;
use tokio::sync::Notify;
use tower_service::Service;

use super::error::H2Error;
use super::tasks::Tasks;
use crate::BoxError;

/// One HTTP/2 connection, made by [`H2Connector`](super::H2Connector): a cheap-to-clone
/// `Service<Request<B>>` answering `Response<H2Body>`, for use under [`layer`](super::layer):
/// the layer's monitor drives its socket (without it, nothing does), and its `poll_ready`
/// stays pending once the connection has ended, until the layer's service moves on to the
/// next connection.
///
/// A request whose URI has no scheme and authority (tonic's, which carry only the path) is
/// sent to the connection's own origin.
///
/// The connection's socket and every task of hyper's for it are owned by the connection's
/// lifecycle, not by its copies: while the connection is installed its monitor
/// ([`H2Monitor`](super::H2Monitor)) drives them, and its teardown
/// ([`H2Teardown`](super::H2Teardown)) refuses new requests, waits for the ones in flight
/// (until each response body is read or dropped), then ends them all. A copy kept after that
/// answers [`H2Error::Closing`].
pub struct H2Connection<B> {
    send: SendRequest<B>,
    shared: Arc<Shared>,
}

impl<B> Clone for H2Connection<B> {
    fn clone(&self) -> Self {
        H2Connection {
            send: self.send.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> std::fmt::Debug for H2Connection<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Connection")
            .field("origin", &self.shared.authority)
            .field("in_flight", &self.shared.in_flight.load(Ordering::Relaxed))
            .field("closing", &self.shared.closing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What the copies of a connection share with its monitor and teardown.
pub(super) struct Shared {
    scheme: Scheme,
    authority: Authority,
    /// The connection's tasks, while neither the monitor nor the teardown holds them.
    tasks: Mutex<Option<Tasks>>,
    /// Requests sent and not yet done (response body read to its end, or dropped).
    in_flight: AtomicUsize,
    /// Set by the teardown: no new request.
    closing: AtomicBool,
    /// Woken when the last request in flight of a closing connection is done.
    idle: Notify,
}

impl Shared {
    fn slot(&self) -> MutexGuard<'_, Option<Tasks>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn take_tasks(&self) -> Option<Tasks> {
        self.slot().take()
    }

    pub(super) fn put_tasks(&self, tasks: Tasks) {
        *self.slot() = Some(tasks);
    }

    /// Refuses new requests from now on.
    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Resolves once no request is in flight (the connection is closing, so none can start).
    pub(super) async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            idle.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// A request in flight, counted until it is dropped.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(shared))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let before = self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.0.closing.load(Ordering::SeqCst) {
            self.0.idle.notify_waiters();
        }
    }
}

impl<B> H2Connection<B> {
    pub(super) fn new(
        send: SendRequest<B>,
        scheme: Scheme,
        authority: Authority,
        tasks: Tasks,
    ) -> Self {
        H2Connection {
            send,
            shared: Arc::new(Shared {
                scheme,
                authority,
                tasks: Mutex::new(Some(tasks)),
                in_flight: AtomicUsize::new(0),
                closing: AtomicBool::new(false),
                idle: Notify::new(),
            }),
        }
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Requests in flight on this connection.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Whether the connection was released: it takes no new request.
    pub fn is_closing(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// `uri` with the connection's scheme and authority where it has none.
    fn with_origin(&self, uri: Uri) -> Result<Uri, H2Error> {
        if uri.authority().is_some() {
            return Ok(uri);
        }
        let mut parts = uri.into_parts();
        parts.scheme = Some(self.shared.scheme.clone());
        parts.authority = Some(self.shared.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        Uri::from_parts(parts).map_err(|e| H2Error::InvalidUrl(e.to_string()))
    }
}

/// The future of [`H2Connection`]'s call.
type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<H2Body>, H2Error>> + Send>>;

impl<B> Service<Request<B>> for H2Connection<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<H2Body>;
    type Error = H2Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<H2Body>, H2Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H2Error>> {
        if self.is_closing() {
            return Poll::Ready(Err(H2Error::Closing));
        }
        match self.send.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            // hyper's dispatch has ended (a GOAWAY, or the socket closed): the monitor reports
            // it in the same poll of the driver, and the layer's service, woken by the
            // release, goes on to the next connection. An error here would be a failure of a
            // connection that may have ended normally.
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let fail = |error| -> ResponseFuture { Box::pin(std::future::ready(Err(error))) };
        if self.is_closing() {
            return fail(H2Error::Closing);
        }
        let (mut parts, body) = request.into_parts();
        parts.uri = match self.with_origin(parts.uri) {
            Ok(uri) => uri,
            Err(error) => return fail(error),
        };
        let in_flight = InFlight::new(&self.shared);
        let sent = self.send.try_send_request(Request::from_parts(parts, body));
        Box::pin(async move {
            let response = sent.await.map_err(|mut error| {
                // Given back: hyper never wrote it (its dispatch had ended).
                let unsent = error.take_message().is_some();
                H2Error::of_request(error.into_error(), unsent)
            })?;
            // A body that ended with the headers (END_STREAM on them) is over now: a consumer
            // that trusts `is_end_stream` never polls it.
            Ok(response.map(|body| H2Body {
                live: (!body.is_end_stream()).then(|| Live {
                    body,
                    _in_flight: in_flight,
                }),
            }))
        })
    }
}

/// The body of a response of an [`H2Connection`]: hyper's, counted as in flight on its
/// connection until it is read to its end or dropped.
///
/// At its end (its last frame, an error, or the response's headers when they end the stream)
/// it lets go of hyper's body at once, and with it the HTTP/2 stream: a body held after its
/// end keeps neither the request in flight nor the connection's closing waiting.
pub struct H2Body {
    /// `None` once the body has ended.
    live: Option<Live>,
}

/// A body that has not ended yet.
struct Live {
    body: hyper::body::Incoming,
    _in_flight: InFlight,
}

impl std::fmt::Debug for H2Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Body")
            .field("done", &self.live.is_none())
            .finish_non_exhaustive()
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = H2Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H2Error>>> {
        let Some(live) = self.live.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(&mut live.body).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) || live.body.is_end_stream() {
            self.live = None;
        }
        Poll::Ready(frame.map(|f| f.map_err(H2Error::Request)))
    }

    fn is_end_stream(&self) -> bool {
        self.live
            .as_ref()
            .is_none_or(|live| live.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.live
            .as_ref()
            .map_or(SizeHint::with_exact(0), |live| live.body.size_hint())
    }
}
