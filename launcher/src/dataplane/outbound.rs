//! The builtin data plane's HTTP proxy (the whitebox proxy, `KRUN_OUTBOUND_ADDR`, 15007): the
//! app reaches mesh workloads and anything else through it, by `CONNECT host:port` (any TCP,
//! e.g. TLS) or by absolute-URI requests (`GET http://host:port/path`, what `HTTP_PROXY`
//! clients send for plain HTTP). Both are routed by [`Router`]: mesh destinations over HBONE
//! to the peer's 15008 (peer verified to be in the trust domain), others directly.
//!
//! Bounds: request headers must arrive within the handshake timeout (also between requests on
//! a kept-alive connection) and fit in [`MAX_HTTP1_HEAD_BYTES`]; connections, tunnels included, are
//! capped; a tunnel that carries nothing for the idle timeout is closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hbone::idle::pipe;
use hbone::listen::{Bounds, serve_each};
use hbone::settings::{MAX_HTTP1_HEAD_BYTES, MAX_HTTP1_HEADERS};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::route::Router;

type Body = BoxBody<Bytes, hyper::Error>;

/// Held by every tunnel of a connection: the connection's slot under the cap is kept until
/// the last sender is dropped.
type TunnelsOpen = mpsc::Sender<()>;

/// Outbound proxy settings.
pub struct Outbound {
    /// Where connections go.
    pub router: Arc<Router>,
    /// Copy buffer per direction.
    pub copy_buffer: usize,
    /// The listener's bounds.
    pub bounds: Bounds,
}

/// Serves the proxy on `listener` until `drain`.
pub async fn serve(listener: TcpListener, outbound: Outbound, drain: CancellationToken) {
    let outbound = Arc::new(outbound);
    let limit = outbound.bounds.limit("outbound proxy");
    serve_each(listener, &limit, &drain, |stream, peer| {
        let outbound = outbound.clone();
        async move {
            let (open, mut all_closed) = mpsc::channel::<()>(1);
            let handshake_timeout = outbound.bounds.handshake_timeout;
            let service = hyper::service::service_fn(move |req| {
                let (outbound, open) = (outbound.clone(), open.clone());
                async move { Ok::<_, Infallible>(outbound.handle(req, peer, open).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .preserve_header_case(true)
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .max_buf_size(MAX_HTTP1_HEAD_BYTES)
                .max_headers(MAX_HTTP1_HEADERS)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
            // A CONNECT tunnel outlives the HTTP connection; the slot is free once it ends.
            let _ = all_closed.recv().await;
        }
    })
    .await;
}

impl Outbound {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        open: TunnelsOpen,
    ) -> Response<Body> {
        if req.method() == Method::CONNECT {
            return self.tunnel(req, peer, open).await;
        }
        match authority(req.uri()) {
            Some(target) => self.forward(target, peer, req).await,
            None => answer(
                StatusCode::BAD_REQUEST,
                "send CONNECT host:port or an absolute URI (http://host/path)",
            ),
        }
    }

    /// `CONNECT host:port`: a byte tunnel.
    async fn tunnel(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        open: TunnelsOpen,
    ) -> Response<Body> {
        let Some(target) = req.uri().authority().map(|a| a.to_string()) else {
            return answer(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
        };
        let upstream = match self.router.connect_host(&target, peer).await {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::warn!(%target, error = %e, "outbound tunnel failed");
                return answer(StatusCode::BAD_GATEWAY, &e.to_string());
            }
        };
        let (buffer, idle) = (self.copy_buffer, self.bounds.idle_timeout);
        tokio::spawn(async move {
            if let Ok(upgraded) = hyper::upgrade::on(req).await {
                pipe(TokioIo::new(upgraded), upstream.io, buffer, idle).await;
            }
            drop(upstream.guard);
            drop(upstream.metrics);
            drop(open);
        });
        answer(StatusCode::OK, "")
    }

    /// An absolute-URI request: sent on a fresh upstream connection in origin form.
    async fn forward(
        &self,
        target: String,
        peer: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        let upstream = match self.router.connect_host(&target, peer).await {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::warn!(%target, error = %e, "outbound request failed");
                return answer(StatusCode::BAD_GATEWAY, &e.to_string());
            }
        };
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(upstream.io)).await {
                Ok(pair) => pair,
                Err(e) => return answer(StatusCode::BAD_GATEWAY, &e.to_string()),
            };
        let (guard, metrics) = (upstream.guard, upstream.metrics);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(guard);
            drop(metrics);
        });
        let origin = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<Uri>()
            .unwrap_or_default();
        *req.uri_mut() = origin;
        let headers = req.headers_mut();
        headers.remove("proxy-connection");
        headers.remove(header::PROXY_AUTHORIZATION);
        if !headers.contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(&target)
        {
            headers.insert(header::HOST, host);
        }
        match sender.send_request(req).await {
            Ok(response) => response.map(BodyExt::boxed),
            Err(e) => answer(StatusCode::BAD_GATEWAY, &e.to_string()),
        }
    }
}

/// `host:port` of an absolute `http://` URI (port 80 when not given).
fn authority(uri: &Uri) -> Option<String> {
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let authority = uri.authority()?;
    Some(format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    ))
}

fn answer(status: StatusCode, body: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_owned()))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}
