//! The request path's response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use crate::activity::Hold;
use crate::core::Core;
use crate::epoch::Epoch;
use crate::error::{BoxError, Error, SharedError};

use super::service::IsFailure;

pin_project_lite::pin_project! {
    /// Response future of [`Reconnect`](crate::Reconnect).
    ///
    /// Errors of the connection pass through boxed; with a failure predicate configured, an error
    /// it classifies as a connection failure is reported for the epoch of the connection that
    /// served the request and returned as [`Error::ConnectionFailed`] with the original as its
    /// source.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // `None` unless a failure predicate or an idle timeout is configured: one word, whose
        // drop is one test inlined on the hot path. (Two fields to drop made the future's drop
        // a call on every request, 3.2 ns instead of 2.3; an allocation for the requests that
        // carry something costs less, `cargo bench --bench request_path`.)
        extra: Tail,
    }
}

/// The future's [`Extra`], whose drop is one test inlined on the hot path and a call only
/// when there is one (a field of type `Option<Box<Extra>>` alone was dropped by a call).
struct Tail(Option<Box<Extra>>);

impl Drop for Tail {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(extra) = self.0.take() {
            drop_extra(extra);
        }
    }
}

#[cold]
#[inline(never)]
fn drop_extra(extra: Box<Extra>) {
    drop(extra);
}

/// What a response future carries besides the connection's future.
pub(crate) struct Extra {
    pub(crate) classify: Option<Classify>,
    /// With an idle timeout: the request holds its connection until the future is dropped.
    /// (Released at completion instead, the test it takes in `poll` made the plain path
    /// 2.8 ns instead of 2.3.)
    pub(crate) _hold: Option<Hold>,
}

/// What a response future needs to report a classified failure: 16 bytes, so the future stays
/// small on the hot path.
pub(crate) struct Classify {
    pub(crate) epoch: Epoch,
    pub(crate) ctx: Arc<ClassifyCtx>,
}

/// The connection's core and the failure predicate, shared by a service and its clones.
pub(crate) struct ClassifyCtx {
    pub(crate) core: Arc<Core>,
    pub(crate) is_failure: IsFailure,
}

impl<F> ResponseFuture<F> {
    #[inline(always)]
    pub(crate) fn new(inner: F, extra: Option<Box<Extra>>) -> Self {
        ResponseFuture {
            inner,
            extra: Tail(extra),
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.inner.poll(cx)) {
            Ok(response) => Ok(response),
            Err(error) => {
                let error: BoxError = error.into();
                match this
                    .extra
                    .0
                    .as_mut()
                    .and_then(|extra| extra.classify.take())
                {
                    Some(c) if (c.ctx.is_failure)(&*error) => {
                        let failure = Error::ConnectionFailed(SharedError::from(error));
                        c.ctx.core.report_failure(c.epoch, failure.clone());
                        Err(Box::new(failure))
                    }
                    _ => Err(error),
                }
            }
        })
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field(
                "classify",
                &self
                    .extra
                    .0
                    .as_ref()
                    .and_then(|e| e.classify.as_ref())
                    .map(|c| c.epoch),
            )
            .finish_non_exhaustive()
    }
}
