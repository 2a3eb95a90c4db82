//! krun's configuration: the mesh side ([`MeshConfig`], declared in the mesh crate because
//! discovery, identity and logging read it) and the launcher's own settings, declared below
//! in one table ([`mesh::settings!`]). Each value remembers where it came from.
//!
//! [`Config::merge`] adds a [`Layer`] (mesh-env, metadata, discovery) and resolves both tables
//! again, so every setting, including `PORT_*`, is parsed by the same code whichever layer
//! it came from; the environment always wins.

mod cidr;
mod rules;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use mesh::config::table::{Show, parse, text};
use mesh::config::{ConfigError, Env, Inputs, Layer, Merge, MeshConfig, Printer, Setting, values};
use mesh::identity::SpiffeId;
use mesh::istio;
use serde::Serialize;
use serde_json::{Value, json};

pub use cidr::Cidr;
use rules::{Ports, StartupProbes};

/// Prefix of krun's own variables: one that no table reads is probably a typo.
pub const KRUN_PREFIX: &str = "KRUN_";
/// Default app port (`PORT_http`): Cloud Run's default container port.
pub const DEFAULT_APP_PORT: u16 = 8080;
/// Default drain budget: inside Cloud Run's 10 s between SIGTERM and SIGKILL.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(8);
/// Default app readiness budget: Cloud Run's 240 s startup window.
pub const DEFAULT_APP_READY_TIMEOUT: Duration = Duration::from_secs(240);
/// Default mesh agent (pilot-agent or Envoy) readiness budget: generous, because the first
/// XDS push of a large mesh over a cold connection can take minutes (cloud-run-mesh gave up
/// after a fixed 10 s, which broke such starts).
pub const DEFAULT_AGENT_READY_TIMEOUT: Duration = Duration::from_secs(240);
/// Default outbound HTTP CONNECT proxy of the builtin data plane (the whitebox proxy port).
pub const DEFAULT_OUTBOUND_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    Ipv4Addr::LOCALHOST,
    istio::WHITEBOX_PROXY_PORT,
));
/// Default outbound capture listener: iptables REDIRECT of locally generated traffic lands
/// on 127.0.0.1, so loopback is enough and nothing outside the container can reach it.
pub const DEFAULT_CAPTURE_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    Ipv4Addr::LOCALHOST,
    istio::OUTBOUND_CAPTURE_PORT,
));
/// Default handshake deadline: generous for a TLS handshake and a first request over a slow
/// link, short enough that idle connections cannot pile up.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle timeout: Envoy's default for TCP proxies and HTTP connections (1 h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default connection cap per listener (hgate's default too).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default HTTP/2 streams per connection: Cloud Run's highest per-instance concurrency, so the
/// front end never needs a second connection because of this cap.
pub const DEFAULT_MAX_STREAMS: u32 = 1000;
/// One thread runs everything: the supervisor, the listeners and every tunnel. On the 1 or 2
/// vCPUs of a Cloud Run instance the app needs the other core, and one thread measured 20 %
/// less CPU per tunnelled GiB than two workers handing each chunk across threads
/// (docs/performance.md).
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// Default path of pilot-agent in the golden image.
pub const DEFAULT_PILOT_AGENT_PATH: &str = "/usr/local/bin/pilot-agent";
/// Default path of Envoy in the golden image.
pub const DEFAULT_ENVOY_PATH: &str = "/usr/local/bin/envoy";
/// Default admin endpoint: loopback, so only the container itself (probes run by the platform
/// go to the tunnel port, not here) can read the configuration dump or drain krun.
pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15030));
/// Default Cloud Run discovery zone (`SVC.REGION.run.internal`).
pub const DEFAULT_RUN_DOMAIN: &str = "run.internal";
/// Default address of the Cloud Run discovery proxy: its own loopback address, so every port
/// of it can be redirected to the proxy without touching the app's other loopback traffic.
pub const DEFAULT_RUN_PROXY_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 80), 80));
/// Default address of the local DNS server (resolv.conf cannot name a port).
pub const DEFAULT_RUN_DNS_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 53));
/// The resolv.conf the app reads.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Default outbound capture range (cloud-run-mesh's, so its deployments capture the same).
pub const DEFAULT_OUTBOUND_IP_RANGES: &str = "10.0.0.0/8";

mesh::settings! {
    /// The settings only the launcher reads: ports, processes, data plane, capture, agent.
    #[derive(Clone, Debug)]
    pub struct LauncherConfig {
        /// CIDRs captured outbound.
        outbound_ip_ranges_include: Setting<String> = OUTBOUND_IP_RANGES_INCLUDE =>
            text().or_default(DEFAULT_OUTBOUND_IP_RANGES.to_owned()),
        /// Ports never captured outbound.
        outbound_ports_exclude: Setting<Vec<u16>> = OUTBOUND_PORTS_EXCLUDE =>
            parse(port_list).or_default(Vec::new()),
        /// `NONE` forces whitebox mode.
        interception_mode: Option<Setting<String>> = ISTIO_META_INTERCEPTION_MODE => text(),
        /// `PORT_<name>` declarations; `http` is the app port.
        ports: BTreeMap<String, Setting<PortTarget>> = PORT_PREFIX("PORT_") => Ports,
        /// uid the app runs as (when krun is root).
        k8s_uid: Option<Setting<u32>> = K8S_UID =>
            parse(|v| v.parse().map_err(|_| "a numeric uid")),
        /// gid the app runs as (when krun is root).
        k8s_gid: Option<Setting<u32>> = K8S_GID =>
            parse(|v| v.parse().map_err(|_| "a numeric gid")),
        /// gRPC xDS bootstrap path.
        grpc_xds_bootstrap: Option<Setting<String>> = GRPC_XDS_BOOTSTRAP => text(),
        /// pilot-agent `--log_output_level`.
        xds_agent_debug: Option<Setting<String>> = XDS_AGENT_DEBUG => text(),
        /// Envoy `--proxyLogLevel`.
        envoy_log_level: Option<Setting<String>> = ENVOY_LOG_LEVEL => text(),
        /// Run the agent as a gateway (`router`).
        gateway_name: Option<Setting<String>> = GATEWAY_NAME => text(),
        /// Explicit app startup probe (replaces the port wait), with the variable it came
        /// from: `KRUN_STARTUP_PROBE`, `startupProbe.http` or `startupProbe.tcp`.
        startup_probe: Option<(&'static str, Setting<StartupProbe>)> = KRUN_STARTUP_PROBE =>
            StartupProbes,
        /// h2c tunnel port.
        tunnel_port: Setting<u16> = KRUN_TUNNEL_PORT =>
            parse(values::port).or_default(istio::TUNNEL_PORT),
        /// HBONE mTLS port; 0 disables.
        hbone_port: Setting<u16> = KRUN_HBONE_PORT =>
            parse(values::port).or_default(istio::HBONE_PORT),
        /// Data plane choice.
        dataplane: Setting<DataPlane> = KRUN_DATAPLANE =>
            parse(DataPlane::parse).or_default(DataPlane::Auto),
        /// Drain budget after SIGTERM.
        drain_timeout: Setting<Duration> = KRUN_DRAIN_TIMEOUT =>
            parse(values::duration).or_default(DEFAULT_DRAIN_TIMEOUT),
        /// SPIFFE IDs allowed to reach the app; empty means the workload's own trust domain.
        allowed_principals: Setting<Vec<String>> = KRUN_ALLOWED_PRINCIPALS =>
            parse(principals).or_default(Vec::new()),
        /// The processes file: extra processes, the app's hooks, files to write.
        processes: Option<Setting<PathBuf>> = KRUN_PROCESSES => parse(values::path),
        /// App readiness budget.
        app_ready_timeout: Setting<Duration> = KRUN_APP_READY_TIMEOUT =>
            parse(values::duration).or_default(DEFAULT_APP_READY_TIMEOUT),
        /// pilot-agent / Envoy readiness budget.
        agent_ready_timeout: Setting<Duration> = KRUN_AGENT_READY_TIMEOUT =>
            parse(values::duration).or_default(DEFAULT_AGENT_READY_TIMEOUT),
        /// pilot-agent binary.
        pilot_agent_path: Setting<PathBuf> = KRUN_PILOT_AGENT_PATH =>
            parse(values::path).or_default(PathBuf::from(DEFAULT_PILOT_AGENT_PATH)),
        /// Envoy binary.
        envoy_path: Setting<PathBuf> = KRUN_ENVOY_PATH =>
            parse(values::path).or_default(PathBuf::from(DEFAULT_ENVOY_PATH)),
        /// Localhost port forwards.
        forwards: Setting<Vec<Forward>> = KRUN_FORWARD =>
            parse(Forward::parse_list).or_default(Vec::new()),
        /// Whether non-tunnel requests on the tunnel port reach the app as plain HTTP.
        public_http: Setting<bool> = KRUN_PUBLIC_HTTP =>
            parse(values::boolean).or_default(true),
        /// Declared ports (names or numbers) the tunnel port reaches without mTLS.
        tunnel_plaintext: Setting<Vec<String>> = KRUN_TUNNEL_PLAINTEXT =>
            parse(|v| Ok(values::list(v))).or_default(Vec::new()),
        /// The SPIFFE IDs outbound HBONE destinations must present.
        peer_identities: Setting<Vec<PeerIdentity>> = KRUN_PEER_IDENTITIES =>
            parse(PeerIdentity::parse_list).or_default(Vec::new()),
        /// Address ranges whose destinations are mesh workloads, reached over HBONE; every
        /// other destination is passthrough.
        mesh_cidrs: Setting<Vec<Cidr>> = KRUN_MESH_CIDRS =>
            parse(Cidr::parse_list).or_default(Vec::new()),
        /// Outbound HTTP CONNECT proxy of the builtin data plane; port 0 disables it.
        outbound_addr: Setting<SocketAddr> = KRUN_OUTBOUND_ADDR =>
            parse(|v| v.parse().map_err(|_| "an address such as 127.0.0.1:15007"))
                .or_default(DEFAULT_OUTBOUND_ADDR),
        /// HBONE port of mesh peers reached through the outbound proxy.
        hbone_peer_port: Setting<u16> = KRUN_HBONE_PEER_PORT =>
            parse(values::port).or_default(istio::HBONE_PORT),
        /// Where the builtin data plane accepts captured outbound connections; its port is the
        /// iptables REDIRECT target.
        capture_addr: Setting<SocketAddr> = KRUN_CAPTURE_ADDR =>
            parse(|v| v.parse().map_err(|_| "an address such as 127.0.0.1:15001"))
                .or_default(DEFAULT_CAPTURE_ADDR),
        /// Whether DNS (udp and tcp 53) is redirected to 15053 when capturing.
        capture_dns: Setting<bool> = KRUN_CAPTURE_DNS => parse(values::boolean).or_default(false),
        /// Whether krun removes its iptables rules on exit.
        capture_cleanup: Setting<bool> = KRUN_CAPTURE_CLEANUP =>
            parse(values::boolean).or_default(false),
        /// Deadline of a new connection's handshake on the mesh listeners (TLS, first request).
        handshake_timeout: Setting<Duration> = KRUN_HANDSHAKE_TIMEOUT =>
            parse(values::duration).or_default(DEFAULT_HANDSHAKE_TIMEOUT),
        /// A connection that carries nothing for this long is closed.
        idle_timeout: Setting<Duration> = KRUN_IDLE_TIMEOUT =>
            parse(values::duration).or_default(DEFAULT_IDLE_TIMEOUT),
        /// Concurrent connections of each listener.
        max_connections: Setting<usize> = KRUN_MAX_CONNECTIONS =>
            parse(values::positive).or_default(DEFAULT_MAX_CONNECTIONS),
        /// Concurrent HTTP/2 streams per connection on the tunnel port and HBONE.
        max_streams: Setting<u32> = KRUN_MAX_STREAMS =>
            parse(values::positive).or_default(DEFAULT_MAX_STREAMS),
        /// Threads of krun's async runtime; 1 runs everything on the main thread.
        worker_threads: Setting<usize> = KRUN_WORKER_THREADS =>
            parse(values::positive).or_default(DEFAULT_WORKER_THREADS),
        /// Inbound ports redirected to 15006 (none by default).
        capture_inbound_ports: Setting<Vec<u16>> = KRUN_CAPTURE_INBOUND_PORTS =>
            parse(port_list).or_default(Vec::new()),
        /// The admin endpoint (`/healthz/ready`, `/config_dump`, `/metrics`, `/logging`,
        /// `/quitquitquit`), or `off`.
        admin_addr: Setting<AdminAddr> = KRUN_ADMIN_ADDR =>
            parse(AdminAddr::parse).or_default(AdminAddr(Some(DEFAULT_ADMIN_ADDR))),
        /// Lifetime krun requests for the workload certificate it mints (Istio's name).
        secret_ttl: Setting<Duration> = SECRET_TTL =>
            parse(positive_duration).or_default(mesh::identity::DEFAULT_CERT_TTL),
        /// Cloud Run service discovery: `auto` (on where a metadata server answers) or `off`.
        run_discovery: Setting<RunDiscovery> = KRUN_RUN_DISCOVERY =>
            parse(RunDiscovery::parse).or_default(RunDiscovery::Auto),
        /// The discovery zone: `SVC.REGION.<zone>`.
        run_domain: Setting<String> = KRUN_RUN_DOMAIN =>
            parse(run_domain).or_default(DEFAULT_RUN_DOMAIN.to_owned()),
        /// Bare names that are services; empty: every single-label name.
        run_services: Setting<Vec<String>> = KRUN_RUN_SERVICES =>
            parse(run_services).or_default(Vec::new()),
        /// The service URL form.
        run_url_template: Setting<String> = KRUN_RUN_URL_TEMPLATE =>
            parse(run_url_template).or_default(mesh::cloud_run::DETERMINISTIC_URL.to_owned()),
        /// Where the proxy's ID tokens come from.
        run_token_source: Setting<RunTokenSource> = KRUN_RUN_TOKEN_SOURCE =>
            parse(RunTokenSource::parse).or_default(RunTokenSource::Metadata),
        /// Service account whose ID tokens IAM mints for the proxy (unset: the instance's own,
        /// from the metadata server).
        run_token_service_account: Option<Setting<String>> = KRUN_RUN_TOKEN_SERVICE_ACCOUNT =>
            parse(values::service_account_email),
        /// The proxy's address; run names resolve to its IP.
        run_proxy_addr: Setting<SocketAddr> = KRUN_RUN_PROXY_ADDR =>
            parse(|v| v.parse().map_err(|_| "an address such as 127.0.0.80:80"))
                .or_default(DEFAULT_RUN_PROXY_ADDR),
        /// The local DNS server's address.
        run_dns_addr: Setting<SocketAddr> = KRUN_RUN_DNS_ADDR =>
            parse(|v| v.parse().map_err(|_| "an address such as 127.0.0.1:53"))
                .or_default(DEFAULT_RUN_DNS_ADDR),
        /// Where forwarded queries go; unset: the first nameserver of the original resolv.conf.
        run_dns_upstream: Option<Setting<SocketAddr>> = KRUN_RUN_DNS_UPSTREAM =>
            parse(|v| v.parse().map_err(|_| "an address such as 169.254.169.254:53")),
        /// The resolv.conf rewritten for the app.
        run_resolv_conf: Setting<PathBuf> = KRUN_RUN_RESOLV_CONF =>
            parse(values::path).or_default(PathBuf::from(DEFAULT_RESOLV_CONF)),
    }
    /// Env var names of [`LauncherConfig`]. Constants so a typo is a compile error.
    pub mod names;
}

/// Everything krun is configured with: both tables, resolved from the same inputs.
///
/// It derefs to [`MeshConfig`] so launcher code reads `config.trust_domain` as it reads
/// `config.launcher.tunnel_port`, and passes `&config` where mesh wants a `&MeshConfig`
/// (discovery), without knowing which table declares a setting.
#[derive(Clone, Debug)]
pub struct Config {
    /// The mesh side: what discovery, identity and logging read.
    pub shared: MeshConfig,
    /// The launcher's own settings.
    pub launcher: LauncherConfig,
    /// Unknown `KRUN_*` variables: probably typos, logged as warnings once logging is up.
    pub unknown_vars: Vec<String>,
    /// The environment and layers this was resolved from, for [`Config::merge`].
    inputs: Inputs,
}

impl Deref for Config {
    type Target = MeshConfig;

    fn deref(&self) -> &MeshConfig {
        &self.shared
    }
}

impl Config {
    /// Parses the environment layer. Pure: no I/O beyond asking whether we run as root.
    pub fn from_env(env: &Env) -> Result<Config, ConfigError> {
        Self::resolve(Inputs::new(env))
    }

    /// Adds a layer below the environment and the layers merged before it, and resolves
    /// again: the layer fills in only what is still unset (env `PORT_*` entries survive a
    /// mesh-env that declares ports too), and its values keep their own sources.
    pub fn merge(&mut self, layer: Layer) -> Result<(), ConfigError> {
        let mut inputs = self.inputs.clone();
        inputs.push(layer);
        *self = Self::resolve(inputs)?;
        Ok(())
    }

    /// The value of any variable as krun sees it: the environment, then the merged layers
    /// (mesh-env keys such as `CAROOT_ISTIOD` that have no typed setting).
    pub fn lookup(&self, name: &str) -> Option<Setting<String>> {
        self.inputs.string(name)
    }

    /// Every variable krun reads, as documented (`PORT_<name>` for the port family).
    pub fn names() -> Vec<&'static str> {
        let mut names = MeshConfig::names();
        names.extend(LauncherConfig::names());
        names
    }

    fn resolve(inputs: Inputs) -> Result<Config, ConfigError> {
        let launcher = LauncherConfig::resolve(&inputs)?;
        if let Some(gsa) = &launcher.run_token_service_account
            && launcher.run_token_source.value == RunTokenSource::None
        {
            return Err(ConfigError::invalid(
                names::KRUN_RUN_TOKEN_SERVICE_ACCOUNT,
                &gsa.value,
                "unset while KRUN_RUN_TOKEN_SOURCE=none (no ID token is added); set KRUN_RUN_TOKEN_SOURCE=metadata to add this account's tokens",
            ));
        }
        Ok(Config {
            shared: MeshConfig::resolve(&inputs)?,
            launcher,
            unknown_vars: inputs.env().unknown(KRUN_PREFIX, &Self::names()),
            inputs,
        })
    }

    /// The app port: where the app serves HTTP, and the `PORT` it is given.
    pub fn app_port(&self) -> Option<u16> {
        match self.launcher.ports.get("http").map(|s| &s.value) {
            Some(PortTarget::Local(port)) => Some(*port),
            _ => None,
        }
    }

    /// Loopback ports the app must accept on before it counts as ready: `PORT_http` and every
    /// numeric `PORT_<name>`: an app that serves several ports is ready only when all accept.
    pub fn app_ready_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .launcher
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
        self.shared.print(&mut out);
        self.launcher.print(&mut out);
        out.finish()
    }
}

impl Merge for Config {
    fn merge(&mut self, layer: Layer) -> Result<(), ConfigError> {
        Config::merge(self, layer)
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

impl DataPlane {
    fn parse(raw: &str) -> Result<DataPlane, &'static str> {
        match raw.trim() {
            "auto" => Ok(DataPlane::Auto),
            "envoy" => Ok(DataPlane::Envoy),
            "builtin" => Ok(DataPlane::Builtin),
            "none" => Ok(DataPlane::None),
            _ => Err("one of auto, envoy, builtin, none"),
        }
    }
}

impl Show for DataPlane {
    fn show(&self) -> Value {
        json!(self)
    }
}

/// Where the admin endpoint listens; `None` when it is `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminAddr(pub Option<SocketAddr>);

impl AdminAddr {
    fn parse(raw: &str) -> Result<AdminAddr, &'static str> {
        match raw.trim() {
            "off" => Ok(AdminAddr(None)),
            addr => addr
                .parse()
                .map(|addr| AdminAddr(Some(addr)))
                .map_err(|_| "an address such as 127.0.0.1:15030, or off"),
        }
    }
}

/// Whether Cloud Run service discovery runs (`KRUN_RUN_DISCOVERY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunDiscovery {
    /// On where a metadata server answers.
    Auto,
    /// Never: DNS and resolv.conf are left alone.
    Off,
}

impl RunDiscovery {
    fn parse(raw: &str) -> Result<RunDiscovery, &'static str> {
        match raw.trim() {
            "auto" => Ok(RunDiscovery::Auto),
            "off" => Ok(RunDiscovery::Off),
            _ => Err("auto or off"),
        }
    }
}

impl Show for AdminAddr {
    fn show(&self) -> Value {
        self.0.map_or(json!("off"), |addr| json!(addr))
    }
}

impl Show for RunDiscovery {
    fn show(&self) -> Value {
        json!(self)
    }
}

/// Where the discovery proxy's ID tokens come from (`KRUN_RUN_TOKEN_SOURCE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunTokenSource {
    /// The metadata server's `identity` endpoint, as the instance's service account.
    Metadata,
    /// No token is added (public services, or the app adds its own).
    None,
}

impl RunTokenSource {
    fn parse(raw: &str) -> Result<RunTokenSource, &'static str> {
        match raw.trim() {
            "metadata" => Ok(RunTokenSource::Metadata),
            "none" => Ok(RunTokenSource::None),
            _ => Err("metadata or none"),
        }
    }
}

impl std::fmt::Display for RunTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunTokenSource::Metadata => "metadata",
            RunTokenSource::None => "none",
        })
    }
}

impl Show for RunTokenSource {
    fn show(&self) -> Value {
        json!(self)
    }
}

/// A DNS domain of one or more labels (`run.internal`), without the trailing dot.
fn run_domain(raw: &str) -> Result<String, &'static str> {
    let domain = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if domain.split('.').all(label_ok) {
        Ok(domain)
    } else {
        Err("a DNS domain such as run.internal")
    }
}

/// Service names, lower case.
fn run_services(raw: &str) -> Result<Vec<String>, &'static str> {
    let services: Vec<String> = values::list(raw)
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let valid = |s: &String| {
        s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if services.iter().all(valid) {
        Ok(services)
    } else {
        Err("comma-separated Cloud Run service names (lower-case letters, digits, -)")
    }
}

/// An `https://` (or `http://`) URL with `{service}`, no path: the placeholders filled with
/// sample values must give a valid URL.
fn run_url_template(raw: &str) -> Result<String, &'static str> {
    const FORM: &str = "a URL such as https://{service}-{project_number}.{region}.run.app (placeholders {service}, {project_number}, {region}, {project}; a port allowed, no path)";
    let template = raw.trim().trim_end_matches('/').to_owned();
    let sample = mesh::cloud_run::fill(
        &template,
        &mesh::cloud_run::UrlValues {
            service: "svc",
            project_number: "1",
            region: "us-central1",
            project: "p",
        },
    );
    let uri: http::Uri = sample.parse().map_err(|_| FORM)?;
    let scheme_ok = matches!(uri.scheme_str(), Some("https" | "http"));
    let no_path = uri.path_and_query().is_none_or(|p| p.as_str() == "/");
    if template.contains(mesh::cloud_run::SERVICE) && scheme_ok && uri.host().is_some() && no_path {
        Ok(template)
    } else {
        Err(FORM)
    }
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
        if is_host_port(raw) {
            Ok(PortTarget::Remote(raw.to_owned()))
        } else {
            Err(FORM)
        }
    }
}

impl Show for PortTarget {
    fn show(&self) -> Value {
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

    fn parse_http(raw: &str) -> Result<Self, &'static str> {
        match Self::parse_url(raw) {
            Ok(probe @ StartupProbe::Http(_)) => Ok(probe),
            _ => Err("an http:// URL"),
        }
    }

    fn parse_tcp(addr: &str) -> Result<Self, &'static str> {
        if is_host_port(addr) {
            Ok(StartupProbe::Tcp(addr.to_owned()))
        } else {
            Err("host:port")
        }
    }
}

impl Show for StartupProbe {
    fn show(&self) -> Value {
        match self {
            StartupProbe::Http(url) => json!(url),
            StartupProbe::Tcp(addr) => json!(format!("tcp://{addr}")),
        }
    }
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
        assignments(raw, Self::FORM, |listen, target| {
            Some(Forward {
                listen: listen.parse().ok()?,
                target: is_host_port(target).then(|| target.to_owned())?,
            })
        })
    }
}

impl Show for Forward {
    fn show(&self) -> Value {
        json!(format!("{}={}", self.listen, self.target))
    }
}

/// The identity a mesh destination must prove (`KRUN_PEER_IDENTITIES`): outbound HBONE to
/// it fails unless the peer certificate carries exactly this SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// An IP address, or a host name as the app or `KRUN_FORWARD` names it.
    pub destination: String,
    /// The SPIFFE ID it must present.
    pub id: SpiffeId,
}

impl PeerIdentity {
    const FORM: &str = "a comma-separated list of DESTINATION=SPIFFE_ID (DESTINATION an IP address or host name), e.g. 10.8.0.12=spiffe://cluster.local/ns/prod/sa/db";

    fn parse_list(raw: &str) -> Result<Vec<PeerIdentity>, &'static str> {
        assignments(raw, Self::FORM, |destination, id| {
            // A port would never match: identities belong to workloads, not ports.
            let is_host_port = destination.contains(':') && destination.parse::<IpAddr>().is_err();
            (!destination.is_empty() && !is_host_port).then_some(())?;
            Some(PeerIdentity {
                destination: destination.to_owned(),
                id: id.parse().ok()?,
            })
        })
    }

    /// True when this entry names `host` (as written) or `ip`.
    pub fn names(&self, host: &str, ip: IpAddr) -> bool {
        self.destination.eq_ignore_ascii_case(host) || self.destination.parse::<IpAddr>() == Ok(ip)
    }
}

impl Show for PeerIdentity {
    fn show(&self) -> Value {
        json!(format!("{}={}", self.destination, self.id))
    }
}

/// A comma-separated list of `LEFT=RIGHT` items (each side trimmed), each made into a value
/// by `item`; any item without `=` or refused by `item` fails the list with `form`.
fn assignments<T>(
    raw: &str,
    form: &'static str,
    item: impl Fn(&str, &str) -> Option<T>,
) -> Result<Vec<T>, &'static str> {
    values::list(raw)
        .iter()
        .map(|entry| {
            let (left, right) = entry.split_once('=').ok_or(form)?;
            item(left.trim(), right.trim()).ok_or(form)
        })
        .collect()
}

/// `host:port` with a non-empty host and a numeric port.
fn is_host_port(raw: &str) -> bool {
    matches!(raw.rsplit_once(':'), Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok())
}

/// A comma-separated port list (`OUTBOUND_PORTS_EXCLUDE`, `KRUN_CAPTURE_INBOUND_PORTS`).
fn port_list(v: &str) -> Result<Vec<u16>, &'static str> {
    values::list(v)
        .iter()
        .map(|p| values::port(p))
        .collect::<Result<_, _>>()
        .map_err(|_| "a comma-separated list of port numbers")
}

/// A duration above zero (`SECRET_TTL`: a certificate valid for no time is never usable).
fn positive_duration(v: &str) -> Result<Duration, &'static str> {
    match values::duration(v)? {
        d if d.is_zero() => Err("a duration above zero such as 24h or 90m"),
        d => Ok(d),
    }
}

fn principals(raw: &str) -> Result<Vec<String>, &'static str> {
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

#[cfg(test)]
mod tests;
