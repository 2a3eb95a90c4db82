//! hgate's settings: parsed from an environment map like krun's ([`mesh::config`]), each value
//! remembering its source, printed by `--print-config` in the same shape.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh::config::{ConfigError, Env, LogFormat, Printer, Setting, Source, values};
use serde_json::Value;

/// Env var names (design.md §hgate plus hgate's own knobs).
pub mod names {
    #![allow(missing_docs)]
    pub const HGATE_SNI_ADDR: &str = "HGATE_SNI_ADDR";
    pub const HGATE_ROUTE_TEMPLATE: &str = "HGATE_ROUTE_TEMPLATE";
    pub const HGATE_ROUTES: &str = "HGATE_ROUTES";
    pub const HGATE_ADMIN_ADDR: &str = "HGATE_ADMIN_ADDR";
    pub const HGATE_ISTIOD_ADDR: &str = "HGATE_ISTIOD_ADDR";
    pub const HGATE_ISTIOD_UPSTREAM: &str = "HGATE_ISTIOD_UPSTREAM";
    pub const HGATE_HELLO_TIMEOUT: &str = "HGATE_HELLO_TIMEOUT";
    pub const HGATE_IDLE_TIMEOUT: &str = "HGATE_IDLE_TIMEOUT";
    pub const HGATE_DRAIN_TIMEOUT: &str = "HGATE_DRAIN_TIMEOUT";
    pub const HGATE_MAX_CONNECTIONS: &str = "HGATE_MAX_CONNECTIONS";
    pub const HGATE_ID_TOKENS: &str = "HGATE_ID_TOKENS";
    pub const HGATE_KUBE: &str = "HGATE_KUBE";
    pub const HGATE_ROUTE_REFRESH: &str = "HGATE_ROUTE_REFRESH";
    pub const HGATE_LOG_FORMAT: &str = "HGATE_LOG_FORMAT";
    pub const GCE_METADATA_HOST: &str = "GCE_METADATA_HOST";
    pub const KUBECONFIG: &str = "KUBECONFIG";
    pub const MESH_DEBUG: &str = "MESH_DEBUG";
    pub const PROJECT_NUMBER: &str = "PROJECT_NUMBER";
    pub const MESH_TENANT: &str = "MESH_TENANT";
}

use names::*;

/// The Cloud Run URL form of the reference: service name as host, the mTLS terminator port.
pub const DEFAULT_ROUTE_TEMPLATE: &str = "https://{service}.a.run.app/_hbone/15003";

/// Where ID tokens for the tunnels come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdTokens {
    /// The metadata server's `identity` endpoint (GKE Workload Identity: hgate's account).
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

/// Every hgate setting.
#[derive(Clone, Debug)]
pub struct HgateConfig {
    /// SNI listener.
    pub sni_addr: Setting<SocketAddr>,
    /// URL template for services without an explicit route.
    pub route_template: Setting<String>,
    /// Static routes file.
    pub routes: Option<Setting<PathBuf>>,
    /// Readiness, liveness and counters.
    pub admin_addr: Setting<SocketAddr>,
    /// istiod forwarding listener (`None`: off).
    pub istiod_addr: Option<Setting<SocketAddr>>,
    /// Where istiod forwarding goes (`host:port`).
    pub istiod_upstream: Setting<String>,
    /// How long a client may take to send its whole ClientHello.
    pub hello_timeout: Setting<Duration>,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Setting<Duration>,
    /// How long SIGTERM waits for open connections.
    pub drain_timeout: Setting<Duration>,
    /// Concurrent connections (SNI and istiod each).
    pub max_connections: Setting<usize>,
    /// ID token source.
    pub id_tokens: Setting<IdTokens>,
    /// Metadata server `host[:port]`.
    pub metadata_host: Setting<String>,
    /// Kubernetes API use.
    pub kube: Setting<KubeMode>,
    /// Kubeconfig path (outside a cluster).
    pub kubeconfig: Option<Setting<String>>,
    /// How often Service annotations and mesh-env are refreshed.
    pub route_refresh: Setting<Duration>,
    /// Log format.
    pub log_format: Setting<LogFormat>,
    /// Debug logs.
    pub mesh_debug: Setting<bool>,
    /// Published into mesh-env when set.
    pub project_number: Option<Setting<String>>,
    /// Published into mesh-env when set.
    pub mesh_tenant: Option<Setting<String>>,
}

fn text(env: &Env, name: &str) -> Option<Setting<String>> {
    env.get(name)
        .filter(|v| !v.is_empty())
        .map(|v| Setting::new(v.to_owned(), Source::Env))
}

fn parsed<T>(
    env: &Env,
    name: &str,
    default: T,
    expected: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Setting<T>, ConfigError> {
    match env.get(name).filter(|v| !v.is_empty()) {
        None => Ok(Setting::new(default, Source::Default)),
        Some(raw) => parse(raw)
            .map(|v| Setting::new(v, Source::Env))
            .ok_or_else(|| ConfigError::invalid(name, raw, expected)),
    }
}

fn addr(env: &Env, name: &str, default: &str) -> Result<Setting<SocketAddr>, ConfigError> {
    let fallback = default
        .parse()
        .map_err(|_| ConfigError::invalid(name, default, "ip:port"))?;
    parsed(env, name, fallback, "ip:port (e.g. 0.0.0.0:15442)", |v| {
        v.parse().ok()
    })
}

fn duration(env: &Env, name: &str, default: Duration) -> Result<Setting<Duration>, ConfigError> {
    parsed(env, name, default, "a duration like 5s or 1m", |v| {
        values::duration(v).ok()
    })
}

impl HgateConfig {
    /// Parses `env`; a bad value is a one-line error naming it.
    pub fn from_env(env: &Env) -> Result<HgateConfig, ConfigError> {
        let istiod_addr = match env.get(HGATE_ISTIOD_ADDR) {
            Some("off") => None,
            _ => Some(addr(env, HGATE_ISTIOD_ADDR, "0.0.0.0:15012")?),
        };
        let template = text(env, HGATE_ROUTE_TEMPLATE)
            .unwrap_or_else(|| Setting::new(DEFAULT_ROUTE_TEMPLATE.to_owned(), Source::Default));
        if !template.value.contains("{service}") {
            return Err(ConfigError::invalid(
                HGATE_ROUTE_TEMPLATE,
                &template.value,
                "an http(s) URL containing {service}",
            ));
        }
        Ok(HgateConfig {
            sni_addr: addr(env, HGATE_SNI_ADDR, "0.0.0.0:15442")?,
            route_template: template,
            routes: text(env, HGATE_ROUTES).map(|s| Setting::new(s.value.into(), s.source)),
            admin_addr: addr(env, HGATE_ADMIN_ADDR, "0.0.0.0:15021")?,
            istiod_addr,
            istiod_upstream: text(env, HGATE_ISTIOD_UPSTREAM).unwrap_or_else(|| {
                Setting::new("istiod.istio-system.svc:15012".into(), Source::Default)
            }),
            hello_timeout: duration(env, HGATE_HELLO_TIMEOUT, Duration::from_secs(5))?,
            idle_timeout: duration(env, HGATE_IDLE_TIMEOUT, Duration::from_secs(3600))?,
            drain_timeout: duration(env, HGATE_DRAIN_TIMEOUT, Duration::from_secs(30))?,
            max_connections: parsed(
                env,
                HGATE_MAX_CONNECTIONS,
                10_000,
                "a positive number",
                |v| v.parse().ok().filter(|n| *n > 0),
            )?,
            id_tokens: parsed(
                env,
                HGATE_ID_TOKENS,
                IdTokens::Metadata,
                "metadata or none",
                |v| match v {
                    "metadata" => Some(IdTokens::Metadata),
                    "none" => Some(IdTokens::None),
                    _ => None,
                },
            )?,
            metadata_host: text(env, GCE_METADATA_HOST).unwrap_or_else(|| {
                Setting::new("metadata.google.internal".into(), Source::Default)
            }),
            kube: parsed(
                env,
                HGATE_KUBE,
                KubeMode::Auto,
                "auto or off",
                |v| match v {
                    "auto" => Some(KubeMode::Auto),
                    "off" => Some(KubeMode::Off),
                    _ => None,
                },
            )?,
            kubeconfig: text(env, KUBECONFIG),
            route_refresh: duration(env, HGATE_ROUTE_REFRESH, Duration::from_secs(30))?,
            log_format: parsed(
                env,
                HGATE_LOG_FORMAT,
                LogFormat::Text,
                "text or json",
                |v| match v {
                    "text" => Some(LogFormat::Text),
                    "json" => Some(LogFormat::Json),
                    _ => None,
                },
            )?,
            mesh_debug: parsed(env, MESH_DEBUG, false, "true or false", |v| {
                values::boolean(v).ok()
            })?,
            project_number: text(env, PROJECT_NUMBER),
            mesh_tenant: text(env, MESH_TENANT),
        })
    }

    /// `--print-config`: keyed by variable, with value and source, secrets redacted.
    pub fn printable(&self) -> BTreeMap<String, Value> {
        let mut out = Printer::default();
        out.one(HGATE_SNI_ADDR, &self.sni_addr);
        out.one(HGATE_ROUTE_TEMPLATE, &self.route_template);
        out.opt(HGATE_ROUTES, &self.routes);
        out.one(HGATE_ADMIN_ADDR, &self.admin_addr);
        out.opt(HGATE_ISTIOD_ADDR, &self.istiod_addr);
        out.one(HGATE_ISTIOD_UPSTREAM, &self.istiod_upstream);
        out.duration(HGATE_HELLO_TIMEOUT, &self.hello_timeout);
        out.duration(HGATE_IDLE_TIMEOUT, &self.idle_timeout);
        out.duration(HGATE_DRAIN_TIMEOUT, &self.drain_timeout);
        out.one(HGATE_MAX_CONNECTIONS, &self.max_connections);
        out.one(HGATE_ID_TOKENS, &self.id_tokens);
        out.one(GCE_METADATA_HOST, &self.metadata_host);
        out.one(HGATE_KUBE, &self.kube);
        out.opt(KUBECONFIG, &self.kubeconfig);
        out.duration(HGATE_ROUTE_REFRESH, &self.route_refresh);
        out.one(HGATE_LOG_FORMAT, &self.log_format);
        out.one(MESH_DEBUG, &self.mesh_debug);
        out.opt(PROJECT_NUMBER, &self.project_number);
        out.opt(MESH_TENANT, &self.mesh_tenant);
        out.finish()
    }
}

#[cfg(test)]
mod tests {
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
