//! The builtin data plane's mesh inbound: terminates the mesh mTLS that arrives through
//! `/_hbone/15003` (and would otherwise need Envoy), authorizes the peer's SPIFFE ID, and
//! forwards plaintext to the app. A peer denied by `KRUN_ALLOWED_PRINCIPALS` or by istiod's
//! authorization policies (both must allow) never reaches the app, and a policy change closes
//! open connections it now denies. The stream inside is raw TCP, so a denial closes the
//! connection (there is no status to answer with, unlike on 15008).
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
use hbone::authorize::{StreamAuthorizer, StreamFacts, revocation};
use hbone::idle::{PipeEnd, pipe};
use hbone::listen::{Bounds, handshake_timed_out, serve_each};
use hbone::server::MeshTls;
use mesh::metrics::tcp::{Reporter, TcpConnection};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The terminator's fixed inputs.
pub struct Terminator {
    /// mTLS and `KRUN_ALLOWED_PRINCIPALS`.
    pub tls: MeshTls,
    /// istiod's authorization policies, when krun follows istiod.
    pub authorizer: Option<Arc<dyn StreamAuthorizer>>,
    /// The workload's own identity.
    pub local: Option<SpiffeId>,
    /// Where the app listens.
    pub app: SocketAddr,
    /// Copy buffer size.
    pub copy_buffer: usize,
    /// Handshake, idle and connection bounds.
    pub bounds: Bounds,
}

/// Serves the mTLS terminator on `listener` until `drain`.
pub async fn serve(listener: TcpListener, terminator: Terminator, drain: CancellationToken) {
    let terminator = Arc::new(terminator);
    let limit = terminator.bounds.limit("mesh inbound");
    serve_each(listener, &limit, &drain, |stream, remote| {
        let terminator = terminator.clone();
        async move { terminate(stream, remote, &terminator).await }
    })
    .await;
}

async fn terminate(stream: TcpStream, remote: SocketAddr, terminator: &Terminator) {
    let Terminator {
        tls: mesh,
        authorizer,
        local,
        app,
        copy_buffer,
        bounds,
    } = terminator;
    let (app, local) = (*app, local.as_ref());
    let _ = stream.set_nodelay(true);
    let Ok(listening) = stream.local_addr() else {
        return;
    };
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
    // The stream reaches the app's port on this workload; changes are taken before the check
    // so a policy change between the two is not missed.
    let facts = StreamFacts {
        peer: peer.clone(),
        source: remote,
        destination: SocketAddr::new(listening.ip(), app.port()),
    };
    let authorization = authorizer.as_ref().map(|a| (a.clone(), a.changes()));
    if let Some((authorizer, _)) = &authorization
        && let Err(reason) = authorizer.authorize(&facts)
    {
        let denied_total = hbone::metrics::DENIED.increment();
        return tracing::warn!(%remote, peer = ?facts.peer.as_ref().map(ToString::to_string), %reason, denied_total, "mesh connection denied by policy; closed");
    }
    let upstream = match TcpStream::connect(app).await {
        Ok(upstream) => upstream,
        Err(e) => return tracing::warn!(%app, error = %e, "app unreachable for a mesh connection"),
    };
    let _ = upstream.set_nodelay(true);
    let connection = TcpConnection::open(Reporter::Destination, peer.as_ref(), local);
    let upstream = connection.count_upstream(upstream);
    tokio::select! {
        end = pipe(tls, upstream, *copy_buffer, bounds.idle_timeout) => {
            if let PipeEnd::Idle = end {
                tracing::debug!(%remote, "mesh connection idle for KRUN_IDLE_TIMEOUT; closed");
            }
        }
        () = revocation(authorization, &facts) => {}
    }
}
