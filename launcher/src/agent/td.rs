//! Traffic Director (`MESH=td:...`): no pilot-agent; krun renders Envoy's bootstrap itself and
//! starts Envoy directly, as cloud-run-mesh's `startTd` does
//! (<https://github.com/GoogleCloudPlatform/cloud-run-mesh/blob/main/cmd/krun/krun.go>; the
//! `td:mesh_name=` form comes from its later `dev` branch). Unlike cloud-run-mesh, whose
//! template hard-codes Envoy's admin port to 15000, the admin port is a placeholder like every
//! other value; readiness is Envoy's own admin stats with krun's configurable budget
//! (cloud-run-mesh had a fixed, fatal 10 s); and the app and tunnel readiness gates apply as in
//! every mode (cloud-run-mesh skipped both for Traffic Director).

use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

use super::layout::Layout;
use super::{AgentInputs, DataPlaneError, Workload, config_dump_evidence, envoy_graceful_stop};
use crate::config::Config;
use crate::probe::{Check, Probe};
use crate::processes::{ProcessPlan, ProcessSpec, ReadyBudget, RestartPolicy, RunAs};
use mesh::files::{Access, write_atomic};
use mesh::istio::{ENVOY_ADMIN_PORT, OUTBOUND_CAPTURE_PORT, PROXY_GID, PROXY_UID};

/// The bootstrap template, with `{{NAME}}` placeholders.
pub const TEMPLATE: &str = include_str!("td_bootstrap.yaml");
/// The roots Envoy verifies Traffic Director with.
pub const XDS_SERVER_CERT: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Zone when the metadata server gives none (cloud-run-mesh's default).
pub const DEFAULT_ZONE: &str = "cloud-run-cluster";
/// Process name in logs.
pub const ENVOY_PROCESS: &str = "envoy";

/// A `MESH=td:...` locator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TdMesh {
    /// `projects=` / `project=`: the project number, if given.
    pub project_number: Option<String>,
    /// The bootstrap's network: `scope:<scopes>` (cloud-run-mesh's `main` branch form, default
    /// `scope:default`) or `mesh:<mesh_name>` (the form of its later `dev` branch).
    pub network: String,
}

/// A `MESH=td:` value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "MESH={mesh}: {problem}; expected td:, td:projects=NUM&scopes=SCOPE or td:project=NUM&mesh_name=NAME"
)]
pub struct TdMeshError {
    mesh: String,
    problem: String,
}

impl TdMesh {
    /// Parses `td:...`; `None` when `mesh` is not a Traffic Director locator.
    pub fn parse(mesh: &str) -> Option<Result<TdMesh, TdMeshError>> {
        let query = mesh.strip_prefix("td:")?;
        let fail = |problem: String| TdMeshError {
            mesh: mesh.to_owned(),
            problem,
        };
        let (mut project, mut scope, mut mesh_name) = (None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "projects" | "project" => &mut project,
                "scopes" => &mut scope,
                "mesh_name" => &mut mesh_name,
                other => return Some(Err(fail(format!("unknown key {other:?}")))),
            };
            if value.is_empty() {
                return Some(Err(fail(format!("{key} is empty"))));
            }
            *slot = Some(value.to_owned());
        }
        if let Some(number) = &project
            && !number.bytes().all(|b| b.is_ascii_digit())
        {
            return Some(Err(fail(format!(
                "project {number:?} is not a numeric project number"
            ))));
        }
        let network = match (scope, mesh_name) {
            (Some(_), Some(_)) => {
                return Some(Err(fail("scopes and mesh_name exclude each other".into())));
            }
            (None, Some(name)) => format!("mesh:{name}"),
            (Some(scope), None) => format!("scope:{scope}"),
            (None, None) => "scope:default".to_owned(),
        };
        Some(Ok(TdMesh {
            project_number: project,
            network,
        }))
    }
}

/// The values substituted into the template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TdBootstrap {
    /// Project number of the Traffic Director config.
    pub project_number: String,
    /// `scope:...` or `mesh:...`.
    pub network: String,
    /// `<uuid>~<ip>`.
    pub node_id: String,
    /// The instance's zone.
    pub zone: String,
    /// The interception port (Envoy's outbound listener).
    pub envoy_port: u16,
    /// Envoy's admin port.
    pub admin_port: u16,
}

/// A template placeholder left unreplaced: a bug in the template, caught before Envoy runs.
#[derive(Debug, thiserror::Error)]
#[error("the Traffic Director bootstrap template has an unknown placeholder near {0:?}")]
pub struct TemplateError(String);

impl TdBootstrap {
    /// Renders [`TEMPLATE`].
    pub fn render(&self) -> Result<String, TemplateError> {
        let values = [
            ("CONFIG_PROJECT_NUMBER", self.project_number.clone()),
            ("VPC_NETWORK_NAME", self.network.clone()),
            ("ENVOY_NODE_ID", self.node_id.clone()),
            ("ENVOY_ZONE", self.zone.clone()),
            ("ENVOY_PORT", self.envoy_port.to_string()),
            ("ENVOY_ADMIN_PORT", self.admin_port.to_string()),
            ("XDS_SERVER_CERT", XDS_SERVER_CERT.to_owned()),
            ("TRACING_ENABLED", "false".to_owned()),
            ("ACCESSLOG_PATH", String::new()),
            ("BACKEND_INBOUND_PORTS", String::new()),
        ];
        let mut out = TEMPLATE.to_owned();
        for (name, value) in values {
            out = out.replace(&format!("{{{{{name}}}}}"), &value);
        }
        match out.find("{{") {
            Some(at) => Err(TemplateError(out[at..].chars().take(40).collect())),
            None => Ok(out),
        }
    }
}

/// A Traffic Director node id in cloud-run-mesh's `<id>~<ip>` form: the instance id from the
/// metadata server when known (one node per instance, recognisable in TD's console), else a
/// random uuid; the instance IP, else loopback.
pub fn node_id(instance_id: Option<&str>, ip: Option<&str>) -> String {
    let id = instance_id.map(str::to_owned).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map(|u| u.trim().to_owned())
            .unwrap_or_else(|_| format!("{:x}", std::process::id()))
    });
    format!("{id}~{}", ip.unwrap_or("127.0.0.1"))
}

/// Envoy's readiness from its admin stats: LIVE (`server.state: 0`) with workers started.
pub fn readiness(admin_port: u16) -> Probe {
    Probe::new(Check::HttpLines(
        format!(
            "http://127.0.0.1:{admin_port}/stats?filter=^(server.state|listener_manager.workers_started)$"
        ),
        vec![
            "server.state: 0".to_owned(),
            "listener_manager.workers_started: 1".to_owned(),
        ],
    ))
}

/// Envoy as a process the app depends on: runs as the proxy user (uid/gid 1337, the capture
/// exemption of the TD iptables rules) when krun is root.
pub fn envoy_process(
    envoy: &Path,
    bootstrap_path: PathBuf,
    layout: &Layout,
    root: bool,
    budget: std::time::Duration,
) -> ProcessSpec {
    ProcessSpec {
        name: ENVOY_PROCESS.to_owned(),
        command: vec![
            envoy.display().to_string(),
            "--config-path".to_owned(),
            bootstrap_path.display().to_string(),
            "--log-level".to_owned(),
            "info".to_owned(),
            "--allow-unknown-static-fields".to_owned(),
        ],
        env: Default::default(),
        depends_on: Vec::new(),
        readiness: Some(readiness(ENVOY_ADMIN_PORT)),
        restart: RestartPolicy::Never,
        required: true,
        run_as: root.then(|| RunAs {
            uid: Uid::from_raw(PROXY_UID),
            gid: Gid::from_raw(PROXY_GID),
            groups: Vec::new(),
        }),
        cwd: Some(layout.base().to_path_buf()),
        ready_budget: Some(ReadyBudget {
            timeout: budget,
            variable: crate::config::names::KRUN_AGENT_READY_TIMEOUT,
            evidence: Some(config_dump_evidence(layout)),
        }),
        graceful_stop: Some(envoy_graceful_stop()),
    }
}

/// Renders and writes the bootstrap and adds Envoy to `processes`. The project number comes
/// from `MESH`, else the workload's (env, metadata, mesh-env); zone and node id from `inputs`.
pub fn start(
    config: &Config,
    inputs: &AgentInputs,
    workload: &Workload,
    mesh: TdMesh,
    layout: &Layout,
    processes: &mut ProcessPlan,
) -> Result<(), DataPlaneError> {
    let mesh_value = || {
        config
            .mesh
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_default()
    };
    let project_number = mesh
        .project_number
        .or_else(|| workload.project_number.clone())
        .ok_or_else(|| DataPlaneError::TdProjectNumber(mesh_value()))?;
    let bootstrap = TdBootstrap {
        project_number,
        network: mesh.network,
        node_id: inputs.node_id.clone().unwrap_or_else(|| {
            node_id(inputs.instance_id.as_deref(), inputs.instance_ip.as_deref())
        }),
        zone: inputs
            .zone
            .clone()
            .unwrap_or_else(|| DEFAULT_ZONE.to_owned()),
        envoy_port: OUTBOUND_CAPTURE_PORT,
        admin_port: ENVOY_ADMIN_PORT,
    };
    let root = nix::unistd::geteuid().is_root();
    let path = layout.td_bootstrap();
    layout
        .prepare(root)
        .map_err(DataPlaneError::write(config))?;
    write_atomic(&path, bootstrap.render()?.as_bytes(), Access::Public)
        .map_err(|e| DataPlaneError::write(config)(e.into()))?;
    tracing::info!(
        node_id = %bootstrap.node_id, zone = %bootstrap.zone,
        bootstrap = %path.display(), "Traffic Director bootstrap written"
    );
    let envoy = envoy_process(
        &config.launcher.envoy_path.value,
        path,
        layout,
        root,
        config.launcher.agent_ready_timeout.value,
    );
    processes
        .add_app_dependency(envoy)
        .map_err(DataPlaneError::Conflict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(mesh: &str) -> TdMesh {
        TdMesh::parse(mesh).expect("a td locator").expect("valid")
    }

    #[test]
    fn both_mesh_forms_parse() {
        assert_eq!(
            parse("td:projects=123&scopes=edge"),
            TdMesh {
                project_number: Some("123".into()),
                network: "scope:edge".into()
            }
        );
        assert_eq!(parse("td:").network, "scope:default");
        assert_eq!(
            parse("td:project=456&mesh_name=prod"),
            TdMesh {
                project_number: Some("456".into()),
                network: "mesh:prod".into()
            }
        );
        assert_eq!(parse("td:mesh_name=prod").project_number, None);
        assert!(TdMesh::parse("gke://p").is_none());
    }

    #[test]
    fn bad_td_locators_are_named() {
        let err = |m: &str| {
            TdMesh::parse(m)
                .expect("td")
                .expect_err("rejected")
                .to_string()
        };
        assert!(err("td:scopes=a&mesh_name=b").contains("exclude each other"));
        assert!(err("td:project=abc&mesh_name=b").contains("not a numeric project number"));
        assert!(err("td:colour=red").starts_with("MESH=td:colour=red: unknown key \"colour\""));
        assert!(err("td:mesh_name=").contains("mesh_name is empty"));
    }

    #[test]
    fn the_template_renders_every_placeholder_including_the_admin_port() {
        let rendered = TdBootstrap {
            project_number: "123".into(),
            network: "mesh:prod".into(),
            node_id: "abc~10.0.0.1".into(),
            zone: "us-central1-a".into(),
            envoy_port: 15001,
            admin_port: 15999,
        }
        .render()
        .expect("renders");
        assert!(rendered.contains("id: \"projects/123/networks/mesh:prod/nodes/abc~10.0.0.1\""));
        assert!(rendered.contains("zone: \"us-central1-a\""));
        assert!(rendered.contains("port_value: 15999"), "{rendered}");
        assert!(rendered.contains("TRAFFICDIRECTOR_INTERCEPTION_PORT: \"15001\""));
        assert!(!rendered.contains("{{"));
    }

    #[test]
    fn the_stats_url_is_a_valid_uri() {
        let Check::HttpLines(url, _) = readiness(15000).check else {
            panic!("stats check expected");
        };
        url.parse::<hyper::Uri>().expect("valid URI");
        assert!(node_id(None, Some("10.0.0.9")).ends_with("~10.0.0.9"));
        assert_eq!(node_id(Some("4711"), Some("10.0.0.9")), "4711~10.0.0.9");
    }
}
