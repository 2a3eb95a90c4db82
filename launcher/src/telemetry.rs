//! krun's own metrics (`krun_...` on the admin endpoint's `/metrics`), beside Istio's TCP
//! metrics and the counters both binaries share ([`mesh::metrics`]): startup phase durations,
//! process restarts, the workload certificate's expiry and the tunnel streams open.
//!
//! The certificate's expiry and the open streams are read at scrape time from their sources
//! (the certificate feed, hbone's gauge), so nothing has to remember to update them.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use hbone::tls::WorkloadCert;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use tokio::sync::watch;

/// A label set of one label: names come from krun's code or the operator's `KRUN_PROCESSES`,
/// never from a peer.
type OneLabel = Vec<(&'static str, String)>;

/// Restarts of each declared process after a failure.
pub static PROCESS_RESTARTS: LazyLock<Family<OneLabel, Counter>> = LazyLock::new(Family::default);

/// How long each startup phase took.
pub static PHASE_SECONDS: LazyLock<Family<OneLabel, Gauge<f64, AtomicU64>>> =
    LazyLock::new(Family::default);

/// Registers krun's metrics; `certs` is the workload certificate feed, when there is one.
pub fn register(certs: Option<watch::Receiver<Arc<WorkloadCert>>>) {
    mesh::metrics::register("krun", |registry| {
        registry.register(
            "startup_phase_duration_seconds",
            "How long each startup phase took",
            PHASE_SECONDS.clone(),
        );
        registry.register(
            "process_restarts",
            "Restarts of a declared process after it failed",
            PROCESS_RESTARTS.clone(),
        );
        registry.register_collector(Box::new(LiveGauges { certs }));
    });
}

/// The end of `cert`'s leaf validity.
pub fn expiry(cert: &WorkloadCert) -> Option<SystemTime> {
    mesh::identity::verify::not_after(cert.chain.first()?)
}

fn expiry_seconds(cert: &WorkloadCert) -> Option<i64> {
    let seconds = expiry(cert)?.duration_since(UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(seconds).ok()
}

/// Gauges read at scrape time.
struct LiveGauges {
    certs: Option<watch::Receiver<Arc<WorkloadCert>>>,
}

impl std::fmt::Debug for LiveGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveGauges")
    }
}

impl Collector for LiveGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let streams = encoder.encode_descriptor(
            "tunnel_streams_open",
            "Tunnel streams (tunnel port and HBONE) open now",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(hbone::metrics::TUNNEL_STREAMS.get()).encode(streams)?;
        let expiry = self
            .certs
            .as_ref()
            .and_then(|certs| expiry_seconds(&certs.borrow()));
        if let Some(expiry) = expiry {
            let metric = encoder.encode_descriptor(
                "certificate_expiry_timestamp_seconds",
                "When the workload certificate in use expires (seconds since the epoch)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(expiry).encode(metric)?;
        }
        Ok(())
    }
}
