//! A token cache keyed by (kind, audience). cloud-run-mesh kept every token for a fixed
//! 45 min whatever its real expiry, and a sign error in its check served a token until a
//! minute after it expired; it also let every caller of a cold key mint its own. Here entries
//! live until shortly before their real `exp`, concurrent
//! callers for one key share one exchange (single-flight), a token near expiry is refreshed
//! ahead while the old one is still served if the refresh fails, and failures are cached
//! briefly so a broken exchange is not hammered.
//!
//! The audiences may follow what a peer chooses (hgate's come from the client's SNI), so the
//! cache is bounded three ways: at most `capacity` keys (least recently used evicted first,
//! failures included), at most `max_concurrent_mints` exchanges at once, and, when a
//! [`MintBudget`] is set, at most `burst + rate × seconds` mints over any stretch of time; a
//! key the budget refuses is not entered, so a flood of new keys cannot evict the ones in use.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hbone::lru::LruMap;
use tokio::sync::Semaphore;
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

/// A token bucket over mints: `burst` at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MintBudget {
    /// Mints allowed back to back.
    pub burst: u32,
    /// Mints added back per second.
    pub per_second: f64,
}

/// Timing and bounds of the cache.
#[derive(Clone, Debug)]
pub struct CachePolicy {
    /// Refresh a token this long before its `exp`.
    pub refresh_before: Duration,
    /// How long a failure is returned without retrying.
    pub negative_ttl: Duration,
    /// Keys kept (tokens and recent failures); the least recently used goes first.
    pub capacity: usize,
    /// Exchanges in flight at once; more callers wait their turn.
    pub max_concurrent_mints: usize,
    /// Mints over time (`None`: unlimited, for keys krun itself chooses).
    pub budget: Option<MintBudget>,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            refresh_before: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(2),
            capacity: 1024,
            max_concurrent_mints: 16,
            budget: None,
        }
    }
}

/// No token: the exchange failed, or the mint budget refused a new one.
#[derive(Debug, thiserror::Error)]
pub enum TokenCacheError<E: std::error::Error + 'static> {
    /// The minter failed (returned again for the negative TTL).
    #[error(transparent)]
    Mint(Arc<E>),
    /// The budget is spent; nothing was asked of the minter.
    #[error(
        "not minted: the token mint budget ({burst} at once, {per_second}/s) is spent by other new audiences; retry later"
    )]
    Budget {
        /// The budget's burst.
        burst: u32,
        /// Its refill rate.
        per_second: f64,
    },
}

/// The budget's state.
struct Bucket {
    budget: MintBudget,
    available: f64,
    updated: Instant,
}

impl Bucket {
    fn new(budget: MintBudget) -> Self {
        Bucket {
            budget,
            available: f64::from(budget.burst),
            updated: Instant::now(),
        }
    }

    /// Takes one mint, or says none is left.
    fn take<E: std::error::Error>(&mut self) -> Result<(), TokenCacheError<E>> {
        let now = Instant::now();
        let refill = now.duration_since(self.updated).as_secs_f64() * self.budget.per_second;
        self.available = (self.available + refill).min(f64::from(self.budget.burst));
        self.updated = now;
        if self.available < 1.0 {
            return Err(TokenCacheError::Budget {
                burst: self.budget.burst,
                per_second: self.budget.per_second,
            });
        }
        self.available -= 1.0;
        Ok(())
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

/// The keys and the budget, under one lock.
struct Slots<E> {
    map: LruMap<CacheKey, SharedSlot<E>>,
    bucket: Option<Bucket>,
}

impl<E: std::error::Error> Slots<E> {
    fn charge(&mut self) -> Result<(), TokenCacheError<E>> {
        self.bucket.as_mut().map_or(Ok(()), Bucket::take)
    }
}

/// The cache; share it behind an `Arc`.
pub struct TokenCache<M: Mint> {
    minter: M,
    policy: CachePolicy,
    slots: Mutex<Slots<M::Error>>,
    minting: Semaphore,
}

impl<M: Mint> TokenCache<M> {
    /// A cache over `minter`.
    pub fn new(minter: M, policy: CachePolicy) -> Self {
        TokenCache {
            minter,
            slots: Mutex::new(Slots {
                map: LruMap::new(policy.capacity),
                bucket: policy.budget.map(Bucket::new),
            }),
            minting: Semaphore::new(policy.max_concurrent_mints.max(1)),
            policy,
        }
    }

    /// The minter, for what it knows besides tokens (whose account, which file).
    pub fn minter(&self) -> &M {
        &self.minter
    }

    /// A valid token for `key`, minting at most once for all concurrent callers.
    pub async fn get(&self, key: &CacheKey) -> Result<Token, TokenCacheError<M::Error>> {
        // A new key is charged its first mint before it is entered, so a refused one displaces
        // nothing.
        let (slot, charged) = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.map.get_mut(key) {
                Some(slot) => (slot.clone(), false),
                None => {
                    slots.charge()?;
                    let fresh = || Arc::new(tokio::sync::Mutex::new(Slot::Empty));
                    (slots.map.get_or_insert_with(key, fresh).clone(), true)
                }
            }
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
                    _ => Err(TokenCacheError::Mint(error.clone())),
                };
            }
            Slot::Failed { stale, .. } => stale.clone(),
            Slot::Empty => None,
        };
        let still_valid = stale.clone().filter(|t| t.expires_at > now);
        if !charged {
            // A refresh, or a retry after a failure: charged too, served stale when refused.
            let refused = self
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .charge();
            if let Err(refused) = refused {
                return still_valid.ok_or(refused);
            }
        }
        // An error only on a closed semaphore, and this one is never closed.
        let _turn = self.minting.acquire().await;
        match self.minter.mint(key).await {
            Ok(token) => {
                *slot = Slot::Ready(token.clone());
                Ok(token)
            }
            Err(e) => {
                let error = Arc::new(e);
                tracing::warn!(kind = ?key.kind, audience = key.audience, error = %error, "token mint failed");
                *slot = Slot::Failed {
                    error: error.clone(),
                    until: Instant::now() + self.policy.negative_ttl,
                    stale,
                };
                still_valid.ok_or(TokenCacheError::Mint(error))
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

    /// Mints tokens valid for `lifetime`, or fails when `fail` is set; counts calls and the
    /// most calls in flight at once.
    struct Counting {
        calls: AtomicUsize,
        lifetime: Duration,
        fail: std::sync::atomic::AtomicBool,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    impl Mint for Counting {
        type Error = Failed;
        fn mint<'a>(&'a self, _key: &'a CacheKey) -> MintFuture<'a, Failed> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.most_in_flight.fetch_max(now, Ordering::SeqCst);
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
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
        cache_with(lifetime, CachePolicy::default())
    }

    fn cache_with(lifetime: Duration, policy: CachePolicy) -> Arc<TokenCache<Counting>> {
        Arc::new(TokenCache::new(
            Counting {
                calls: AtomicUsize::new(0),
                lifetime,
                fail: false.into(),
                in_flight: AtomicUsize::new(0),
                most_in_flight: AtomicUsize::new(0),
            },
            policy,
        ))
    }

    fn key() -> CacheKey {
        audience("svc")
    }

    fn audience(service: &str) -> CacheKey {
        CacheKey {
            kind: TokenKind::Id,
            audience: format!("https://{service}.a.run.app"),
        }
    }

    fn calls(cache: &TokenCache<Counting>) -> usize {
        cache.minter.calls.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn the_least_recently_used_audience_is_evicted_at_capacity() {
        let policy = CachePolicy {
            capacity: 2,
            ..CachePolicy::default()
        };
        let cache = cache_with(Duration::from_secs(3600), policy);
        for service in ["a", "b", "a", "c"] {
            cache.get(&audience(service)).await.expect("minted");
        }
        // a, b minted; a from the cache (now the most recent); c evicts b.
        assert_eq!(calls(&cache), 3);
        cache.get(&audience("a")).await.expect("cached");
        cache.get(&audience("c")).await.expect("cached");
        assert_eq!(calls(&cache), 3, "a and c were kept");
        cache.get(&audience("b")).await.expect("minted again");
        assert_eq!(calls(&cache), 4, "b was evicted");
    }

    #[tokio::test]
    async fn a_token_is_kept_until_its_expiry_less_the_refresh_margin() {
        let margin = CachePolicy::default().refresh_before;
        let lasting = cache(margin + Duration::from_secs(60));
        lasting.get(&key()).await.expect("minted");
        lasting.get(&key()).await.expect("cached");
        assert_eq!(calls(&lasting), 1);
        // A token inside the margin is never served from the cache.
        let short = cache(margin - Duration::from_secs(1));
        short.get(&key()).await.expect("minted");
        short.get(&key()).await.expect("minted again");
        assert_eq!(calls(&short), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refuses_new_audiences_without_evicting_and_refills_over_time() {
        let policy = CachePolicy {
            capacity: 2,
            budget: Some(MintBudget {
                burst: 2,
                per_second: 1.0,
            }),
            ..CachePolicy::default()
        };
        let cache = cache_with(Duration::from_secs(3600), policy);
        cache.get(&audience("a")).await.expect("burst");
        cache.get(&audience("b")).await.expect("burst");
        let refused = cache.get(&audience("c")).await.expect_err("budget spent");
        assert!(
            refused.to_string().contains("mint budget (2 at once, 1/s)"),
            "{refused}"
        );
        assert_eq!(calls(&cache), 2, "nothing asked of the minter");
        // The refused key displaced nothing: a and b are still cached.
        cache.get(&audience("a")).await.expect("cached");
        cache.get(&audience("b")).await.expect("cached");
        assert_eq!(calls(&cache), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        cache.get(&audience("c")).await.expect("refilled");
        assert_eq!(calls(&cache), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_mints_for_distinct_audiences_are_bounded() {
        let policy = CachePolicy {
            max_concurrent_mints: 3,
            ..CachePolicy::default()
        };
        let cache = cache_with(Duration::from_secs(3600), policy);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let cache = cache.clone();
            tasks.spawn(async move { cache.get(&audience(&format!("s{i}"))).await.is_ok() });
        }
        while let Some(ok) = tasks.join_next().await {
            assert!(ok.expect("task"), "every audience got a token");
        }
        assert_eq!(calls(&cache), 50);
        let most = cache.minter.most_in_flight.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "{most} mints at once");
    }

    #[tokio::test]
    async fn a_token_near_expiry_is_refreshed_and_a_failed_refresh_serves_the_old_one() {
        // Lifetime below the refresh margin: every get wants a refresh.
        let cache = cache(Duration::from_secs(60));
        let first = cache.get(&key()).await.expect("first");
        cache.minter.fail.store(true, Ordering::SeqCst);
        let during_outage = cache.get(&key()).await.expect("old token still valid");
        assert_eq!(first, during_outage);
        assert_eq!(calls(&cache), 2);
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
