//! Prometheus metrics of krun and hgate, served on their admin endpoints (`/metrics`).
//!
//! One registry per process: Istio's TCP metrics ([`tcp`]) under Istio's own names, so the
//! dashboards built for Envoy and ztunnel show krun and hgate too; everything else under the
//! binary's prefix (`krun_...`, `hgate_...`), registered once at startup by [`register`].
//! Metrics are cheap atomics: recording one never takes the registry's lock, only a scrape
//! does.

mod counted;
mod principals;
pub mod tcp;

use std::sync::{LazyLock, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::registry::Registry;

pub use counted::Counted;
pub use principals::Principals;

/// The `Content-Type` of [`render`]'s output (the Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Failed refreshes of a token the process keeps fresh (the istio-token); each retry counts.
pub static TOKEN_REFRESH_FAILURES: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Failed certificate rotations (the old certificate stays in use); each retry counts.
pub static CERTIFICATE_REFRESH_FAILURES: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The process's registry: Istio's TCP metrics from the start, the rest from [`register`].
static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    let mut registry = Registry::default();
    tcp::register(&mut registry);
    Mutex::new(registry)
});

/// Registers what both binaries count (refresh failures, the listeners' closed and refused
/// connections by reason) and, through `own`, the binary's own metrics, all named
/// `<prefix>_...`. Called once, at startup.
pub fn register(prefix: &str, own: impl FnOnce(&mut Registry)) {
    let Ok(mut registry) = REGISTRY.lock() else {
        return;
    };
    let sub = registry.sub_registry_with_prefix(prefix);
    sub.register(
        "token_refresh_failures",
        "Failed token refreshes (each retry counts); the previous token stays in use",
        TOKEN_REFRESH_FAILURES.clone(),
    );
    sub.register(
        "certificate_refresh_failures",
        "Failed certificate rotations (each retry counts); the current certificate stays in use",
        CERTIFICATE_REFRESH_FAILURES.clone(),
    );
    sub.register_collector(Box::new(ListenerCounters));
    own(sub);
}

/// The metrics as Prometheus text.
pub fn render() -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    let registry = REGISTRY.lock().map_err(|_| std::fmt::Error)?;
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// hbone's counters of connections the listeners closed or refused, read at scrape time (hbone
/// stays free of metrics code; its counters are plain atomics).
#[derive(Debug)]
struct ListenerCounters;

impl Collector for ListenerCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use hbone::metrics::{DENIED, HANDSHAKE_TIMEOUTS, IDLE_CLOSED, LIMITED, REFUSED, REVOKED};
        let mut family = encoder.encode_descriptor(
            "connections_denied",
            "Connections or tunnel requests refused before reaching an upstream, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, counter) in [
            ("peer_not_allowed", &DENIED),
            ("connection_limit", &LIMITED),
            ("handshake_timeout", &HANDSHAKE_TIMEOUTS),
            ("tunnel_refused", &REFUSED),
            ("policy_revoked", &REVOKED),
        ] {
            let labels = [("reason", reason)];
            ConstCounter::new(counter.get()).encode(family.encode_family(&labels)?)?;
        }
        let idle = encoder.encode_descriptor(
            "connections_idle_closed",
            "Connections closed because they carried nothing for the idle timeout",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(IDLE_CLOSED.get()).encode(idle)
    }
}

/// A line of `text` for tests and logs: the sample named `name` with `labels`, if present.
#[cfg(test)]
fn sample(text: &str, name: &str, labels: &str) -> Option<u64> {
    let wanted = format!("{name}{labels} ");
    text.lines()
        .find_map(|line| line.strip_prefix(wanted.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_counters_are_named_by_the_prefix_and_reason() {
        register("test", |_| {});
        hbone::metrics::HANDSHAKE_TIMEOUTS.increment();
        let text = render().expect("render");
        let timeouts = sample(
            &text,
            "test_connections_denied_total",
            "{reason=\"handshake_timeout\"}",
        )
        .expect("the handshake timeouts are exported");
        assert!(timeouts >= 1, "{text}");
        assert!(
            text.contains("# TYPE test_connections_idle_closed_total counter"),
            "{text}"
        );
    }
}
