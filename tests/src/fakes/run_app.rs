//! Stand-in for Cloud Run's `*.run.app` front end as krun's discovery proxy reaches it: HTTPS
//! with ALPN `h2` and `http/1.1`, a certificate for `*.REGION.run.app` from its own CA (trust
//! it with `SSL_CERT_FILE`). It records each request's HTTP version, host (`:authority` or
//! `Host`), path and `Authorization`, and answers:
//! - `/sse`: a server-sent event stream that sends one event and then stays open (a proxy
//!   that buffers would never deliver it);
//! - an HTTP/1.1 `Upgrade` request: `101`, then echoes every byte (a WebSocket-style tunnel);
//! - anything else: `200` with `host=<host> path=<path>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::pki::TestCa;
use super::server::runtime;

/// What the stand-in saw of one request.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// `HTTP/2.0` or `HTTP/1.1`.
    pub version: String,
    /// The host the request named (no port).
    pub host: String,
    /// Path and query.
    pub path: String,
    /// The Authorization header.
    pub authorization: Option<String>,
}

/// The running stand-in.
pub struct FakeRunApp {
    /// Its address (`127.0.0.1:port`).
    pub addr: SocketAddr,
    /// The CA of its certificate (PEM).
    pub ca_pem: String,
    seen: Arc<Mutex<Vec<RunRequest>>>,
}

impl FakeRunApp {
    /// Requests seen so far.
    pub fn seen(&self) -> Vec<RunRequest> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Starts the stand-in with a certificate for `*.REGION.run.app` of each region. The listener
/// is bound on the calling thread (so inside a network namespace when called from one).
pub fn start(regions: &[&str]) -> FakeRunApp {
    let ca = TestCa::new("fake-run-app-ca");
    let names: Vec<String> = regions.iter().map(|r| format!("*.{r}.run.app")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (cert_pem, key_pem) = ca.server_cert(&names);
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server TLS config");
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind run.app stand-in");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<RunRequest>>> = Arc::default();
    let recorded = seen.clone();
    runtime().spawn(async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), recorded.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(answer(req, &seen)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    FakeRunApp {
        addr,
        ca_pem: ca.root_pem.clone(),
        seen,
    }
}

type Reply = Response<BoxBody<Bytes, Infallible>>;

fn answer(mut req: Request<Incoming>, seen: &Mutex<Vec<RunRequest>>) -> Reply {
    let host = req
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            let host = req.headers().get("host")?.to_str().ok()?;
            Some(host.split(':').next().unwrap_or(host).to_owned())
        })
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.to_string());
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Ok(mut seen) = seen.lock() {
        seen.push(RunRequest {
            version: format!("{:?}", req.version()),
            host: host.clone(),
            path: path.clone(),
            authorization,
        });
    }
    if req.headers().contains_key("upgrade") {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut read, &mut write).await;
            }
        });
        return Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(Full::new(Bytes::new()).boxed())
            .expect("101");
    }
    if path == "/sse" {
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(OneThenOpen(Some(Bytes::from_static(b"data: first\n\n"))).boxed())
            .expect("sse");
    }
    Response::new(Full::new(Bytes::from(format!("host={host} path={path}\n"))).boxed())
}

/// A body that yields one chunk and then never ends.
struct OneThenOpen(Option<Bytes>);

impl Body for OneThenOpen {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None => Poll::Pending,
        }
    }
}
