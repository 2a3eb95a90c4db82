//! HBONE: HTTP/2 CONNECT tunnels (Istio's HBONE,
//! <https://istio.io/latest/docs/ambient/architecture/hbone/>) and the `POST /_hbone/<target>`
//! form of cloud-run-mesh (<https://github.com/GoogleCloudPlatform/cloud-run-mesh>), which
//! Cloud Run's front end carries, server and client, over mTLS with SPIFFE identities or over
//! h2c.
//!
//! This crate speaks the protocol and knows nothing of GCP or Kubernetes: where a tunnel may
//! go is decided by the embedder's [`server::Router`].

pub mod authorize;
pub mod client;
pub mod copy;
pub mod dial;
pub mod identity;
pub mod idle;
pub mod listen;
pub mod lru;
pub mod metrics;
pub mod once;
pub mod pool;
pub mod post;
pub mod server;
pub mod settings;
pub mod sni;
pub mod tls;

pub use identity::{AllowedPeers, SpiffeId};
pub use settings::H2Settings;
