//! The Istio agent side of the data plane: which data plane runs ([`mode`]), which XDS server
//! it talks to ([`xds`]), the workload as Istio sees it ([`workload`]), and how krun starts
//! pilot-agent ([`pilot`], with its environment [`env`](mod@env) and files [`layout`]),
//! Envoy for Traffic Director ([`td`]) or only a gRPC xDS bootstrap for proxyless apps
//! ([`grpc_bootstrap`]).
//!
//! The agent is an extra process of the supervisor that the app depends on, so the app starts
//! only once the agent is ready, the drain SIGTERMs the app first and the agent only after the
//! app has exited, and an agent crash drains the app and ends krun with exit 1.
//!
//! Discovery (metadata, mesh-env) and identity (tokens, certificates) are computed elsewhere
//! and arrive here as plain values in [`AgentInputs`].

pub mod env;
pub mod explain;
pub mod grpc_bootstrap;
pub mod layout;
pub mod mode;
pub mod pilot;
pub mod td;
pub mod workload;
pub mod xds;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{Config, DataPlane};
use crate::processes::ProcessPlan;
use layout::Layout;
use mesh::config::Env;
use mesh::istio::ENVOY_ADMIN_PORT;
pub use mesh::istio::Interception;
use mode::Plan;
pub use workload::Workload;

/// The pilot-agent readiness endpoint (`/healthz/ready` on the status port).
pub const AGENT_READY_URL: &str = "http://127.0.0.1:15021/healthz/ready";
/// What the discovery, identity and capture layers found, as plain values. Every field is
/// optional: the environment (in [`Config`]) wins over these, and missing values leave the
/// matching agent variable unset.
#[derive(Clone, Debug, Default)]
pub struct AgentInputs {
    /// The `istio-system/mesh-env` ConfigMap (or a `MESH=file://` map).
    pub mesh_env: BTreeMap<String, String>,
    /// An XDS address discovery found (below `XDS_ADDR` and `PROXY_CONFIG`).
    pub xds_addr: Option<String>,
    /// SPIFFE trust domain (derived from the project when not set).
    pub trust_domain: Option<String>,
    /// Numeric project number (metadata `project/numeric-project-id`).
    pub project_number: Option<String>,
    /// Config project id.
    pub project_id: Option<String>,
    /// GKE cluster name.
    pub cluster_name: Option<String>,
    /// GKE cluster location.
    pub cluster_location: Option<String>,
    /// Zone (metadata `instance/zone`, last path segment).
    pub zone: Option<String>,
    /// Instance id (metadata `instance/id`): names the pod.
    pub instance_id: Option<String>,
    /// The instance's IP, for node ids.
    pub instance_ip: Option<String>,
    /// Traffic Director node id; `<uuid>~<ip>` when not given.
    pub node_id: Option<String>,
    /// Directory with `cert-chain.pem`, `key.pem`, `root-cert.pem`; the layout's
    /// `var/run/secrets/istio.io` when not given.
    pub cert_dir: Option<PathBuf>,
    /// krun holds a GKE workload certificate (`CA_PROVIDER=GoogleGkeWorkloadCertificate`).
    pub workload_cert: bool,
    /// How traffic is captured.
    pub interception: Interception,
}

/// Envoy's `config_dump` on the admin port, saved when the proxy is never ready so the operator
/// can see which listeners, clusters or secrets never arrived.
pub fn config_dump_evidence(layout: &layout::Layout) -> crate::processes::Evidence {
    crate::processes::Evidence {
        what: "Envoy's config_dump",
        url: format!("http://127.0.0.1:{ENVOY_ADMIN_PORT}/config_dump"),
        path: layout.config_dump(),
    }
}

/// How long before the drain deadline krun starts draining Envoy even while the app still
/// runs: the last 2 s, so Envoy's own drain ends before the SIGKILL (Cloud Run sends SIGKILL
/// 10 s after SIGTERM, <https://cloud.google.com/run/docs/container-contract>).
pub const ENVOY_DRAIN_LEAD: std::time::Duration = std::time::Duration::from_secs(2);

/// Envoy's graceful stop: `/drain_listeners?graceful` on the admin port, then wait until
/// `server.total_connections` is 0 (or the drain deadline), then SIGTERM.
pub fn envoy_graceful_stop() -> crate::processes::GracefulStop {
    let admin = format!("http://127.0.0.1:{ENVOY_ADMIN_PORT}");
    crate::processes::GracefulStop {
        lead: ENVOY_DRAIN_LEAD,
        drain_url: format!("{admin}/drain_listeners?graceful"),
        idle: crate::probe::Probe::new(crate::probe::Check::HttpLines(
            format!("{admin}/stats?filter=^server.total_connections$"),
            vec!["server.total_connections: 0".to_owned()],
        )),
    }
}

/// Why the data plane cannot be set up. Each message names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// The mode cannot be honoured or `MESH=td:` is malformed.
    #[error(transparent)]
    Mode(#[from] mode::ModeError),
    /// `PROXY_CONFIG` does not parse.
    #[error(transparent)]
    ProxyConfig(#[from] xds::ProxyConfigError),
    /// A file or directory krun must write.
    #[error(
        "cannot write the mesh files: {cause}; make MESH_BASE_DIR={base} writable or point it elsewhere"
    )]
    Write {
        /// `MESH_BASE_DIR`.
        base: String,
        /// What failed, naming the path.
        cause: std::io::Error,
    },
    /// Traffic Director without a project number.
    #[error(
        "MESH={0}: Traffic Director needs the project number; set PROJECT_NUMBER or use MESH=td:project=NUM&mesh_name=NAME"
    )]
    TdProjectNumber(String),
    /// The embedded TD template is broken.
    #[error(transparent)]
    Template(#[from] td::TemplateError),
    /// istiod on 15012 without its root certificate.
    #[error(
        "XDS address {0} is istiod, which pilot-agent verifies with istiod's root, and mesh-env has no CAROOT_ISTIOD; publish istiod's root in istio-system/mesh-env (hgate does), or set XDS_ROOT_CA to a root file"
    )]
    IstiodRoot(String),
    /// `KRUN_PROCESSES` uses the agent's name.
    #[error("{0}")]
    Conflict(String),
}

impl DataPlaneError {
    /// Maps an I/O error on the mesh files (it names the path) to [`DataPlaneError::Write`].
    pub fn write(config: &Config) -> impl Fn(std::io::Error) -> DataPlaneError + '_ {
        |cause| DataPlaneError::Write {
            base: config.mesh_base_dir.value.display().to_string(),
            cause,
        }
    }
}

/// What [`set_up`] decided: the data plane that runs and what the app's environment gains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPlaneSetup {
    /// Envoy (agent or Traffic Director), builtin, or none; never `Auto`.
    pub mode: DataPlane,
    /// Variables added to the app's environment (gRPC bootstrap, proxy settings).
    pub app_env: BTreeMap<String, String>,
}

/// Decides the data plane, prepares its files and adds its process to `processes` (the app
/// depends on it).
pub fn set_up(
    config: &Config,
    inputs: &AgentInputs,
    env: &Env,
    processes: &mut ProcessPlan,
) -> Result<DataPlaneSetup, DataPlaneError> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let workload = Workload::resolve(config, inputs, env, hostname, now);
    let xds = xds::select(
        config.proxy_config.as_ref().map(|s| s.value.as_str()),
        config.xds_addr.as_ref().map(|s| s.value.as_str()),
        inputs.xds_addr.as_deref(),
        &inputs.mesh_env,
        workload.tenant.as_deref(),
    )?;
    let choice = mode::choose(
        config.launcher.dataplane.value,
        config.mesh.as_ref().map(|s| s.value.as_str()),
        &xds,
        &config.launcher.pilot_agent_path.value,
        &config.launcher.envoy_path.value,
    )?;
    let mode = match choice.plan {
        Plan::Agent { .. } | Plan::TrafficDirector(_) => DataPlane::Envoy,
        Plan::Builtin { .. } => DataPlane::Builtin,
        Plan::None => DataPlane::None,
    };
    tracing::info!(dataplane = ?mode, "data plane: {}", choice.why);
    let layout = Layout::new(&config.mesh_base_dir.value).map_err(DataPlaneError::write(config))?;
    let app_env = match choice.plan {
        Plan::Agent { xds } => pilot::start(config, inputs, env, workload, xds, processes)?,
        Plan::TrafficDirector(mesh) => {
            td::start(config, inputs, &workload, mesh, &layout, processes)?;
            BTreeMap::new()
        }
        Plan::Builtin {
            proxyless_xds: Some(xds),
        } => grpc_bootstrap::write(config, inputs, env, &workload, &xds, &layout)?,
        Plan::Builtin {
            proxyless_xds: None,
        }
        | Plan::None => BTreeMap::new(),
    };
    Ok(DataPlaneSetup { mode, app_env })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Traffic Director with zone and node id as the metadata layer hands them over.
    #[test]
    fn traffic_director_bootstrap_uses_the_given_zone_and_node_id() {
        let dir = std::env::temp_dir().join(format!("krun-td-{}", std::process::id()));
        let base = dir.display().to_string();
        let env = env(&[
            ("MESH", "td:project=42&mesh_name=prod"),
            ("MESH_BASE_DIR", &base),
            ("KRUN_ENVOY_PATH", "/bin/sh"),
        ]);
        let config = Config::from_env(&env).expect("valid env");
        let inputs = AgentInputs {
            zone: Some("europe-west1-b".into()),
            node_id: Some("8f0c~10.8.0.3".into()),
            ..AgentInputs::default()
        };
        let mut plan = ProcessPlan::default();
        let setup = set_up(&config, &inputs, &env, &mut plan).expect("set up");
        assert_eq!(setup.mode, DataPlane::Envoy);
        assert!(setup.app_env.is_empty());
        assert_eq!(plan.processes[0].name, td::ENVOY_PROCESS);
        assert_eq!(plan.app_depends_on, vec![0]);
        let rendered = std::fs::read_to_string(dir.join("etc/istio/proxy/td_bootstrap.yaml"))
            .expect("bootstrap written");
        assert!(rendered.contains("id: \"projects/42/networks/mesh:prod/nodes/8f0c~10.8.0.3\""));
        assert!(rendered.contains("zone: \"europe-west1-b\""));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn traffic_director_without_a_project_number_is_an_error_naming_mesh() {
        let env = env(&[
            ("MESH", "td:mesh_name=prod"),
            ("KRUN_ENVOY_PATH", "/bin/sh"),
        ]);
        let config = Config::from_env(&env).expect("valid env");
        let err = set_up(
            &config,
            &AgentInputs::default(),
            &env,
            &mut ProcessPlan::default(),
        )
        .expect_err("no project number")
        .to_string();
        assert!(
            err.starts_with("MESH=td:mesh_name=prod: Traffic Director needs the project number"),
            "{err}"
        );
    }
}
