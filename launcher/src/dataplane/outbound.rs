//! The builtin data plane's outbound: an HTTP CONNECT proxy on loopback through which the app
//! (or a port forward) reaches `ip:port` of a mesh workload over HBONE on the peer's 15008,
//! verifying that the peer belongs to the mesh trust domain. This is how a builtin-mode app
//! calls ambient (ztunnel) workloads or another krun.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hbone::client::HboneClient;
use hbone::tls::ExpectedPeer;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Outbound proxy settings.
pub struct Outbound {
    /// Pooled HBONE client with the workload certificate.
    pub client: Arc<HboneClient>,
    /// Which peers are acceptable.
    pub expected: ExpectedPeer,
    /// The peers' HBONE port.
    pub peer_port: u16,
    /// Copy buffer per direction.
    pub copy_buffer: usize,
}

/// Serves the proxy on `listener` until `drain`.
pub async fn serve(listener: TcpListener, outbound: Outbound, drain: CancellationToken) {
    let outbound = Arc::new(outbound);
    loop {
        let stream = tokio::select! {
            () = drain.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    continue;
                }
            },
        };
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let outbound = outbound.clone();
                async move { Ok::<_, Infallible>(outbound.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

impl Outbound {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::CONNECT {
            return answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "only CONNECT ip:port is supported",
            );
        }
        let Some(target) = req.uri().authority().and_then(|a| {
            Some(SocketAddr::new(
                a.host().trim_matches(['[', ']']).parse().ok()?,
                a.port_u16()?,
            ))
        }) else {
            return answer(
                StatusCode::BAD_REQUEST,
                "CONNECT needs ip:port of a mesh workload",
            );
        };
        let peer = SocketAddr::new(target.ip(), self.peer_port);
        let (mut tunnel, guard) = match self
            .client
            .connect(peer, Some(&self.expected), &target.to_string())
            .await
        {
            Ok(tunnel) => tunnel,
            Err(e) => {
                tracing::warn!(%target, error = %e, "outbound HBONE tunnel failed");
                return answer(StatusCode::BAD_GATEWAY, &e.to_string());
            }
        };
        let buffer = self.copy_buffer;
        tokio::spawn(async move {
            if let Ok(upgraded) = hyper::upgrade::on(req).await {
                let mut app = TokioIo::new(upgraded);
                let _ = hbone::copy::copy_bidirectional(&mut app, &mut tunnel, buffer).await;
            }
            drop(guard);
        });
        answer(StatusCode::OK, "")
    }
}

fn answer(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}
