//! Counters of security-relevant events and gauges of open work, readable by the embedding
//! process (admin endpoint, logs, tests). Plain atomics: the embedder exports them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero, for a `static` (other crates declare their own counters).
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    /// Adds one and returns the new total (logged with each event, so the count is visible
    /// without a metrics endpoint).
    pub fn increment(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The total so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new()
    }
}

/// Streams and connections refused because the peer's identity or a policy does not allow
/// them.
pub static DENIED: Counter = Counter::new();

/// Open streams closed because a policy change denies them.
pub static REVOKED: Counter = Counter::new();

/// Connections closed at once because their listener was at its connection cap.
pub static LIMITED: Counter = Counter::new();

/// Connections closed because they did not complete their handshake (TLS, first request)
/// within the listener's handshake timeout.
pub static HANDSHAKE_TIMEOUTS: Counter = Counter::new();

/// Connections closed because they carried nothing for the listener's idle timeout.
pub static IDLE_CLOSED: Counter = Counter::new();

/// Tunnel requests refused (by the router's policy, an unknown target, a bad request or a
/// failed dial), before any byte reached an upstream.
pub static REFUSED: Counter = Counter::new();

/// How many of something are open now.
pub struct Gauge(AtomicI64);

impl Gauge {
    const fn new() -> Self {
        Gauge(AtomicI64::new(0))
    }

    /// Counts one more open until the returned guard is dropped.
    pub fn enter(&'static self) -> Open {
        self.0.fetch_add(1, Ordering::Relaxed);
        Open(self)
    }

    /// How many are open now.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One open item of a [`Gauge`]; dropping it closes it.
pub struct Open(&'static Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tunnel streams (CONNECT or POST) open now, on every tunnel server of the process.
pub static TUNNEL_STREAMS: Gauge = Gauge::new();
