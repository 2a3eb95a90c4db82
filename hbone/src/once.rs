//! Decisions logged once per peer: a flood of refused requests from one address must not flood
//! the logs. What was already logged is keyed by what the network chooses (the peer's
//! address), so the memory is bounded: once it holds `capacity` keys nothing new is
//! remembered, and later first-time peers are only counted (the caller's counter, carried by
//! every logged line, keeps the total visible). Not a [`crate::lru::LruMap`]: evicting old
//! keys would let a flood from ever new addresses log one line each.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};

/// How many distinct keys a listener remembers as logged.
pub const DEFAULT_CAPACITY: usize = 4096;

/// The set of keys whose first occurrence was logged.
pub struct OncePerPeer<K> {
    seen: Mutex<HashSet<K>>,
    capacity: usize,
}

impl<K: Hash + Eq> OncePerPeer<K> {
    /// Remembers up to `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        OncePerPeer {
            seen: Mutex::new(HashSet::new()),
            capacity,
        }
    }

    /// True the first time `key` is seen while the memory has room: log then, not after.
    pub fn first(&self, key: K) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&key) || seen.len() >= self.capacity {
            return false;
        }
        seen.insert(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_occurrence_only_and_bounded() {
        let once = OncePerPeer::new(2);
        assert!(once.first("a"));
        assert!(!once.first("a"), "a repeat is not logged");
        assert!(once.first("b"));
        assert!(
            !once.first("c"),
            "past the capacity nothing new is remembered"
        );
        assert!(!once.first("a"));
    }
}
