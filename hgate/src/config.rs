//! hgate's settings: parsed from an environment map like krun's ([`mesh::config`]), each value
//! remembering its source, printed by `--print-config` in the same shape.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use mesh::config::table::{Rule, Show, parse, text};
use mesh::config::{
    ConfigError, DEFAULT_IAM_CREDENTIALS, Env, Inputs, LogFormat, Printer, Setting, values,
};
use serde_json::{Value, json};

/// hgate's default metadata server: by name, as GKE pods reach it (the default route's lookup
/// races a DNS resolution of this name against the HTTP probe).
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";

/// Cloud Run's deterministic service URL, the mTLS terminator port. `{project_number}` and
/// `{region}` are filled once at start ([`crate::default_route`]).
pub const DEFAULT_ROUTE_TEMPLATE: &str =
    "https://{service}-{project_number}.{region}.run.app/_hbone/15003";

/// Google's Cloud Run Admin API, the default of `CLOUD_RUN_API_ENDPOINT`.
pub const DEFAULT_CLOUD_RUN_API: &str = "https://run.googleapis.com";

/// Where ID tokens for the tunnels come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdTokens {
    /// hgate's own Google identity: the metadata server's `identity` endpoint (GKE Workload
    /// Identity: hgate's account), or off GCP a service-account key's token endpoint; IAM for
    /// `HGATE_ID_TOKEN_SERVICE_ACCOUNT` when that is set.
    Metadata,
    /// No Authorization header (an `http://` route to a local krun).
    None,
}

/// Whether hgate talks to the Kubernetes API (Service annotations, mesh-env).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubeMode {
    /// In cluster when `KUBERNETES_SERVICE_HOST` is set, else `KUBECONFIG` when set, else off.
    Auto,
    /// Never.
    Off,
}

mesh::settings! {
    /// Every hgate setting.
    #[derive(Clone, Debug)]
    pub struct HgateConfig {
        /// SNI listener.
        sni_addr: Setting<SocketAddr> = HGATE_SNI_ADDR =>
            parse(addr).or_default(any_ip(15442)),
        /// URL template for services without an explicit route.
        route_template: Setting<String> = HGATE_ROUTE_TEMPLATE =>
            parse(route_template).or_default(DEFAULT_ROUTE_TEMPLATE.to_owned()),
        /// Project number in the default route (unset: the metadata server's).
        cloud_run_project_number: Option<Setting<String>> = HGATE_CLOUD_RUN_PROJECT_NUMBER =>
            parse(project_number),
        /// Region in the default route (unset: the metadata server's).
        cloud_run_region: Option<Setting<String>> = HGATE_CLOUD_RUN_REGION => parse(region),
        /// Static routes file.
        routes: Option<Setting<PathBuf>> = HGATE_ROUTES => parse(values::path),
        /// Readiness, liveness and counters.
        admin_addr: Setting<SocketAddr> = HGATE_ADMIN_ADDR =>
            parse(addr).or_default(any_ip(15021)),
        /// istiod forwarding listener (`None`: off).
        istiod_addr: Option<Setting<SocketAddr>> = HGATE_ISTIOD_ADDR => AddrOrOff(any_ip(15012)),
        /// Where istiod forwarding goes (`host:port`).
        istiod_upstream: Setting<String> = HGATE_ISTIOD_UPSTREAM =>
            text().or_default("istiod.istio-system.svc:15012".to_owned()),
        /// How long a client may take to send its whole ClientHello.
        hello_timeout: Setting<Duration> = HGATE_HELLO_TIMEOUT =>
            parse(duration).or_default(Duration::from_secs(5)),
        /// A connection with no bytes either way for this long is closed.
        idle_timeout: Setting<Duration> = HGATE_IDLE_TIMEOUT =>
            parse(duration).or_default(Duration::from_secs(3600)),
        /// How long SIGTERM waits for open connections.
        drain_timeout: Setting<Duration> = HGATE_DRAIN_TIMEOUT =>
            parse(duration).or_default(Duration::from_secs(30)),
        /// Concurrent connections (SNI, istiod and admin each).
        max_connections: Setting<usize> = HGATE_MAX_CONNECTIONS =>
            parse(values::positive).or_default(10_000),
        /// ID token source.
        id_tokens: Setting<IdTokens> = HGATE_ID_TOKENS =>
            parse(id_tokens).or_default(IdTokens::Metadata),
        /// Service account whose ID tokens IAM mints (unset: hgate's own, from the metadata
        /// server).
        id_token_service_account: Option<Setting<String>> = HGATE_ID_TOKEN_SERVICE_ACCOUNT =>
            parse(values::service_account_email),
        /// IAM Credentials base URL.
        iam_credentials_endpoint: Setting<String> = IAM_CREDENTIALS_ENDPOINT =>
            parse(values::base_url).or_default(DEFAULT_IAM_CREDENTIALS.to_owned()),
        /// ID tokens (audiences) kept; the least recently used goes first.
        id_token_cache: Setting<usize> = HGATE_ID_TOKEN_CACHE =>
            parse(values::positive).or_default(1000),
        /// ID token mints allowed back to back.
        id_token_burst: Setting<usize> = HGATE_ID_TOKEN_BURST =>
            parse(values::positive).or_default(100),
        /// ID token mints per second after the burst.
        id_token_rate: Setting<usize> = HGATE_ID_TOKEN_RATE =>
            parse(values::positive).or_default(10),
        /// A Google credentials file, used when no metadata server answers: its access token
        /// asks IAM for `HGATE_ID_TOKEN_SERVICE_ACCOUNT`'s ID tokens and the Admin API for
        /// registration; a service-account key also mints its own ID tokens.
        google_application_credentials: Option<Setting<PathBuf>> =
            GOOGLE_APPLICATION_CREDENTIALS => parse(values::path),
        /// gcloud's configuration directory (its application-default credentials file).
        cloudsdk_config: Option<Setting<PathBuf>> = CLOUDSDK_CONFIG => parse(values::path),
        /// The home directory, where gcloud's configuration directory is by default.
        home: Option<Setting<PathBuf>> = HOME => parse(values::path),
        /// Metadata server `host[:port]`.
        metadata_host: Setting<String> = GCE_METADATA_HOST =>
            text().or_default(DEFAULT_METADATA_HOST.to_owned()),
        /// Kubernetes API use.
        kube: Setting<KubeMode> = HGATE_KUBE => parse(kube_mode).or_default(KubeMode::Auto),
        /// Kubeconfig path (outside a cluster).
        kubeconfig: Option<Setting<String>> = KUBECONFIG => text(),
        /// Log format.
        log_format: Setting<LogFormat> = HGATE_LOG_FORMAT =>
            parse(log_format).or_default(LogFormat::Text),
        /// Debug logs.
        mesh_debug: Setting<bool> = MESH_DEBUG =>
            parse(|v| values::boolean(v).map_err(|_| "true or false")).or_default(false),
        /// Published into mesh-env when set.
        project_number: Option<Setting<String>> = PROJECT_NUMBER => text(),
        /// Published into mesh-env when set.
        mesh_tenant: Option<Setting<String>> = MESH_TENANT => text(),
        /// Cloud Run services carrying this label are registered in the mesh, in the
        /// namespace its value names (unset: registration off).
        register_label: Option<Setting<String>> = HGATE_REGISTER_LABEL => parse(label_key),
        /// Regions whose Cloud Run services are registered (unset: `HGATE_CLOUD_RUN_REGION`).
        register_regions: Option<Setting<Vec<String>>> = HGATE_REGISTER_REGIONS =>
            parse(regions),
        /// How often the Cloud Run services are listed and the cluster reconciled.
        register_interval: Setting<Duration> = HGATE_REGISTER_INTERVAL =>
            parse(interval).or_default(Duration::from_secs(60)),
        /// Cloud Run Admin API base URL.
        cloud_run_api_endpoint: Setting<String> = CLOUD_RUN_API_ENDPOINT =>
            parse(values::base_url).or_default(DEFAULT_CLOUD_RUN_API.to_owned()),
    }
    /// Env var names: those hgate shares with krun, and hgate's own `HGATE_*` knobs.
    pub mod names;
}

impl HgateConfig {
    /// Parses `env`; a bad value is a one-line error naming it.
    pub fn from_env(env: &Env) -> Result<HgateConfig, ConfigError> {
        let config = Self::resolve(&Inputs::new(env))?;
        if let Some(gsa) = &config.id_token_service_account
            && config.id_tokens.value == IdTokens::None
        {
            return Err(ConfigError::invalid(
                names::HGATE_ID_TOKEN_SERVICE_ACCOUNT,
                &gsa.value,
                "unset while HGATE_ID_TOKENS=none (no ID token is sent); set HGATE_ID_TOKENS=metadata to send this account's tokens",
            ));
        }
        if let Some(label) = &config.register_label
            && config.kube.value == KubeMode::Off
        {
            return Err(ConfigError::invalid(
                names::HGATE_REGISTER_LABEL,
                &label.value,
                "set while HGATE_KUBE=off (registration writes Kubernetes objects); set HGATE_KUBE=auto",
            ));
        }
        if config.register_label.is_none()
            && let Some(regions) = &config.register_regions
        {
            return Err(ConfigError::invalid(
                names::HGATE_REGISTER_REGIONS,
                &regions.value.join(","),
                "set while HGATE_REGISTER_LABEL is unset (registration is off); set HGATE_REGISTER_LABEL=krun-mesh to register the labelled Cloud Run services",
            ));
        }
        Ok(config)
    }

    /// `--print-config`: keyed by variable, with value and source, secrets redacted.
    pub fn printable(&self) -> BTreeMap<String, Value> {
        let mut out = Printer::default();
        self.print(&mut out);
        out.finish()
    }
}

impl Show for IdTokens {
    fn show(&self) -> Value {
        json!(self)
    }
}

impl Show for KubeMode {
    fn show(&self) -> Value {
        json!(self)
    }
}

/// A listener on every interface.
const fn any_ip(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
}

/// A listener address that `off` turns off (`None`); unset means the default address.
struct AddrOrOff(SocketAddr);

impl Rule for AddrOrOff {
    type Value = Option<Setting<SocketAddr>>;

    fn resolve(self, name: &'static str, inputs: &Inputs) -> Result<Self::Value, ConfigError> {
        match inputs.lookup(name) {
            Some(("off", _)) => Ok(None),
            _ => parse(addr)
                .or_default(self.0)
                .resolve(name, inputs)
                .map(Some),
        }
    }

    fn print(self, name: &'static str, value: &Self::Value, out: &mut Printer) {
        out.optional(name, value);
    }
}

fn addr(raw: &str) -> Result<SocketAddr, &'static str> {
    raw.parse().map_err(|_| "ip:port (e.g. 0.0.0.0:15442)")
}

fn duration(raw: &str) -> Result<Duration, &'static str> {
    values::duration(raw).map_err(|_| "a duration like 5s or 1m")
}

fn interval(raw: &str) -> Result<Duration, &'static str> {
    values::duration(raw)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or("a duration above zero like 30s or 5m")
}

fn route_template(raw: &str) -> Result<String, &'static str> {
    raw.contains("{service}")
        .then(|| raw.to_owned())
        .ok_or("an http(s) URL containing {service}")
}

fn project_number(raw: &str) -> Result<String, &'static str> {
    (!raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()))
        .then(|| raw.to_owned())
        .ok_or("the numeric project number (e.g. 123456789012), not the project id")
}

fn region(raw: &str) -> Result<String, &'static str> {
    (!raw.is_empty()
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    .then(|| raw.to_owned())
    .ok_or("a Cloud Run region like us-central1")
}

/// A Cloud Run label key: lower-case letters, digits, `_` and `-`, starting with a letter,
/// at most 63 characters (<https://cloud.google.com/run/docs/configuring/services/labels>).
fn label_key(raw: &str) -> Result<String, &'static str> {
    let ok = raw.len() <= 63
        && raw.starts_with(|c: char| c.is_ascii_lowercase())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    ok.then(|| raw.to_owned())
        .ok_or("a Cloud Run label key like krun-mesh (lower-case letters, digits, _ and -)")
}

fn regions(raw: &str) -> Result<Vec<String>, &'static str> {
    let list: Vec<String> = values::list(raw)
        .iter()
        .map(|r| {
            region(r).map_err(|_| "a comma-separated list of regions like us-central1,europe-west1")
        })
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err("a comma-separated list of regions like us-central1,europe-west1");
    }
    Ok(list)
}

fn id_tokens(raw: &str) -> Result<IdTokens, &'static str> {
    match raw {
        "metadata" => Ok(IdTokens::Metadata),
        "none" => Ok(IdTokens::None),
        _ => Err("metadata or none"),
    }
}

fn kube_mode(raw: &str) -> Result<KubeMode, &'static str> {
    match raw {
        "auto" => Ok(KubeMode::Auto),
        "off" => Ok(KubeMode::Off),
        _ => Err("auto or off"),
    }
}

fn log_format(raw: &str) -> Result<LogFormat, &'static str> {
    match raw {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("text or json"),
    }
}

#[cfg(test)]
mod tests {
    use super::names::*;
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_iter(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = HgateConfig::from_env(&env(&[])).expect("config");
        assert_eq!(c.sni_addr.value.to_string(), "0.0.0.0:15442");
        assert_eq!(c.route_template.value, DEFAULT_ROUTE_TEMPLATE);
        assert_eq!(c.hello_timeout.value, Duration::from_secs(5));
        assert_eq!(
            c.istiod_addr.map(|s| s.value.to_string()).as_deref(),
            Some("0.0.0.0:15012")
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = HgateConfig::from_env(&env(&[(HGATE_HELLO_TIMEOUT, "soon")]))
            .expect_err("invalid")
            .to_string();
        assert!(e.starts_with("HGATE_HELLO_TIMEOUT=soon: expected"), "{e}");
        let e = HgateConfig::from_env(&env(&[(HGATE_ROUTE_TEMPLATE, "https://x/")]))
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("{service}"), "{e}");
        let e = HgateConfig::from_env(&env(&[
            (HGATE_ID_TOKENS, "none"),
            (
                HGATE_ID_TOKEN_SERVICE_ACCOUNT,
                "gate@p.iam.gserviceaccount.com",
            ),
        ]))
        .expect_err("a service account with no tokens acts on nothing")
        .to_string();
        assert!(e.contains("HGATE_ID_TOKENS=metadata"), "{e}");
        let e = HgateConfig::from_env(&env(&[(HGATE_ID_TOKEN_SERVICE_ACCOUNT, "gate")]))
            .expect_err("not an email")
            .to_string();
        assert!(
            e.starts_with("HGATE_ID_TOKEN_SERVICE_ACCOUNT=gate: expected"),
            "{e}"
        );
    }

    #[test]
    fn registration_settings_are_checked() {
        let c = HgateConfig::from_env(&env(&[
            (HGATE_REGISTER_LABEL, "krun-mesh"),
            (HGATE_REGISTER_REGIONS, "us-central1, europe-west1"),
        ]))
        .expect("config");
        assert_eq!(
            c.register_regions.map(|r| r.value),
            Some(vec!["us-central1".to_owned(), "europe-west1".to_owned()])
        );
        let e = HgateConfig::from_env(&env(&[(HGATE_REGISTER_LABEL, "Krun Mesh")]))
            .expect_err("not a label key")
            .to_string();
        assert!(
            e.starts_with("HGATE_REGISTER_LABEL=Krun Mesh: expected"),
            "{e}"
        );
        let e = HgateConfig::from_env(&env(&[(HGATE_REGISTER_REGIONS, "us-central1")]))
            .expect_err("regions without a label act on nothing")
            .to_string();
        assert!(e.contains("HGATE_REGISTER_LABEL=krun-mesh"), "{e}");
        let e = HgateConfig::from_env(&env(&[
            (HGATE_REGISTER_LABEL, "krun-mesh"),
            (HGATE_REGISTER_REGIONS, "us central"),
        ]))
        .expect_err("bad region")
        .to_string();
        assert!(
            e.starts_with("HGATE_REGISTER_REGIONS=us central: expected"),
            "{e}"
        );
    }

    /// docs/hgate.md is the operator's reference: every variable hgate prints must be there.
    #[test]
    fn every_printed_variable_is_documented() {
        let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/hgate.md");
        let doc = std::fs::read_to_string(doc_path).expect("docs/hgate.md exists");
        let config = HgateConfig::from_env(&env(&[])).expect("config");
        let missing: Vec<String> = config
            .printable()
            .into_keys()
            .filter(|name| !doc.contains(&format!("`{name}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "add these to docs/hgate.md: {missing:?}"
        );
    }
}
