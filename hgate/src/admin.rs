//! hgate's admin paths on `HGATE_ADMIN_ADDR`, served by [`mesh::admin`] (with `/metrics` and
//! `/logging`): `/healthz/ready` (503 until the listeners are up and again while draining, so
//! the load balancer stops sending new connections), `/healthz/live`, `/stats` (counters as
//! text) and `/config_dump` (the resolved configuration as `--print-config` prints it, and the
//! live state). `/logging` is read-only here: the port is reachable from the pod network.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::StatusCode;
use mesh::admin::{AdminRequest, Answer, Paths, text};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::{Value, json};
use tokio::sync::watch;

use hbone::listen::ConnectionLimit;

use crate::gate::{NO_ROUTE, TUNNELLED};
use crate::register::CONFLICTS;

/// What hgate's admin paths read.
pub struct HgatePaths {
    /// The readiness state.
    pub ready: watch::Receiver<bool>,
    /// The SNI listener's connections.
    pub sni: Arc<ConnectionLimit>,
    /// The resolved configuration, as `--print-config` prints it.
    pub config: BTreeMap<String, Value>,
    /// The listeners: name and bound address.
    pub listeners: BTreeMap<&'static str, String>,
}

impl Paths for HgatePaths {
    fn answer(&self, request: &AdminRequest) -> Option<Answer> {
        let ready = *self.ready.borrow();
        Some(match request.path.as_str() {
            "/healthz/live" => text(StatusCode::OK, "live\n"),
            "/healthz/ready" if ready => text(StatusCode::OK, "ready\n"),
            "/healthz/ready" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: starting or draining\n",
            ),
            "/stats" => text(
                StatusCode::OK,
                format!(
                    "hgate_open_connections {}\nhgate_tunnelled_total {}\nhgate_no_route_total {}\nhgate_limited_total {}\n",
                    self.sni.open(),
                    TUNNELLED.load(Ordering::Relaxed),
                    NO_ROUTE.load(Ordering::Relaxed),
                    self.sni.refused(),
                ),
            ),
            "/config_dump" => mesh::admin::json(&json!({
                "config": self.config,
                "live": {
                    "ready": ready,
                    "listeners": self.listeners,
                    "open_connections": self.sni.open(),
                },
            })),
            // The admin port is reachable from the pod network (the kubelet probes it), so
            // nobody there may turn on debug logging and flood the log; reading is fine.
            "/logging" if request.method != http::Method::GET => text(
                StatusCode::FORBIDDEN,
                "hgate's admin endpoint is reachable from the pod network, so its log level is not changed here; set MESH_DEBUG or RUST_LOG and restart\n",
            ),
            _ => return None,
        })
    }
}

/// hgate's own metrics (`hgate_...`), read from the gate's counters at scrape time.
pub struct GateMetrics(pub Arc<ConnectionLimit>);

impl std::fmt::Debug for GateMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GateMetrics")
    }
}

impl Collector for GateMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            (
                "tunnelled",
                "Connections tunnelled to their route and finished",
                TUNNELLED.load(Ordering::Relaxed),
            ),
            (
                "no_route",
                "Connections closed because their SNI has no route",
                NO_ROUTE.load(Ordering::Relaxed),
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }
        let conflicts = i64::try_from(CONFLICTS.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        let metric = encoder.encode_descriptor(
            "registration_conflicts",
            "Cloud Run services not registered because a same-named object is not hgate's",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(conflicts).encode(metric)?;
        let open = i64::try_from(self.0.open()).unwrap_or(i64::MAX);
        let metric = encoder.encode_descriptor(
            "open_connections",
            "Connections open on the SNI listener",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(open).encode(metric)
    }
}
