//! krun's configuration: every setting in one typed place, each value remembering where it
//! came from.
//!
//! Parsing is a pure function of an environment map ([`Config::from_env`]), so tests pass a
//! `HashMap` instead of mutating the process environment. Later layers (mesh-env, metadata,
//! discovery) fill in values that the environment left unset; the environment always wins.
//! [`Config::merge`] adds such a [`Layer`] and resolves again, so every setting, including
//! `PORT_*`, is parsed by the same code whichever layer it came from.

mod redact;
pub mod values;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

pub use redact::{REDACTED, is_secret, redact};

/// Env var names, in the order of design.md. Constants so a typo is a compile error.
pub mod names {
    #![allow(missing_docs)]
    pub const MESH: &str = "MESH";
    pub const WORKLOAD_NAMESPACE: &str = "WORKLOAD_NAMESPACE";
    pub const WORKLOAD_NAME: &str = "WORKLOAD_NAME";
    pub const WORKLOAD_SERVICE_ACCOUNT: &str = "WORKLOAD_SERVICE_ACCOUNT";
    pub const K_SERVICE: &str = "K_SERVICE";
    pub const K_REVISION: &str = "K_REVISION";
    pub const CLOUD_RUN_JOB: &str = "CLOUD_RUN_JOB";
    pub const PROJECT_ID: &str = "PROJECT_ID";
    pub const PROJECT_NUMBER: &str = "PROJECT_NUMBER";
    pub const CLUSTER_NAME: &str = "CLUSTER_NAME";
    pub const CLUSTER_LOCATION: &str = "CLUSTER_LOCATION";
    pub const XDS_ADDR: &str = "XDS_ADDR";
    pub const MESH_TENANT: &str = "MESH_TENANT";
    pub const TRUST_DOMAIN: &str = "TRUST_DOMAIN";
    pub const PROXY_CONFIG: &str = "PROXY_CONFIG";
    pub const CA_ADDR: &str = "CA_ADDR";
    pub const CA_POOL: &str = "CA_POOL";
    pub const OSS_ISTIO: &str = "OSS_ISTIO";
    pub const OUTBOUND_IP_RANGES_INCLUDE: &str = "OUTBOUND_IP_RANGES_INCLUDE";
    pub const OUTBOUND_PORTS_EXCLUDE: &str = "OUTBOUND_PORTS_EXCLUDE";
    pub const ISTIO_META_INTERCEPTION_MODE: &str = "ISTIO_META_INTERCEPTION_MODE";
    pub const PORT_PREFIX: &str = "PORT_";
    pub const PORT_HTTP: &str = "PORT_http";
    pub const K8S_UID: &str = "K8S_UID";
    pub const K8S_GID: &str = "K8S_GID";
    pub const GRPC_XDS_BOOTSTRAP: &str = "GRPC_XDS_BOOTSTRAP";
    pub const MESH_DEBUG: &str = "MESH_DEBUG";
    pub const XDS_AGENT_DEBUG: &str = "XDS_AGENT_DEBUG";
    pub const ENVOY_LOG_LEVEL: &str = "ENVOY_LOG_LEVEL";
    pub const GATEWAY_NAME: &str = "GATEWAY_NAME";
    pub const MESH_BASE_DIR: &str = "MESH_BASE_DIR";
    pub const KUBECONFIG: &str = "KUBECONFIG";
    pub const KUBERNETES_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
    pub const GCE_METADATA_HOST: &str = "GCE_METADATA_HOST";
    pub const CONTAINER_API_ENDPOINT: &str = "CONTAINER_API_ENDPOINT";
    pub const STS_ENDPOINT: &str = "STS_ENDPOINT";
    pub const IAM_CREDENTIALS_ENDPOINT: &str = "IAM_CREDENTIALS_ENDPOINT";
    pub const RESOURCE_MANAGER_ENDPOINT: &str = "RESOURCE_MANAGER_ENDPOINT";
    pub const STARTUP_PROBE_HTTP: &str = "startupProbe.http";
    pub const STARTUP_PROBE_TCP: &str = "startupProbe.tcp";
    pub const KRUN_PREFIX: &str = "KRUN_";
    pub const KRUN_STARTUP_PROBE: &str = "KRUN_STARTUP_PROBE";
    pub const KRUN_TUNNEL_PORT: &str = "KRUN_TUNNEL_PORT";
    pub const KRUN_HBONE_PORT: &str = "KRUN_HBONE_PORT";
    pub const KRUN_DATAPLANE: &str = "KRUN_DATAPLANE";
    pub const KRUN_DRAIN_TIMEOUT: &str = "KRUN_DRAIN_TIMEOUT";
    pub const KRUN_ADMIN_ADDR: &str = "KRUN_ADMIN_ADDR";
    pub const KRUN_ALLOWED_PRINCIPALS: &str = "KRUN_ALLOWED_PRINCIPALS";
    pub const KRUN_LOG_FORMAT: &str = "KRUN_LOG_FORMAT";
    pub const KRUN_PROCESSES: &str = "KRUN_PROCESSES";
    pub const KRUN_APP_READY_TIMEOUT: &str = "KRUN_APP_READY_TIMEOUT";
    pub const KRUN_AGENT_READY_TIMEOUT: &str = "KRUN_AGENT_READY_TIMEOUT";
    pub const KRUN_PILOT_AGENT_PATH: &str = "KRUN_PILOT_AGENT_PATH";
    pub const KRUN_ENVOY_PATH: &str = "KRUN_ENVOY_PATH";
    pub const KRUN_FORWARD: &str = "KRUN_FORWARD";
    pub const KRUN_PUBLIC_HTTP: &str = "KRUN_PUBLIC_HTTP";
    pub const KRUN_OUTBOUND_ADDR: &str = "KRUN_OUTBOUND_ADDR";
    pub const KRUN_HBONE_PEER_PORT: &str = "KRUN_HBONE_PEER_PORT";
    pub const KRUN_CAPTURE_ADDR: &str = "KRUN_CAPTURE_ADDR";
    pub const KRUN_CAPTURE_DNS: &str = "KRUN_CAPTURE_DNS";
    pub const KRUN_CAPTURE_CLEANUP: &str = "KRUN_CAPTURE_CLEANUP";
    pub const KRUN_CAPTURE_INBOUND_PORTS: &str = "KRUN_CAPTURE_INBOUND_PORTS";
    pub const KRUN_METADATA_TIMEOUT: &str = "KRUN_METADATA_TIMEOUT";
    pub const KRUN_METADATA_PROBE_TIMEOUT: &str = "KRUN_METADATA_PROBE_TIMEOUT";
    pub const KRUN_DISCOVERY_TIMEOUT: &str = "KRUN_DISCOVERY_TIMEOUT";
}
use names::*;

/// Default app port (`PORT_http`): Cloud Run's default container port.
pub const DEFAULT_APP_PORT: u16 = 8080;
/// Default tunnel port: the Cloud Run container port of a meshed service.
pub const DEFAULT_TUNNEL_PORT: u16 = 15009;
/// Default Istio HBONE port.
pub const DEFAULT_HBONE_PORT: u16 = 15008;
/// Default drain budget: inside Cloud Run's 10 s between SIGTERM and SIGKILL.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(8);
/// Default app readiness budget: Cloud Run's 240 s startup window.
pub const DEFAULT_APP_READY_TIMEOUT: Duration = Duration::from_secs(240);
/// Default mesh agent (pilot-agent or Envoy) readiness budget: generous, because the first
/// XDS push of a large mesh over a cold connection can take minutes (the reference's fatal
/// 10 s broke such starts, peers-and-users.md §7.1).
pub const DEFAULT_AGENT_READY_TIMEOUT: Duration = Duration::from_secs(240);
/// Default admin listener: loopback only, on a port Istio does not use.
pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15030));
/// Default outbound HTTP CONNECT proxy of the builtin data plane (the whitebox proxy port).
pub const DEFAULT_OUTBOUND_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15007));
/// Default outbound capture listener: iptables REDIRECT of locally generated traffic lands
/// on 127.0.0.1, so loopback is enough and nothing outside the container can reach it.
pub const DEFAULT_CAPTURE_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001));
/// Default path of pilot-agent in the golden image.
pub const DEFAULT_PILOT_AGENT_PATH: &str = "/usr/local/bin/pilot-agent";
/// Default path of Envoy in the golden image.
pub const DEFAULT_ENVOY_PATH: &str = "/usr/local/bin/envoy";
/// Default outbound capture range (the reference's).
pub const DEFAULT_OUTBOUND_IP_RANGES: &str = "10.0.0.0/8";
/// Default metadata server: the link-local IP, so no DNS lookup is needed.
pub const DEFAULT_METADATA_HOST: &str = "169.254.169.254";
/// Default per-attempt budget of a metadata server request (connect and response); the Google
/// client libraries use about 2 s.
pub const DEFAULT_METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// Default budget of the "are we on GCP" probe when `GCE_METADATA_HOST` is not set: a real
/// metadata server answers in milliseconds, and a laptop must not stall on the link-local IP.
pub const DEFAULT_METADATA_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default budget of the whole discovery phase (metadata, GKE, mesh-env), retries included.
pub const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default Google API endpoints; each can be overridden for private endpoints and tests.
pub const DEFAULT_CONTAINER_API: &str = "https://container.googleapis.com";
#[allow(missing_docs)]
pub const DEFAULT_STS: &str = "https://sts.googleapis.com";
#[allow(missing_docs)]
pub const DEFAULT_IAM_CREDENTIALS: &str = "https://iamcredentials.googleapis.com";
#[allow(missing_docs)]
pub const DEFAULT_RESOURCE_MANAGER: &str = "https://cloudresourcemanager.googleapis.com";

/// Where a value came from, shown by `--print-config` so an operator can tell why krun did
/// what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The process environment.
    Env,
    /// The `istio-system/mesh-env` ConfigMap (or a `MESH=file://` map).
    MeshEnv,
    /// The GCE/Cloud Run metadata server.
    Metadata,
    /// A GCP or Kubernetes API lookup (cluster, project labels).
    Discovered,
    /// Computed from other settings.
    Derived,
    /// Built-in default.
    Default,
}

impl std::fmt::Display for Source {
    /// The name `--print-config` uses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Env => "env",
            Source::MeshEnv => "mesh-env",
            Source::Metadata => "metadata",
            Source::Discovered => "discovered",
            Source::Derived => "derived",
            Source::Default => "default",
        })
    }
}

/// A value and its source.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting<T> {
    /// The effective value.
    pub value: T,
    /// Where it came from.
    pub source: Source,
}

impl<T> Setting<T> {
    /// A value with its source.
    pub fn new(value: T, source: Source) -> Self {
        Setting { value, source }
    }
}

/// A bad setting: the one-line message names the variable, the value and the accepted form.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse.
    #[error("{name}={value}: expected {expected}")]
    Invalid {
        /// The variable.
        name: String,
        /// The value as given (redacted when secret).
        value: String,
        /// The accepted form.
        expected: String,
    },
}

impl ConfigError {
    /// The error for `name=value` (redacted when secret) not being of the `expected` form.
    pub fn invalid(name: &str, value: &str, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            name: name.to_owned(),
            value: redact(name, value).to_owned(),
            expected: expected.into(),
        }
    }
}

/// Which data plane serves the mesh side of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPlane {
    /// Envoy when pilot-agent is installed and an XDS address is known, builtin otherwise.
    Auto,
    /// pilot-agent and Envoy.
    Envoy,
    /// krun's own L4 data plane.
    Builtin,
    /// App and tunnel only.
    None,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line with Cloud Logging's `severity` field.
    Json,
    /// Human-readable lines.
    Text,
}

/// Where a `PORT_<name>` points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortTarget {
    /// A port of the app on loopback (`PORT_http=8080` means `127.0.0.1:8080`).
    Local(u16),
    /// Any `host:port` (a helper process, another container).
    Remote(String),
    /// `-`: declared but neither waited for nor tunnelled.
    Disabled,
}

impl PortTarget {
    fn parse(raw: &str) -> Result<Self, &'static str> {
        const FORM: &str = "a port number, host:port, or - to disable";
        let raw = raw.trim();
        if raw == "-" {
            return Ok(PortTarget::Disabled);
        }
        if let Ok(port) = raw.parse::<u16>() {
            return Ok(PortTarget::Local(port));
        }
        match raw.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(PortTarget::Remote(raw.to_owned()))
            }
            _ => Err(FORM),
        }
    }

    fn printable(&self) -> Value {
        match self {
            PortTarget::Local(port) => json!(port),
            PortTarget::Remote(addr) => json!(addr),
            PortTarget::Disabled => json!("-"),
        }
    }
}

/// How krun decides the app is ready, when the app's ports are not the right signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartupProbe {
    /// HTTP GET; 200-399 is ready (Cloud Run's rule).
    Http(String),
    /// TCP connect to `host:port`.
    Tcp(String),
}

impl StartupProbe {
    const FORM: &str = "http://HOST:PORT/PATH or tcp://HOST:PORT";

    fn parse_url(raw: &str) -> Result<Self, &'static str> {
        let raw = raw.trim();
        if raw.starts_with("http://") {
            Ok(StartupProbe::Http(raw.to_owned()))
        } else if let Some(addr) = raw.strip_prefix("tcp://") {
            Self::parse_tcp(addr)
        } else {
            Err(Self::FORM)
        }
    }

    fn parse_tcp(addr: &str) -> Result<Self, &'static str> {
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(StartupProbe::Tcp(addr.to_owned()))
            }
            _ => Err("host:port"),
        }
    }

    fn printable(&self) -> String {
        match self {
            StartupProbe::Http(url) => url.clone(),
            StartupProbe::Tcp(addr) => format!("tcp://{addr}"),
        }
    }
}

/// A comma-separated port list (`OUTBOUND_PORTS_EXCLUDE`, `KRUN_CAPTURE_INBOUND_PORTS`).
fn port_list(v: &str) -> Result<Vec<u16>, &'static str> {
    values::list(v)
        .iter()
        .map(|p| values::port(p))
        .collect::<Result<_, _>>()
        .map_err(|_| "a comma-separated list of port numbers")
}

/// A localhost port forward for clients that cannot use `HTTP_PROXY` (whitebox mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// Where krun listens, e.g. `127.0.0.1:5432`.
    pub listen: SocketAddr,
    /// The mesh destination, e.g. `db.prod.svc.cluster.local:5432`.
    pub target: String,
}

impl Forward {
    const FORM: &str = "a comma-separated list of LISTEN=HOST:PORT, e.g. 127.0.0.1:5432=db.prod.svc.cluster.local:5432";

    fn parse_list(raw: &str) -> Result<Vec<Forward>, &'static str> {
        values::list(raw)
            .iter()
            .map(|item| {
                let (listen, target) = item.split_once('=').ok_or(Self::FORM)?;
                let listen = listen
                    .trim()
                    .parse::<SocketAddr>()
                    .map_err(|_| Self::FORM)?;
                let target = target.trim();
                match target.rsplit_once(':') {
                    Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                        Ok(Forward {
                            listen,
                            target: target.to_owned(),
                        })
                    }
                    _ => Err(Self::FORM),
                }
            })
            .collect()
    }
}

/// The environment krun reads. Empty values count as unset, as in the reference.
#[derive(Clone, Debug, Default)]
pub struct Env(HashMap<String, String>);

impl Env {
    /// Captures the process environment; variables that are not UTF-8 are skipped.
    pub fn from_process() -> Self {
        Env(std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect())
    }

    /// The value of `name`, or `None` when unset or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Env {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Env(iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect())
    }
}

/// Values of lower precedence than the environment (mesh-env, metadata, discovery), each with
/// its own source. Empty values count as unset, as in the environment.
#[derive(Clone, Default, PartialEq)]
pub struct Layer(BTreeMap<String, Setting<String>>);

impl Layer {
    /// A layer whose values all come from `source` (e.g. the mesh-env map).
    pub fn from_map<'a>(
        source: Source,
        map: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        Layer(
            map.into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.clone(), Setting::new(v.clone(), source)))
                .collect(),
        )
    }

    /// Sets `name` unless this layer already has it: the first value set wins, so callers
    /// write a precedence chain in order.
    pub fn set_if_unset(&mut self, name: &str, value: impl Into<String>, source: Source) {
        let value = value.into();
        if !value.is_empty() {
            self.0
                .entry(name.to_owned())
                .or_insert(Setting::new(value, source));
        }
    }

    /// The value of `name` in this layer.
    pub fn get(&self, name: &str) -> Option<&Setting<String>> {
        self.0.get(name)
    }
}

/// Names only: layer values may be secrets (mesh-env carries CA roots, debug flags).
impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What a [`Config`] is resolved from: the environment first, then each layer in order.
#[derive(Clone, Default)]
struct Inputs {
    env: Env,
    layers: Vec<Layer>,
}

/// Names only, so a debug print of the config never dumps the environment.
impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("env", &self.env.0.keys().collect::<Vec<_>>())
            .field("layers", &self.layers)
            .finish()
    }
}

impl Inputs {
    fn lookup(&self, name: &str) -> Option<(&str, Source)> {
        self.env.get(name).map(|v| (v, Source::Env)).or_else(|| {
            self.layers
                .iter()
                .find_map(|l| l.get(name).map(|s| (s.value.as_str(), s.source)))
        })
    }

    /// Every name set anywhere, with the value and source that win.
    fn iter(&self) -> impl Iterator<Item = (&str, &str, Source)> {
        let mut names: Vec<&str> = self.env.iter().map(|(k, _)| k).collect();
        for layer in &self.layers {
            names.extend(layer.0.keys().map(String::as_str));
        }
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .filter_map(|name| self.lookup(name).map(|(v, source)| (name, v, source)))
    }

    fn string(&self, name: &str) -> Option<Setting<String>> {
        self.lookup(name)
            .map(|(v, source)| Setting::new(v.to_owned(), source))
    }

    fn string_or(&self, name: &str, default: &str) -> Setting<String> {
        self.string(name)
            .unwrap_or_else(|| Setting::new(default.to_owned(), Source::Default))
    }

    fn parsed<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, &'static str>,
    ) -> Result<Option<Setting<T>>, ConfigError> {
        self.lookup(name)
            .map(|(raw, source)| {
                parse(raw)
                    .map(|v| Setting::new(v, source))
                    .map_err(|form| ConfigError::invalid(name, raw, form))
            })
            .transpose()
    }

    fn parsed_or<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, &'static str>,
        default: T,
    ) -> Result<Setting<T>, ConfigError> {
        Ok(self
            .parsed(name, parse)?
            .unwrap_or(Setting::new(default, Source::Default)))
    }
}

/// Everything krun is configured with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Mesh locator (`gke://`, `//container.googleapis.com/...`, `td:`, `file://`).
    pub mesh: Option<Setting<String>>,
    /// K8s namespace of the workload: env, metadata (GSA `k8s-<ns>@`), project label, the
    /// project id rule, then `default`.
    pub workload_namespace: Setting<String>,
    /// Canonical service name.
    pub workload_name: Option<Setting<String>>,
    /// KSA whose token and identity the workload uses.
    pub workload_service_account: Setting<String>,
    /// Cloud Run service.
    pub k_service: Option<Setting<String>>,
    /// Cloud Run revision.
    pub k_revision: Option<Setting<String>>,
    /// Config (cluster) project id.
    pub project_id: Option<Setting<String>>,
    /// Project number.
    pub project_number: Option<Setting<String>>,
    /// GKE cluster name.
    pub cluster_name: Option<Setting<String>>,
    /// GKE cluster location.
    pub cluster_location: Option<Setting<String>>,
    /// XDS address; `-` disables the agent.
    pub xds_addr: Option<Setting<String>>,
    /// Managed control plane tenant.
    pub mesh_tenant: Option<Setting<String>>,
    /// SPIFFE trust domain.
    pub trust_domain: Option<Setting<String>>,
    /// Istio ProxyConfig (YAML/JSON).
    pub proxy_config: Option<Setting<String>>,
    /// CA address (Istio CA, MeshCA, or `file:///dir`).
    pub ca_addr: Option<Setting<String>>,
    /// Google CAS pool.
    pub ca_pool: Option<Setting<String>>,
    /// Open-source Istio: istio-token audience `istio-ca`.
    pub oss_istio: Setting<bool>,
    /// CIDRs captured outbound.
    pub outbound_ip_ranges_include: Setting<String>,
    /// Ports never captured outbound.
    pub outbound_ports_exclude: Setting<Vec<u16>>,
    /// `NONE` forces whitebox mode.
    pub interception_mode: Option<Setting<String>>,
    /// `PORT_<name>` declarations; `http` is the app port.
    pub ports: BTreeMap<String, Setting<PortTarget>>,
    /// uid the app runs as (when krun is root).
    pub k8s_uid: Option<Setting<u32>>,
    /// gid the app runs as (when krun is root).
    pub k8s_gid: Option<Setting<u32>>,
    /// gRPC xDS bootstrap path.
    pub grpc_xds_bootstrap: Option<Setting<String>>,
    /// Verbose logs.
    pub mesh_debug: Setting<bool>,
    /// pilot-agent `--log_output_level`.
    pub xds_agent_debug: Option<Setting<String>>,
    /// Envoy `--proxyLogLevel`.
    pub envoy_log_level: Option<Setting<String>>,
    /// Run the agent as a gateway (`router`).
    pub gateway_name: Option<Setting<String>>,
    /// Base directory for mesh files.
    pub mesh_base_dir: Setting<PathBuf>,
    /// kubeconfig path.
    pub kubeconfig: Option<Setting<String>>,
    /// Set by Kubernetes in a pod: krun runs in-cluster.
    pub kubernetes_service_host: Option<Setting<String>>,
    /// Metadata server `host[:port]`.
    pub gce_metadata_host: Setting<String>,
    /// GKE Container API base URL.
    pub container_api_endpoint: Setting<String>,
    /// Google STS base URL.
    pub sts_endpoint: Setting<String>,
    /// IAM Credentials base URL.
    pub iam_credentials_endpoint: Setting<String>,
    /// Cloud Resource Manager base URL.
    pub resource_manager_endpoint: Setting<String>,
    /// Per-attempt budget of a metadata server request.
    pub metadata_timeout: Setting<Duration>,
    /// Budget of the "are we on GCP" probe.
    pub metadata_probe_timeout: Setting<Duration>,
    /// Budget of the whole discovery phase.
    pub discovery_timeout: Setting<Duration>,
    /// Explicit app startup probe (replaces the port wait).
    pub startup_probe: Option<(&'static str, Setting<StartupProbe>)>,
    /// h2c tunnel port.
    pub tunnel_port: Setting<u16>,
    /// HBONE mTLS port; 0 disables.
    pub hbone_port: Setting<u16>,
    /// Data plane choice.
    pub dataplane: Setting<DataPlane>,
    /// Drain budget after SIGTERM.
    pub drain_timeout: Setting<Duration>,
    /// Admin listener.
    pub admin_addr: Setting<SocketAddr>,
    /// SPIFFE IDs allowed to reach the app; empty means the workload's own trust domain.
    pub allowed_principals: Setting<Vec<String>>,
    /// Log format.
    pub log_format: Setting<LogFormat>,
    /// Extra processes file.
    pub processes: Option<Setting<PathBuf>>,
    /// App readiness budget.
    pub app_ready_timeout: Setting<Duration>,
    /// pilot-agent / Envoy readiness budget.
    pub agent_ready_timeout: Setting<Duration>,
    /// pilot-agent binary.
    pub pilot_agent_path: Setting<PathBuf>,
    /// Envoy binary.
    pub envoy_path: Setting<PathBuf>,
    /// Localhost port forwards.
    pub forwards: Setting<Vec<Forward>>,
    /// Whether non-tunnel requests on the tunnel port reach the app as plain HTTP.
    pub public_http: Setting<bool>,
    /// Outbound HTTP CONNECT proxy of the builtin data plane; port 0 disables it.
    pub outbound_addr: Setting<SocketAddr>,
    /// HBONE port of mesh peers reached through the outbound proxy.
    pub hbone_peer_port: Setting<u16>,
    /// Where the builtin data plane accepts captured outbound connections; its port is the
    /// iptables REDIRECT target.
    pub capture_addr: Setting<SocketAddr>,
    /// Whether DNS (udp and tcp 53) is redirected to 15053 when capturing.
    pub capture_dns: Setting<bool>,
    /// Whether krun removes its iptables rules on exit.
    pub capture_cleanup: Setting<bool>,
    /// Inbound ports redirected to 15006 (none by default).
    pub capture_inbound_ports: Setting<Vec<u16>>,
    /// Unknown `KRUN_*` variables: probably typos, logged as warnings once logging is up.
    pub unknown_vars: Vec<String>,
    /// The environment and layers this was resolved from, for [`Config::merge`].
    inputs: Inputs,
}

/// Every `KRUN_*` name krun reads, to warn about typos such as `KRUN_DRAIN_TIMOUT`.
const KNOWN_KRUN_VARS: &[&str] = &[
    KRUN_STARTUP_PROBE,
    KRUN_TUNNEL_PORT,
    KRUN_HBONE_PORT,
    KRUN_DATAPLANE,
    KRUN_DRAIN_TIMEOUT,
    KRUN_ADMIN_ADDR,
    KRUN_ALLOWED_PRINCIPALS,
    KRUN_LOG_FORMAT,
    KRUN_PROCESSES,
    KRUN_APP_READY_TIMEOUT,
    KRUN_AGENT_READY_TIMEOUT,
    KRUN_PILOT_AGENT_PATH,
    KRUN_ENVOY_PATH,
    KRUN_FORWARD,
    KRUN_PUBLIC_HTTP,
    KRUN_OUTBOUND_ADDR,
    KRUN_HBONE_PEER_PORT,
    KRUN_CAPTURE_ADDR,
    KRUN_CAPTURE_DNS,
    KRUN_CAPTURE_CLEANUP,
    KRUN_CAPTURE_INBOUND_PORTS,
    KRUN_METADATA_TIMEOUT,
    KRUN_METADATA_PROBE_TIMEOUT,
    KRUN_DISCOVERY_TIMEOUT,
];

impl Config {
    /// Parses the environment layer. Pure: no I/O beyond asking whether we run as root.
    pub fn from_env(env: &Env) -> Result<Config, ConfigError> {
        Self::resolve(Inputs {
            env: env.clone(),
            layers: Vec::new(),
        })
    }

    /// Adds a layer below the environment and the layers merged before it, and resolves
    /// again: the layer fills in only what is still unset (env `PORT_*` entries survive a
    /// mesh-env that declares ports too), and its values keep their own sources.
    pub fn merge(&mut self, layer: Layer) -> Result<(), ConfigError> {
        let mut inputs = self.inputs.clone();
        inputs.layers.push(layer);
        *self = Self::resolve(inputs)?;
        Ok(())
    }

    /// The value of any variable as krun sees it: the environment, then the merged layers
    /// (mesh-env keys such as `CAROOT_ISTIOD` that have no typed setting).
    pub fn lookup(&self, name: &str) -> Option<Setting<String>> {
        self.inputs.string(name)
    }

    fn resolve(inputs: Inputs) -> Result<Config, ConfigError> {
        let env = &inputs;
        let k_service = env.string(K_SERVICE);
        let on_cloud_run =
            inputs.env.get(K_SERVICE).is_some() || inputs.env.get(CLOUD_RUN_JOB).is_some();
        let ports = parse_ports(env)?;
        let project_id = env.string(PROJECT_ID);
        Ok(Config {
            mesh: env.string(MESH),
            workload_namespace: env
                .string(WORKLOAD_NAMESPACE)
                .or_else(|| namespace_from_project(project_id.as_ref()?))
                .unwrap_or_else(|| Setting::new("default".to_owned(), Source::Default)),
            workload_name: env
                .string(WORKLOAD_NAME)
                .or_else(|| derive_workload_name(k_service.as_ref())),
            workload_service_account: env.string_or(WORKLOAD_SERVICE_ACCOUNT, "default"),
            k_service,
            k_revision: env.string(K_REVISION),
            trust_domain: env.string(TRUST_DOMAIN).or_else(|| {
                // The GKE workload identity pool of the config project.
                let project = project_id.as_ref()?;
                Some(Setting::new(
                    format!("{}.svc.id.goog", project.value),
                    Source::Derived,
                ))
            }),
            project_id,
            project_number: env.parsed(PROJECT_NUMBER, |v| {
                v.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| v.to_owned())
                    .ok_or("the numeric project number")
            })?,
            cluster_name: env.string(CLUSTER_NAME),
            cluster_location: env.string(CLUSTER_LOCATION),
            xds_addr: env.string(XDS_ADDR),
            mesh_tenant: env.string(MESH_TENANT),
            proxy_config: env.string(PROXY_CONFIG),
            ca_addr: env.string(CA_ADDR),
            ca_pool: env.string(CA_POOL),
            oss_istio: env.parsed_or(OSS_ISTIO, values::boolean, false)?,
            outbound_ip_ranges_include: env
                .string_or(OUTBOUND_IP_RANGES_INCLUDE, DEFAULT_OUTBOUND_IP_RANGES),
            outbound_ports_exclude: env.parsed_or(OUTBOUND_PORTS_EXCLUDE, port_list, Vec::new())?,
            interception_mode: env.string(ISTIO_META_INTERCEPTION_MODE),
            ports,
            k8s_uid: env.parsed(K8S_UID, |v| v.parse::<u32>().map_err(|_| "a numeric uid"))?,
            k8s_gid: env.parsed(K8S_GID, |v| v.parse::<u32>().map_err(|_| "a numeric gid"))?,
            grpc_xds_bootstrap: env.string(GRPC_XDS_BOOTSTRAP),
            mesh_debug: env.parsed_or(MESH_DEBUG, values::boolean, false)?,
            xds_agent_debug: env.string(XDS_AGENT_DEBUG),
            envoy_log_level: env.string(ENVOY_LOG_LEVEL),
            gateway_name: env.string(GATEWAY_NAME),
            mesh_base_dir: env
                .string(MESH_BASE_DIR)
                .map(|s| Setting::new(PathBuf::from(s.value), s.source))
                .unwrap_or_else(|| {
                    // Root writes the real paths; anyone else writes under the working directory.
                    let base = if nix::unistd::geteuid().is_root() {
                        "/"
                    } else {
                        "."
                    };
                    Setting::new(PathBuf::from(base), Source::Derived)
                }),
            kubeconfig: env.string(KUBECONFIG),
            kubernetes_service_host: env.string(KUBERNETES_SERVICE_HOST),
            gce_metadata_host: env.string_or(GCE_METADATA_HOST, DEFAULT_METADATA_HOST),
            container_api_endpoint: endpoint(env, CONTAINER_API_ENDPOINT, DEFAULT_CONTAINER_API)?,
            sts_endpoint: endpoint(env, STS_ENDPOINT, DEFAULT_STS)?,
            iam_credentials_endpoint: endpoint(
                env,
                IAM_CREDENTIALS_ENDPOINT,
                DEFAULT_IAM_CREDENTIALS,
            )?,
            resource_manager_endpoint: endpoint(
                env,
                RESOURCE_MANAGER_ENDPOINT,
                DEFAULT_RESOURCE_MANAGER,
            )?,
            metadata_timeout: env.parsed_or(
                KRUN_METADATA_TIMEOUT,
                values::duration,
                DEFAULT_METADATA_TIMEOUT,
            )?,
            metadata_probe_timeout: env.parsed_or(
                KRUN_METADATA_PROBE_TIMEOUT,
                values::duration,
                DEFAULT_METADATA_PROBE_TIMEOUT,
            )?,
            discovery_timeout: env.parsed_or(
                KRUN_DISCOVERY_TIMEOUT,
                values::duration,
                DEFAULT_DISCOVERY_TIMEOUT,
            )?,
            startup_probe: parse_startup_probe(env)?,
            tunnel_port: env.parsed_or(KRUN_TUNNEL_PORT, values::port, DEFAULT_TUNNEL_PORT)?,
            hbone_port: env.parsed_or(KRUN_HBONE_PORT, values::port, DEFAULT_HBONE_PORT)?,
            dataplane: env.parsed_or(KRUN_DATAPLANE, parse_dataplane, DataPlane::Auto)?,
            drain_timeout: env.parsed_or(
                KRUN_DRAIN_TIMEOUT,
                values::duration,
                DEFAULT_DRAIN_TIMEOUT,
            )?,
            admin_addr: env.parsed_or(
                KRUN_ADMIN_ADDR,
                |v| v.parse().map_err(|_| "an address such as 127.0.0.1:15030"),
                DEFAULT_ADMIN_ADDR,
            )?,
            allowed_principals: env.parsed_or(
                KRUN_ALLOWED_PRINCIPALS,
                parse_principals,
                Vec::new(),
            )?,
            log_format: match env.parsed(KRUN_LOG_FORMAT, parse_log_format)? {
                Some(format) => format,
                // Cloud Logging parses JSON lines into structured entries with severities.
                None if on_cloud_run => Setting::new(LogFormat::Json, Source::Derived),
                None => Setting::new(LogFormat::Text, Source::Default),
            },
            processes: env
                .string(KRUN_PROCESSES)
                .map(|s| Setting::new(PathBuf::from(s.value), s.source)),
            app_ready_timeout: env.parsed_or(
                KRUN_APP_READY_TIMEOUT,
                values::duration,
                DEFAULT_APP_READY_TIMEOUT,
            )?,
            agent_ready_timeout: env.parsed_or(
                KRUN_AGENT_READY_TIMEOUT,
                values::duration,
                DEFAULT_AGENT_READY_TIMEOUT,
            )?,
            pilot_agent_path: env.parsed_or(
                KRUN_PILOT_AGENT_PATH,
                |v| Ok(PathBuf::from(v)),
                PathBuf::from(DEFAULT_PILOT_AGENT_PATH),
            )?,
            envoy_path: env.parsed_or(
                KRUN_ENVOY_PATH,
                |v| Ok(PathBuf::from(v)),
                PathBuf::from(DEFAULT_ENVOY_PATH),
            )?,
            forwards: env.parsed_or(KRUN_FORWARD, Forward::parse_list, Vec::new())?,
            public_http: env.parsed_or(KRUN_PUBLIC_HTTP, values::boolean, true)?,
            outbound_addr: env.parsed_or(
                KRUN_OUTBOUND_ADDR,
                |v| v.parse().map_err(|_| "an address such as 127.0.0.1:15007"),
                DEFAULT_OUTBOUND_ADDR,
            )?,
            hbone_peer_port: env.parsed_or(
                KRUN_HBONE_PEER_PORT,
                values::port,
                DEFAULT_HBONE_PORT,
            )?,
            capture_addr: env.parsed_or(
                KRUN_CAPTURE_ADDR,
                |v| v.parse().map_err(|_| "an address such as 127.0.0.1:15001"),
                DEFAULT_CAPTURE_ADDR,
            )?,
            capture_dns: env.parsed_or(KRUN_CAPTURE_DNS, values::boolean, false)?,
            capture_cleanup: env.parsed_or(KRUN_CAPTURE_CLEANUP, values::boolean, false)?,
            capture_inbound_ports: env.parsed_or(
                KRUN_CAPTURE_INBOUND_PORTS,
                port_list,
                Vec::new(),
            )?,
            unknown_vars: unknown_krun_vars(&inputs.env),
            inputs,
        })
    }

    /// The app port: where the app serves HTTP, and the `PORT` it is given.
    pub fn app_port(&self) -> Option<u16> {
        match self.ports.get("http").map(|s| &s.value) {
            Some(PortTarget::Local(port)) => Some(*port),
            _ => None,
        }
    }

    /// Loopback ports the app must accept on before it counts as ready: `PORT_http` and every
    /// numeric `PORT_<name>` (reference issue #2: one port is not enough).
    pub fn app_ready_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .ports
            .values()
            .filter_map(|s| match s.value {
                PortTarget::Local(port) => Some(port),
                _ => None,
            })
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The settings as `--print-config` shows them: keyed by env var name, secrets redacted.
    pub fn printable(&self) -> BTreeMap<String, Value> {
        let mut out = Printer::default();
        out.opt(MESH, &self.mesh);
        out.one(WORKLOAD_NAMESPACE, &self.workload_namespace);
        out.opt(WORKLOAD_NAME, &self.workload_name);
        out.one(WORKLOAD_SERVICE_ACCOUNT, &self.workload_service_account);
        out.opt(K_SERVICE, &self.k_service);
        out.opt(K_REVISION, &self.k_revision);
        out.opt(PROJECT_ID, &self.project_id);
        out.opt(PROJECT_NUMBER, &self.project_number);
        out.opt(CLUSTER_NAME, &self.cluster_name);
        out.opt(CLUSTER_LOCATION, &self.cluster_location);
        out.opt(XDS_ADDR, &self.xds_addr);
        out.opt(MESH_TENANT, &self.mesh_tenant);
        out.opt(TRUST_DOMAIN, &self.trust_domain);
        out.opt(PROXY_CONFIG, &self.proxy_config);
        out.opt(CA_ADDR, &self.ca_addr);
        out.opt(CA_POOL, &self.ca_pool);
        out.one(OSS_ISTIO, &self.oss_istio);
        out.one(OUTBOUND_IP_RANGES_INCLUDE, &self.outbound_ip_ranges_include);
        out.one(OUTBOUND_PORTS_EXCLUDE, &self.outbound_ports_exclude);
        out.opt(ISTIO_META_INTERCEPTION_MODE, &self.interception_mode);
        for (name, port) in &self.ports {
            out.value(
                &format!("{PORT_PREFIX}{name}"),
                port.value.printable(),
                port.source,
            );
        }
        out.opt(K8S_UID, &self.k8s_uid);
        out.opt(K8S_GID, &self.k8s_gid);
        out.opt(GRPC_XDS_BOOTSTRAP, &self.grpc_xds_bootstrap);
        out.one(MESH_DEBUG, &self.mesh_debug);
        out.opt(XDS_AGENT_DEBUG, &self.xds_agent_debug);
        out.opt(ENVOY_LOG_LEVEL, &self.envoy_log_level);
        out.opt(GATEWAY_NAME, &self.gateway_name);
        out.one(MESH_BASE_DIR, &self.mesh_base_dir);
        out.opt(KUBECONFIG, &self.kubeconfig);
        out.opt(KUBERNETES_SERVICE_HOST, &self.kubernetes_service_host);
        out.one(GCE_METADATA_HOST, &self.gce_metadata_host);
        out.one(CONTAINER_API_ENDPOINT, &self.container_api_endpoint);
        out.one(STS_ENDPOINT, &self.sts_endpoint);
        out.one(IAM_CREDENTIALS_ENDPOINT, &self.iam_credentials_endpoint);
        out.one(RESOURCE_MANAGER_ENDPOINT, &self.resource_manager_endpoint);
        for (name, setting) in [
            (KRUN_METADATA_TIMEOUT, &self.metadata_timeout),
            (KRUN_METADATA_PROBE_TIMEOUT, &self.metadata_probe_timeout),
            (KRUN_DISCOVERY_TIMEOUT, &self.discovery_timeout),
        ] {
            out.duration(name, setting);
        }
        for name in [STARTUP_PROBE_HTTP, STARTUP_PROBE_TCP, KRUN_STARTUP_PROBE] {
            match &self.startup_probe {
                Some((from, probe)) if *from == name => {
                    out.value(name, json!(probe.value.printable()), probe.source)
                }
                _ => out.value(name, Value::Null, Source::Default),
            }
        }
        out.one(KRUN_TUNNEL_PORT, &self.tunnel_port);
        out.one(KRUN_HBONE_PORT, &self.hbone_port);
        out.one(KRUN_DATAPLANE, &self.dataplane);
        out.duration(KRUN_DRAIN_TIMEOUT, &self.drain_timeout);
        out.one(KRUN_ADMIN_ADDR, &self.admin_addr);
        out.one(KRUN_ALLOWED_PRINCIPALS, &self.allowed_principals);
        out.one(KRUN_LOG_FORMAT, &self.log_format);
        out.opt(KRUN_PROCESSES, &self.processes);
        out.duration(KRUN_APP_READY_TIMEOUT, &self.app_ready_timeout);
        out.duration(KRUN_AGENT_READY_TIMEOUT, &self.agent_ready_timeout);
        out.one(KRUN_PILOT_AGENT_PATH, &self.pilot_agent_path);
        out.one(KRUN_ENVOY_PATH, &self.envoy_path);
        let forwards: Vec<String> = self
            .forwards
            .value
            .iter()
            .map(|f| format!("{}={}", f.listen, f.target))
            .collect();
        out.value(KRUN_FORWARD, json!(forwards), self.forwards.source);
        out.one(KRUN_PUBLIC_HTTP, &self.public_http);
        out.one(KRUN_OUTBOUND_ADDR, &self.outbound_addr);
        out.one(KRUN_HBONE_PEER_PORT, &self.hbone_peer_port);
        out.one(KRUN_CAPTURE_ADDR, &self.capture_addr);
        out.one(KRUN_CAPTURE_DNS, &self.capture_dns);
        out.one(KRUN_CAPTURE_CLEANUP, &self.capture_cleanup);
        out.one(KRUN_CAPTURE_INBOUND_PORTS, &self.capture_inbound_ports);
        out.finish()
    }
}

/// Collects `--print-config` entries, redacting secrets in every string it is given; hgate
/// prints its settings with it too, so both binaries show the same shape.
#[derive(Default)]
pub struct Printer(BTreeMap<String, Value>);

impl Printer {
    /// The entries, keyed by variable name.
    pub fn finish(self) -> BTreeMap<String, Value> {
        self.0
    }

    /// Adds `name` with a JSON value.
    pub fn value(&mut self, name: &str, value: Value, source: Source) {
        let value = redact_json(name, value);
        self.0
            .insert(name.to_owned(), json!({ "value": value, "source": source }));
    }

    /// Adds a setting.
    pub fn one<T: Serialize>(&mut self, name: &str, setting: &Setting<T>) {
        self.value(name, json!(setting.value), setting.source);
    }

    /// Adds a duration setting in humantime form.
    pub fn duration(&mut self, name: &str, setting: &Setting<Duration>) {
        let text = humantime::format_duration(setting.value).to_string();
        self.value(name, json!(text), setting.source);
    }

    /// Adds an optional setting (`null` when unset).
    pub fn opt<T: Serialize>(&mut self, name: &str, setting: &Option<Setting<T>>) {
        match setting {
            Some(s) => self.one(name, s),
            None => self.value(name, Value::Null, Source::Default),
        }
    }
}

fn redact_json(name: &str, value: Value) -> Value {
    match value {
        Value::String(s) if is_secret(name, &s) => json!(REDACTED),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| redact_json(name, v)).collect())
        }
        other => other,
    }
}

/// Fixes reference bug §13.1.1: `K_SERVICE=v2--reviews` is service `reviews`, version `v2`.
fn derive_workload_name(k_service: Option<&Setting<String>>) -> Option<Setting<String>> {
    let service = &k_service?.value;
    let name = service
        .split_once("--")
        .map_or(service.as_str(), |(_, name)| name);
    Some(Setting::new(name.to_owned(), Source::Derived))
}

/// The reference's last guess before `default`: project `acme-fortio-prod` serves namespace
/// `fortio` (the second-to-last of three or more dash-separated parts).
fn namespace_from_project(project: &Setting<String>) -> Option<Setting<String>> {
    let parts: Vec<&str> = project.value.split('-').collect();
    (parts.len() > 2).then(|| Setting::new(parts[parts.len() - 2].to_owned(), Source::Derived))
}

fn parse_ports(env: &Inputs) -> Result<BTreeMap<String, Setting<PortTarget>>, ConfigError> {
    let mut ports = BTreeMap::new();
    for (name, raw, source) in env.iter() {
        let Some(port_name) = name.strip_prefix(PORT_PREFIX) else {
            continue;
        };
        if port_name.is_empty() || raw.is_empty() {
            continue;
        }
        let target =
            PortTarget::parse(raw).map_err(|form| ConfigError::invalid(name, raw, form))?;
        ports.insert(port_name.to_owned(), Setting::new(target, source));
    }
    ports.entry("http".to_owned()).or_insert(Setting::new(
        PortTarget::Local(DEFAULT_APP_PORT),
        Source::Default,
    ));
    Ok(ports)
}

fn parse_startup_probe(
    env: &Inputs,
) -> Result<Option<(&'static str, Setting<StartupProbe>)>, ConfigError> {
    if let Some(probe) = env.parsed(KRUN_STARTUP_PROBE, StartupProbe::parse_url)? {
        return Ok(Some((KRUN_STARTUP_PROBE, probe)));
    }
    let http = |v: &str| match StartupProbe::parse_url(v) {
        Ok(probe @ StartupProbe::Http(_)) => Ok(probe),
        _ => Err("an http:// URL"),
    };
    if let Some(probe) = env.parsed(STARTUP_PROBE_HTTP, http)? {
        return Ok(Some((STARTUP_PROBE_HTTP, probe)));
    }
    Ok(env
        .parsed(STARTUP_PROBE_TCP, StartupProbe::parse_tcp)?
        .map(|p| (STARTUP_PROBE_TCP, p)))
}

fn parse_dataplane(raw: &str) -> Result<DataPlane, &'static str> {
    match raw.trim() {
        "auto" => Ok(DataPlane::Auto),
        "envoy" => Ok(DataPlane::Envoy),
        "builtin" => Ok(DataPlane::Builtin),
        "none" => Ok(DataPlane::None),
        _ => Err("one of auto, envoy, builtin, none"),
    }
}

fn parse_log_format(raw: &str) -> Result<LogFormat, &'static str> {
    match raw.trim() {
        "json" => Ok(LogFormat::Json),
        "text" => Ok(LogFormat::Text),
        _ => Err("json or text"),
    }
}

fn parse_principals(raw: &str) -> Result<Vec<String>, &'static str> {
    const FORM: &str = "comma-separated SPIFFE IDs such as spiffe://TD/ns/NS/sa/SA or patterns spiffe://TD/ns/NS/*";
    let principals = values::list(raw);
    let valid = |p: &String| {
        p.strip_prefix("spiffe://").is_some_and(|rest| {
            let wildcard_ok =
                !rest.contains('*') || (rest.ends_with("/*") && rest.matches('*').count() == 1);
            rest.contains('/') && wildcard_ok
        })
    };
    if principals.iter().all(valid) {
        Ok(principals)
    } else {
        Err(FORM)
    }
}

fn endpoint(env: &Inputs, name: &str, default: &str) -> Result<Setting<String>, ConfigError> {
    env.parsed_or(
        name,
        |v| {
            let v = v.trim().trim_end_matches('/');
            (v.starts_with("https://") || v.starts_with("http://"))
                .then(|| v.to_owned())
                .ok_or("a base URL such as https://host or http://127.0.0.1:PORT")
        },
        default.to_owned(),
    )
}

fn unknown_krun_vars(env: &Env) -> Vec<String> {
    let mut unknown: Vec<String> = env
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(KRUN_PREFIX) && !KNOWN_KRUN_VARS.contains(k))
        .map(str::to_owned)
        .collect();
    unknown.sort();
    unknown
}

#[cfg(test)]
mod tests;
