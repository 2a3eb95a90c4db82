//! The admin endpoint's HTTP plumbing, shared by krun (`KRUN_ADMIN_ADDR`) and hgate
//! (`HGATE_ADMIN_ADDR`): HTTP/1.1 on a listener bounded like every other one (a connection cap
//! and a header deadline), the paths both serve (`/metrics`, `/logging`), and the binary's own
//! paths through [`Paths`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use hbone::listen::{ConnectionLimit, serve_each};

/// How long a client of the admin endpoint may take to send a request's headers (and to send
/// the next one on a kept-alive connection): probes and scrapers answer in milliseconds, and a
/// connection that sends nothing must not hold one of the cap's slots.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// An admin answer.
pub type Answer = Response<Full<Bytes>>;

/// What one request asks: the method, the path and the query string.
pub struct AdminRequest {
    /// The HTTP method (`/quitquitquit` and `/logging` changes need POST).
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
}

/// The binary's own admin paths (readiness, configuration dump, ...).
pub trait Paths: Send + Sync + 'static {
    /// The answer to `request`, or `None` when the path is not the binary's (then the shared
    /// paths answer, or 404).
    fn answer(&self, request: &AdminRequest) -> Option<Answer>;
}

/// Serves the admin endpoint until the process ends, at most `limit` connections at once. It
/// answers through the drain too (readiness says 503 then).
pub async fn serve(listener: TcpListener, limit: ConnectionLimit, paths: Arc<dyn Paths>) {
    let never = CancellationToken::new();
    serve_each(listener, &limit, &never, |tcp, _| {
        let paths = paths.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let request = AdminRequest {
                    method: req.method().clone(),
                    path: req.uri().path().to_owned(),
                    query: req.uri().query().map(str::to_owned),
                };
                let answer = paths.answer(&request).unwrap_or_else(|| shared(&request));
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

/// The paths both binaries serve.
fn shared(request: &AdminRequest) -> Answer {
    match request.path.as_str() {
        "/metrics" => match crate::metrics::render() {
            Ok(body) => with_type(StatusCode::OK, crate::metrics::CONTENT_TYPE, body),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n"),
        },
        "/logging" => logging(request),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /logging`: the log filter; `POST /logging?level=FILTER`: a new one (`debug`,
/// `info,hbone=trace`, ...), in effect at once.
fn logging(request: &AdminRequest) -> Answer {
    let level = request
        .query
        .as_deref()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("level="));
    match (&request.method, level) {
        (&Method::GET, None) => match crate::logging::filter() {
            Some(filter) => text(StatusCode::OK, format!("{filter}\n")),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "logging not initialised\n"),
        },
        (&Method::POST, Some(level)) => match crate::logging::set_filter(level) {
            Ok(filter) => {
                tracing::info!(%filter, "log filter changed through the admin endpoint");
                text(StatusCode::OK, format!("{filter}\n"))
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (_, Some(_)) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /logging?level=FILTER changes the log filter\n",
        ),
        (_, None) => text(
            StatusCode::BAD_REQUEST,
            "GET /logging shows the log filter; POST /logging?level=FILTER changes it (debug, info, warn, or a RUST_LOG directive list)\n",
        ),
    }
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Answer {
    with_type(status, "text/plain; charset=utf-8", body.into())
}

/// A JSON answer (pretty, for people reading it with curl).
pub fn json(value: &serde_json::Value) -> Answer {
    match serde_json::to_string_pretty(value) {
        Ok(body) => with_type(StatusCode::OK, "application/json", body + "\n"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
