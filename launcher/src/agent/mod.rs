//! The Envoy data plane: which data plane runs ([`mode`]), and how krun starts pilot-agent
//! ([`pilot`]), Envoy for Traffic Director ([`td`]) or only a gRPC xDS bootstrap for proxyless
//! apps ([`grpc_bootstrap`]).
//!
//! The agent is an extra process of the supervisor that the app depends on, so the app starts
//! only once the agent is ready, the drain SIGTERMs the app first and the agent only after the
//! app has exited, and an agent crash drains the app and ends krun with exit 1.
//!
//! Discovery (metadata, mesh-env) and identity (tokens, certificates) are computed elsewhere
//! and arrive here as plain values in [`AgentInputs`].

pub mod env;
pub mod grpc_bootstrap;
pub mod layout;
pub mod mode;
pub mod pilot;
pub mod td;
pub mod xds;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{Config, Env};
use crate::files::write_atomic;
use crate::processes::ProcessPlan;
use layout::Layout;
use mode::Plan;

/// The pilot-agent readiness endpoint (`/healthz/ready` on the status port).
pub const AGENT_READY_URL: &str = "http://127.0.0.1:15021/healthz/ready";
/// Envoy's admin port (config_dump on failure; Traffic Director readiness).
pub const ENVOY_ADMIN_PORT: u16 = 15000;
/// Envoy's outbound capture port (the Traffic Director interception port).
pub const ENVOY_OUTBOUND_PORT: u16 = 15001;
/// Envoy's whitebox HTTP proxy port.
pub const WHITEBOX_PROXY_PORT: u16 = 15007;
/// pilot-agent's STS port for Envoy.
pub const STS_PORT: u16 = 15463;
/// The group whose traffic iptables never captures: the proxy runs with it.
pub const PROXY_GID: u32 = 1337;
/// The proxy user of the Istio images (owner of the proxy's directories; Envoy's uid in TD).
pub const PROXY_UID: u32 = 1337;

/// How outbound traffic reaches the proxy, decided by the capture layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Interception {
    /// iptables redirects outbound TCP (and DNS) to the proxy.
    Iptables,
    /// No capture: the app uses `HTTP_PROXY` (Envoy listens on 15007).
    #[default]
    Whitebox,
}

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

/// A value from the environment first, then the given fallback.
fn pick(env: Option<&crate::config::Setting<String>>, fallback: &Option<String>) -> Option<String> {
    env.map(|s| s.value.clone())
        .or_else(|| fallback.clone())
        .filter(|v| !v.is_empty())
}

/// The workload as the agent sees it: every identity value resolved once, env first.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// K8s namespace.
    pub namespace: String,
    /// Canonical service name.
    pub name: String,
    /// Canonical revision (`K_REVISION`, else `v1`).
    pub revision: String,
    /// Pod name as Istio sees it.
    pub pod_name: String,
    /// KSA.
    pub service_account: String,
    /// Gateway name (`router` mode).
    pub gateway: Option<String>,
    /// MCP tenant, `-` for in-cluster istiod.
    pub tenant: Option<String>,
    /// Project id.
    pub project_id: Option<String>,
    /// Project number.
    pub project_number: Option<String>,
    /// Cluster name.
    pub cluster_name: Option<String>,
    /// Cluster location.
    pub cluster_location: Option<String>,
    /// Trust domain.
    pub trust_domain: Option<String>,
}

impl Workload {
    /// Resolves the workload from the configuration and the discovered inputs. `hostname` is
    /// the machine's host name (POD_NAME fallback when `HOSTNAME` is unset, §13.1.9) and
    /// `now_secs` the current Unix time (last-resort pod name suffix).
    pub fn resolve(
        config: &Config,
        inputs: &AgentInputs,
        env: &Env,
        hostname: Option<String>,
        now_secs: u64,
    ) -> Workload {
        let mesh_env = |key: &str| inputs.mesh_env.get(key).cloned();
        let namespace = config
            .workload_namespace
            .as_ref()
            .map_or_else(|| "default".to_owned(), |s| s.value.clone());
        let name = config
            .workload_name
            .as_ref()
            .map_or_else(|| namespace.clone(), |s| s.value.clone());
        let revision = config.k_revision.as_ref().map(|s| s.value.clone());
        let pod_name = match (&revision, &inputs.instance_id) {
            (Some(rev), Some(id)) => format!("{rev}-{}", id.chars().take(8).collect::<String>()),
            (Some(rev), None) => format!("{rev}-{now_secs}"),
            (None, _) => env
                .get("HOSTNAME")
                .map(str::to_owned)
                .or(hostname)
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("{name}--{now_secs}")),
        };
        let project_id =
            pick(config.project_id.as_ref(), &inputs.project_id).or_else(|| mesh_env("PROJECT_ID"));
        let trust_domain = pick(config.trust_domain.as_ref(), &inputs.trust_domain)
            .or_else(|| project_id.as_ref().map(|p| format!("{p}.svc.id.goog")));
        Workload {
            revision: revision.unwrap_or_else(|| "v1".to_owned()),
            pod_name,
            service_account: config.workload_service_account.value.clone(),
            gateway: config.gateway_name.as_ref().map(|s| s.value.clone()),
            tenant: pick(config.mesh_tenant.as_ref(), &mesh_env("MESH_TENANT")),
            project_number: pick(config.project_number.as_ref(), &inputs.project_number)
                .or_else(|| mesh_env("PROJECT_NUMBER")),
            cluster_name: pick(config.cluster_name.as_ref(), &inputs.cluster_name)
                .or_else(|| mesh_env("CLUSTER_NAME")),
            cluster_location: pick(config.cluster_location.as_ref(), &inputs.cluster_location)
                .or_else(|| mesh_env("CLUSTER_LOCATION")),
            project_id,
            trust_domain,
            namespace,
            name,
        }
    }

    /// True when a managed control plane tenant is configured (not empty, not `-`).
    pub fn has_tenant(&self) -> bool {
        self.tenant.as_deref().is_some_and(|t| t != "-")
    }
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
/// runs (peers-and-users.md §7.2: "T-2 s").
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

/// True when `path` is a regular file someone may execute.
pub fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
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
    /// `KRUN_PROCESSES` uses the agent's name.
    #[error("{0}")]
    Conflict(String),
}

/// Decides the data plane, prepares its files and adds its process to `processes` (the app
/// depends on it). Returns what the app's environment gains (gRPC bootstrap, proxy settings).
pub fn set_up(
    config: &Config,
    inputs: &AgentInputs,
    env: &Env,
    processes: &mut ProcessPlan,
) -> Result<BTreeMap<String, String>, DataPlaneError> {
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
        config.dataplane.value,
        config.mesh.as_ref().map(|s| s.value.as_str()),
        &xds,
        &config.pilot_agent_path.value,
        &config.envoy_path.value,
    )?;
    let base = config.mesh_base_dir.value.display().to_string();
    let write_err = |cause| DataPlaneError::Write {
        base: base.clone(),
        cause,
    };
    let layout = Layout::new(&config.mesh_base_dir.value).map_err(write_err)?;
    let root = nix::unistd::geteuid().is_root();
    let budget = config.agent_ready_timeout.value;
    match choice.plan {
        Plan::Agent { xds } => {
            tracing::info!(dataplane = "envoy", "data plane: {}", choice.why);
            let setup = pilot::setup(config, inputs, workload, xds, root).map_err(write_err)?;
            pilot::prepare(&setup).map_err(write_err)?;
            tracing::info!(
                command = ?setup.argv(&config.pilot_agent_path.value),
                interception = ?setup.interception,
                grpc_bootstrap = %setup.grpc_bootstrap.display(),
                envoy = setup.envoy_template.is_some(),
                "pilot-agent prepared; the app starts once it is ready"
            );
            processes
                .add_app_dependency(pilot::process(
                    &setup,
                    &config.pilot_agent_path.value,
                    env,
                    budget,
                ))
                .map_err(DataPlaneError::Conflict)?;
            let whitebox =
                setup.interception == Interception::Whitebox && setup.envoy_template.is_some();
            Ok(env::app_env(env, &setup.grpc_bootstrap, whitebox))
        }
        Plan::TrafficDirector(mesh) => {
            tracing::info!(dataplane = "envoy", "data plane: {}", choice.why);
            let project_number = mesh
                .project_number
                .clone()
                .or_else(|| workload.project_number.clone())
                .ok_or_else(|| {
                    DataPlaneError::TdProjectNumber(
                        config
                            .mesh
                            .as_ref()
                            .map(|s| s.value.clone())
                            .unwrap_or_default(),
                    )
                })?;
            let bootstrap = td::TdBootstrap {
                project_number,
                network: mesh.network,
                node_id: inputs
                    .node_id
                    .clone()
                    .unwrap_or_else(|| td::node_id(inputs.instance_ip.as_deref())),
                zone: inputs
                    .zone
                    .clone()
                    .unwrap_or_else(|| td::DEFAULT_ZONE.to_owned()),
                envoy_port: ENVOY_OUTBOUND_PORT,
                admin_port: ENVOY_ADMIN_PORT,
            };
            let path = layout.td_bootstrap();
            layout.prepare(root).map_err(write_err)?;
            write_atomic(&path, bootstrap.render()?.as_bytes(), 0o644).map_err(write_err)?;
            tracing::info!(
                node_id = %bootstrap.node_id, zone = %bootstrap.zone,
                bootstrap = %path.display(), "Traffic Director bootstrap written"
            );
            processes
                .add_app_dependency(td::envoy_process(
                    &config.envoy_path.value,
                    path,
                    &layout,
                    root,
                    budget,
                ))
                .map_err(DataPlaneError::Conflict)?;
            Ok(BTreeMap::new())
        }
        Plan::Builtin {
            proxyless_xds: Some(xds),
        } => {
            tracing::info!(dataplane = "builtin", "data plane: {}", choice.why);
            let path = env::grpc_bootstrap_path(
                config.grpc_xds_bootstrap.as_ref().map(|s| s.value.as_str()),
                &layout,
            )
            .map_err(write_err)?;
            let certs = grpc_bootstrap::CertFiles::in_dir(
                &inputs
                    .cert_dir
                    .clone()
                    .unwrap_or_else(|| layout.output_certs()),
            );
            let missing = certs.missing();
            if !missing.is_empty() {
                tracing::warn!(
                    ?missing,
                    "gRPC bootstrap points at certificate files that do not exist yet; proxyless mTLS fails until the identity layer writes them"
                );
            }
            let json = grpc_bootstrap::render(
                &xds,
                &workload,
                &certs,
                inputs.instance_ip.as_deref().unwrap_or("127.0.0.1"),
                inputs.zone.as_deref(),
            );
            let text = serde_json::to_string_pretty(&json).unwrap_or_default();
            write_atomic(&path, text.as_bytes(), 0o644).map_err(write_err)?;
            tracing::info!(path = %path.display(), %xds, "proxyless gRPC bootstrap written");
            Ok(env::app_env(env, &path, false))
        }
        Plan::Builtin {
            proxyless_xds: None,
        } => {
            tracing::info!(dataplane = "builtin", "data plane: {}", choice.why);
            Ok(BTreeMap::new())
        }
        Plan::None => {
            tracing::info!(dataplane = "none", "data plane: {}", choice.why);
            Ok(BTreeMap::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn workload(pairs: &[(&str, &str)], inputs: &AgentInputs, hostname: Option<&str>) -> Workload {
        let env = env(pairs);
        let config = Config::from_env(&env).expect("valid env");
        Workload::resolve(
            &config,
            inputs,
            &env,
            hostname.map(str::to_owned),
            1700000000,
        )
    }

    #[test]
    fn pod_name_follows_the_reference_order_and_uses_the_real_hostname() {
        let with_id = AgentInputs {
            instance_id: Some("0123456789abcdef".into()),
            ..AgentInputs::default()
        };
        let rev = [("K_SERVICE", "fortio"), ("K_REVISION", "fortio-001")];
        assert_eq!(
            workload(&rev, &with_id, None).pod_name,
            "fortio-001-01234567"
        );
        let none = AgentInputs::default();
        assert_eq!(
            workload(&rev, &none, None).pod_name,
            "fortio-001-1700000000"
        );
        let svc = [("K_SERVICE", "fortio"), ("HOSTNAME", "from-env")];
        assert_eq!(workload(&svc, &none, Some("host")).pod_name, "from-env");
        // HOSTNAME unset: the machine's host name, not an empty string (§13.1.9).
        assert_eq!(workload(&svc[..1], &none, Some("host")).pod_name, "host");
        assert_eq!(
            workload(&svc[..1], &none, None).pod_name,
            "fortio--1700000000"
        );
        assert_eq!(workload(&svc[..1], &none, None).revision, "v1");
    }

    #[test]
    fn environment_wins_over_discovered_and_mesh_env_values() {
        let inputs = AgentInputs {
            project_number: Some("111".into()),
            project_id: Some("discovered".into()),
            mesh_env: [("MESH_TENANT".to_owned(), "t1".to_owned())].into(),
            ..AgentInputs::default()
        };
        let w = workload(&[("PROJECT_NUMBER", "222")], &inputs, None);
        assert_eq!(w.project_number.as_deref(), Some("222"));
        assert_eq!(w.project_id.as_deref(), Some("discovered"));
        assert_eq!(w.trust_domain.as_deref(), Some("discovered.svc.id.goog"));
        assert!(w.has_tenant());
        assert!(!workload(&[("MESH_TENANT", "-")], &inputs, None).has_tenant());
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
        let app_env = set_up(&config, &inputs, &env, &mut plan).expect("set up");
        assert!(app_env.is_empty());
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
