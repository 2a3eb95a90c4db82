//! The tunnel server: HTTP/2 streams that become TCP connections (and, on the plain tunnel
//! port, ordinary HTTP/1.1 or HTTP/2 requests passed to the app).
//!
//! Two request forms open a tunnel: Istio's `CONNECT host:port`
//! (<https://istio.io/latest/docs/ambient/architecture/hbone/>) and cloud-run-mesh's
//! `POST /_hbone/<target>` (request body upstream, response body downstream, as Cloud Run's
//! front end only forwards ordinary requests). The server answers `200` only after the upstream
//! dial succeeded, so a client learns about a refused or unknown target from the status
//! (`404`, `503`) instead of from a dead stream. Where a tunnel may go is the [`Router`]'s
//! decision; whether the peer may open it is [`MeshTls::allowed`]'s and the embedder's
//! [`StreamAuthorizer`]'s: a denied stream is answered `401`, as ztunnel answers it, and a
//! policy change closes open streams it now denies. This module only speaks the protocol.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use crate::authorize::{StreamAuthorizer, StreamFacts, revocation};
use crate::copy::copy_bidirectional;
use crate::identity::{AllowedPeers, SpiffeId};
use crate::idle::{Busy, IdleClock};
use crate::listen::{Accepted, Bounds, handshake_timed_out};
use crate::once::OncePerPeer;
use crate::settings::H2Settings;
use crate::tls;

/// Response and forwarded bodies.
pub type Body = BoxBody<Bytes, Box<dyn StdError + Send + Sync>>;

/// Path prefix of cloud-run-mesh's tunnel form (`POST /_hbone/<target>`).
pub const HBONE_PATH: &str = "/_hbone/";

/// What a tunnel request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `POST /_hbone/<name or port>`.
    Named(String),
    /// `CONNECT host:port`.
    Authority {
        /// Host or IP as sent.
        host: String,
        /// Port.
        port: u16,
    },
}

/// Facts about the stream a routing decision may use.
#[derive(Clone, Debug)]
pub struct StreamContext {
    /// The authenticated peer, on mTLS listeners.
    pub peer: Option<SpiffeId>,
    /// The local address the connection arrived on.
    pub local: SocketAddr,
    /// The peer's address (on Cloud Run: the front end's).
    pub remote: SocketAddr,
}

/// Why a tunnel is refused, with the status the client sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status (403 not allowed, 404 unknown target, 400 bad authority, 503 illegal
    /// port, ...).
    pub status: StatusCode,
    /// Logged, and sent as the body.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `status`.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

/// Where a tunnel is dialed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// A resolved address (the common case: an app port on loopback).
    Addr(SocketAddr),
    /// `host:port`, resolved when dialed.
    Host(String),
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Addr(addr) => write!(f, "{addr}"),
            Upstream::Host(host) => write!(f, "{host}"),
        }
    }
}

/// Decides where each tunnel goes: the policy of the process embedding the server.
pub trait Router: Send + Sync + 'static {
    /// The upstream for `target`, or why not.
    fn route(&self, target: &Target, ctx: &StreamContext) -> Result<Upstream, Refusal>;
}

/// mTLS for an HBONE listener: the server certificate and who may connect.
pub struct MeshTls {
    /// Current TLS config (rebuilt by the embedder on rotation; established connections keep
    /// the one they started with).
    pub config: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
    /// Peers allowed to open streams; others' streams are answered `401`.
    pub allowed: AllowedPeers,
    /// Asked before each handshake; see [`FreshConfig`].
    pub fresh: Option<Arc<dyn FreshConfig>>,
}

impl MeshTls {
    /// The config a new connection is served with: the embedder's fresh one when it gives
    /// one, the watched one otherwise.
    pub async fn config_for_new_connection(&self) -> Arc<rustls::ServerConfig> {
        match &self.fresh {
            Some(fresh) => fresh.fresh().await,
            None => None,
        }
        .unwrap_or_else(|| self.config.borrow().clone())
    }
}

/// The config for a new connection from the embedder's certificate source itself, checked
/// against the wall clock: the watched config lags behind a rotation by the time its rebuild
/// takes, and the timer that should have rotated it may not have fired (a CPU throttled
/// between requests). `None`: serve the watched config.
pub trait FreshConfig: Send + Sync {
    /// Checks the certificate's time against the wall clock and refreshes it when due.
    fn fresh(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<Arc<rustls::ServerConfig>>> + Send + '_>>;
}

/// Where requests that are not tunnels go (cloud-run-mesh's public HTTP path to the app, e.g.
/// requests to the service's own Cloud Run URL).
#[derive(Clone, Debug)]
pub struct Fallback {
    /// The app's address.
    pub app: SocketAddr,
}

/// Serves tunnels on one listener until drained.
///
/// Without TLS it speaks HTTP/2 (prior knowledge) and HTTP/1.1 on the same port, detected per
/// connection, so a Cloud Run service deployed without `--use-http2` reaches the app too;
/// tunnels need HTTP/2 and are refused (400) over HTTP/1.1. With TLS it speaks HTTP/2 only.
///
/// Its bounds ([`TunnelServer::with_bounds`]): at most `max_connections` connections; a new
/// connection must finish its handshake (mTLS when configured) and send its first request
/// headers within `handshake_timeout`; a connection with no open stream (HTTP/2) or request
/// (HTTP/1.1) for `idle_timeout` is shut down gracefully; streams per connection and header
/// sizes are bounded by [`H2Settings`], HTTP/1.1 request heads by
/// [`crate::settings::MAX_HTTP1_HEAD_BYTES`] and [`crate::settings::MAX_HTTP1_HEADERS`].
pub struct TunnelServer {
    router: Arc<dyn Router>,
    settings: H2Settings,
    name: &'static str,
    bounds: Bounds,
    tls: Option<MeshTls>,
    fallback: Option<Fallback>,
    authorizer: Option<Arc<dyn StreamAuthorizer>>,
    /// Peers (address and status) whose refusal was logged.
    refused_peers: OncePerPeer<(IpAddr, StatusCode)>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Incoming,
    >,
}

impl TunnelServer {
    /// A server routing with `router`; h2c or HTTP/1.1 unless [`TunnelServer::with_tls`] is
    /// used.
    pub fn new(router: Arc<dyn Router>, settings: H2Settings) -> Self {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        TunnelServer {
            router,
            settings,
            name: "tunnel",
            bounds: Bounds::default(),
            tls: None,
            fallback: None,
            authorizer: None,
            refused_peers: OncePerPeer::new(crate::once::DEFAULT_CAPACITY),
            client,
        }
    }

    /// Bounds the listener (named `name` in logs) with `bounds`.
    pub fn with_bounds(mut self, name: &'static str, bounds: Bounds) -> Self {
        self.name = name;
        self.bounds = bounds;
        self
    }

    /// Requires mesh mTLS on every connection.
    pub fn with_tls(mut self, tls: MeshTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Asks `authorizer` about every tunnel stream (after [`MeshTls::allowed`]), and closes
    /// open CONNECT streams it denies after a policy change.
    pub fn with_authorizer(mut self, authorizer: Arc<dyn StreamAuthorizer>) -> Self {
        self.authorizer = Some(authorizer);
        self
    }

    /// Sends non-tunnel requests to the app instead of answering 404.
    pub fn with_fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// Accepts until `drain` is cancelled, then stops accepting, sends GOAWAY on every
    /// connection, lets open streams finish for up to `grace`, and closes what is left.
    pub async fn serve(self, listener: TcpListener, drain: CancellationToken, grace: Duration) {
        let limit = self.bounds.limit(self.name);
        let server = Arc::new(self);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = crate::listen::next_connection(&listener, &limit, &drain) => {
                    let Some(Accepted { stream, peer, permit }) = accepted else { break };
                    let server = server.clone();
                    let drain = drain.clone();
                    connections.spawn(async move {
                        server.handle_connection(stream, peer, drain).await;
                        drop(permit);
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let open = connections.len();
        tracing::info!(open, grace = ?grace, "tunnel listener closed; draining open connections");
        if tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                left = connections.len(),
                "drain deadline reached; closing tunnels"
            );
            connections.abort_all();
        }
    }

    async fn handle_connection(
        self: Arc<Self>,
        stream: TcpStream,
        remote: SocketAddr,
        drain: CancellationToken,
    ) {
        // One deadline for the whole handshake: TLS (on mTLS listeners) and the first request.
        let deadline = Instant::now() + self.bounds.handshake_timeout;
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            return;
        };
        match &self.tls {
            None => {
                let ctx = StreamContext {
                    peer: None,
                    local,
                    remote,
                };
                self.serve_http(stream, ctx, remote, deadline, drain).await
            }
            Some(mesh) => {
                let handshake = async {
                    let config = mesh.config_for_new_connection().await;
                    tokio_rustls::TlsAcceptor::from(config).accept(stream).await
                };
                let tls_stream = match tokio::time::timeout_at(deadline, handshake).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        return tracing::info!(%remote, error = %e, "mTLS handshake failed");
                    }
                    Err(_) => {
                        return handshake_timed_out(self.name, remote, "mTLS handshake");
                    }
                };
                // A peer that is not allowed still gets its streams answered (401), so it learns
                // why instead of seeing a closed connection.
                let peer = tls::peer_identity(tls_stream.get_ref().1);
                let ctx = StreamContext {
                    peer,
                    local,
                    remote,
                };
                self.serve_http(tls_stream, ctx, remote, deadline, drain)
                    .await
            }
        }
    }

    /// Serves one connection: HTTP/2 only on mTLS listeners (ALPN h2); on the plain tunnel
    /// port HTTP/2 (prior knowledge) or HTTP/1.1, told apart by the first bytes (Cloud Run
    /// sends HTTP/1.1 unless the service is deployed with `--use-http2`). Closed if no request
    /// arrives by `deadline`; shut down gracefully once no request or stream was open for the
    /// idle timeout, or on drain.
    async fn serve_http<IO>(
        self: &Arc<Self>,
        io: IO,
        ctx: StreamContext,
        remote: SocketAddr,
        deadline: Instant,
        drain: CancellationToken,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = self.clone();
        let clock = IdleClock::new();
        let first_request = CancellationToken::new();
        let service = {
            let (clock, first_request) = (clock.clone(), first_request.clone());
            hyper::service::service_fn(move |req| {
                first_request.cancel();
                let busy = clock.busy();
                let server = server.clone();
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(server.handle_request(req, &ctx, busy).await) }
            })
        };
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if self.tls.is_some() {
            builder = builder.http2_only();
        }
        let s = &self.settings;
        builder
            .http2()
            .initial_stream_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_concurrent_streams(s.max_concurrent_streams)
            .max_header_list_size(s.max_header_list_size)
            .max_send_buf_size(s.stream_window as usize)
            .keep_alive_interval(s.keepalive_interval)
            .keep_alive_timeout(s.keepalive_timeout)
            .timer(TokioTimer::new());
        // The first request's head is bounded by `deadline` below, on both protocols. hyper
        // starts the header read timer as soon as a kept-alive connection waits for its next
        // request, so it is the idle timeout: an idle HTTP/1.1 connection lives as long as an
        // HTTP/2 one without streams (closing it sooner races with the peer reusing it).
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(self.bounds.idle_timeout)
            .max_buf_size(crate::settings::MAX_HTTP1_HEAD_BYTES)
            .max_headers(crate::settings::MAX_HTTP1_HEADERS);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => return log_connection_end(result),
            () = first_request.cancelled() => {}
            // Dropping the connection closes it: a peer that never sent a request gets nothing.
            () = tokio::time::sleep_until(deadline) => {
                return handshake_timed_out(self.name, remote, "first request");
            }
            () = drain.cancelled() => {
                connection.as_mut().graceful_shutdown();
                return log_connection_end(connection.await);
            }
        }
        let idle = self.bounds.idle_timeout;
        tokio::select! {
            result = connection.as_mut() => return log_connection_end(result),
            () = drain.cancelled() => {}
            () = clock.idle(idle) => {
                let idle_total = crate::metrics::IDLE_CLOSED.increment();
                tracing::debug!(listener = self.name, %remote, idle = ?idle, idle_total, "no open stream for the idle timeout; sending GOAWAY");
            }
        }
        connection.as_mut().graceful_shutdown();
        log_connection_end(connection.await);
    }

    /// Answers one request; `busy` keeps the connection from idling until the tunnel or
    /// response it opens has ended.
    async fn handle_request(
        &self,
        req: Request<Incoming>,
        ctx: &StreamContext,
        busy: Busy,
    ) -> Response<Body> {
        if let Err(refusal) = self.peer_allowed(ctx) {
            return self.deny(req, &refusal, ctx);
        }
        let target = match parse_target(&req) {
            Ok(Some(target)) => target,
            Ok(None) => return self.forward_to_app(req, ctx, busy).await,
            Err(refusal) => return self.refuse(req, &refusal, None, ctx),
        };
        let upstream = match self.router.route(&target, ctx) {
            Ok(upstream) => upstream,
            Err(refusal) => return self.refuse(req, &refusal, Some(&target), ctx),
        };
        // Taken before the check, so a policy change between the two is not missed.
        let authorization = self
            .authorizer
            .as_ref()
            .map(|authorizer| (authorizer.clone(), authorizer.changes()));
        let facts = stream_facts(&target, &upstream, ctx);
        if let Some((authorizer, _)) = &authorization
            && let Err(reason) = authorizer.authorize(&facts)
        {
            return self.deny(req, &Refusal::new(StatusCode::UNAUTHORIZED, reason), ctx);
        }
        let upstream_stream = match self.dial(&upstream).await {
            Ok(stream) => stream,
            Err(refusal) => return self.refuse(req, &refusal, Some(&target), ctx),
        };
        // ztunnel's request headers say who sent the stream; the stream carries raw bytes to
        // the app, so they are logged here rather than passed on.
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        tracing::debug!(?target, peer = ?ctx.peer.as_ref().map(ToString::to_string), forwarded = ?header("forwarded"), baggage = ?header("baggage"), traceparent = ?header("traceparent"), "tunnel open");
        let busy = OpenStream {
            _busy: busy,
            _open: crate::metrics::TUNNEL_STREAMS.enter(),
        };
        if req.method() == Method::CONNECT {
            let buffer = self.settings.copy_buffer;
            tokio::spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let mut tunnel = TokioIo::new(upgraded);
                        let mut upstream = upstream_stream;
                        tokio::select! {
                            _ = copy_bidirectional(&mut tunnel, &mut upstream, buffer) => {}
                            () = revocation(authorization, &facts) => {}
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "CONNECT stream ended before upgrade"),
                }
                drop(busy);
            });
            Response::new(empty())
        } else {
            // Open POST-form streams are not re-checked on a policy change: krun's HBONE
            // listener, the one with an authorizer, accepts CONNECT only.
            stream_body_tunnel(req, upstream_stream, self.settings.copy_buffer, busy)
        }
    }

    /// `Err(401)` when the listener is mTLS and the peer is not among [`MeshTls::allowed`].
    fn peer_allowed(&self, ctx: &StreamContext) -> Result<(), Refusal> {
        let Some(mesh) = &self.tls else {
            return Ok(());
        };
        match &ctx.peer {
            Some(id) if mesh.allowed.allows(id) => Ok(()),
            Some(id) => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                format!("peer not allowed: {id} is not among the allowed principals"),
            )),
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "peer not allowed: its certificate carries no SPIFFE ID",
            )),
        }
    }

    /// Dials `upstream`; `200` is only ever sent after this succeeded.
    async fn dial(&self, upstream: &Upstream) -> Result<TcpStream, Refusal> {
        let unavailable = |why: String| {
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("dial {upstream}: {why}"),
            )
        };
        let timeout = self.settings.connect_timeout;
        match upstream {
            Upstream::Addr(addr) => crate::dial::connect(*addr, timeout).await,
            Upstream::Host(host) => crate::dial::connect(host.as_str(), timeout).await,
        }
        .map_err(unavailable)
    }

    async fn forward_to_app(
        &self,
        mut req: Request<Incoming>,
        ctx: &StreamContext,
        busy: Busy,
    ) -> Response<Body> {
        let Some(fallback) = &self.fallback else {
            return self.refuse(
                req,
                &Refusal::new(StatusCode::NOT_FOUND, "not a tunnel request"),
                None,
                ctx,
            );
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri = format!("http://{}{path}", fallback.app);
        match uri.parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => {
                return self.refuse(
                    req,
                    &Refusal::new(StatusCode::BAD_REQUEST, "bad request path"),
                    None,
                    ctx,
                );
            }
        }
        // The mesh client-cert header is only trustworthy when the mesh proxy sets it.
        req.headers_mut().remove("x-forwarded-client-cert");
        remove_hop_by_hop(req.headers_mut());
        *req.version_mut() = http::Version::HTTP_11;
        match self.client.request(req).await {
            Ok(mut response) => {
                // The client's connection is ours, not the app's: an HTTP/1.0 app or its
                // `Connection: close` must not end a kept-alive HTTP/1.1 client connection.
                remove_hop_by_hop(response.headers_mut());
                *response.version_mut() = http::Version::HTTP_11;
                response.map(|b| {
                    b.map_err(|e| Box::new(e) as Box<dyn StdError + Send + Sync>)
                        .map_frame(move |frame| {
                            // The response is in progress until its body has been sent.
                            let _busy = &busy;
                            frame
                        })
                        .boxed()
                })
            }
            Err(e) => error_response(&Refusal::new(
                StatusCode::BAD_GATEWAY,
                format!("app unreachable: {e}"),
            )),
        }
    }

    /// Answers a stream the peer may not open (`401`): counted, and logged once per stream
    /// with the peer and the policy that denied it.
    fn deny(
        &self,
        req: Request<Incoming>,
        refusal: &Refusal,
        ctx: &StreamContext,
    ) -> Response<Body> {
        let denied_total = crate::metrics::DENIED.increment();
        let peer = ctx.peer.as_ref().map(ToString::to_string);
        tracing::warn!(remote = %ctx.remote, peer = ?peer, reason = %refusal.reason, denied_total, "stream denied (401)");
        self.drain_body(req);
        error_response(refusal)
    }

    /// Answers a refused request (no upstream was reached). Every refusal is counted; the first per
    /// peer address and status is logged (a flood of refused requests logs one line), the
    /// rest at debug level. The request body is read to the end (up to a bound) in the
    /// background: dropping it unread would reset the stream, and some clients (curl 7.x)
    /// report a reset that follows a complete response as an error.
    fn refuse(
        &self,
        req: Request<Incoming>,
        refusal: &Refusal,
        target: Option<&Target>,
        ctx: &StreamContext,
    ) -> Response<Body> {
        let refused_total = crate::metrics::REFUSED.increment();
        let (remote, status, reason) = (ctx.remote, refusal.status.as_u16(), &refusal.reason);
        if self.refused_peers.first((remote.ip(), refusal.status)) {
            tracing::info!(%remote, status, %reason, ?target, refused_total, "tunnel refused (logged once per peer address and status)");
        } else {
            tracing::debug!(%remote, status, %reason, ?target, refused_total, "tunnel refused");
        }
        self.drain_body(req);
        error_response(refusal)
    }

    /// Reads a refused request's body to the end (up to a bound) in the background.
    fn drain_body(&self, req: Request<Incoming>) {
        let mut body = req.into_body();
        tokio::spawn(async move {
            let mut left = REFUSED_BODY_LIMIT;
            while let Ok(Some(Ok(frame))) =
                tokio::time::timeout(REFUSED_BODY_WAIT, body.frame()).await
            {
                let len = frame.data_ref().map_or(0, Bytes::len);
                match left.checked_sub(len) {
                    Some(rest) => left = rest,
                    None => break,
                }
            }
        });
    }
}

/// Removes the headers that describe one connection rather than the message (RFC 9110
/// section 7.6.1: `Connection` and the fields it names, and the hop-by-hop fields): each side
/// of the public path is its own connection, and HTTP/1.1 clients send them.
fn remove_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| http::HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        http::header::CONNECTION,
        http::HeaderName::from_static("keep-alive"),
        http::HeaderName::from_static("proxy-connection"),
        http::header::TE,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// `Some(target)` for tunnel requests, `None` for other requests, or a refusal.
fn parse_target(req: &Request<Incoming>) -> Result<Option<Target>, Refusal> {
    let tunnel = req.method() == Method::CONNECT || req.uri().path().starts_with(HBONE_PATH);
    if tunnel && req.version() != http::Version::HTTP_2 {
        // A tunnel is a stream beside others on one connection; HTTP/1.1 has no such thing.
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "HBONE tunnels need HTTP/2 (h2c prior knowledge); this request came over {:?}",
                req.version()
            ),
        ));
    }
    if req.method() == Method::CONNECT {
        let bad = || {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "CONNECT authority {:?} is not host:port",
                    req.uri().to_string()
                ),
            )
        };
        let authority = req.uri().authority().ok_or_else(bad)?;
        let port = authority.port_u16().ok_or_else(bad)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() || authority.as_str().contains('@') {
            return Err(bad());
        }
        return Ok(Some(Target::Authority {
            host: host.to_owned(),
            port,
        }));
    }
    let Some(name) = req.uri().path().strip_prefix(HBONE_PATH) else {
        return Ok(None);
    };
    if req.method() != Method::POST {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} {HBONE_PATH}: only POST opens a tunnel", req.method()),
        ));
    }
    Ok(Some(Target::Named(name.to_owned())))
}

/// What the authorizer is asked about a stream: the peer, and the workload address the
/// connection arrived on with the port the stream reaches (the CONNECT port, the numeric
/// `/_hbone/<port>`, else the port it was routed to).
fn stream_facts(target: &Target, upstream: &Upstream, ctx: &StreamContext) -> StreamFacts {
    let port = match (target, upstream) {
        (Target::Authority { port, .. }, _) => *port,
        (Target::Named(name), Upstream::Addr(addr)) => name.parse().unwrap_or(addr.port()),
        (Target::Named(name), Upstream::Host(_)) => name.parse().unwrap_or(0),
    };
    StreamFacts {
        peer: ctx.peer.clone(),
        source: ctx.remote,
        destination: SocketAddr::new(ctx.local.ip(), port),
    }
}

/// A tunnel stream in progress: it keeps its connection from idling out and counts in
/// [`crate::metrics::TUNNEL_STREAMS`] until it ends.
struct OpenStream {
    _busy: Busy,
    _open: crate::metrics::Open,
}

/// The POST form: the request body flows upstream, upstream bytes flow back as the response
/// body. The end of the request body half-closes the upstream; upstream EOF ends the response.
fn stream_body_tunnel(
    req: Request<Incoming>,
    upstream: TcpStream,
    buffer: usize,
    busy: OpenStream,
) -> Response<Body> {
    let (upstream_read, mut upstream_write) = upstream.into_split();
    let mut body = req.into_body();
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map(Frame::into_data) else {
                break;
            };
            if let Ok(data) = data
                && upstream_write.write_all(&data).await.is_err()
            {
                return;
            }
        }
        let _ = upstream_write.shutdown().await;
    });
    let frames = ReaderStream::with_capacity(upstream_read, buffer).map(move |chunk| {
        // The tunnel is in progress until the upstream has nothing more to send.
        let _busy = &busy;
        chunk
            .map(Frame::data)
            .map_err(|e| Box::new(e) as Box<dyn StdError + Send + Sync>)
    });
    Response::new(BodyExt::boxed(StreamBody::new(frames)))
}

/// How much of a refused request's body is read before the stream is reset.
const REFUSED_BODY_LIMIT: usize = 64 << 10;
/// How long a refused request's body may take to end.
const REFUSED_BODY_WAIT: Duration = Duration::from_secs(5);

fn error_response(refusal: &Refusal) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{}\n", refusal.reason)))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = refusal.status;
    response
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn log_connection_end(result: Result<(), Box<dyn StdError + Send + Sync>>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "tunnel connection ended with an error");
    }
}
