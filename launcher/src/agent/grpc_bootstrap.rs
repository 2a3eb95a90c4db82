//! The gRPC xDS bootstrap for proxyless gRPC apps
//! (<https://github.com/grpc/proposal/blob/master/A27-xds-global-load-balancing.md>), in the
//! schema cloud-run-mesh's `pkg/mesh/grpc_bootstrap.go` defines but never calls, written by
//! krun when no agent runs but an XDS address is known. With an agent, pilot-agent writes it
//! itself (grpc-agent mode) at the same path.
//!
//! The certificate provider is a `file_watcher` on the workload certificate files krun's
//! identity phase writes, which are rotated atomically, so gRPC picks up new certificates
//! without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::layout::Layout;
use super::{AgentInputs, DataPlaneError, Workload};
use crate::config::Config;
use mesh::config::Env;
use mesh::files::{Access, write_atomic};

/// How often gRPC re-reads the certificate files.
pub const REFRESH_INTERVAL: &str = "900s";
/// Istio's inbound listener name template for proxyless servers.
pub const SERVER_LISTENER_TEMPLATE: &str = "xds.istio.io/grpc/lds/inbound/%s";

/// The identity files gRPC uses for mTLS and for the XDS channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// Workload certificate chain.
    pub cert_chain: PathBuf,
    /// Workload private key.
    pub key: PathBuf,
    /// Mesh root certificates.
    pub roots: PathBuf,
}

impl CertFiles {
    /// Istio's names in `dir`: `cert-chain.pem`, `key.pem`, `root-cert.pem`.
    pub fn in_dir(dir: &Path) -> CertFiles {
        CertFiles {
            cert_chain: dir.join("cert-chain.pem"),
            key: dir.join("key.pem"),
            roots: dir.join("root-cert.pem"),
        }
    }

    /// The files that do not exist (yet).
    pub fn missing(&self) -> Vec<&Path> {
        [&self.cert_chain, &self.key, &self.roots]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(PathBuf::as_path)
            .collect()
    }
}

/// Renders the bootstrap JSON. `ip` is the instance's address for the node id (Istio's
/// `sidecar~IP~POD.NS~NS.svc.cluster.local` form) and `zone` its locality.
pub fn render(
    xds: &str,
    workload: &Workload,
    certs: &CertFiles,
    ip: &str,
    zone: Option<&str>,
) -> Value {
    let path = |p: &Path| p.display().to_string();
    // istiod's 15012 is TLS with the mesh roots (gRFC A65 "tls" credentials); Google endpoints
    // use Google default credentials.
    let channel_creds = if xds.ends_with(".googleapis.com:443") {
        json!([{ "type": "google_default" }])
    } else {
        json!([{
            "type": "tls",
            "config": {
                "ca_certificate_file": path(&certs.roots),
                "certificate_file": path(&certs.cert_chain),
                "private_key_file": path(&certs.key),
            }
        }])
    };
    let ns = &workload.namespace;
    let mut node = json!({
        "id": format!("sidecar~{ip}~{}.{ns}~{ns}.svc.cluster.local", workload.pod_name),
        "metadata": {
            "GENERATOR": "grpc",
            "NAMESPACE": ns,
            "SERVICE_ACCOUNT": workload.service_account,
            "WORKLOAD_NAME": workload.name,
            "INSTANCE_IPS": ip,
            "LABELS": {
                "app": workload.name,
                "version": workload.revision,
                "service.istio.io/canonical-name": workload.name,
                "service.istio.io/canonical-revision": workload.revision,
            },
        },
    });
    if let Some(td) = &workload.trust_domain {
        node["metadata"]["TRUST_DOMAIN"] = json!(td);
    }
    if let Some(number) = &workload.project_number {
        node["metadata"]["MESH_ID"] = json!(format!("proj-{number}"));
    }
    node["metadata"]["CLUSTER_ID"] = json!(workload.cluster_id);
    if let Some(zone) = zone {
        let region = mesh::metadata::region_of_zone(zone).unwrap_or(zone);
        node["locality"] = json!({ "region": region, "zone": zone });
    }
    json!({
        "xds_servers": [{
            "server_uri": xds,
            "channel_creds": channel_creds,
            "server_features": ["xds_v3"],
        }],
        "node": node,
        "certificate_providers": {
            "default": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": path(&certs.cert_chain),
                    "private_key_file": path(&certs.key),
                    "ca_certificate_file": path(&certs.roots),
                    "refresh_interval": REFRESH_INTERVAL,
                },
            },
        },
        "server_listener_resource_name_template": SERVER_LISTENER_TEMPLATE,
    })
}

/// Whether the XDS address's host is an IP literal (`10.0.0.1:15012`, `[fd00::1]:15012`).
fn xds_host_is_ip(xds: &str) -> bool {
    let host = xds.rsplit_once(':').map_or(xds, |(host, _)| host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok()
}

/// Writes the bootstrap (0644) for an XDS address without an agent and returns the app's
/// additions (`GRPC_XDS_BOOTSTRAP` and the experimental flags).
pub fn write(
    config: &Config,
    inputs: &AgentInputs,
    env: &Env,
    workload: &Workload,
    xds: &str,
    layout: &Layout,
) -> Result<BTreeMap<String, String>, DataPlaneError> {
    let path = super::env::grpc_bootstrap_path(
        config
            .launcher
            .grpc_xds_bootstrap
            .as_ref()
            .map(|s| s.value.as_str()),
        layout,
    )
    .map_err(DataPlaneError::write(config))?;
    let cert_dir = inputs
        .cert_dir
        .clone()
        .unwrap_or_else(|| layout.output_certs());
    let certs = CertFiles::in_dir(&cert_dir);
    let missing = certs.missing();
    if !missing.is_empty() {
        tracing::warn!(
            ?missing,
            "the gRPC bootstrap points at certificate files that do not exist yet; proxyless mTLS fails until the identity layer writes them"
        );
    }
    let ip = inputs.instance_ip.as_deref().unwrap_or("127.0.0.1");
    if xds_host_is_ip(xds) && !xds.ends_with(".googleapis.com:443") {
        tracing::warn!(
            %xds,
            "the proxyless bootstrap reaches istiod by IP with TLS credentials; gRPC verifies the IP against istiod's certificate, which names DNS names only, so give XDS_ADDR a host name in istiod's certificate or run pilot-agent (grpc-agent mode)"
        );
    }
    let json = render(xds, workload, &certs, ip, inputs.zone.as_deref());
    let text = serde_json::to_string_pretty(&json).unwrap_or_default();
    write_atomic(&path, text.as_bytes(), Access::Public)
        .map_err(|e| DataPlaneError::write(config)(e.into()))?;
    tracing::info!(path = %path.display(), %xds, "proxyless gRPC bootstrap written");
    Ok(super::env::app_env(env, &path, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node carries istiod's cluster id and the locality's region (the zone without its
    /// letter); an IP host is recognised for the warning.
    #[test]
    fn node_has_cluster_id_and_region() {
        let env: Env = [("K_SERVICE", "svc")].into_iter().collect();
        let config = Config::from_env(&env).expect("valid env");
        let workload = Workload::resolve(&config, &AgentInputs::default(), &env, None, 0);
        let certs = CertFiles::in_dir(Path::new("/certs"));
        let json = render(
            "10.0.0.1:15012",
            &workload,
            &certs,
            "10.8.0.3",
            Some("us-central1-a"),
        );
        assert_eq!(json["node"]["metadata"]["CLUSTER_ID"], "Kubernetes");
        assert_eq!(
            json["node"]["locality"],
            json!({ "region": "us-central1", "zone": "us-central1-a" })
        );
        assert!(xds_host_is_ip("10.0.0.1:15012") && xds_host_is_ip("[fd00::1]:15012"));
        assert!(!xds_host_is_ip("istiod.istio-system.svc:15012"));
    }
}
