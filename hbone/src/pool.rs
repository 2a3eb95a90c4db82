//! The HTTP/2 connection pool both tunnel clients share: connections are kept per key and each
//! carries up to `max_streams` tunnels; when none has room, one caller dials while concurrent
//! callers for the same key wait for it and then share the new connection, so a burst of
//! tunnels to one peer costs one handshake (cloud-run-mesh dialed per tunnel). ztunnel pools
//! the same way (<https://github.com/istio/ztunnel/blob/master/src/proxy/pool.rs>).
//!
//! The keys can be chosen by a peer (hgate's origins come from the client's SNI), so both maps
//! are bounded: connections are kept for at most `max_keys` keys, least recently used first
//! out (an evicted key's idle connections close once their last tunnel ends, as hyper closes
//! an HTTP/2 connection whose every sender is dropped), and a key's dial lock is dropped as
//! soon as no caller holds or waits for it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hyper::client::conn::http2::SendRequest;
use tokio::sync::OwnedMutexGuard;

use crate::lru::LruMap;

struct Pooled<B> {
    sender: SendRequest<B>,
    streams: Arc<AtomicUsize>,
}

/// Keeps a pooled connection's stream count right while a tunnel is open.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection with room for one more stream, counted until the guard drops.
pub struct Lease<B> {
    /// Sends the tunnel request.
    pub sender: SendRequest<B>,
    /// Hold for as long as the tunnel is open.
    pub guard: StreamGuard,
}

/// Per key, the lock whose holder dials; present only while someone holds or waits for it.
type DialLocks<K> = Arc<Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>>;

/// The right to dial for a key: hold it until [`ConnectionPool::insert`]. Dropping it (dial
/// done or failed) removes the key's lock when no one else holds or waits for it.
pub struct DialPermit<K: Hash + Eq> {
    key: K,
    lock: Option<OwnedMutexGuard<()>>,
    locks: DialLocks<K>,
}

impl<K: Hash + Eq> Drop for DialPermit<K> {
    fn drop(&mut self) {
        self.lock = None;
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's own reference is the last one: nobody holds or awaits this lock.
        if locks
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

/// HTTP/2 connections by key.
pub struct ConnectionPool<K, B> {
    max_streams: usize,
    connections: Mutex<LruMap<K, Vec<Pooled<B>>>>,
    dialing: DialLocks<K>,
}

impl<K: Hash + Eq + Clone, B> ConnectionPool<K, B> {
    /// A pool sharing each connection among up to `max_streams` tunnels, keeping connections
    /// for at most `max_keys` keys.
    pub fn new(max_streams: usize, max_keys: usize) -> Self {
        ConnectionPool {
            max_streams,
            connections: Mutex::new(LruMap::new(max_keys)),
            dialing: DialLocks::default(),
        }
    }

    /// A live connection with room, or the permit to dial one (after waiting for anyone
    /// already dialing for `key`, whose connection is then used instead).
    pub async fn checkout(&self, key: &K) -> Result<Lease<B>, DialPermit<K>> {
        if let Some(lease) = self.find(key) {
            return Ok(lease);
        }
        let lock = self
            .dialing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let permit = DialPermit {
            key: key.clone(),
            lock: Some(lock.lock_owned().await),
            locks: self.dialing.clone(),
        };
        // Someone dialed while this caller waited: use theirs (the permit drops here).
        self.find(key).ok_or(permit)
    }

    /// Adds a freshly dialed connection and leases its first stream.
    pub fn insert(&self, key: K, sender: SendRequest<B>, permit: DialPermit<K>) -> Lease<B> {
        let streams = Arc::new(AtomicUsize::new(1));
        let pooled = Pooled {
            sender: sender.clone(),
            streams: streams.clone(),
        };
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(&key, Vec::new)
            .push(pooled);
        // Waiters find the connection once the permit is gone.
        drop(permit);
        Lease {
            sender,
            guard: StreamGuard(streams),
        }
    }

    fn find(&self, key: &K) -> Option<Lease<B>> {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let list = connections.get_mut(key)?;
        list.retain(|c| !c.sender.is_closed());
        if list.is_empty() {
            connections.remove(key);
            return None;
        }
        let found = list.iter().find(|c| {
            c.sender.is_ready() && c.streams.load(Ordering::Relaxed) < self.max_streams
        })?;
        found.streams.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            sender: found.sender.clone(),
            guard: StreamGuard(found.streams.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper::body::Bytes;

    fn dial_locks(pool: &ConnectionPool<u32, Empty<Bytes>>) -> usize {
        pool.dialing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    #[tokio::test]
    async fn failed_dials_to_many_keys_leave_no_dial_lock_behind() {
        let pool = ConnectionPool::<u32, Empty<Bytes>>::new(100, 8);
        for key in 0..1000 {
            // No connection yet: the caller gets the permit, and its dial "fails" (drop).
            let Err(permit) = pool.checkout(&key).await else {
                panic!("an empty pool has no lease");
            };
            assert_eq!(dial_locks(&pool), 1);
            drop(permit);
        }
        assert_eq!(dial_locks(&pool), 0);
    }

    #[tokio::test]
    async fn a_waiting_caller_keeps_the_dial_lock_until_it_is_done() {
        let pool = Arc::new(ConnectionPool::<u32, Empty<Bytes>>::new(100, 8));
        let Err(first) = pool.checkout(&7).await else {
            panic!("an empty pool has no lease");
        };
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.checkout(&7).await.is_err() }
        });
        // Let the waiter reach the lock, then fail the first dial.
        while Arc::strong_count(
            pool.dialing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&7)
                .expect("lock of key 7"),
        ) < 3
        {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert!(waiter.await.expect("waiter"), "the waiter dials next");
        assert_eq!(dial_locks(&pool), 0);
    }
}
