//! One retry policy for every discovery call (metadata, GKE, Resource Manager, mesh-env):
//! a bounded number of attempts with full-jitter exponential backoff, so a fleet of cold
//! starts does not hammer a recovering server in lockstep.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// How often and how patiently a call is retried.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Attempts in total, the first one included.
    pub attempts: u32,
    /// Upper bound of the first delay; doubles per attempt.
    pub base: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
}

impl Backoff {
    /// The policy of discovery calls: 5 attempts (the reference's GetCluster count), delays
    /// drawn from 0..100 ms, 0..200 ms, ... capped at 2 s.
    pub const DISCOVERY: Backoff = Backoff {
        attempts: 5,
        base: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };

    /// The delay before retry number `retry` (1-based): uniform in `0..=min(max, base*2^(retry-1))`.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(self.max);
        let unit = RandomState::new().hash_one(retry) as f64 / u64::MAX as f64;
        ceiling.mul_f64(unit)
    }

    /// Runs `call` until it succeeds, fails with an error `retryable` rejects, or the attempts
    /// are used up; returns the last error with the number of attempts made.
    pub async fn retry<T, E, F, Fut>(
        &self,
        what: &str,
        retryable: impl Fn(&E) -> bool,
        mut call: F,
    ) -> Result<T, (E, u32)>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(e) if attempt < self.attempts && retryable(&e) => {
                    let delay = self.delay(attempt);
                    tracing::warn!(call = what, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err((e, attempt)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_jittered_below_a_doubling_cap() {
        let policy = Backoff::DISCOVERY;
        for retry in 1..10 {
            let cap = (policy.base * (1 << (retry - 1))).min(policy.max);
            assert!(policy.delay(retry) <= cap, "retry {retry}");
        }
    }

    #[tokio::test]
    async fn stops_at_a_permanent_error_and_counts_attempts() {
        let policy = Backoff {
            attempts: 5,
            base: Duration::ZERO,
            max: Duration::ZERO,
        };
        let mut calls = 0;
        let result: Result<(), _> = policy
            .retry(
                "test",
                |e: &String| e == "transient",
                || {
                    calls += 1;
                    let e = if calls < 3 { "transient" } else { "permanent" };
                    std::future::ready(Err(e.to_owned()))
                },
            )
            .await;
        assert_eq!(result, Err(("permanent".to_owned(), 3)));
    }
}
