//! mesh: what krun (the launcher) and hgate (the gateway) share.
//!
//! - [`allocator`]: the global allocator of krun and hgate (mimalloc, arenas committed lazily);
//! - [`config`]: the settings-table primitives (each value remembering its source, printed
//!   by `--print-config` with secrets redacted) and [`MeshConfig`](config::MeshConfig), the
//!   settings of the mesh side;
//! - [`logging`]: text or JSON logs (Cloud Logging's `severity`);
//! - [`discovery`]: where the mesh is, from the metadata server, GKE, Resource Manager and
//!   the `mesh-env` ConfigMap, and the Kubernetes client of the config cluster;
//! - [`credentials`]: who calls Google APIs (the metadata server's account) and the ID
//!   tokens hgate and krun send to Cloud Run;
//! - [`identity`]: token sources, certificate authorities and the workload certificate;
//! - [`files`]: atomic writes with deliberate modes;
//! - [`backoff`]: the jittered retry pacing of every call and refresh;
//! - [`http`]: the HTTP client of Google APIs and the metadata server;
//! - [`metadata`]: the metadata server's values, access and ID tokens, and the GCP probe;
//! - [`istio`]: Istio's ports and the proxy's uid and gid;
//! - [`rlimit`]: the open-file limit raised to what the connection caps need;
//! - [`metrics`]: the Prometheus metrics (Istio's TCP metrics and the binaries' own);
//! - [`admin`]: the admin endpoint's HTTP plumbing and the paths both binaries serve.
//! - [`xds`]: workload discovery from istiod (delta ADS) and the store it fills.
//!
//! It knows nothing of processes, iptables or the data plane: those are krun's.
//!
//! krun and hgate re-create cloud-run-mesh
//! (<https://github.com/GoogleCloudPlatform/cloud-run-mesh>) with the same environment
//! variables, mesh-env keys, ports and files; comments that name cloud-run-mesh say what that
//! Go implementation did, usually a bug fixed here.

pub mod admin;
pub mod allocator;
pub mod backoff;
pub mod cloud_run;
pub mod config;
pub mod credentials;
pub mod discovery;
pub mod files;
pub mod http;
pub mod identity;
pub mod istio;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod rlimit;
pub mod xds;
