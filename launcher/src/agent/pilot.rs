//! pilot-agent as a supervised process, started as cloud-run-mesh starts it (same command line,
//! directories and pod labels file, so its images can switch to krun): its setup, directories,
//! pod labels file and process spec. Its output is passed through unchanged (stdout and stderr
//! inherited): pilot-agent and Envoy already write their own structured lines, and a prefix
//! would break Cloud Logging's parsing of them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nix::unistd::{Gid, Uid};

use super::env::{AgentSetup, grpc_bootstrap_path};
use super::layout::Layout;
use super::xds::is_istiod;
use super::{
    AGENT_READY_URL, AgentInputs, DataPlaneError, Interception, Workload, config_dump_evidence,
    envoy_graceful_stop,
};
use crate::config::{Config, names};
use crate::probe::{Check, Probe};
use crate::processes::{
    ProcessPlan, ProcessSpec, ReadyBudget, RestartPolicy, RunAs, is_executable,
};
use mesh::config::Env;
use mesh::files::{Access, write_atomic};
use mesh::istio::{PROXY_GID, PROXY_UID};

/// Process name in logs and messages.
pub const AGENT_PROCESS: &str = "pilot-agent";
/// Envoy's bootstrap template in the proxyv2 image.
pub const ENVOY_TEMPLATE: &str = "var/lib/istio/envoy/envoy_bootstrap_tmpl.json";

/// Resolves how the agent runs. `root` is whether krun runs as root.
pub fn setup(
    config: &Config,
    inputs: &AgentInputs,
    workload: Workload,
    xds: String,
    root: bool,
) -> std::io::Result<AgentSetup> {
    let layout = Layout::new(&config.mesh_base_dir.value)?;
    let forced_whitebox = !root
        || workload.gateway.is_some()
        || config
            .launcher
            .interception_mode
            .as_ref()
            .is_some_and(|m| m.value.eq_ignore_ascii_case("NONE"));
    let interception = if forced_whitebox {
        Interception::Whitebox
    } else {
        inputs.interception
    };
    let envoy_template = is_executable(&config.launcher.envoy_path.value)
        .then(|| {
            [
                layout.base().join(ENVOY_TEMPLATE),
                Path::new("/").join(ENVOY_TEMPLATE),
            ]
            .into_iter()
            .find(|p| p.is_file())
        })
        .flatten();
    let envoy_binary = (envoy_template.is_some()
        && config.launcher.envoy_path.value != Path::new(crate::config::DEFAULT_ENVOY_PATH))
    .then(|| config.launcher.envoy_path.value.clone());
    let grpc_bootstrap = grpc_bootstrap_path(
        config
            .launcher
            .grpc_xds_bootstrap
            .as_ref()
            .map(|s| s.value.as_str()),
        &layout,
    )?;
    Ok(AgentSetup {
        workload,
        xds,
        user_proxy_config: config.proxy_config.is_some(),
        layout,
        grpc_bootstrap,
        root,
        interception,
        workload_cert: inputs.workload_cert,
        envoy_template,
        envoy_binary,
        xds_agent_debug: config
            .launcher
            .xds_agent_debug
            .as_ref()
            .map(|s| s.value.clone()),
        envoy_log_level: config
            .launcher
            .envoy_log_level
            .as_ref()
            .map(|s| s.value.clone()),
        instance_ip: inputs.instance_ip.clone(),
        istiod_root: inputs
            .mesh_env
            .get("CAROOT_ISTIOD")
            .filter(|pem| !pem.trim().is_empty())
            .cloned(),
    })
}

/// The pod labels file (`key="value"` lines) pilot-agent reports to istiod.
pub fn labels(workload: &Workload) -> String {
    let mut lines = vec![
        format!("version={:?}", workload.revision),
        "security.istio.io/tlsMode=\"istio\"".to_owned(),
    ];
    match &workload.gateway {
        Some(gateway) => lines.push(format!("istio={gateway:?}")),
        None => lines.extend([
            format!("app={:?}", workload.name),
            format!("service.istio.io/canonical-name={:?}", workload.name),
            format!(
                "service.istio.io/canonical-revision={:?}",
                workload.revision
            ),
            "environment=\"cloud-run-mesh\"".to_owned(),
        ]),
    }
    lines.join("\n") + "\n"
}

/// Creates the agent's directories and writes the pod labels file and istiod's root.
pub fn prepare(setup: &AgentSetup) -> std::io::Result<()> {
    setup.layout.prepare(setup.root)?;
    if let Some(pem) = &setup.istiod_root {
        write_atomic(&setup.layout.istiod_root(), pem.as_bytes(), Access::Public)?;
    }
    write_atomic(
        &setup.layout.pod_labels(),
        labels(&setup.workload).as_bytes(),
        Access::Public,
    )
    .map_err(Into::into)
}

/// pilot-agent verifies istiod (XDS and CA on 15012) with the root at
/// `var/run/secrets/istio/root-cert.pem` unless told to use system roots or another file; it
/// exits when the file is missing, so krun refuses to start it without one.
fn check_istiod_root(setup: &AgentSetup, env: &Env) -> Result<(), DataPlaneError> {
    let other_roots = env.get("XDS_ROOT_CA").is_some()
        || env
            .get("PILOT_CERT_PROVIDER")
            .is_some_and(|p| p.eq_ignore_ascii_case("system"));
    if is_istiod(&setup.xds) && !other_roots && setup.istiod_root.is_none() {
        return Err(DataPlaneError::IstiodRoot(setup.xds.clone()));
    }
    Ok(())
}

/// pilot-agent as a required process the app depends on: uid 1337 / gid 1337 when root, as
/// Istio runs it (the owner rules exempt its traffic from capture, and the uid rule sends
/// Envoy's calls to its own IP back inbound), working directory the layout's base, ready when
/// `127.0.0.1:15021/healthz/ready` answers; Envoy's `config_dump` is saved if it never is.
/// In the drain, Envoy's listeners are drained before pilot-agent gets SIGTERM.
pub fn process(setup: &AgentSetup, pilot_agent: &Path, env: &Env, budget: Duration) -> ProcessSpec {
    ProcessSpec {
        name: AGENT_PROCESS.to_owned(),
        command: setup.argv(pilot_agent),
        env: setup.agent_env(env),
        depends_on: Vec::new(),
        readiness: Some(Probe::new(Check::Http(AGENT_READY_URL.to_owned()))),
        restart: RestartPolicy::Never,
        required: true,
        run_as: setup.root.then(|| RunAs {
            uid: Uid::from_raw(PROXY_UID),
            gid: Gid::from_raw(PROXY_GID),
            groups: Vec::new(),
        }),
        cwd: Some(setup.layout.base().to_path_buf()),
        ready_budget: Some(ReadyBudget {
            timeout: budget,
            variable: names::KRUN_AGENT_READY_TIMEOUT,
            evidence: Some(config_dump_evidence(&setup.layout)),
        }),
        // Without Envoy (grpc-agent) there is nothing to drain: SIGTERM at once.
        graceful_stop: setup.envoy_template.is_some().then(envoy_graceful_stop),
    }
}

/// Prepares pilot-agent's files, adds it to `processes` and returns the app's additions.
pub fn start(
    config: &Config,
    inputs: &AgentInputs,
    env: &Env,
    workload: Workload,
    xds: String,
    processes: &mut ProcessPlan,
) -> Result<BTreeMap<String, String>, DataPlaneError> {
    let root = nix::unistd::geteuid().is_root();
    let setup =
        setup(config, inputs, workload, xds, root).map_err(DataPlaneError::write(config))?;
    check_istiod_root(&setup, env)?;
    prepare(&setup).map_err(DataPlaneError::write(config))?;
    let pilot_agent = &config.launcher.pilot_agent_path.value;
    tracing::info!(
        command = ?setup.argv(pilot_agent),
        interception = ?setup.interception,
        grpc_bootstrap = %setup.grpc_bootstrap.display(),
        envoy = setup.envoy_template.is_some(),
        "pilot-agent prepared; the app starts once it is ready"
    );
    let budget = config.launcher.agent_ready_timeout.value;
    processes
        .add_app_dependency(process(&setup, pilot_agent, env, budget))
        .map_err(DataPlaneError::Conflict)?;
    // Envoy's HTTP proxy on 15007 exists only with Envoy and without capture.
    let http_proxy = setup.interception == Interception::Whitebox && setup.envoy_template.is_some();
    Ok(super::env::app_env(env, &setup.grpc_bootstrap, http_proxy))
}
