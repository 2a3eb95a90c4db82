//! istiod forwarding: plain TCP passthrough from hgate's 15012 to the in-cluster istiod, so
//! Cloud Run workloads reach the control plane through the gateway's address without Envoy
//! (cloud-run-mesh's gateway ran a whole Envoy for this one forward).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::limits::{Activity, ConnectionLimit, accept_loop, idle};

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
    accept_loop(listener, "istiod", &limit, None, drain, |client, peer| {
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
    let mut server = match tokio::time::timeout(connect_timeout, TcpStream::connect(upstream)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect {upstream} (HGATE_ISTIOD_UPSTREAM): {e}")),
        Err(_) => {
            return Err(format!(
                "connect {upstream} (HGATE_ISTIOD_UPSTREAM): timed out"
            ));
        }
    };
    let _ = server.set_nodelay(true);
    let (mut client, clock) = Activity::new(client);
    tokio::select! {
        copied = hbone::copy::copy_bidirectional(&mut client, &mut server, 64 << 10) => {
            copied.map_err(|e| format!("forwarding broke: {e}"))
        }
        () = idle(clock, idle_timeout) => Err("idle (HGATE_IDLE_TIMEOUT); closed".into()),
    }
}
