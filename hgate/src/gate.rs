//! The SNI listener: reads a mesh client's ClientHello without terminating TLS, picks the
//! tunnel URL for the destination its SNI names, and pipes the connection (ClientHello first)
//! through a pooled HBONE `POST` tunnel with a Google ID token for that URL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use hbone::idle::Activity;
use hbone::listen::{ConnectionLimit, serve_each};
use hbone::post::{PostClient, PostUrl};
use hbone::sni::{self, MAX_CLIENT_HELLO, Parsed};
use mesh::credentials::id_tokens::IdTokenSource;
use mesh::identity::token_cache::{CacheKey, TokenCache, TokenKind};
use mesh::metrics::tcp::{Reporter, TcpConnection};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::route::{self, Routes};

/// Connections closed because no route matched their SNI.
pub static NO_ROUTE: AtomicU64 = AtomicU64::new(0);
/// Connections tunnelled to the end.
pub static TUNNELLED: AtomicU64 = AtomicU64::new(0);

/// Everything a connection needs.
pub struct Gate {
    /// The routing table.
    pub routes: Routes,
    /// Pooled HBONE POST client.
    pub client: PostClient,
    /// ID tokens (`None`: no Authorization header).
    pub tokens: Option<TokenCache<IdTokenSource>>,
    /// ClientHello deadline.
    pub hello_timeout: Duration,
    /// Idle timeout of tunnelled connections.
    pub idle_timeout: Duration,
    /// Copy buffer per direction.
    pub buffer: usize,
}

/// What happened to one connection, for its log line.
#[derive(Default)]
struct Outcome {
    sni: Option<String>,
    route: Option<String>,
    sent: u64,
    received: u64,
}

impl Gate {
    /// Accepts until `drain` is cancelled; each connection runs to its end under `limit`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        limit: Arc<ConnectionLimit>,
        drain: CancellationToken,
    ) {
        serve_each(listener, &limit, &drain, |tcp, peer| {
            let gate = self.clone();
            async move { gate.handle(tcp, peer).await }
        })
        .await;
    }

    async fn handle(&self, tcp: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let mut outcome = Outcome::default();
        let result = self.tunnel(tcp, &mut outcome).await;
        let duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let sni = outcome.sni.as_deref().unwrap_or("-");
        let route = outcome.route.as_deref().unwrap_or("-");
        match result {
            Ok(()) => {
                TUNNELLED.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, sni, route, sent = outcome.sent, received = outcome.received, duration_ms, outcome = "ok", "connection finished");
            }
            Err(reason) => {
                tracing::info!(%peer, sni, route, sent = outcome.sent, received = outcome.received, duration_ms, outcome = %reason, "connection finished");
            }
        }
    }

    async fn tunnel(&self, mut tcp: TcpStream, outcome: &mut Outcome) -> Result<(), String> {
        let (hello, name) =
            match tokio::time::timeout(self.hello_timeout, read_hello(&mut tcp)).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(format!(
                        "ClientHello not complete within {} (HGATE_HELLO_TIMEOUT); closed",
                        humantime::format_duration(self.hello_timeout)
                    ));
                }
            };
        outcome.sni = name.clone();
        let dest = name
            .as_deref()
            .and_then(route::destination)
            .ok_or_else(|| {
                NO_ROUTE.fetch_add(1, Ordering::Relaxed);
                "no route: SNI is not outbound_.PORT_._.SVC.NS.svc... or SVC.NS.svc...".to_owned()
            })?;
        let (url, source) = self.routes.resolve(&dest).map_err(|e| {
            NO_ROUTE.fetch_add(1, Ordering::Relaxed);
            format!("no route for {dest}: {e}")
        })?;
        outcome.route = Some(format!("{url} ({source:?})"));
        let url = PostUrl::parse(&url).map_err(|e| {
            NO_ROUTE.fetch_add(1, Ordering::Relaxed);
            e.to_string()
        })?;
        let authorization = match &self.tokens {
            None => None,
            Some(cache) => {
                let key = CacheKey {
                    kind: TokenKind::Id,
                    audience: url.origin(),
                };
                // Boxed for the same reason as `open` below: a token fetch is a whole HTTP call.
                let token = Box::pin(cache.get(&key))
                    .await
                    .map_err(|e| format!("no ID token for {}: {e}", url.origin()))?;
                Some(format!("Bearer {}", token.secret()))
            }
        };
        let hello_len = hello.len() as u64;
        // Boxed: the dial and TLS handshake state would otherwise size this connection's task
        // for its whole life, idle tunnels included; on the heap it is freed once open.
        let tunnel = Box::pin(
            self.client
                .open(&url, authorization.as_deref(), hello.freeze()),
        )
        .await
        .map_err(|e| e.to_string())?;
        // Neither end shows hgate a mesh identity (the client's TLS passes through, the
        // upstream is a web server), so both principals are `unknown`.
        let connection = TcpConnection::open(Reporter::Source, None, None);
        connection.received_before(hello_len);
        let (io, clock) = Activity::new(connection.count(tcp));
        tokio::select! {
            piped = tunnel.pipe(io, self.buffer) => {
                let (sent, received) = piped.map_err(|e| format!("tunnel broke: {e}"))?;
                outcome.sent = sent;
                outcome.received = received;
                Ok(())
            }
            () = clock.idle(self.idle_timeout) => Err(format!(
                "idle for {} (HGATE_IDLE_TIMEOUT); closed",
                humantime::format_duration(self.idle_timeout)
            )),
        }
    }
}

/// Reads until the ClientHello is whole; returns every byte read (to replay) and the SNI.
async fn read_hello(tcp: &mut TcpStream) -> Result<(BytesMut, Option<String>), String> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let n = tcp
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("read ClientHello: {e}"))?;
        match sni::parse(&buf) {
            Ok(Parsed::Complete { sni, .. }) => return Ok((buf, sni)),
            Ok(Parsed::Incomplete) if n == 0 => {
                return Err("client closed before its ClientHello was complete".into());
            }
            // Records add 5 bytes per fragment; bound the buffer well above any real hello.
            Ok(Parsed::Incomplete) if buf.len() > 2 * MAX_CLIENT_HELLO => {
                return Err("ClientHello too large".into());
            }
            Ok(Parsed::Incomplete) => {}
            Err(e) => return Err(format!("not a TLS ClientHello: {e}")),
        }
    }
}
