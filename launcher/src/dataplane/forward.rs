//! `KRUN_FORWARD` listeners: whitebox port forwards for clients that cannot use `HTTP_PROXY`
//! (databases, gRPC over TCP, ...). Each accepted connection goes to the declared target with
//! the same routing as captured traffic ([`Router`]).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::route::Router;

/// Serves one forward until `drain`.
pub async fn serve(
    listener: TcpListener,
    target: String,
    router: Arc<Router>,
    copy_buffer: usize,
    drain: CancellationToken,
) {
    let target = Arc::new(target);
    while let Some((mut stream, _)) =
        hbone::listen::next_connection(&listener, &drain, "forward").await
    {
        let (router, target) = (router.clone(), target.clone());
        tokio::spawn(async move {
            match router.connect_host(&target).await {
                Ok(upstream) => {
                    let mut io = upstream.io;
                    let _ =
                        hbone::copy::copy_bidirectional(&mut stream, &mut io, copy_buffer).await;
                    drop(upstream.guard);
                }
                Err(e) => tracing::warn!(%target, error = %e, "forward: upstream failed"),
            }
        });
    }
}
