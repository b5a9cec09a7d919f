//! `tower::load::Load` for [`Reconnect`]: the load of the installed connection.

use tower::load::Load;

use super::service::Reconnect;

/// The load of a managed connection: the installed connection's own, or `Disconnected`.
///
/// `Disconnected` compares greater than every `Connected` load, so a balancer that compares
/// loads prefers any connected endpoint. (tower's p2c `Balance` only ever compares services
/// that are ready, and a [`Reconnect`] is ready only with a connection installed.)
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub enum EndpointLoad<M> {
    /// The load the installed connection reports.
    Connected(M),
    /// No connection is installed, or not yet checked out by this service.
    Disconnected,
}

/// Forwards the load of the installed connection, when the connection type measures one
/// (as a connection that counts its own streams can).
///
/// tower's balancers need `Load`. Where the connection measures none, measure at the
/// service instead, as over tower's own services: wrap each [`Reconnect`] in tower's
/// `PendingRequests` (or `PeakEwma`), or an [`EndpointChanges`](crate::endpoints::EndpointChanges)
/// stream in `PendingRequestsDiscover`. (tower's load wrappers are not `Clone`, so they go
/// around the `Reconnect`, not around the connection.)
///
/// ```
/// use std::convert::Infallible;
/// use tower::balance::p2c::Balance;
/// use tower::discover::ServiceList;
/// use tower::load::{CompleteOnResponse, PendingRequests};
/// use tower::{Layer, ServiceExt, service_fn};
/// use tower_epoch::ReconnectLayer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = ReconnectLayer::new(());
/// let backends: Vec<_> = ["a", "b", "c"]
///     .into_iter()
///     .map(|name| {
///         let connector = service_fn(move |()| async move {
///             Ok::<_, Infallible>(service_fn(move |x: u32| async move { Ok::<_, Infallible>((name, x)) }))
///         });
///         let backend = layer.layer(connector);
///         backend.handle().connect().unwrap();
///         PendingRequests::new(backend, CompleteOnResponse::default())
///     })
///     .collect();
/// let balance = Balance::new(ServiceList::new(backends));
/// let (_name, x) = balance.oneshot(7).await.unwrap();
/// assert_eq!(x, 7);
/// # }
/// ```
impl<C: Load> Load for Reconnect<C> {
    type Metric = EndpointLoad<C::Metric>;

    fn load(&self) -> Self::Metric {
        match self.installed() {
            Some((_, conn)) => EndpointLoad::Connected(conn.load()),
            None => EndpointLoad::Disconnected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_connected_load_is_less_than_disconnected() {
        assert!(EndpointLoad::Connected(u32::MAX) < EndpointLoad::Disconnected);
        assert!(EndpointLoad::Connected(1) < EndpointLoad::Connected(2));
        assert!(
            EndpointLoad::Connected(f64::NAN)
                .partial_cmp(&EndpointLoad::Connected(1.0))
                .is_none()
        );
    }
}
