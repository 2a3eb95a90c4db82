//! The capture listener (`KRUN_CAPTURE_ADDR`, 15001): iptables REDIRECTs the app's outbound TCP
//! here; the original destination comes back from the socket (`SO_ORIGINAL_DST`) and the
//! connection is routed like any other outbound one ([`Router`]).
//!
//! It carries arbitrary TCP, where the server may speak first (MySQL, SMTP), so there is no
//! handshake to wait for and no handshake timeout: it is bounded by the connection cap and the
//! idle timeout.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hbone::idle::{PipeEnd, pipe};
use hbone::listen::{Bounds, serve_each};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::route::Router;

/// Serves captured connections on `listener` until `drain`.
pub async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    copy_buffer: usize,
    bounds: Bounds,
    drain: CancellationToken,
) {
    let local = listener.local_addr().ok();
    let limit = bounds.limit("capture");
    serve_each(listener, &limit, &drain, |stream, peer| {
        let router = router.clone();
        async move {
            let target = match original_dst(&stream) {
                // A direct connection to the listener, not a redirected one: routing it would
                // loop.
                Ok(target) if Some(target) == local => return,
                Ok(target) => target,
                Err(e) => {
                    return tracing::warn!(%peer, error = %e, "captured connection without an original destination");
                }
            };
            let route = router.route(target);
            tracing::info!(%peer, original_dst = %target, route = route.name(), "captured connection");
            match router.connect_routed(route, &target.ip().to_string(), target, peer).await {
                Ok(upstream) => {
                    let end = pipe(stream, upstream.io, copy_buffer, bounds.idle_timeout).await;
                    drop(upstream.guard);
                    if let PipeEnd::Idle = end {
                        tracing::debug!(%peer, original_dst = %target, "captured connection idle for KRUN_IDLE_TIMEOUT; closed");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // The app's connect already succeeded (iptables redirected it): a reset is
                    // the nearest it can see to "refused". The route decision logged why.
                    let _ = stream.set_zero_linger();
                }
                Err(e) => {
                    tracing::warn!(original_dst = %target, error = %e, "captured connection: upstream failed")
                }
            }
        }
    })
    .await;
}

/// The destination the app dialled before iptables redirected it.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    match stream.local_addr()? {
        SocketAddr::V4(_) => {
            let addr = getsockopt(stream, sockopt::OriginalDst)?;
            Ok(SocketAddr::from((
                Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                u16::from_be(addr.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            let addr = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
            Ok(SocketAddr::from((
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
            )))
        }
    }
}
