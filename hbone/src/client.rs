//! The tunnel client: opens `CONNECT` streams to HBONE peers over pooled HTTP/2 connections.
//!
//! Connections are pooled per (peer address, expected peer identity, own identity) and shared
//! by up to `max_streams_per_connection` tunnels, so a burst of tunnels to one peer costs one
//! TLS handshake, not one each (cloud-run-mesh dialed per tunnel).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use crate::SpiffeId;
pub use crate::pool::StreamGuard;
use crate::pool::{ConnectionPool, Lease};
use crate::settings::H2Settings;
use crate::tls::{self, ExpectedPeer, WorkloadCert};

/// A failed tunnel, saying which step failed for which peer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed or timed out.
    #[error("connect to {peer}: {detail}")]
    Connect {
        /// The peer address.
        peer: SocketAddr,
        /// Why.
        detail: String,
    },
    /// The TLS handshake failed (wrong identity, untrusted chain, ...).
    #[error("mTLS handshake with {peer}: {source}")]
    Tls {
        /// The peer address.
        peer: SocketAddr,
        /// rustls' error.
        source: std::io::Error,
    },
    /// TLS configuration could not be built.
    #[error("TLS setup: {0}")]
    Setup(#[from] tls::TlsError),
    /// HTTP/2 failed.
    #[error("HTTP/2 with {peer}: {source}")]
    H2 {
        /// The peer address.
        peer: SocketAddr,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The peer refused the tunnel.
    #[error("{peer} refused CONNECT {authority}: HTTP {status}")]
    Refused {
        /// The peer address.
        peer: SocketAddr,
        /// The requested authority.
        authority: String,
        /// Its answer.
        status: StatusCode,
    },
}

/// How to reach one HBONE peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The peer's HBONE address (`<ip>:15008`).
    pub addr: SocketAddr,
    /// `Some` for mTLS (verifying this identity); `None` for h2c.
    pub expected: Option<ExpectedPeerKey>,
}

/// [`ExpectedPeer`] in a hashable form for pool keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExpectedPeerKey(pub String);

/// A tunnel: bytes written reach the target, bytes read come from it.
pub type Tunnel = TokioIo<hyper::upgrade::Upgraded>;

/// Opens tunnels, reusing connections.
pub struct HboneClient {
    settings: H2Settings,
    cert: Option<watch::Receiver<Arc<WorkloadCert>>>,
    pool: ConnectionPool<Peer, Empty<Bytes>>,
}

impl HboneClient {
    /// A client presenting the current certificate of `cert` on new mTLS connections (`None`:
    /// h2c only); pooled connections keep the certificate they were opened with.
    pub fn new(settings: H2Settings, cert: Option<watch::Receiver<Arc<WorkloadCert>>>) -> Self {
        HboneClient {
            settings,
            cert,
            pool: ConnectionPool::new(
                settings.max_streams_per_connection,
                settings.max_pooled_peers,
            ),
        }
    }

    /// The SPIFFE ID this client presents (`None`: h2c only, or a certificate without one),
    /// for the source principal of what it carries.
    pub fn identity(&self) -> Option<SpiffeId> {
        self.cert.as_ref().and_then(|cert| cert.borrow().identity())
    }

    /// Opens `CONNECT authority` through `peer`, over mTLS verifying `expected` when given.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        expected: Option<&ExpectedPeer>,
        authority: &str,
    ) -> Result<(Tunnel, StreamGuard), ClientError> {
        self.connect_with_headers(peer, expected, authority, http::HeaderMap::new())
            .await
    }

    /// [`HboneClient::connect`], the CONNECT request carrying `headers` too (ztunnel's
    /// `baggage`, `forwarded` and `traceparent`: what they say is the embedder's business).
    pub async fn connect_with_headers(
        &self,
        peer: SocketAddr,
        expected: Option<&ExpectedPeer>,
        authority: &str,
        headers: http::HeaderMap,
    ) -> Result<(Tunnel, StreamGuard), ClientError> {
        let key = Peer {
            addr: peer,
            expected: expected.map(|e| ExpectedPeerKey(e.to_string())),
        };
        let Lease { mut sender, guard } = match self.pool.checkout(&key).await {
            Ok(lease) => lease,
            Err(permit) => {
                let sender = self.dial(peer, expected).await?;
                self.pool.insert(key, sender, permit)
            }
        };
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(Empty::new())
            .map_err(|_| ClientError::Refused {
                peer,
                authority: authority.to_owned(),
                status: StatusCode::BAD_REQUEST,
            })?;
        request.headers_mut().extend(headers);
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| ClientError::H2 { peer, source })?;
        if response.status() != StatusCode::OK {
            return Err(ClientError::Refused {
                peer,
                authority: authority.to_owned(),
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|source| ClientError::H2 { peer, source })?;
        Ok((TokioIo::new(upgraded), guard))
    }

    async fn dial(
        &self,
        peer: SocketAddr,
        expected: Option<&ExpectedPeer>,
    ) -> Result<SendRequest<Empty<Bytes>>, ClientError> {
        let tcp = crate::dial::connect(peer, self.settings.connect_timeout)
            .await
            .map_err(|detail| ClientError::Connect { peer, detail })?;
        match (expected, &self.cert) {
            (Some(expected), Some(cert)) => {
                let current = cert.borrow().clone();
                let config = tls::client_config(&current, expected.clone(), &[tls::ALPN_H2])?;
                let tls_stream = tokio_rustls::TlsConnector::from(config)
                    .connect(tls::unused_server_name(), tcp)
                    .await
                    .map_err(|source| ClientError::Tls { peer, source })?;
                self.handshake(peer, tls_stream).await
            }
            _ => self.handshake(peer, tcp).await,
        }
    }

    async fn handshake<IO>(
        &self,
        peer: SocketAddr,
        io: IO,
    ) -> Result<SendRequest<Empty<Bytes>>, ClientError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        h2_handshake(&self.settings, io)
            .await
            .map_err(|source| ClientError::H2 { peer, source })
    }
}

/// An HTTP/2 client handshake with `settings` over `io`; the connection is driven by a task.
pub(crate) async fn h2_handshake<IO, B>(
    s: &H2Settings,
    io: IO,
) -> Result<SendRequest<B>, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(s.stream_window)
        .initial_connection_window_size(s.connection_window)
        .max_frame_size(s.max_frame_size)
        .max_send_buf_size(s.stream_window as usize)
        .keep_alive_interval(s.keepalive_interval)
        .keep_alive_timeout(s.keepalive_timeout)
        .timer(hyper_util::rt::TokioTimer::new())
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HBONE connection closed");
        }
    });
    Ok(sender)
}
