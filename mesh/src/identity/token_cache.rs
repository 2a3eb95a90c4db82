//! A token cache keyed by (kind, audience). cloud-run-mesh kept every token for a fixed
//! 45 min whatever its real expiry, and a sign error in its check served a token until a
//! minute after it expired; it also let every caller of a cold key mint its own. Here entries
//! live until shortly before their real `exp`, concurrent
//! callers for one key share one exchange (single-flight), a token near expiry is refreshed
//! ahead while the old one is still served if the refresh fails, and failures are cached
//! briefly so a broken exchange is not hammered.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::token::Token;

/// Which token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// STS federated access token.
    Federated,
    /// OAuth access token of a Google service account.
    Access,
    /// Google-signed ID token for an audience.
    Id,
}

/// Cache key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Which token.
    pub kind: TokenKind,
    /// Its audience (empty when the kind has none).
    pub audience: String,
}

/// The future a minter returns.
pub type MintFuture<'a, E> = Pin<Box<dyn Future<Output = Result<Token, E>> + Send + 'a>>;

/// Something that mints tokens for a key (STS + IAM, the metadata server, a test double).
pub trait Mint: Send + Sync {
    /// The minting error.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Mints a fresh token for `key`.
    fn mint<'a>(&'a self, key: &'a CacheKey) -> MintFuture<'a, Self::Error>;
}

/// Timing of the cache.
#[derive(Clone, Debug)]
pub struct CachePolicy {
    /// Refresh a token this long before its `exp`.
    pub refresh_before: Duration,
    /// How long a failure is returned without retrying.
    pub negative_ttl: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            refresh_before: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(2),
        }
    }
}

enum Slot<E> {
    Empty,
    Ready(Token),
    Failed {
        error: Arc<E>,
        until: Instant,
        stale: Option<Token>,
    },
}

/// One key's entry; its async lock is what makes minting single-flight.
type SharedSlot<E> = Arc<tokio::sync::Mutex<Slot<E>>>;

/// The cache; share it behind an `Arc`.
pub struct TokenCache<M: Mint> {
    minter: M,
    policy: CachePolicy,
    slots: Mutex<HashMap<CacheKey, SharedSlot<M::Error>>>,
}

impl<M: Mint> TokenCache<M> {
    /// A cache over `minter`.
    pub fn new(minter: M, policy: CachePolicy) -> Self {
        TokenCache {
            minter,
            policy,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A valid token for `key`, minting at most once for all concurrent callers.
    pub async fn get(&self, key: &CacheKey) -> Result<Token, Arc<M::Error>> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry(key.clone())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Slot::Empty)))
                .clone()
        };
        // Holding the slot's lock across the mint is the single flight: later callers wait
        // here and then find the fresh token.
        let mut slot = slot.lock().await;
        let now = SystemTime::now();
        let fresh = |t: &Token| t.expires_at > now + self.policy.refresh_before;
        let stale = match &*slot {
            Slot::Ready(t) if fresh(t) => return Ok(t.clone()),
            Slot::Ready(t) => Some(t.clone()),
            Slot::Failed {
                error,
                until,
                stale,
            } if Instant::now() < *until => {
                return match stale {
                    Some(t) if t.expires_at > now => Ok(t.clone()),
                    _ => Err(error.clone()),
                };
            }
            Slot::Failed { stale, .. } => stale.clone(),
            Slot::Empty => None,
        };
        match self.minter.mint(key).await {
            Ok(token) => {
                *slot = Slot::Ready(token.clone());
                Ok(token)
            }
            Err(e) => {
                let error = Arc::new(e);
                tracing::warn!(kind = ?key.kind, audience = key.audience, error = %error, "token mint failed");
                let still_valid = stale.clone().filter(|t| t.expires_at > now);
                *slot = Slot::Failed {
                    error: error.clone(),
                    until: Instant::now() + self.policy.negative_ttl,
                    stale,
                };
                still_valid.ok_or(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, thiserror::Error)]
    #[error("mint failed")]
    struct Failed;

    /// Mints tokens valid for `lifetime`, or fails when `fail` is set; counts calls.
    struct Counting {
        calls: AtomicUsize,
        lifetime: Duration,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Mint for Counting {
        type Error = Failed;
        fn mint<'a>(&'a self, _key: &'a CacheKey) -> MintFuture<'a, Failed> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(Failed);
                }
                Ok(Token::new(
                    format!("t{n}"),
                    SystemTime::now() + self.lifetime,
                ))
            })
        }
    }

    fn cache(lifetime: Duration) -> Arc<TokenCache<Counting>> {
        Arc::new(TokenCache::new(
            Counting {
                calls: AtomicUsize::new(0),
                lifetime,
                fail: false.into(),
            },
            CachePolicy::default(),
        ))
    }

    fn key() -> CacheKey {
        CacheKey {
            kind: TokenKind::Id,
            audience: "https://svc.a.run.app".into(),
        }
    }

    #[tokio::test]
    async fn a_token_near_expiry_is_refreshed_and_a_failed_refresh_serves_the_old_one() {
        // Lifetime below the refresh margin: every get wants a refresh.
        let cache = cache(Duration::from_secs(60));
        let first = cache.get(&key()).await.expect("first");
        cache.minter.fail.store(true, Ordering::SeqCst);
        let during_outage = cache.get(&key()).await.expect("old token still valid");
        assert_eq!(first, during_outage);
        assert_eq!(cache.minter.calls.load(Ordering::SeqCst), 2);
        // Negative caching: no new attempt within the negative TTL.
        cache.get(&key()).await.expect("old token");
        assert_eq!(cache.minter.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_cached_briefly_then_retried() {
        let cache = cache(Duration::from_secs(3600));
        cache.minter.fail.store(true, Ordering::SeqCst);
        cache.get(&key()).await.expect_err("fails");
        cache.get(&key()).await.expect_err("cached failure");
        assert_eq!(cache.minter.calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(CachePolicy::default().negative_ttl).await;
        cache.minter.fail.store(false, Ordering::SeqCst);
        cache
            .get(&key())
            .await
            .expect("retried after the negative TTL");
        assert_eq!(cache.minter.calls.load(Ordering::SeqCst), 2);
    }
}
