//! The builtin data plane's mesh inbound: terminates the mesh mTLS that arrives through
//! `/_hbone/15003` (and would otherwise need Envoy), authorizes the peer's SPIFFE ID, and
//! forwards plaintext to the app. A denied peer never reaches the app.
//!
//! Each connection let through counts in Istio's TCP metrics as the destination reports them
//! (source: the peer's verified SPIFFE ID; destination: the workload's), bytes counted on the
//! plaintext side, as Envoy's inbound listener counts them.
//!
//! Bounded like every listener: the mTLS handshake must finish within the handshake timeout,
//! connections are capped, and one that carries nothing for the idle timeout is closed.

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::SpiffeId;
use hbone::idle::{PipeEnd, pipe};
use hbone::listen::{Bounds, handshake_timed_out, serve_each};
use hbone::server::MeshTls;
use mesh::metrics::tcp::{Reporter, TcpConnection};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Serves the mTLS terminator on `listener` until `drain`.
pub async fn serve(
    listener: TcpListener,
    tls: MeshTls,
    local: Option<SpiffeId>,
    app: SocketAddr,
    copy_buffer: usize,
    bounds: Bounds,
    drain: CancellationToken,
) {
    let tls = Arc::new(tls);
    let local = Arc::new(local);
    let limit = bounds.limit("mesh inbound");
    serve_each(listener, &limit, &drain, |stream, remote| {
        let tls = tls.clone();
        let local = local.clone();
        async move {
            terminate(
                stream,
                remote,
                &tls,
                local.as_ref().as_ref(),
                app,
                copy_buffer,
                bounds,
            )
            .await
        }
    })
    .await;
}

async fn terminate(
    stream: TcpStream,
    remote: SocketAddr,
    mesh: &MeshTls,
    local: Option<&SpiffeId>,
    app: SocketAddr,
    copy_buffer: usize,
    bounds: Bounds,
) {
    let _ = stream.set_nodelay(true);
    let handshake = async {
        let config = mesh.config_for_new_connection().await;
        tokio_rustls::TlsAcceptor::from(config).accept(stream).await
    };
    let tls = match tokio::time::timeout(bounds.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::info!(%remote, error = %e, "mesh mTLS handshake failed"),
        Err(_) => return handshake_timed_out("mesh inbound", remote, "mTLS handshake"),
    };
    let peer = hbone::tls::peer_identity(tls.get_ref().1);
    match &peer {
        Some(id) if mesh.allowed.allows(id) => {
            tracing::debug!(%remote, peer = %id, "mesh mTLS terminated: peer verified");
        }
        _ => {
            let denied_total = hbone::metrics::DENIED.increment();
            let who = peer.map_or_else(|| "no SPIFFE ID".to_owned(), |p| p.to_string());
            return tracing::warn!(peer = %who, denied_total, "peer not allowed by KRUN_ALLOWED_PRINCIPALS; connection closed");
        }
    }
    let upstream = match TcpStream::connect(app).await {
        Ok(upstream) => upstream,
        Err(e) => return tracing::warn!(%app, error = %e, "app unreachable for a mesh connection"),
    };
    let _ = upstream.set_nodelay(true);
    let connection = TcpConnection::open(Reporter::Destination, peer.as_ref(), local);
    let upstream = connection.count_upstream(upstream);
    if let PipeEnd::Idle = pipe(tls, upstream, copy_buffer, bounds.idle_timeout).await {
        tracing::debug!(%remote, "mesh connection idle for KRUN_IDLE_TIMEOUT; closed");
    }
}
