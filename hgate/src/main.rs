//! The `hgate` binary: parses the CLI and the environment, then hands over to [`hgate::run`].

use clap::Parser;
use hgate::config::HgateConfig;
use mesh::config::Env;

/// mimalloc with lazily committed arenas: see [`mesh::allocator`] for why.
#[global_allocator]
static ALLOCATOR: mesh::allocator::Allocator = mesh::allocator::Allocator;

/// SNI gateway from the Istio mesh to Cloud Run over HBONE.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Print the effective configuration as JSON (value and source per variable) and exit.
    /// The default route's project number and region are resolved first (read-only metadata
    /// requests) unless --offline.
    #[arg(long)]
    print_config: bool,
    /// With --print-config: the environment only, no metadata requests.
    #[arg(long, requires = "print_config")]
    offline: bool,
}

fn main() {
    let cli = Cli::parse();
    let mut config = match HgateConfig::from_env(&Env::from_process()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("hgate: {e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hgate: start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if cli.print_config {
        if !cli.offline
            && let Err(e) = runtime.block_on(hgate::default_route::resolve(&mut config))
        {
            eprintln!("hgate: {e}");
        }
        if let Err(e) = mesh::config::print_json(&config.printable()) {
            eprintln!("hgate: print config: {e}");
            std::process::exit(1);
        }
        runtime.shutdown_background();
        return;
    }
    mesh::logging::init(config.log_format.value, config.mesh_debug.value);
    // Every connection is a file descriptor: the cap (HGATE_MAX_CONNECTIONS), not EMFILE,
    // must be what bounds the listeners.
    mesh::rlimit::raise_open_files();
    if let Err(e) = runtime.block_on(hgate::run(config)) {
        tracing::error!(error = format!("{e:#}"), "hgate stopped");
        std::process::exit(1);
    }
}
