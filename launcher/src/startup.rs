//! Startup phase timing: every phase is logged with its own duration and the time since krun
//! started, so a slow cold start shows where the time went.

use std::time::Instant;

/// Marks the end of each startup phase.
pub struct PhaseClock {
    start: Instant,
    last: Instant,
}

impl PhaseClock {
    /// Starts the clock at `start` (the moment krun began).
    pub fn new(start: Instant) -> Self {
        PhaseClock { start, last: start }
    }

    /// Logs that `phase` is complete.
    pub fn mark(&mut self, phase: &str) {
        let now = Instant::now();
        crate::telemetry::PHASE_SECONDS
            .get_or_create(&vec![("phase", phase.to_owned())])
            .set((now - self.last).as_secs_f64());
        tracing::info!(
            phase,
            phase_ms = millis(now - self.last),
            since_start_ms = millis(now - self.start),
            "phase complete"
        );
        self.last = now;
    }
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}
