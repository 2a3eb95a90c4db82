//! The builtin data plane's mesh inbound: terminates the mesh mTLS that arrives through
//! `/_hbone/15003` (and would otherwise need Envoy), authorizes the peer's SPIFFE ID, and
//! forwards plaintext to the app. A denied peer never reaches the app.

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::AllowedPeers;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Serves the mTLS terminator on `listener` until `drain`.
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    allowed: AllowedPeers,
    app: SocketAddr,
    copy_buffer: usize,
    drain: CancellationToken,
) {
    let allowed = Arc::new(allowed);
    while let Some((stream, remote)) =
        hbone::listen::next_connection(&listener, &drain, "mesh inbound").await
    {
        let config = tls.borrow().clone();
        let allowed = allowed.clone();
        tokio::spawn(
            async move { terminate(stream, remote, config, &allowed, app, copy_buffer).await },
        );
    }
}

async fn terminate(
    stream: TcpStream,
    remote: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    allowed: &AllowedPeers,
    app: SocketAddr,
    copy_buffer: usize,
) {
    let _ = stream.set_nodelay(true);
    let mut tls = match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
        Ok(tls) => tls,
        Err(e) => return tracing::info!(%remote, error = %e, "mesh mTLS handshake failed"),
    };
    let peer = hbone::tls::peer_identity(tls.get_ref().1);
    match &peer {
        Some(id) if allowed.allows(id) => {}
        _ => {
            let denied_total = hbone::metrics::DENIED.increment();
            let who = peer.map_or_else(|| "no SPIFFE ID".to_owned(), |p| p.to_string());
            return tracing::warn!(peer = %who, denied_total, "peer not allowed by KRUN_ALLOWED_PRINCIPALS; connection closed");
        }
    }
    let mut upstream = match TcpStream::connect(app).await {
        Ok(upstream) => upstream,
        Err(e) => return tracing::warn!(%app, error = %e, "app unreachable for a mesh connection"),
    };
    let _ = upstream.set_nodelay(true);
    let _ = hbone::copy::copy_bidirectional(&mut tls, &mut upstream, copy_buffer).await;
}
