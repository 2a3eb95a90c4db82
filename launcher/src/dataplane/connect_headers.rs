//! The headers krun's outbound HBONE CONNECTs carry, as ztunnel sends them
//! (`src/proxy/outbound.rs`): `baggage` naming the source workload for the peer's telemetry,
//! `forwarded: for="<the app's address>"`, and a fresh W3C `traceparent` per connection.

use std::fmt::Write;
use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue};
use ring::rand::{SecureRandom, SystemRandom};

/// The source workload as ztunnel's `baggage` names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceWorkload {
    /// The cluster id istiod knows the workload by.
    pub cluster: String,
    /// Its namespace.
    pub namespace: String,
    /// Its canonical service name (on Cloud Run, the service).
    pub service: String,
    /// Its canonical revision.
    pub revision: String,
}

impl SourceWorkload {
    /// ztunnel's `baggage` value; krun runs as a deployment-like workload named after its
    /// service. `None` when a value is not a valid header (then no baggage is sent).
    pub fn baggage(&self) -> Option<HeaderValue> {
        let SourceWorkload {
            cluster,
            namespace,
            service,
            revision,
        } = self;
        HeaderValue::from_str(&format!(
            "k8s.cluster.name={cluster},k8s.namespace.name={namespace},k8s.deployment.name={service},service.name={service},service.version={revision}"
        ))
        .ok()
    }
}

/// The headers of one outbound CONNECT for a connection the app opened from `source`.
pub fn connect_headers(baggage: Option<&HeaderValue>, source: SocketAddr) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(baggage) = baggage {
        headers.insert("baggage", baggage.clone());
    }
    if let Ok(forwarded) = HeaderValue::from_str(&format!("for=\"{source}\"")) {
        headers.insert(http::header::FORWARDED, forwarded);
    }
    if let Some(traceparent) = traceparent() {
        headers.insert("traceparent", traceparent);
    }
    headers
}

/// A new W3C trace context, version 00, random trace and parent ids, flags 00 (ztunnel's
/// `TraceParent::new`); `None` if the system has no randomness to give.
fn traceparent() -> Option<HeaderValue> {
    let mut ids = [0u8; 24];
    SystemRandom::new().fill(&mut ids).ok()?;
    // 00-<16-byte trace id>-<8-byte parent id>-00, written into one buffer.
    let mut value = String::with_capacity(55);
    value.push_str("00-");
    for (i, b) in ids.iter().enumerate() {
        if i == 16 {
            value.push('-');
        }
        write!(value, "{b:02x}").ok()?;
    }
    value.push_str("-00");
    HeaderValue::from_str(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three headers in ztunnel's forms; each connection gets its own trace id.
    #[test]
    fn headers_as_ztunnel_sends_them() {
        let source = SourceWorkload {
            cluster: "cn-p-us-central1-c1".into(),
            namespace: "prod".into(),
            service: "api".into(),
            revision: "api-00002".into(),
        };
        let baggage = source.baggage();
        let headers = connect_headers(baggage.as_ref(), "10.0.0.7:40000".parse().expect("addr"));
        assert_eq!(
            headers["baggage"],
            "k8s.cluster.name=cn-p-us-central1-c1,k8s.namespace.name=prod,k8s.deployment.name=api,service.name=api,service.version=api-00002"
        );
        assert_eq!(headers["forwarded"], "for=\"10.0.0.7:40000\"");
        let trace = headers["traceparent"].to_str().expect("ascii");
        let parts: Vec<&str> = trace.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [2, 32, 16, 2],
            "{trace}"
        );
        assert!(trace.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        let other = connect_headers(None, "[fd00::1]:1".parse().expect("addr"));
        assert_ne!(other["traceparent"], headers["traceparent"]);
        assert_eq!(other["forwarded"], "for=\"[fd00::1]:1\"");
        assert!(other.get("baggage").is_none());
        let bad = SourceWorkload {
            service: "a\nb".into(),
            ..SourceWorkload::default()
        };
        assert_eq!(bad.baggage(), None);
    }
}
