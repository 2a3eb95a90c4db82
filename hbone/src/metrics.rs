//! Counters of security-relevant events, readable by the embedding process (admin endpoint,
//! logs, tests).

use std::sync::atomic::{AtomicU64, Ordering};

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

/// Connections closed because the peer's identity is not allowed.
pub static DENIED: Counter = Counter::new();

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
