//! The tunnel client for the `POST <path>` form that Cloud Run accepts (it has no CONNECT):
//! the request body carries bytes upstream and the response body brings them back, over
//! pooled HTTP/2 — TLS with ALPN h2 to a normal web server identity for `https://` URLs (the
//! Cloud Run front end), h2c for `http://` URLs (a local krun, tests).
//!
//! Connections are pooled per origin and shared by up to `max_streams_per_connection`
//! tunnels (cloud-run-mesh's hgate opened one TLS connection per inbound connection).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::pool::{ConnectionPool, Lease, StreamGuard};
use crate::settings::H2Settings;

/// A failed POST tunnel, naming the URL and the step.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The tunnel URL is not `http(s)://host[:port]/path`.
    #[error("tunnel URL {url:?}: {detail}; expected http(s)://host[:port]/path")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// TCP connect failed or timed out.
    #[error("connect to {origin}: {detail}")]
    Connect {
        /// scheme://host:port.
        origin: String,
        /// Why.
        detail: String,
    },
    /// The TLS handshake failed (untrusted certificate, wrong name, no h2).
    #[error("TLS handshake with {origin}: {source}")]
    Tls {
        /// scheme://host:port.
        origin: String,
        /// rustls' error.
        source: std::io::Error,
    },
    /// HTTP/2 failed.
    #[error("HTTP/2 with {origin}: {source}")]
    H2 {
        /// scheme://host:port.
        origin: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The server answered the POST with an error.
    #[error("{url} refused the tunnel: HTTP {status}")]
    Refused {
        /// The tunnel URL.
        url: String,
        /// Its answer.
        status: StatusCode,
    },
}

/// `http` (h2c) or `https` (HTTP/2 over TLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// h2c with prior knowledge.
    Http,
    /// HTTP/2 over TLS, ALPN h2.
    Https,
}

/// A parsed tunnel URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PostUrl {
    /// Transport.
    pub scheme: Scheme,
    /// Host name or IP (without brackets).
    pub host: String,
    /// Port (default 80 / 443).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl PostUrl {
    /// Parses `http(s)://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<PostUrl, PostError> {
        let bad = |detail| PostError::Url {
            url: url.to_owned(),
            detail,
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err(bad("scheme must be http or https")),
        };
        let authority = uri.authority().ok_or(bad("no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        Ok(PostUrl {
            scheme,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// `scheme://host[:port]`: the ID token audience Cloud Run expects, and the pool key.
    pub fn origin(&self) -> String {
        let (name, default) = match self.scheme {
            Scheme::Http => ("http", 80),
            Scheme::Https => ("https", 443),
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            format!("{name}://{host}")
        } else {
            format!("{name}://{host}:{}", self.port)
        }
    }
}

/// Pool key: one origin.
type OriginKey = (Scheme, String, u16);

/// The request body: chunks read from the client, framed as DATA. The channel carries bare
/// `Bytes` (32 bytes a slot) rather than `Result<Frame<Bytes>, _>` (over 100, room for
/// trailers): tokio allocates a block of 32 slots up front for every tunnel, idle or not.
type ReqBody = StreamBody<tokio_stream::adapters::Map<ReceiverStream<Bytes>, DataFrame>>;

/// Frames a chunk of the request body.
type DataFrame = fn(Bytes) -> Result<Frame<Bytes>, Infallible>;

fn data_frame(chunk: Bytes) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(chunk))
}

/// Opens POST tunnels, reusing HTTP/2 connections per origin.
pub struct PostClient {
    settings: H2Settings,
    tls: Arc<rustls::ClientConfig>,
    /// Per origin; a burst of tunnels to a new origin waits for the first connection and
    /// shares it, instead of each dialing its own.
    pool: ConnectionPool<OriginKey, ReqBody>,
}

/// An open POST tunnel: call [`PostTunnel::pipe`] to move bytes.
pub struct PostTunnel {
    upstream: mpsc::Sender<Bytes>,
    downstream: Incoming,
    _guard: StreamGuard,
}

impl PostClient {
    /// A client verifying `https://` servers with `tls` (its roots; ALPN is set to h2 here).
    pub fn new(settings: H2Settings, tls: &rustls::ClientConfig) -> Self {
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        PostClient {
            settings,
            tls: Arc::new(tls),
            pool: ConnectionPool::new(
                settings.max_streams_per_connection,
                settings.max_pooled_peers,
            ),
        }
    }

    /// Opens `POST url.path` with `authorization` (a full header value, e.g. `Bearer ...`) and
    /// sends `first` (bytes already read from the client) as the first upstream data.
    pub async fn open(
        &self,
        url: &PostUrl,
        authorization: Option<&str>,
        first: Bytes,
    ) -> Result<PostTunnel, PostError> {
        let key = (url.scheme, url.host.clone(), url.port);
        let Lease { mut sender, guard } = match self.pool.checkout(&key).await {
            Ok(lease) => lease,
            Err(permit) => {
                let sender = self.dial(url).await?;
                self.pool.insert(key, sender, permit)
            }
        };
        let (tx, rx) = mpsc::channel(8);
        if !first.is_empty() {
            // The channel is empty, so this cannot wait.
            let _ = tx.try_send(first);
        }
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{}", url.origin(), url.path))
            .header(header::CONTENT_TYPE, "application/octet-stream");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let request = request
            .body(StreamBody::new(
                ReceiverStream::new(rx).map(data_frame as DataFrame),
            ))
            .map_err(|_| PostError::Url {
                url: format!("{}{}", url.origin(), url.path),
                detail: "not a valid request URI",
            })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| PostError::H2 {
                origin: url.origin(),
                source,
            })?;
        if response.status() != StatusCode::OK {
            return Err(PostError::Refused {
                url: format!("{}{}", url.origin(), url.path),
                status: response.status(),
            });
        }
        Ok(PostTunnel {
            upstream: tx,
            downstream: response.into_body(),
            _guard: guard,
        })
    }

    async fn dial(&self, url: &PostUrl) -> Result<SendRequest<ReqBody>, PostError> {
        let origin = url.origin();
        let tcp =
            crate::dial::connect((url.host.as_str(), url.port), self.settings.connect_timeout)
                .await
                .map_err(|detail| PostError::Connect {
                    origin: origin.clone(),
                    detail,
                })?;
        let h2 = |source| PostError::H2 {
            origin: origin.clone(),
            source,
        };
        match url.scheme {
            Scheme::Http => crate::client::h2_handshake(&self.settings, tcp)
                .await
                .map_err(h2),
            Scheme::Https => {
                let name = ServerName::try_from(url.host.clone()).map_err(|_| PostError::Url {
                    url: origin.clone(),
                    detail: "host is not a valid TLS server name",
                })?;
                let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|source| PostError::Tls {
                        origin: origin.clone(),
                        source,
                    })?;
                crate::client::h2_handshake(&self.settings, tls)
                    .await
                    .map_err(h2)
            }
        }
    }
}

/// First read size of a tunnel's upstream direction.
const MIN_READ: usize = 4 << 10;

impl PostTunnel {
    /// Pipes `io` through the tunnel until both directions end: `io` EOF ends the request
    /// body (half-close upstream); the end of the response body shuts down `io`'s write side.
    /// Returns (bytes sent upstream, bytes received).
    pub async fn pipe<S>(self, io: S, buffer: usize) -> std::io::Result<(u64, u64)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut reader, mut writer) = tokio::io::split(io);
        let PostTunnel {
            upstream,
            mut downstream,
            _guard,
        } = self;
        let up = async move {
            let mut sent = 0u64;
            // Start small and grow while reads fill the buffer: an idle tunnel holds 4 KiB,
            // a busy one reads up to `buffer` (at most 256 KiB) at a time.
            let mut capacity = MIN_READ;
            loop {
                let chunk = read_chunk(&mut reader, capacity).await?;
                let n = chunk.len();
                capacity = if n == capacity {
                    (capacity * 2).min(buffer.clamp(MIN_READ, 256 << 10))
                } else {
                    capacity
                };
                if n == 0 {
                    break; // dropping the sender ends the request body
                }
                sent += n as u64;
                if upstream.send(chunk.freeze()).await.is_err() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "tunnel request stream closed",
                    ));
                }
            }
            Ok::<u64, std::io::Error>(sent)
        };
        let down = async move {
            let mut received = 0u64;
            while let Some(frame) = downstream.frame().await {
                let frame = frame.map_err(std::io::Error::other)?;
                if let Ok(data) = frame.into_data() {
                    received += data.len() as u64;
                    writer.write_all(&data).await?;
                }
            }
            writer.shutdown().await?;
            Ok::<u64, std::io::Error>(received)
        };
        let (sent, received) = tokio::join!(up, down);
        Ok((sent?, received?))
    }
}

/// Reads what `reader` has into a new buffer of `capacity`, allocated on each poll and freed
/// again when the poll finds nothing: a tunnel waiting for its client to speak holds no read
/// buffer (thousands of idle tunnels each held 4 KiB). A reader with bytes at hand fills the
/// buffer at once, so a busy tunnel allocates once per chunk, as before.
async fn read_chunk<R>(reader: &mut R, capacity: usize) -> std::io::Result<BytesMut>
where
    R: AsyncRead + Unpin,
{
    std::future::poll_fn(|cx| {
        let mut chunk = BytesMut::with_capacity(capacity);
        match tokio_util::io::poll_read_buf(Pin::new(&mut *reader), cx, &mut chunk) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(read) => Poll::Ready(read.map(|_| chunk)),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tunnel_urls_and_derives_the_audience() {
        let u = PostUrl::parse("https://echo-abc.a.run.app/_hbone/15003").expect("url");
        assert_eq!(u.scheme, Scheme::Https);
        assert_eq!((u.host.as_str(), u.port), ("echo-abc.a.run.app", 443));
        assert_eq!(u.path, "/_hbone/15003");
        assert_eq!(u.origin(), "https://echo-abc.a.run.app");
        let local = PostUrl::parse("http://127.0.0.1:9000/_hbone/15003").expect("url");
        assert_eq!(local.origin(), "http://127.0.0.1:9000");
        assert!(PostUrl::parse("ftp://x/").is_err());
        assert!(PostUrl::parse("/_hbone/15003").is_err());
    }
}
