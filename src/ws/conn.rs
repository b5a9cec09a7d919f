//! [`WsConn`]: a WebSocket connection as the layer manages it.

use std::sync::{Arc, Mutex, MutexGuard};

use super::writer::Wire;
use crate::epoch::Epoch;

/// The connection the layer installs, releases and tears down: a slot for its [`Wire`].
///
/// Whoever runs the connection takes the wire out and owns it: the monitor while the
/// connection is installed (it puts the wire back when the driver drops it, at the release),
/// then the teardown, which drops it at its end and with it the socket. Nothing else holds the
/// socket, so no copy of the connection can keep it open.
#[derive(Clone)]
pub(crate) struct WsConn(Arc<Mutex<Option<Wire>>>);

impl WsConn {
    pub(crate) fn new(wire: Wire) -> WsConn {
        WsConn(Arc::new(Mutex::new(Some(wire))))
    }

    fn slot(&self) -> MutexGuard<'_, Option<Wire>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection is installed at `epoch` (called when its monitor is made, before the
    /// monitor is first polled: a release before that still finds it installed).
    pub(crate) fn install(&self, epoch: Epoch) {
        if let Some(wire) = self.slot().as_mut() {
            wire.install(epoch);
        }
    }

    pub(crate) fn take_wire(&self) -> Option<Wire> {
        self.slot().take()
    }

    pub(crate) fn put_wire(&self, wire: Wire) {
        *self.slot() = Some(wire);
    }
}
