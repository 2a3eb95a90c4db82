//! The one retry pacing of the mesh side: delays double from `base` up to `max` and are
//! jittered, so a fleet of cold starts, or of instances that lost their CA or API server at the
//! same moment, does not retry in lockstep. Discovery calls retry a bounded number of times
//! with full jitter ([`Backoff::retry`]); background refreshes (certificate rotation, the
//! `istio-token` file) retry until they succeed with ±20 % jitter ([`Backoff::delays`]).

use std::future::Future;
use std::time::Duration;

/// How the delay is drawn below its doubling ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `0..=ceiling` ("full jitter"): for short calls many callers make at once.
    Full,
    /// Uniform in `0.8..=1.2 × ceiling`: for background retries that should not fire at once.
    Proportional,
}

/// How often and how patiently a call is retried.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Attempts in total, the first one included ([`Backoff::retry`] only).
    pub attempts: u32,
    /// The first delay's ceiling; doubles per retry.
    pub base: Duration,
    /// Upper bound of any ceiling.
    pub max: Duration,
    /// How a delay is drawn under its ceiling.
    pub jitter: Jitter,
}

impl Backoff {
    /// The policy of discovery calls: 5 attempts (as many as cloud-run-mesh gave GKE's
    /// GetCluster, with a fixed 1 s sleep), delays
    /// drawn from 0..100 ms, 0..200 ms, ... capped at 2 s.
    pub const DISCOVERY: Backoff = Backoff {
        attempts: 5,
        base: Duration::from_millis(100),
        max: Duration::from_secs(2),
        jitter: Jitter::Full,
    };

    /// Retries until success: `base`, doubling up to `max`, each ±20 %.
    pub const fn until_success(base: Duration, max: Duration) -> Backoff {
        Backoff {
            attempts: u32::MAX,
            base,
            max,
            jitter: Jitter::Proportional,
        }
    }

    /// The delay before retry number `retry` (1-based), drawn under
    /// `min(max, base * 2^(retry-1))` as [`Jitter`] says.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(self.max);
        match self.jitter {
            Jitter::Full => ceiling.mul_f64(unit_random()),
            Jitter::Proportional => ceiling.mul_f64(0.8 + 0.4 * unit_random()),
        }
    }

    /// The successive delays of a retry loop that runs until it succeeds.
    pub fn delays(&self) -> Delays {
        Delays {
            policy: *self,
            retry: 0,
        }
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

/// The delays of one retry loop, from [`Backoff::delays`].
#[derive(Clone, Debug)]
pub struct Delays {
    policy: Backoff,
    retry: u32,
}

impl Delays {
    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.retry = self.retry.saturating_add(1);
        self.policy.delay(self.retry)
    }
}

/// A uniform random number in [0, 1), from the system RNG.
pub fn unit_random() -> f64 {
    let mut bytes = [0u8; 4];
    // A failing system RNG only removes the jitter; the delay itself stays correct.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
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

    #[test]
    fn doubles_with_jitter_and_stays_capped() {
        let mut b =
            Backoff::until_success(Duration::from_millis(500), Duration::from_secs(2)).delays();
        let delays: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        let bounds = [500, 1000, 2000, 2000, 2000];
        for (d, base) in delays.iter().zip(bounds) {
            let base = Duration::from_millis(base);
            assert!(
                *d >= base.mul_f64(0.8) && *d <= base.mul_f64(1.2),
                "{d:?} vs {base:?}"
            );
        }
    }

    #[tokio::test]
    async fn stops_at_a_permanent_error_and_counts_attempts() {
        let policy = Backoff {
            attempts: 5,
            base: Duration::ZERO,
            max: Duration::ZERO,
            jitter: Jitter::Full,
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
