//! Istio's TCP metrics (`istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total`,
//! `istio_tcp_received_bytes_total`) with Istio's labels `reporter`, `source_principal` and
//! `destination_principal`, so dashboards built for Envoy and ztunnel read krun's builtin data
//! plane and hgate unchanged. Principals are bounded ([`Principals`]).
//!
//! As in Istio, bytes are the payload each way as the reporter sees it: `sent` is what the
//! reporter sent to the peer that opened the connection (the response direction), `received`
//! what it received from it.

use std::sync::LazyLock;

use hbone::identity::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{Counted, Principals};

/// Which side of the connection reports it (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The side that opened the connection (an outbound proxy, a gateway).
    Source,
    /// The side that accepted it (an inbound proxy in front of the app).
    Destination,
}

impl Reporter {
    fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Istio's TCP label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_principal: String,
    destination_principal: String,
}

/// The four TCP families and the principals seen.
#[derive(Default)]
struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    principals: Principals,
}

static TCP: LazyLock<TcpMetrics> = LazyLock::new(TcpMetrics::default);

/// Registers the TCP families, under Istio's names (no prefix).
pub(super) fn register(registry: &mut Registry) {
    registry.register(
        "istio_tcp_connections_opened",
        "TCP connections opened",
        TCP.opened.clone(),
    );
    registry.register(
        "istio_tcp_connections_closed",
        "TCP connections closed",
        TCP.closed.clone(),
    );
    registry.register(
        "istio_tcp_sent_bytes",
        "Bytes the reporter sent to the connection's source",
        TCP.sent.clone(),
    );
    registry.register(
        "istio_tcp_received_bytes",
        "Bytes the reporter received from the connection's source",
        TCP.received.clone(),
    );
}

/// One connection in Istio's TCP metrics: counted as opened when created, as closed when
/// dropped; its bytes are counted by the stream [`TcpConnection::count`] wraps.
pub struct TcpConnection {
    labels: TcpLabels,
}

impl TcpConnection {
    /// Records a connection opened, reported by `reporter`, between two verified identities
    /// (`None`: not verified, labelled `unknown`).
    pub fn open(
        reporter: Reporter,
        source: Option<&SpiffeId>,
        destination: Option<&SpiffeId>,
    ) -> Self {
        let labels = TcpLabels {
            reporter: reporter.label(),
            source_principal: TCP.principals.label(source),
            destination_principal: TCP.principals.label(destination),
        };
        TCP.opened.get_or_create(&labels).inc();
        TcpConnection { labels }
    }

    /// Counts `n` bytes received from the source before its stream was wrapped (a ClientHello
    /// read to route the connection, then replayed upstream).
    pub fn received_before(&self, n: u64) {
        TCP.received.get_or_create(&self.labels).inc_by(n);
    }

    /// Counts the bytes on `toward_source`, the reporter's side of the connection that faces
    /// its source: what is read from it is received, what is written to it is sent.
    pub fn count<S>(&self, toward_source: S) -> Counted<S> {
        Counted::new(
            toward_source,
            TCP.received.get_or_create_owned(&self.labels),
            TCP.sent.get_or_create_owned(&self.labels),
        )
    }

    /// Counts the bytes on `toward_destination`, the reporter's side of the connection that
    /// faces the destination (the app behind an inbound proxy): what is written to it was
    /// received from the source, what is read from it is sent back.
    pub fn count_upstream<S>(&self, toward_destination: S) -> Counted<S> {
        Counted::new(
            toward_destination,
            TCP.sent.get_or_create_owned(&self.labels),
            TCP.received.get_or_create_owned(&self.labels),
        )
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        TCP.closed.get_or_create(&self.labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_connection_is_opened_closed_and_its_bytes_counted_under_istio_names() {
        let source = SpiffeId::new("cluster.local", "tcp-test", "client");
        let destination = SpiffeId::new("cluster.local", "tcp-test", "server");
        let connection =
            TcpConnection::open(Reporter::Destination, Some(&source), Some(&destination));
        let (app_side, mut app) = tokio::io::duplex(64);
        let mut upstream = connection.count_upstream(app_side);
        upstream.write_all(b"request").await.expect("write");
        app.write_all(b"response!").await.expect("write");
        drop(app);
        let mut back = Vec::new();
        upstream.read_to_end(&mut back).await.expect("read");
        drop(connection);
        let text = super::super::render().expect("render");
        let labels = "{reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/tcp-test/sa/client\",destination_principal=\"spiffe://cluster.local/ns/tcp-test/sa/server\"}";
        let get = |name| super::super::sample(&text, name, labels);
        assert_eq!(get("istio_tcp_received_bytes_total"), Some(7), "{text}");
        assert_eq!(get("istio_tcp_sent_bytes_total"), Some(9), "{text}");
        assert_eq!(get("istio_tcp_connections_opened_total"), Some(1), "{text}");
        assert_eq!(get("istio_tcp_connections_closed_total"), Some(1), "{text}");
    }
}
