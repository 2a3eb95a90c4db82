//! The local HTTP proxy for run names: the app's `http://SVC[:ANYPORT]/...` arrives here
//! (HTTP/1.1 or h2c with prior knowledge), goes to the service's URL over HTTPS (HTTP/2 when
//! the server offers it by ALPN) with `Authorization: Bearer <ID token>` added unless the
//! request carries one. Bodies stream both ways frame by frame (SSE, gRPC streaming); an HTTP/1.1
//! `Upgrade` (WebSocket) becomes an HTTP/1.1 upgrade upstream and then a byte pipe. An
//! `Upgrade: h2c` offer is declined by answering over HTTP/1.1, as RFC 9113 allows.
//!
//! The token's audience is the service URL; tokens are cached per audience, refreshed before
//! they expire, minted once for concurrent callers ([`TokenCache`]), from the metadata
//! server's `identity` or IAM `generateIdToken` for `KRUN_RUN_TOKEN_SERVICE_ACCOUNT`
//! ([`IdTokenSource`]).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, HOST, HeaderValue, UPGRADE};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh::credentials::id_tokens::IdTokenSource;
use mesh::identity::token_cache::{CacheKey, TokenCache, TokenKind};
use tokio::net::TcpStream;

use super::names::RunZone;

/// The body of every request and answer through the proxy: streamed, never collected.
type ProxyBody = BoxBody<Bytes, hyper::Error>;
type Upstream = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// Headers of one hop (RFC 9110 §7.6.1) that must not be forwarded.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Why the proxy could not build the upstream client.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot load the TLS roots for Cloud Run upstreams: {0}; install ca-certificates or set SSL_CERT_FILE"
)]
pub struct RootsError(String);

/// The proxy: names, tokens and the upstream clients.
pub struct RunProxy {
    zone: Arc<RunZone>,
    tokens: Option<TokenCache<IdTokenSource>>,
    /// HTTP/2 or HTTP/1.1 by ALPN.
    upstream: Upstream,
    /// HTTP/1.1 only, for upgrades (WebSocket over HTTP/2 would need RFC 8441).
    upgrades: Upstream,
}

impl RunProxy {
    /// A proxy for `zone`'s services; `tokens` adds ID tokens (`None`: requests go as they
    /// are). Upstream TLS trusts the system roots; `SSL_CERT_FILE` / `SSL_CERT_DIR` replace them.
    pub fn new(
        zone: Arc<RunZone>,
        tokens: Option<TokenCache<IdTokenSource>>,
    ) -> Result<RunProxy, RootsError> {
        Ok(RunProxy {
            zone,
            tokens,
            upstream: client(true)?,
            upgrades: client(false)?,
        })
    }

    /// Serves one accepted connection (HTTP/1.1 or h2c) to its end.
    pub async fn serve(self: Arc<Self>, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn(move |req| {
            let proxy = self.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .await
        {
            tracing::debug!(error = %e, "run proxy: connection ended with an error");
        }
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let host = req
            .uri()
            .host()
            .map(str::to_owned)
            .or_else(|| {
                let value = req.headers().get(HOST)?.to_str().ok()?;
                Some(strip_port(value).to_owned())
            })
            .unwrap_or_default();
        let name = match self.zone.host(&host) {
            Ok(name) => name,
            Err(e) => return plain(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let base = match self.zone.url(&name) {
            Ok(base) => base,
            Err(e) => return plain(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let uri: Uri = match format!("{base}{path}").parse() {
            Ok(uri) => uri,
            Err(e) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("{base}{path} is not a URL ({e}); check KRUN_RUN_URL_TEMPLATE"),
                );
            }
        };
        let upgrade = req.version() == Version::HTTP_11
            && req
                .headers()
                .get(UPGRADE)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"h2c"));
        let upgrade_value = req.headers().get(UPGRADE).cloned();
        strip_hop_by_hop(req.headers_mut());
        req.headers_mut().remove(HOST);
        if !req.headers().contains_key(AUTHORIZATION)
            && let Some(tokens) = &self.tokens
        {
            let key = CacheKey {
                kind: TokenKind::Id,
                audience: base.clone(),
            };
            match tokens.get(&key).await {
                Ok(token) => match HeaderValue::try_from(format!("Bearer {}", token.secret())) {
                    Ok(value) => {
                        req.headers_mut().insert(AUTHORIZATION, value);
                    }
                    Err(_) => {
                        return plain(
                            StatusCode::BAD_GATEWAY,
                            "the ID token is not a valid header value".into(),
                        );
                    }
                },
                Err(e) => {
                    tracing::warn!(audience = %base, error = %e, "run proxy: no ID token");
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        format!("no ID token for audience {base}: {e}"),
                    );
                }
            }
        }
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        if upgrade && let Some(value) = upgrade_value {
            return self.upgrade(req, value).await;
        }
        let req = req.map(BodyExt::boxed);
        match self.upstream.request(req).await {
            Ok(response) => response.map(BodyExt::boxed),
            Err(e) => unreachable_upstream(&base, &e),
        }
    }

    /// An HTTP/1.1 upgrade (WebSocket): the same request upstream over HTTP/1.1; on `101` both
    /// upgraded connections are joined byte for byte.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        protocol: HeaderValue,
    ) -> Response<ProxyBody> {
        let from_app = hyper::upgrade::on(&mut req);
        req.headers_mut().insert(UPGRADE, protocol);
        req.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        let base = req.uri().to_string();
        let mut response = match self.upgrades.request(req.map(BodyExt::boxed)).await {
            Ok(response) => response,
            Err(e) => return unreachable_upstream(&base, &e),
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let from_upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                let (Ok(app), Ok(upstream)) = (from_app.await, from_upstream.await) else {
                    tracing::debug!("run proxy: upgrade not completed on both sides");
                    return;
                };
                let (mut app, mut upstream) = (TokioIo::new(app), TokioIo::new(upstream));
                let _ = tokio::io::copy_bidirectional(&mut app, &mut upstream).await;
            });
        }
        response.map(BodyExt::boxed)
    }
}

/// The upstream client: TLS with the system roots (or `SSL_CERT_FILE`), plain `http://` for
/// private setups, HTTP/2 by ALPN when `http2`.
fn client(http2: bool) -> Result<Upstream, RootsError> {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    let tls = mesh::http::system_roots_tls()
        .map_err(|e| RootsError(e.to_string()))?
        .https_or_http();
    let connector = if http2 {
        tls.enable_http1().enable_http2().wrap_connector(tcp)
    } else {
        tls.enable_http1().wrap_connector(tcp)
    };
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        // `te: trailers` is what gRPC needs end to end.
        if name == "te" && headers.get("te").is_some_and(|v| v == "trailers") {
            continue;
        }
        headers.remove(name);
    }
}

/// `host` of `host:port` (and of `[v6]:port`).
fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.ends_with(':') => host,
        _ => authority,
    }
}

fn unreachable_upstream(url: &str, e: &hyper_util::client::legacy::Error) -> Response<ProxyBody> {
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        why = format!("{why}: {cause}");
        source = cause.source();
    }
    tracing::warn!(upstream = %url, error = %why, "run proxy: upstream request failed");
    plain(StatusCode::BAD_GATEWAY, format!("{url}: {why}"))
}

/// A short plain-text answer from the proxy itself.
fn plain(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("krun run proxy: {text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("hello:8080"), "hello");
        assert_eq!(strip_port("hello"), "hello");
        assert_eq!(strip_port("hello.us-east1"), "hello.us-east1");
    }

    #[test]
    fn hop_by_hop_headers_stay_here_and_grpc_te_goes_on() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-kept"]);
    }
}
