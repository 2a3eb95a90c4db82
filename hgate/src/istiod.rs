//! istiod forwarding: plain TCP passthrough from hgate's 15012 to the in-cluster istiod, so
//! Cloud Run workloads reach the control plane through the gateway's address without Envoy
//! (cloud-run-mesh's gateway ran a whole Envoy for this one forward).

use std::sync::Arc;
use std::time::Duration;

use hbone::idle::{PipeEnd, pipe};
use hbone::listen::{ConnectionLimit, serve_each};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards each accepted connection to `upstream` until `drain` is cancelled; open
/// connections keep flowing until they end (the caller bounds the wait).
pub async fn serve(
    listener: TcpListener,
    upstream: String,
    limit: Arc<ConnectionLimit>,
    idle_timeout: Duration,
    connect_timeout: Duration,
    drain: CancellationToken,
) {
    let upstream = Arc::new(upstream);
    serve_each(listener, &limit, &drain, |client, peer| {
        let upstream = upstream.clone();
        async move {
            match forward(client, &upstream, idle_timeout, connect_timeout).await {
                Ok((up, down)) => {
                    tracing::info!(%peer, upstream = %upstream, sent = up, received = down, outcome = "ok", "istiod connection finished");
                }
                Err(reason) => {
                    tracing::info!(%peer, upstream = %upstream, outcome = %reason, "istiod connection finished");
                }
            }
        }
    })
    .await;
}

async fn forward(
    client: TcpStream,
    upstream: &str,
    idle_timeout: Duration,
    connect_timeout: Duration,
) -> Result<(u64, u64), String> {
    let server = match tokio::time::timeout(connect_timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect {upstream} (HGATE_ISTIOD_UPSTREAM): {e}")),
        Err(_) => {
            return Err(format!(
                "connect {upstream} (HGATE_ISTIOD_UPSTREAM): timed out"
            ));
        }
    };
    let _ = server.set_nodelay(true);
    match pipe(client, server, 64 << 10, idle_timeout).await {
        PipeEnd::Done(sent, received) => Ok((sent, received)),
        PipeEnd::Broken(e) => Err(format!("forwarding broke: {e}")),
        PipeEnd::Idle => Err("idle (HGATE_IDLE_TIMEOUT); closed".into()),
    }
}
