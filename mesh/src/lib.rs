//! mesh: what krun (the launcher) and hgate (the gateway) share.
//!
//! - [`config`]: typed settings, each value remembering its source, printed by
//!   `--print-config` with secrets redacted;
//! - [`logging`]: text or JSON logs (Cloud Logging's `severity`);
//! - [`discovery`]: the metadata server, GKE, Resource Manager and the `mesh-env` ConfigMap,
//!   and the Kubernetes client;
//! - [`identity`]: token sources, certificate authorities and the workload certificate;
//! - [`files`]: atomic writes with deliberate modes;
//! - [`backoff`]: the jittered retry pacing of every call and refresh;
//! - [`http`]: the HTTP client of Google APIs and the metadata server;
//! - [`metadata`]: the metadata server's values, access and ID tokens, and the GCP probe.
//!
//! It knows nothing of processes, iptables or the data plane: those are krun's.

pub mod backoff;
pub mod config;
pub mod discovery;
pub mod files;
pub mod http;
pub mod identity;
pub mod istio;
pub mod logging;
pub mod metadata;
