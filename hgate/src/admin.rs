//! The admin endpoint on `HGATE_ADMIN_ADDR`: `/healthz/ready` (503 until the listeners are up
//! and again while draining, so the load balancer stops sending new connections),
//! `/healthz/live`, and `/stats` (counters as text).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use hbone::listen::{ConnectionLimit, serve_each};

use crate::gate::{NO_ROUTE, TUNNELLED};

/// How long a client of the admin endpoint may take to send a request's headers (and to send
/// the next one on a kept-alive connection): probes and scrapers answer in milliseconds, and a
/// connection that sends nothing must not hold one of `limit`'s slots.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoint until the process ends, at most `limit` connections at once;
/// `ready` is the readiness state, `sni` the SNI listener's counters.
pub async fn serve(
    listener: TcpListener,
    limit: ConnectionLimit,
    ready: watch::Receiver<bool>,
    sni: Arc<ConnectionLimit>,
) {
    // The admin endpoint answers until hgate exits, through the drain too (readiness says 503).
    let never = CancellationToken::new();
    serve_each(listener, &limit, &never, |tcp, _| {
        let ready = ready.clone();
        let sni = sni.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = answer(req.uri().path(), *ready.borrow(), &sni);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        }
    })
    .await;
}

fn answer(path: &str, ready: bool, sni: &ConnectionLimit) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz/live" => (StatusCode::OK, "live\n".to_owned()),
        "/healthz/ready" if ready => (StatusCode::OK, "ready\n".to_owned()),
        "/healthz/ready" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned()),
        "/stats" => (
            StatusCode::OK,
            format!(
                "hgate_open_connections {}\nhgate_tunnelled_total {}\nhgate_no_route_total {}\nhgate_limited_total {}\n",
                sni.open(),
                TUNNELLED.load(Ordering::Relaxed),
                NO_ROUTE.load(Ordering::Relaxed),
                sni.refused(),
            ),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
