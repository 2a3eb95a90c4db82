//! The startup graph, in one place: configuration is already resolved from the environment;
//! discovery fills in what the mesh says, then the app's readiness and identity are derived
//! and the supervisor takes over. Later phases (identity, capture, data plane, tunnel) plug
//! in here.

use std::time::Instant;

use crate::config::{Config, StartupProbe};
use crate::discovery;
use crate::probe::{Check, Probe};
use crate::processes::ProcessPlan;
use crate::startup::PhaseClock;
use crate::supervisor::{AppSpec, RunAs, Supervisor, Timeouts};

/// Runs the workload to completion and returns krun's exit code.
pub async fn run(
    mut config: Config,
    plan: ProcessPlan,
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
    let app = (!argv.is_empty()).then(|| app_spec(&config, argv));
    if app.is_none() {
        tracing::info!(
            "no app given: sidecar mode, krun runs only the mesh side and declared processes"
        );
    }
    let timeouts = Timeouts {
        drain: config.drain_timeout.value,
        ready: config.app_ready_timeout.value,
    };
    let supervisor = Supervisor::new(plan, app, timeouts, clock)?;
    Ok(supervisor.run().await)
}

/// How the app is started and when it counts as ready.
fn app_spec(config: &Config, argv: Vec<String>) -> AppSpec {
    AppSpec {
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
