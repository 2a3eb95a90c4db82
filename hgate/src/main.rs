//! The `hgate` binary: parses the CLI and the environment, then hands over to [`hgate::run`].

use clap::Parser;
use hgate::config::HgateConfig;
use mesh::config::Env;

/// mimalloc instead of glibc's malloc. The tunnel data path allocates and frees buffers of
/// 16 KiB to 1 MiB per TLS record and HTTP/2 frame; glibc returns such blocks to the kernel
/// (`madvise`, `munmap`) and faults them in again on the next read, which measured as
/// hundreds of thousands of page faults per GB on the HBONE server. mimalloc keeps them in
/// per-thread heaps (ztunnel links jemalloc for the same reason); it builds from one C file.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        match serde_json::to_string_pretty(&config.printable()) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("hgate: print config: {e}");
                std::process::exit(1);
            }
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
