//! Idle timeouts: a connection that carries nothing for a while is closed, so a peer cannot
//! hold a slot under a listener's cap (and a file descriptor, and a task) forever.
//!
//! "Nothing" is measured by an [`IdleClock`]: bytes moving through an [`Activity`] stream
//! touch it, and work in progress (an open HTTP/2 stream) holds it busy with a [`Busy`] guard,
//! so HTTP/2 keepalive PINGs alone do not keep a connection without streams alive.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a connection last did something, and whether it is doing something now.
#[derive(Clone)]
pub struct IdleClock(Arc<Clock>);

struct Clock {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last activity.
    last: AtomicU64,
    /// Work in progress ([`Busy`] guards alive).
    busy: AtomicUsize,
}

impl IdleClock {
    /// A clock that starts now, idle.
    pub fn new() -> Self {
        IdleClock(Arc::new(Clock {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }))
    }

    /// Records activity now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.0.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last.store(ms, Ordering::Relaxed);
    }

    /// Holds the connection busy (never idle) until the guard is dropped.
    pub fn busy(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// Resolves once nothing is in progress and nothing happened for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.0.epoch + Duration::from_millis(self.0.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            let now = Instant::now();
            let busy = self.0.busy.load(Ordering::Relaxed) > 0;
            if !busy && now >= deadline {
                return;
            }
            // Busy: look again a whole timeout later (cheap; the work may end any time).
            tokio::time::sleep_until(if busy { now + timeout } else { deadline }).await;
        }
    }
}

impl Default for IdleClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Work in progress on a connection (see [`IdleClock::busy`]); its end counts as activity.
pub struct Busy(IdleClock);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that touches its [`IdleClock`] whenever bytes move either way.
pub struct Activity<S> {
    inner: S,
    clock: IdleClock,
}

impl<S> Activity<S> {
    /// Wraps `inner`; the returned clock is the one to wait on ([`IdleClock::idle`]).
    pub fn new(inner: S) -> (Self, IdleClock) {
        let clock = IdleClock::new();
        (
            Activity {
                inner,
                clock: clock.clone(),
            },
            clock,
        )
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
            self.clock.touch();
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
            self.clock.touch();
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

/// How a [`pipe`] ended.
#[derive(Debug)]
pub enum PipeEnd {
    /// Both directions finished: bytes `a` to `b`, then `b` to `a`.
    Done(u64, u64),
    /// Copying failed.
    Broken(std::io::Error),
    /// Nothing moved for the idle timeout; both sides were closed.
    Idle,
}

/// Copies both ways between `a` and `b` (half-close aware, [`crate::copy`]) until both
/// directions end or nothing moves for `idle_timeout`: the byte pipe of every TCP listener.
pub async fn pipe<A, B>(a: A, mut b: B, max_buffer: usize, idle_timeout: Duration) -> PipeEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a, clock) = Activity::new(a);
    tokio::select! {
        copied = crate::copy::copy_bidirectional(&mut a, &mut b, max_buffer) => match copied {
            Ok((sent, received)) => PipeEnd::Done(sent, received),
            Err(e) => PipeEnd::Broken(e),
        },
        () = clock.idle(idle_timeout) => {
            crate::metrics::IDLE_CLOSED.increment();
            PipeEnd::Idle
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_busy_clock_is_never_idle_and_its_end_restarts_the_timeout() {
        let clock = IdleClock::new();
        let busy = clock.busy();
        let timeout = Duration::from_secs(10);
        let waiting = tokio::spawn({
            let clock = clock.clone();
            async move { clock.idle(timeout).await }
        });
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert!(
            !waiting.is_finished(),
            "busy for 35s with a 10s idle timeout"
        );
        let ended = Instant::now();
        drop(busy);
        waiting.await.expect("idle once the work ended");
        assert!(Instant::now() >= ended + timeout);
    }
}
