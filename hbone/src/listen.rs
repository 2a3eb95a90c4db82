//! The accept step every listener shares: the next connection, or nothing once the listener
//! is draining. An accept error (out of file descriptors, a connection reset before it was
//! accepted) is logged and the listener keeps serving, because one bad moment must not close
//! a port that the platform routes traffic to.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Waits for the next connection on `listener`; `None` once `drain` is cancelled. `name`
/// names the listener in the log line of a failed accept.
pub async fn next_connection(
    listener: &TcpListener,
    drain: &CancellationToken,
    name: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = drain.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => tracing::warn!(listener = name, error = %e, "accept failed"),
            },
        }
    }
}
