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
    if let Some(zone) = zone {
        node["locality"] = json!({ "zone": zone });
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
    let json = render(xds, workload, &certs, ip, inputs.zone.as_deref());
    let text = serde_json::to_string_pretty(&json).unwrap_or_default();
    write_atomic(&path, text.as_bytes(), Access::Public)
        .map_err(|e| DataPlaneError::write(config)(e.into()))?;
    tracing::info!(path = %path.display(), %xds, "proxyless gRPC bootstrap written");
    Ok(super::env::app_env(env, &path, false))
}
