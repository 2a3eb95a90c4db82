//! Capped exponential backoff with ±20 % jitter, so a fleet of instances that lost their CA
//! or API server at the same moment does not retry in lockstep.

use std::time::Duration;

/// Retry delays: `initial`, doubling up to `max`, each jittered.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, never exceeds `max` (before jitter).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { next: initial, max }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + 0.4 * unit_random())
    }
}

/// A uniform random number in [0, 1).
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
    fn doubles_with_jitter_and_stays_capped() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
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
}
