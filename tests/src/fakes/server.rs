//! The HTTP(S) server under every fake: a real hyper HTTP/1.1 server on 127.0.0.1 that hands
//! each request to a handler, records it, and can add latency or fail the first N requests
//! (for the benchmark and the retry scenarios). It runs on its own runtime, so it can be
//! started from a plain `#[test]` and from inside `#[tokio::test]` alike.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The runtime every fake runs on, shared by a test process (fakes outlive no test).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("fake runtime")
    })
}

/// A request as a fake saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET` etc.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// The status the fake answered.
    pub status: u16,
    /// When the request arrived (before any injected latency).
    pub arrived: Instant,
}

impl Seen {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A fake's answer.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
    /// A body that goes on after `body`, one chunk per message, until the sender is dropped
    /// (a Kubernetes watch).
    pub stream: Option<Streaming>,
}

/// The receiving end of a streamed body; taken once, when the answer is sent.
#[derive(Clone, Default)]
pub struct Streaming(Arc<Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Bytes>>>>);

impl Streaming {
    /// A streamed body and the sender that feeds it.
    pub fn channel() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, Streaming) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, Streaming(Arc::new(Mutex::new(Some(rx)))))
    }
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Streaming")
    }
}

impl Reply {
    /// 200 with a JSON body.
    pub fn json(value: serde_json::Value) -> Self {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: value.to_string(),
            stream: None,
        }
    }

    /// `value` as JSON with `status`.
    pub fn json_status(status: u16, value: serde_json::Value) -> Self {
        Reply {
            status,
            ..Reply::json(value)
        }
    }

    /// A status with a text body.
    pub fn status(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
            stream: None,
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What a handler is given.
pub struct Request {
    /// Method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// Headers, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// The request body.
    pub body: Bytes,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Turns a request into a reply.
pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// Injected misbehaviour, shared with the serving task.
#[derive(Default)]
struct Faults {
    latency: Duration,
    /// Fail this many requests whose path contains `fail_path` with `fail_status`.
    fail_remaining: u32,
    fail_status: u16,
    fail_path: String,
    /// Reply produced by the fake itself on failure (e.g. with Metadata-Flavor).
    fail_headers: Vec<(String, String)>,
}

/// A running fake server; stops when dropped.
pub struct FakeServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    faults: Arc<Mutex<Faults>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// Starts a plain HTTP server.
    pub fn http(handler: Handler) -> Self {
        Self::start(handler, None)
    }

    /// Starts an HTTPS server with `tls`.
    pub fn https(handler: Handler, tls: Arc<rustls::ServerConfig>) -> Self {
        Self::start(handler, Some(TlsAcceptor::from(tls)))
    }

    fn start(handler: Handler, tls: Option<TlsAcceptor>) -> Self {
        // Bound here (no runtime needed), served on the fakes' runtime.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake");
        listener.set_nonblocking(true).expect("nonblocking fake");
        let addr = listener.local_addr().expect("fake addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let (seen2, faults2) = (seen.clone(), faults.clone());
        let task = runtime().spawn(async move {
            let listener = TcpListener::from_std(listener).expect("fake listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (handler, seen, faults, tls) =
                    (handler.clone(), seen2.clone(), faults2.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        serve(req, handler.clone(), seen.clone(), faults.clone())
                    });
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        FakeServer {
            addr,
            seen,
            faults,
            task,
        }
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port` (or `https://`).
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Adds `latency` before every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.faults.lock().expect("faults").latency = latency;
    }

    /// Answers the next `times` requests whose path contains `path` with `status`.
    pub fn fail(&self, path: &str, times: u32, status: u16, headers: &[(&str, &str)]) {
        let mut faults = self.faults.lock().expect("faults");
        faults.fail_remaining = times;
        faults.fail_status = status;
        faults.fail_path = path.to_owned();
        faults.fail_headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    req: hyper::Request<Incoming>,
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
    faults: Arc<Mutex<Faults>>,
) -> Result<hyper::Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let request = Request {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: headers.clone(),
        body,
    };
    let (latency, injected) = {
        let mut f = faults.lock().expect("faults");
        let injected = (f.fail_remaining > 0 && request.path.contains(&f.fail_path)).then(|| {
            f.fail_remaining -= 1;
            let mut reply = Reply::status(f.fail_status, "injected failure");
            reply.headers = f.fail_headers.clone();
            reply
        });
        (f.latency, injected)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let reply = injected.unwrap_or_else(|| handler(&request));
    seen.lock().expect("seen").push(Seen {
        method: request.method.clone(),
        path: parts
            .uri
            .path_and_query()
            .map_or(request.path.clone(), |p| p.to_string()),
        headers,
        status: reply.status,
        arrived,
    });
    let mut response = hyper::Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        response = response.header(k, v);
    }
    let first = Bytes::from(reply.body);
    let body = match reply
        .stream
        .and_then(|s| s.0.lock().expect("stream").take())
    {
        None => Full::new(first).boxed(),
        Some(rx) => {
            use tokio_stream::StreamExt;
            let rest = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            StreamBody::new(
                tokio_stream::once(first)
                    .chain(rest)
                    .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk))),
            )
            .boxed()
        }
    };
    Ok(response.body(body).expect("fake response"))
}
