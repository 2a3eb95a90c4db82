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

use hbone::idle::{PipeEnd, pipe};
use hbone::listen::{Bounds, handshake_timed_out, serve_each};
use hbone::{AllowedPeers, SpiffeId};
use mesh::metrics::tcp::{Reporter, TcpConnection};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The identities of the terminator's connections.
pub struct Identities {
    /// The peers allowed to reach the app.
    pub allowed: AllowedPeers,
    /// The workload's own identity (the destination principal).
    pub local: Option<SpiffeId>,
}

/// Serves the mTLS terminator on `listener` until `drain`.
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    identities: Identities,
    app: SocketAddr,
    copy_buffer: usize,
    bounds: Bounds,
    drain: CancellationToken,
) {
    let identities = Arc::new(identities);
    let limit = bounds.limit("mesh inbound");
    serve_each(listener, &limit, &drain, |stream, remote| {
        let config = tls.borrow().clone();
        let identities = identities.clone();
        async move {
            terminate(
                stream,
                remote,
                config,
                &identities,
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
    config: Arc<rustls::ServerConfig>,
    identities: &Identities,
    app: SocketAddr,
    copy_buffer: usize,
    bounds: Bounds,
) {
    let _ = stream.set_nodelay(true);
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let tls = match tokio::time::timeout(bounds.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::info!(%remote, error = %e, "mesh mTLS handshake failed"),
        Err(_) => return handshake_timed_out("mesh inbound", remote, "mTLS handshake"),
    };
    let peer = hbone::tls::peer_identity(tls.get_ref().1);
    match &peer {
        Some(id) if identities.allowed.allows(id) => {
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
    let connection = TcpConnection::open(
        Reporter::Destination,
        peer.as_ref(),
        identities.local.as_ref(),
    );
    let upstream = connection.count_upstream(upstream);
    if let PipeEnd::Idle = pipe(tls, upstream, copy_buffer, bounds.idle_timeout).await {
        tracing::debug!(%remote, "mesh connection idle for KRUN_IDLE_TIMEOUT; closed");
    }
}
