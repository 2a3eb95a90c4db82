//! The `krun` binary: parses the command line, resolves the configuration and hands over to
//! [`krun::launch::run`].

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use krun::config::Config;
use krun::processes::ProcessPlan;
use mesh::config::Env;

/// mimalloc with lazily committed arenas: see [`mesh::allocator`] for why.
#[global_allocator]
static ALLOCATOR: mesh::allocator::Allocator = mesh::allocator::Allocator;

/// Mesh launcher and PID-1 supervisor: runs APP inside an Istio mesh.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = AFTER_HELP)]
struct Cli {
    /// Print the resolved configuration as JSON (each value with its source) and exit.
    #[arg(long)]
    print_config: bool,
    /// With --print-config: resolve from the environment only, with no network calls.
    #[arg(long, requires = "print_config")]
    offline: bool,
    /// The app and its arguments; none means sidecar mode.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "APP [ARGS]..."
    )]
    app: Vec<String>,
}

/// What `--help` adds below the options: the `--` form, the settings most deployments set,
/// and where the full reference is, so a new user does not have to find the repository first.
const AFTER_HELP: &str = "\
Usage forms:
  krun [OPTIONS] -- APP [ARGS]...   run APP (a leading `--` keeps APP's own flags from krun)
  krun                              sidecar mode: the mesh side only, no app

Main settings (environment variables):
  MESH                      where the mesh is: gke://PROJECT/LOCATION/CLUSTER, td:..., file://...
  XDS_ADDR, CA_ADDR         istiod's XDS and CA addresses (found from MESH when unset)
  WORKLOAD_NAMESPACE        the Kubernetes namespace the workload belongs to
  PORT_http                 the app's port (default 8080; Cloud Run sets PORT)
  KRUN_DATAPLANE            auto, envoy, builtin or none
  KRUN_PROCESSES            YAML file: extra processes, app hooks, files
  KRUN_DRAIN_TIMEOUT        drain budget after SIGTERM (default 8s)
  KRUN_LOG_FORMAT           text or json

Every setting, with its default: docs/configuration.md in the krun repository
(`krun --print-config --offline` shows the values krun would use).";

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    match run(cli, started) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: what failed, the input at fault, what to do.
            eprintln!("krun: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli, started: Instant) -> anyhow::Result<u8> {
    let env = Env::from_process();
    let config = Config::from_env(&env)?;
    mesh::logging::init(config.log_format.value, config.mesh_debug.value);
    for name in &config.unknown_vars {
        tracing::warn!(variable = %name, "unknown KRUN_ variable ignored; check its spelling against docs/configuration.md");
    }
    let plan = match &config.launcher.processes {
        Some(path) => ProcessPlan::load(&path.value)?,
        None => ProcessPlan::default(),
    };
    let runtime = runtime(config.launcher.worker_threads.value)?;
    let result = if cli.print_config {
        print_config(&runtime, config, cli.offline)
    } else {
        // Every connection is a file descriptor: the caps (KRUN_MAX_CONNECTIONS per
        // listener), not EMFILE, must be what bounds the listeners.
        mesh::rlimit::raise_open_files();
        runtime.block_on(krun::launch::run(config, &env, plan, cli.app, started))
    };
    // Everything that matters is done (children reaped, output written). Do not wait for a
    // leftover blocking lookup, such as the losing side of the "on GCP?" DNS race.
    runtime.shutdown_background();
    result
}

/// The async runtime everything runs on (`KRUN_WORKER_THREADS`). With one thread, the default,
/// it is the main thread itself: no worker to start at every launch, and a tunnel's TLS/HTTP/2
/// task wakes its copy task without a cross-thread wake-up. More threads get a work-stealing
/// runtime.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

/// `--print-config`: the configuration after read-only discovery (GETs to metadata, GKE and
/// mesh-env; nothing written, nothing started), or from the environment only with `--offline`.
fn print_config(
    runtime: &tokio::runtime::Runtime,
    mut config: Config,
    offline: bool,
) -> anyhow::Result<u8> {
    let mut mesh_env = Default::default();
    if !offline {
        let found = runtime.block_on(mesh::discovery::discover(&config))?;
        mesh::discovery::apply(&mut config, &found)?;
        mesh_env = found.mesh_env;
    }
    mesh::config::print_json(&krun::agent::explain::render(&config, &mesh_env))?;
    Ok(0)
}
