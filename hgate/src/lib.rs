//! hgate: the in-cluster gateway. It reads the SNI of mesh mTLS connections without
//! terminating them and tunnels them over HBONE to the right Cloud Run service; it also
//! forwards istiod and publishes `istio-system/mesh-env`. One module per job; [`run`] wires
//! them together.

pub mod admin;
pub mod config;
pub mod default_route;
pub mod gate;
pub mod istiod;
pub mod mesh_env;
pub mod register;
pub mod route;
pub mod run_admin;
pub mod services;

mod run;

pub use run::run;
