//! hgate: the in-cluster gateway. It reads the SNI of mesh mTLS connections without
//! terminating them and tunnels them over HBONE to the right Cloud Run service.

use clap::Parser;

/// SNI gateway from the Istio mesh to Cloud Run over HBONE.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {}

fn main() {
    Cli::parse();
    eprintln!("hgate: the gateway is not implemented yet; see the hgate issue");
    std::process::exit(2);
}
