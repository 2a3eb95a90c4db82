//! A map with a fixed capacity that forgets its least recently used entry to make room: the
//! one shape of every cache or table whose keys a peer chooses (the HTTP/2 pool's origins,
//! hgate's ID-token audiences), so a flood of distinct keys costs a bounded amount of memory.
//! Our own because it is fifty lines over `HashMap` and `BTreeMap`; an entry's recency is a
//! counter, and the oldest is the smallest one in the ordered index.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// A bounded map: inserting a new key when it is full evicts the least recently used one.
pub struct LruMap<K, V> {
    capacity: usize,
    clock: u64,
    entries: HashMap<K, (V, u64)>,
    /// Last use → key; the first entry is the least recently used.
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V> LruMap<K, V> {
    /// A map holding at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        LruMap {
            capacity: capacity.max(1),
            clock: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value at `key`, now the most recently used.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let (value, used) = self.entries.get_mut(key)?;
        self.clock += 1;
        if let Some(k) = self.order.remove(used) {
            self.order.insert(self.clock, k);
        }
        *used = self.clock;
        Some(value)
    }

    /// The value at `key`, made by `make` when there is none (evicting the least recently
    /// used entry when the map is full); now the most recently used.
    pub fn get_or_insert_with(&mut self, key: &K, make: impl FnOnce() -> V) -> &mut V {
        self.clock += 1;
        let now = self.clock;
        match self.entries.get(key) {
            Some((_, used)) => {
                self.order.remove(used);
            }
            None if self.entries.len() >= self.capacity => {
                if let Some((_, oldest)) = self.order.pop_first() {
                    self.entries.remove(&oldest);
                }
            }
            None => {}
        }
        self.order.insert(now, key.clone());
        let entry = self
            .entries
            .entry(key.clone())
            .or_insert_with(|| (make(), now));
        entry.1 = now;
        &mut entry.0
    }

    /// Takes `key` out.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (value, used) = self.entries.remove(key)?;
        self.order.remove(&used);
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::LruMap;

    #[test]
    fn the_least_recently_used_key_is_evicted_at_capacity() {
        let mut map = LruMap::new(2);
        *map.get_or_insert_with(&"a", || 0) += 1;
        map.get_or_insert_with(&"b", || 0);
        // Using "a" makes "b" the oldest.
        assert_eq!(map.get_mut(&"a"), Some(&mut 1));
        map.get_or_insert_with(&"c", || 0);
        assert_eq!(map.len(), 2);
        assert!(map.get_mut(&"b").is_none(), "b was evicted");
        assert_eq!(map.get_mut(&"a"), Some(&mut 1), "a was kept");
        assert!(map.get_mut(&"c").is_some());
        assert_eq!(map.remove(&"a"), Some(1));
        assert_eq!(map.len(), 1);
        assert!(!map.is_empty());
    }

    #[test]
    fn a_flood_of_distinct_keys_keeps_the_map_at_capacity() {
        let mut map = LruMap::new(100);
        for i in 0..10_000u32 {
            map.get_or_insert_with(&i, || i);
        }
        assert_eq!(map.len(), 100);
        assert_eq!(
            map.order.len(),
            100,
            "the recency index shrinks with the map"
        );
        assert!(map.get_mut(&9_999).is_some());
        assert!(map.get_mut(&0).is_none());
    }
}
