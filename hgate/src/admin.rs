//! The admin endpoint on `HGATE_ADMIN_ADDR`: `/healthz/ready` (503 until the listeners are up
//! and again while draining, so the load balancer stops sending new connections),
//! `/healthz/live`, and `/stats` (counters as text).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use hbone::listen::ConnectionLimit;

use crate::gate::{NO_ROUTE, TUNNELLED};

/// Serves the admin endpoint forever; `ready` is the readiness state.
pub async fn serve(listener: TcpListener, ready: watch::Receiver<bool>, sni: Arc<ConnectionLimit>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let ready = ready.clone();
        let sni = sni.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = answer(req.uri().path(), *ready.borrow(), &sni);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
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
