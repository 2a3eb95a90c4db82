//! Connection limits shared by hgate's listeners: the one accept loop, a cap on concurrent
//! connections (refusing beyond it instead of exhausting memory or file descriptors), an idle
//! timeout, and the wait for open connections during drain.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The accept loop of the SNI and istiod listeners: accepts on `listener` until `drain` is
/// cancelled and runs `handle` for each connection on its own task, holding a slot of `limit`
/// until it ends. A connection beyond the limit is closed at once, logged and counted in
/// `refused`; `name` says which listener in the logs.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    limit: &ConnectionLimit,
    refused: Option<&AtomicU64>,
    drain: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = drain.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "{name} listener accept failed");
                continue;
            }
        };
        let Some(permit) = limit.try_acquire() else {
            if let Some(refused) = refused {
                refused.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(%peer, listener = name, max = limit.max(), "connection limit reached (HGATE_MAX_CONNECTIONS); closing the new connection");
            continue;
        };
        let connection = handle(tcp, peer);
        tokio::spawn(async move {
            connection.await;
            drop(permit);
        });
    }
}

/// At most `max` connections at once.
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConnectionLimit {
    /// A limit of `max` concurrent connections.
    pub fn new(max: usize) -> Self {
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The configured maximum.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more connection, or `None` when all are taken.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Waits until every connection has ended, or `timeout`; returns how many are left.
    pub async fn drained(&self, timeout: Duration) -> usize {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        match tokio::time::timeout(timeout, self.permits.acquire_many(all)).await {
            Ok(_) => 0,
            Err(_) => self.open(),
        }
    }
}

/// Wraps a stream to record when bytes last moved either way.
pub struct Activity<S> {
    inner: S,
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Activity<S> {
    /// Wraps `inner`; the returned clock is read by [`idle`].
    pub fn new(inner: S) -> (Self, IdleClock) {
        let epoch = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        (
            Activity {
                inner,
                epoch,
                last: last.clone(),
            },
            IdleClock { epoch, last },
        )
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

/// When an [`Activity`] stream last moved bytes.
pub struct IdleClock {
    epoch: Instant,
    last: Arc<AtomicU64>,
}

/// Resolves once no bytes have moved for `timeout`.
pub async fn idle(clock: IdleClock, timeout: Duration) {
    loop {
        let last = clock.epoch + Duration::from_millis(clock.last.load(Ordering::Relaxed));
        let deadline = last + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
