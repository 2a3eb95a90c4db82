//! Stand-in for Cloud Run's front end: terminates TLS (ALPN h2, a web server certificate for
//! `localhost` from its own CA), records each request's method, path and Authorization, and
//! forwards the request to the instance (a krun tunnel port) over h2c, streaming both bodies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::server::runtime;

/// What the front saw of one request.
#[derive(Clone, Debug)]
pub struct FrontRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// The Authorization header.
    pub authorization: Option<String>,
}

/// The running front.
pub struct FakeFront {
    /// Its address.
    pub addr: SocketAddr,
    /// The CA that signed its certificate (PEM), for the client's trust store.
    pub ca_pem: String,
    seen: Arc<Mutex<Vec<FrontRequest>>>,
    connections: Arc<AtomicUsize>,
}

impl FakeFront {
    /// TLS connections accepted so far (a pooling client opens one for many tunnels).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<FrontRequest> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Starts a front forwarding to `instance` (h2c).
pub fn start(instance: SocketAddr) -> FakeFront {
    let (tls, ca_pem) = super::kube::tls_config();
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = runtime()
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind front");
    let addr = listener.local_addr().expect("front addr");
    let seen: Arc<Mutex<Vec<FrontRequest>>> = Arc::default();
    let record = seen.clone();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    runtime().spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // One upstream h2c connection per front connection, like a proxy's pool.
                let Ok(upstream) = TcpStream::connect(instance).await else {
                    return;
                };
                let Ok((sender, conn)) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(upstream),
                )
                .await
                else {
                    return;
                };
                tokio::spawn(conn);
                let service = service_fn(move |req: Request<Incoming>| {
                    let mut sender = sender.clone();
                    if let Ok(mut seen) = record.lock() {
                        seen.push(FrontRequest {
                            method: req.method().to_string(),
                            path: req.uri().path().to_owned(),
                            authorization: req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned),
                        });
                    }
                    async move {
                        let (parts, body) = req.into_parts();
                        let mut forward = Request::new(body);
                        *forward.method_mut() = parts.method;
                        *forward.uri_mut() = format!("http://{instance}{}", parts.uri.path())
                            .parse()
                            .expect("uri");
                        let response: Response<Incoming> = sender.send_request(forward).await?;
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    FakeFront {
        addr,
        ca_pem,
        seen,
        connections,
    }
}
