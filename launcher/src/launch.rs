//! The startup graph, in one place: configuration is already resolved from the environment;
//! discovery fills in what the mesh says, identity mints the certificate, the data plane is
//! chosen and set up, the supervisor starts the app, and the tunnel opens once it is ready.
//! Traffic capture is decided (and iptables installed) before the supervisor starts.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::agent::{AgentInputs, Interception};
use crate::config::{Config, DataPlane, Env, StartupProbe};
use crate::dataplane::MeshSide;
use crate::discovery;
use crate::identity::{self, Identity, IdentityInputs, RotationPolicy, Signer, SpiffeId};
use crate::probe::{Check, Probe};
use crate::processes::ProcessPlan;
use crate::startup::PhaseClock;
use crate::supervisor::{AppSpec, Phase, RunAs, Supervisor, Timeouts};

/// Runs the workload to completion and returns krun's exit code.
pub async fn run(
    mut config: Config,
    env: &Env,
    mut plan: ProcessPlan,
    argv: Vec<String>,
    started: Instant,
) -> anyhow::Result<u8> {
    let mut clock = PhaseClock::new(started);
    clock.mark("config");
    let found = discovery::discover(&config).await?;
    discovery::apply(&mut config, &found)?;
    if found.mesh {
        let value = |s: Option<&crate::config::Setting<String>>| {
            s.map_or("-".to_owned(), |s| format!("{} ({})", s.value, s.source))
        };
        tracing::info!(
            project = %value(config.project_id.as_ref()),
            cluster = %value(config.cluster_name.as_ref()),
            location = %value(config.cluster_location.as_ref()),
            namespace = %value(Some(&config.workload_namespace)),
            trust_domain = %value(config.trust_domain.as_ref()),
            mesh_env_keys = found.mesh_env.len(),
            "mesh discovered"
        );
    }
    clock.mark("discover");
    // Held for the whole run: dropping it stops certificate rotation.
    let identity = start_identity(&config).await?;
    if identity.is_some() {
        clock.mark("identity");
    }
    // Outside a mesh krun is only a supervisor: no rules, no proxy for the app, unless the
    // operator asks for interception explicitly.
    let in_mesh = found.mesh
        || identity.is_some()
        || config.xds_addr.is_some()
        || crate::dataplane::load_workload_cert(&config.mesh_base_dir.value).is_ok();
    let capture_wanted = in_mesh || config.interception_mode.is_some();
    // Before the supervisor: installing the rules waits for iptables-restore itself.
    let capture = if capture_wanted {
        crate::capture::decide(&config)
    } else {
        crate::capture::Capture::off()
    };
    let value = |s: Option<&crate::config::Setting<String>>| s.map(|s| s.value.clone());
    let inputs = AgentInputs {
        mesh_env: found.mesh_env.clone(),
        trust_domain: value(config.trust_domain.as_ref()),
        project_number: value(config.project_number.as_ref()),
        project_id: value(config.project_id.as_ref()),
        cluster_name: value(config.cluster_name.as_ref()),
        cluster_location: value(config.cluster_location.as_ref()),
        interception: capture.interception,
        ..AgentInputs::default()
    };
    let mut dataplane = crate::agent::set_up(&config, &inputs, env, &mut plan)?;
    // Envoy's whitebox proxy variables come from the agent layer; the builtin one's from here.
    let outbound = config.outbound_addr.value;
    if capture_wanted
        && capture.interception == Interception::Whitebox
        && dataplane.mode == DataPlane::Builtin
        && outbound.port() != 0
    {
        for (name, value) in crate::capture::whitebox::proxy_env(outbound) {
            if env.get(name).is_none() {
                dataplane.app_env.insert(name.to_owned(), value);
            }
        }
    }
    let app = (!argv.is_empty()).then(|| app_spec(&config, argv, dataplane.app_env));
    if app.is_none() {
        tracing::info!(
            "no app given: sidecar mode, krun runs only the mesh side and declared processes"
        );
    }
    let timeouts = Timeouts {
        drain: config.drain_timeout.value,
        ready: config.app_ready_timeout.value,
    };
    // The supervisor first: it installs the signal handlers, so a SIGTERM during the rest of
    // startup drains instead of killing krun.
    let mut supervisor = Supervisor::new(plan, app, timeouts, clock)?;
    let drain = CancellationToken::new();
    let minted = identity
        .as_ref()
        .and_then(|id| crate::dataplane::follow_identity(id.store()));
    let mut mesh = MeshSide::start(
        &config,
        dataplane.mode,
        capture.interception,
        minted,
        drain.clone(),
    )
    .await?;
    supervisor.clock().mark("dataplane");
    mesh.open_tunnel_when_ready(&config, supervisor.phase(), supervisor.fail_handle());
    let mut phase = supervisor.phase();
    let stop_listeners = drain.clone();
    tokio::spawn(async move {
        if phase.wait_for(|p| *p == Phase::Draining).await.is_ok() {
            stop_listeners.cancel();
        }
    });
    let reaper = supervisor.reaper();
    let code = supervisor.run().await;
    capture.cleanup(&reaper).await;
    // Open tunnels had the drain budget alongside the app; give them what is left of it.
    mesh.drain(config.drain_timeout.value).await;
    Ok(code)
}

/// The identity phase. Only the local CA (`CA_ADDR=file:///dir`) is wired here: it needs no
/// network. Istio CA and Google CAs need the discovered cluster and a kube client, and start
/// from the same [`Identity::start`] seam with an `IstioCaClient` over a `k8s_token::TokenFile`.
async fn start_identity(config: &Config) -> anyhow::Result<Option<Identity>> {
    let Some(dir) = config
        .ca_addr
        .as_ref()
        .and_then(|ca| identity::local_ca_dir(&ca.value))
    else {
        return Ok(None);
    };
    let ca = identity::local_ca::LocalCa::load(&dir)?;
    let id = workload_identity(config);
    tracing::info!(identity = %id, ca_dir = %dir.display(), "identity: local CA signs in-process (CA_ADDR=file://)");
    let identity = Identity::start(IdentityInputs {
        identity: id,
        signer: Signer::Local(Box::new(ca)),
        base_dir: config.mesh_base_dir.value.clone(),
        policy: RotationPolicy::default(),
        trust_bundle: Vec::new(),
    })
    .await?;
    Ok(Some(identity))
}

/// The SPIFFE identity from TRUST_DOMAIN, WORKLOAD_NAMESPACE and WORKLOAD_SERVICE_ACCOUNT, with
/// Istio's default trust domain (`cluster.local`) when none is known.
fn workload_identity(config: &Config) -> SpiffeId {
    let value = |s: &Option<crate::config::Setting<String>>, default: &str| {
        s.as_ref().map_or(default.to_owned(), |s| s.value.clone())
    };
    SpiffeId::new(
        &value(&config.trust_domain, identity::DEFAULT_TRUST_DOMAIN),
        &config.workload_namespace.value,
        &config.workload_service_account.value,
    )
}

/// How the app is started and when it counts as ready.
fn app_spec(config: &Config, argv: Vec<String>, env: BTreeMap<String, String>) -> AppSpec {
    AppSpec {
        env,
        argv,
        port: config.app_port(),
        run_as: RunAs::resolve(
            config.k8s_uid.as_ref().map(|s| s.value),
            config.k8s_gid.as_ref().map(|s| s.value),
        ),
        readiness: app_readiness(config),
    }
}

/// An explicit startup probe wins; otherwise every declared app port must accept.
fn app_readiness(config: &Config) -> Vec<Probe> {
    let probes: Vec<Probe> = match &config.startup_probe {
        Some((_, probe)) => vec![Probe::new(match &probe.value {
            StartupProbe::Http(url) => Check::Http(url.clone()),
            StartupProbe::Tcp(addr) => Check::Tcp(addr.clone()),
        })],
        None => config
            .app_ready_ports()
            .into_iter()
            .map(|port| Probe::new(Check::Tcp(format!("127.0.0.1:{port}"))))
            .collect(),
    };
    let checks: Vec<String> = probes.iter().map(|p| p.check.to_string()).collect();
    tracing::info!(?checks, "app readiness: all must pass");
    probes
}
