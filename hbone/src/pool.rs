//! The HTTP/2 connection pool both tunnel clients share: connections are kept per key and each
//! carries up to `max_streams` tunnels; when none has room, one caller dials while concurrent
//! callers for the same key wait for it and then share the new connection, so a burst of
//! tunnels to one peer costs one handshake (cloud-run-mesh dialed per tunnel). ztunnel pools
//! the same way (<https://github.com/istio/ztunnel/blob/master/src/proxy/pool.rs>).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hyper::client::conn::http2::SendRequest;
use tokio::sync::OwnedMutexGuard;

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

/// The right to dial for a key: hold it until [`ConnectionPool::insert`].
pub struct DialPermit {
    _lock: OwnedMutexGuard<()>,
}

/// HTTP/2 connections by key.
pub struct ConnectionPool<K, B> {
    max_streams: usize,
    connections: Mutex<HashMap<K, Vec<Pooled<B>>>>,
    dialing: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Hash + Eq + Clone, B> ConnectionPool<K, B> {
    /// A pool sharing each connection among up to `max_streams` tunnels.
    pub fn new(max_streams: usize) -> Self {
        ConnectionPool {
            max_streams,
            connections: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
        }
    }

    /// A live connection with room, or the permit to dial one (after waiting for anyone
    /// already dialing for `key`, whose connection is then used instead).
    pub async fn checkout(&self, key: &K) -> Result<Lease<B>, DialPermit> {
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
        let permit = lock.lock_owned().await;
        self.find(key).ok_or(DialPermit { _lock: permit })
    }

    /// Adds a freshly dialed connection and leases its first stream.
    pub fn insert(&self, key: K, sender: SendRequest<B>, _permit: DialPermit) -> Lease<B> {
        let streams = Arc::new(AtomicUsize::new(1));
        let pooled = Pooled {
            sender: sender.clone(),
            streams: streams.clone(),
        };
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .push(pooled);
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
