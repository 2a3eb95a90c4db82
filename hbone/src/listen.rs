//! The accept step every listener shares, and the bounds every listener has: a cap on
//! concurrent connections (a connection beyond it is closed at once and counted, instead of
//! exhausting file descriptors or memory), a handshake deadline and an idle timeout (applied by
//! each listener to what its handshake is, see [`Bounds`]), and the wait for open connections
//! during drain.
//!
//! An accept error (out of file descriptors, a connection reset before it was accepted) is
//! logged, the listener pauses for a moment and keeps serving, because one bad moment must not close a port that the
//! platform routes traffic to.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Pause after a failed accept: the usual cause (`EMFILE`, out of file descriptors) persists
/// until connections end, and retrying at once would spin a core and flood the log.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How often, at most, a listener logs that it refuses connections at its cap: one line per
/// burst of refusals, not one per connection (a flood must not become a log flood).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The bounds of one listener, stated by the embedder (krun's and hgate's settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// How long a new connection may take to show it speaks the listener's protocol (TLS
    /// handshake, first request headers, ClientHello); then it is closed.
    pub handshake_timeout: Duration,
    /// How long a connection may carry nothing (no bytes, or no open stream on HTTP/2); then
    /// it is closed.
    pub idle_timeout: Duration,
    /// Concurrent connections of the listener.
    pub max_connections: usize,
    /// The setting that raises the cap, named in the refusal log line.
    pub cap_setting: &'static str,
}

impl Default for Bounds {
    /// krun's defaults (see its `KRUN_HANDSHAKE_TIMEOUT`, `KRUN_IDLE_TIMEOUT` and
    /// `KRUN_MAX_CONNECTIONS`).
    fn default() -> Self {
        Bounds {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            max_connections: 10_000,
            cap_setting: "KRUN_MAX_CONNECTIONS",
        }
    }
}

impl Bounds {
    /// The connection cap of the listener `name` under these bounds.
    pub fn limit(&self, name: &'static str) -> ConnectionLimit {
        ConnectionLimit::new(name, self.cap_setting, self.max_connections)
    }
}

/// At most `max` connections at once on one listener, with the count of those refused.
pub struct ConnectionLimit {
    name: &'static str,
    setting: &'static str,
    permits: Arc<Semaphore>,
    max: usize,
    refused: AtomicU64,
    /// When a refusal was last logged, and how many were refused since.
    last_log: Mutex<(Option<Instant>, u64)>,
}

impl ConnectionLimit {
    /// A cap of `max` concurrent connections on the listener `name`; `setting` is the knob
    /// that raises it.
    pub fn new(name: &'static str, setting: &'static str, max: usize) -> Self {
        ConnectionLimit {
            name,
            setting,
            permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            refused: AtomicU64::new(0),
            last_log: Mutex::new((None, 0)),
        }
    }

    /// The configured maximum.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Connections refused at the cap since the listener started.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A slot for one more connection, or `None` (counted and, once per burst, logged) when
    /// all are taken.
    fn admit(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        let refused_total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::LIMITED.increment();
        let Ok(mut last) = self.last_log.lock() else {
            return None;
        };
        let (at, since) = &mut *last;
        *since += 1;
        let now = Instant::now();
        if at.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_INTERVAL) {
            tracing::warn!(
                %peer,
                listener = self.name,
                max = self.max,
                refused = *since,
                refused_total,
                "connection limit reached ({}); closing new connections at once, logged again in {}s at most",
                self.setting,
                REFUSAL_LOG_INTERVAL.as_secs(),
            );
            *at = Some(now);
            *since = 0;
        }
        None
    }

    /// Waits until every connection has ended, or `timeout`; returns how many are left.
    pub async fn drained(&self, timeout: Duration) -> usize {
        let all = u32::try_from(self.max.min(Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        match tokio::time::timeout(timeout, self.permits.acquire_many(all)).await {
            Ok(_) => 0,
            Err(_) => self.open(),
        }
    }
}

/// An accepted connection and its slot under the listener's cap; the slot is free again when
/// `permit` is dropped, so the connection's task holds it to its end.
pub struct Accepted {
    /// The connection.
    pub stream: TcpStream,
    /// Its peer.
    pub peer: SocketAddr,
    /// Its slot under the cap.
    pub permit: OwnedSemaphorePermit,
}

/// Waits for the next connection on `listener` that fits under `limit`; `None` once `drain`
/// is cancelled. A connection beyond the cap is closed at once (dropped before any byte is
/// read) and counted.
pub async fn next_connection(
    listener: &TcpListener,
    limit: &ConnectionLimit,
    drain: &CancellationToken,
) -> Option<Accepted> {
    loop {
        tokio::select! {
            () = drain.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Some(permit) = limit.admit(peer) {
                        // Every listener relays small writes (requests, responses, TLS
                        // handshakes): Nagle's algorithm would hold them back for an ACK.
                        let _ = stream.set_nodelay(true);
                        return Some(Accepted { stream, peer, permit });
                    }
                }
                Err(e) => {
                    tracing::warn!(listener = limit.name, error = %e, pause = ?ACCEPT_ERROR_PAUSE, "accept failed");
                    tokio::select! {
                        () = drain.cancelled() => return None,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                }
            },
        }
    }
}

/// The accept loop of listeners whose connections need nothing from each other: accepts on
/// `listener` under `limit` until `drain` is cancelled and runs `handle` for each connection on
/// its own task, which holds the connection's slot until it ends.
pub async fn serve_each<F, Fut>(
    listener: TcpListener,
    limit: &ConnectionLimit,
    drain: &CancellationToken,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    while let Some(Accepted {
        stream,
        peer,
        permit,
    }) = next_connection(&listener, limit, drain).await
    {
        let connection = handle(stream, peer);
        tokio::spawn(async move {
            connection.await;
            drop(permit);
        });
    }
}

/// Logs (at debug: a flood of them must not flood the log) and counts a connection closed for
/// not finishing `what` within the handshake timeout: every listener's one line for it.
pub fn handshake_timed_out(listener: &str, remote: SocketAddr, what: &str) {
    let timeouts_total = crate::metrics::HANDSHAKE_TIMEOUTS.increment();
    tracing::debug!(
        listener,
        %remote,
        timeouts_total,
        "{what} not complete within the handshake timeout; connection closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_connection_beyond_the_cap_is_closed_at_once_and_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limit = Arc::new(ConnectionLimit::new("test", "TEST_MAX", 1));
        let drain = CancellationToken::new();
        let global_before = crate::metrics::LIMITED.get();
        let server = {
            let (limit, drain) = (limit.clone(), drain.clone());
            tokio::spawn(async move {
                // The admitted connection is held (not read) until the test ends.
                let mut held = Vec::new();
                while let Some(accepted) = next_connection(&listener, &limit, &drain).await {
                    held.push(accepted);
                }
            })
        };
        let _first = TcpStream::connect(addr).await.expect("first");
        let mut second = TcpStream::connect(addr).await.expect("second");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(60), second.read(&mut buf))
            .await
            .expect("the extra connection is closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(limit.refused(), 1);
        assert_eq!(limit.open(), 1);
        assert!(crate::metrics::LIMITED.get() > global_before);
        drain.cancel();
        server.await.expect("server");
    }
}
