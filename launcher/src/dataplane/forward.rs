//! `KRUN_FORWARD` listeners: whitebox port forwards for clients that cannot use `HTTP_PROXY`
//! (databases, gRPC over TCP, ...). Each accepted connection goes to the declared target with
//! the same routing as captured traffic ([`Router`]). Like the capture listener they carry
//! arbitrary TCP, so they are bounded by the connection cap and the idle timeout only.

use std::sync::Arc;

use hbone::idle::pipe;
use hbone::listen::{Bounds, serve_each};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::route::Router;

/// Serves one forward until `drain`.
pub async fn serve(
    listener: TcpListener,
    target: String,
    router: Arc<Router>,
    copy_buffer: usize,
    bounds: Bounds,
    drain: CancellationToken,
) {
    let target = Arc::new(target);
    let limit = bounds.limit("forward");
    serve_each(listener, &limit, &drain, |stream, peer| {
        let (router, target) = (router.clone(), target.clone());
        async move {
            match router.connect_host(&target, peer).await {
                Ok(upstream) => {
                    pipe(stream, upstream.io, copy_buffer, bounds.idle_timeout).await;
                    drop(upstream.guard);
                }
                Err(e) => tracing::warn!(%target, error = %e, "forward: upstream failed"),
            }
        }
    })
    .await;
}
