//! Counters of security-relevant events, readable by the embedding process (admin endpoint,
//! logs, tests).

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    /// Adds one.
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Connections closed because the peer's identity is not allowed.
pub static DENIED: Counter = Counter::new();
