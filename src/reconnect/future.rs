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
        classify: Option<Classify>,
        // With an idle timeout: the request holds its connection until it completes.
        hold: Option<Hold>,
    }
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
    pub(crate) fn new(inner: F, classify: Option<Classify>, hold: Option<Hold>) -> Self {
        ResponseFuture {
            inner,
            classify,
            hold,
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
        let output = ready!(this.inner.poll(cx));
        drop(this.hold.take());
        Poll::Ready(match output {
            Ok(response) => Ok(response),
            Err(error) => {
                let error: BoxError = error.into();
                match this.classify.take() {
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
            .field("classify", &self.classify.as_ref().map(|c| c.epoch))
            .finish_non_exhaustive()
    }
}
