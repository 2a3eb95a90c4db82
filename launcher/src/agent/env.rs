//! The agent's environment: the variables cloud-run-mesh gives pilot-agent, with the same names
//! and values, so a cloud-run-mesh deployment keeps working. The agent inherits krun's
//! environment; these are the additions. Every addition is "add if missing": a variable the
//! user set wins. Beyond cloud-run-mesh's set, krun gives the agent what Istio's injection
//! template gives a sidecar and Cloud Run can know (`INSTANCE_IP`, `ISTIO_META_CLUSTER_ID`,
//! `ISTIO_META_OWNER`, `ISTIO_META_POD_PORTS`, ...); docs/configuration.md has the table. Three
//! are facts krun established and always set: the interception mode
//! (`ISTIO_META_INTERCEPTION_MODE`, `REDIRECT` with capture, `NONE` plus
//! `ISTIO_META_HTTP_PROXY_PORT` without, which is what makes istiod build Envoy's 15007
//! listener), `DISABLE_ENVOY` (Envoy cannot run), and `GRPC_XDS_BOOTSTRAP` (always the
//! absolute path the app gets too; cloud-run-mesh gave the agent a relative `./etc/...` path
//! and the app an absolute one).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::layout::Layout;
use super::{Workload, xds};
use mesh::config::Env;
use mesh::istio::{DNS_PORT, Interception, STS_PORT, WHITEBOX_PROXY_PORT};

/// The app's port when `PORT` is unset (Cloud Run's default).
const DEFAULT_APP_PORT: u16 = 8080;

/// Everything the agent's environment and command line are derived from.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSetup {
    /// The workload's identity.
    pub workload: Workload,
    /// The XDS address.
    pub xds: String,
    /// The user supplied `PROXY_CONFIG` (then krun adds no MCP variables).
    pub user_proxy_config: bool,
    /// File layout.
    pub layout: Layout,
    /// Absolute gRPC xDS bootstrap path, shared with the app.
    pub grpc_bootstrap: PathBuf,
    /// krun runs as root.
    pub root: bool,
    /// Effective interception (whitebox when not root, `NONE` or a gateway).
    pub interception: Interception,
    /// krun holds a GKE workload certificate.
    pub workload_cert: bool,
    /// Envoy's bootstrap template, `None` when Envoy or its template is missing (grpc-agent).
    pub envoy_template: Option<PathBuf>,
    /// Envoy's binary when `KRUN_ENVOY_PATH` moved it from pilot-agent's default (passed as
    /// ProxyConfig `binaryPath`).
    pub envoy_binary: Option<PathBuf>,
    /// `XDS_AGENT_DEBUG`.
    pub xds_agent_debug: Option<String>,
    /// `ENVOY_LOG_LEVEL`.
    pub envoy_log_level: Option<String>,
    /// The instance's IP (`INSTANCE_IP`; pilot-agent falls back to 127.0.0.1 when it finds
    /// only link-local addresses).
    pub instance_ip: Option<String>,
    /// istiod's root certificate, written where pilot-agent looks for it
    /// (`var/run/secrets/istio/root-cert.pem`) when it verifies istiod with it.
    pub istiod_root: Option<String>,
}

impl AgentSetup {
    /// `pilot-agent proxy sidecar|router ...`, the command line cloud-run-mesh runs; `router`
    /// for a gateway.
    pub fn argv(&self, pilot_agent: &std::path::Path) -> Vec<String> {
        let w = &self.workload;
        let role = if w.gateway.is_some() {
            "router"
        } else {
            "sidecar"
        };
        let mut argv = vec![
            pilot_agent.display().to_string(),
            "proxy".to_owned(),
            role.to_owned(),
            "--domain".to_owned(),
            format!("{}.svc.cluster.local", w.namespace),
            "--serviceCluster".to_owned(),
            format!("{}.{}", w.name, w.namespace),
        ];
        if let Some(level) = &self.xds_agent_debug {
            argv.push(format!("--log_output_level={level}"));
        }
        if let Some(level) = &self.envoy_log_level {
            argv.push(format!("--proxyLogLevel={level}"));
        }
        argv.push(format!("--stsPort={STS_PORT}"));
        argv
    }

    /// The variables added to the agent's environment; names `env` already sets are left out
    /// (except the three facts in the module docs).
    pub fn agent_env(&self, env: &Env) -> BTreeMap<String, String> {
        let w = &self.workload;
        let mut out = BTreeMap::new();
        let mut add = |name: &str, value: String| {
            if env.get(name).is_none() {
                out.insert(name.to_owned(), value);
            }
        };
        // configPath absolute: pilot-agent puts its XDS socket there and names it in the gRPC
        // bootstrap as `unix:///<configPath>/XDS`; its relative default would name
        // `/etc/istio/proxy/XDS` whatever the working directory.
        let mut proxy_config = serde_json::json!({
            "discoveryAddress": self.xds,
            "configPath": self.layout.proxy_dir().display().to_string(),
        });
        if let Some(envoy) = &self.envoy_binary {
            proxy_config["binaryPath"] = serde_json::json!(envoy.display().to_string());
        }
        add("PROXY_CONFIG", proxy_config.to_string());
        if xds::is_istiod(&self.xds) {
            add("ISTIOD_SAN", "istiod.istio-system.svc".to_owned());
        } else {
            add("XDS_ROOT_CA", "SYSTEM".to_owned());
            add("CA_ROOT_CA", "SYSTEM".to_owned());
            add("PILOT_CERT_PROVIDER", "system".to_owned());
        }
        add("POD_NAMESPACE", w.namespace.clone());
        add("POD_NAME", w.pod_name.clone());
        if let Some(ip) = &self.instance_ip {
            add("INSTANCE_IP", ip.clone());
        }
        add("ISTIO_META_WORKLOAD_NAME", w.name.clone());
        add(
            "ISTIO_META_OWNER",
            format!(
                "kubernetes://apis/serving.knative.dev/v1/namespaces/{}/services/{}",
                w.namespace, w.name
            ),
        );
        let port = env
            .get("PORT")
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or(DEFAULT_APP_PORT);
        add(
            "ISTIO_META_POD_PORTS",
            serde_json::json!([{ "name": "http", "containerPort": port, "protocol": "TCP" }])
                .to_string(),
        );
        add("CANONICAL_SERVICE", w.name.clone());
        add("CANONICAL_REVISION", w.revision.clone());
        add("SERVICE_ACCOUNT", w.service_account.clone());
        if let Some(mesh_id) = w
            .project_number
            .as_ref()
            .map(|number| format!("proj-{number}"))
            .or_else(|| w.trust_domain.clone())
        {
            add("ISTIO_META_MESH_ID", mesh_id);
        }
        add("ISTIO_META_CLUSTER_ID", w.cluster_id.clone());
        // The agent's own directory: krun's certificates (var/run/secrets/istio.io) have one
        // writer, krun.
        add(
            "OUTPUT_CERTS",
            format!("{}/", self.layout.agent_certs().display()),
        );
        if self.interception == Interception::Iptables {
            add("ISTIO_META_DNS_CAPTURE", "true".to_owned());
            // Where the capture rules send DNS (KRUN_CAPTURE_DNS); krun never points
            // /etc/resolv.conf at :53 as cloud-run-mesh did (it rewrote the file as root).
            add("DNS_PROXY_ADDR", format!("localhost:{}", DNS_PORT));
        }
        if let (Some(p), Some(l), Some(c)) = (&w.project_id, &w.cluster_location, &w.cluster_name) {
            add(
                "GKE_CLUSTER_URL",
                mesh::identity::google_tokens::cluster_url(p, l, c),
            );
        }
        let part = |v: &Option<String>| v.clone().unwrap_or_default();
        add(
            "GCP_METADATA",
            [
                part(&w.project_id),
                part(&w.project_number),
                part(&w.cluster_name),
                part(&w.cluster_location),
            ]
            .join("|"),
        );
        add("XDS_ADDR", self.xds.clone());
        add("JWT_POLICY", "third-party-jwt".to_owned());
        add("PROXY_CONFIG_XDS_AGENT", "true".to_owned());
        if let Some(td) = &w.trust_domain {
            add("TRUST_DOMAIN", td.clone());
        }
        add("ISTIO_META_APP_CONTAINERS", "cloudrun".to_owned());
        if self.workload_cert {
            add("CA_PROVIDER", "GoogleGkeWorkloadCertificate".to_owned());
        }
        if w.has_tenant() && !self.user_proxy_config {
            add("CA_ADDR", "meshca.googleapis.com:443".to_owned());
            add("XDS_AUTH_PROVIDER", "gcp".to_owned());
            add("ISTIO_META_CLOUDRUN_ADDR", part(&w.tenant));
        }
        if let Some(template) = &self.envoy_template {
            add("ISTIO_BOOTSTRAP", template.display().to_string());
        }
        if !self.root {
            add("ISTIO_META_UNPRIVILEGED_POD", "true".to_owned());
        }
        // Facts krun established: always set.
        if self.interception == Interception::Whitebox {
            out.insert("ISTIO_META_INTERCEPTION_MODE".into(), "NONE".into());
            out.insert(
                "ISTIO_META_HTTP_PROXY_PORT".into(),
                WHITEBOX_PROXY_PORT.to_string(),
            );
        } else {
            out.insert("ISTIO_META_INTERCEPTION_MODE".into(), "REDIRECT".into());
        }
        if self.envoy_template.is_none() {
            out.insert("DISABLE_ENVOY".into(), "true".into());
        }
        out.insert(
            "GRPC_XDS_BOOTSTRAP".into(),
            self.grpc_bootstrap.display().to_string(),
        );
        out
    }
}

/// What the app gets for proxyless gRPC and, in whitebox mode, the HTTP proxy, as in
/// cloud-run-mesh, except that `HTTP_PROXY` is a URL with its scheme (cloud-run-mesh set a bare
/// `127.0.0.1:15007`). User-set values win, except `GRPC_XDS_BOOTSTRAP`, which is made absolute
/// so the app and the agent agree.
pub fn app_env(
    env: &Env,
    grpc_bootstrap: &std::path::Path,
    whitebox_proxy: bool,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut add = |name: &str, value: &str| {
        if env.get(name).is_none() {
            out.insert(name.to_owned(), value.to_owned());
        }
    };
    add("GRPC_XDS_EXPERIMENTAL_RBAC", "true");
    add("GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT", "true");
    if whitebox_proxy {
        let proxy = std::net::SocketAddr::from(([127, 0, 0, 1], WHITEBOX_PROXY_PORT));
        for (name, value) in crate::capture::whitebox::proxy_env(proxy) {
            add(name, &value);
        }
    }
    out.insert(
        "GRPC_XDS_BOOTSTRAP".into(),
        grpc_bootstrap.display().to_string(),
    );
    out
}

/// The absolute gRPC bootstrap path: the user's `GRPC_XDS_BOOTSTRAP` resolved against krun's
/// working directory, else the layout's.
pub fn grpc_bootstrap_path(user: Option<&str>, layout: &Layout) -> std::io::Result<PathBuf> {
    match user {
        Some(path) if std::path::Path::new(path).is_absolute() => Ok(PathBuf::from(path)),
        Some(path) => Ok(std::env::current_dir()?.join(path)),
        None => Ok(layout.grpc_bootstrap()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(xds: &str, root: bool, interception: Interception) -> AgentSetup {
        let layout = Layout::new(std::path::Path::new("/base")).expect("layout");
        AgentSetup {
            workload: Workload {
                namespace: "ns".into(),
                name: "svc".into(),
                revision: "v1".into(),
                pod_name: "svc--1".into(),
                service_account: "default".into(),
                gateway: None,
                tenant: None,
                project_id: None,
                project_number: None,
                cluster_name: None,
                cluster_location: None,
                trust_domain: None,
                cluster_id: "Kubernetes".into(),
            },
            xds: xds.into(),
            user_proxy_config: false,
            grpc_bootstrap: layout.grpc_bootstrap(),
            layout,
            root,
            interception,
            workload_cert: true,
            envoy_template: None,
            envoy_binary: None,
            xds_agent_debug: None,
            envoy_log_level: None,
            instance_ip: Some("10.8.0.3".into()),
            istiod_root: None,
        }
    }

    #[test]
    fn capture_and_privileges_decide_the_dns_and_whitebox_variables() {
        let none = Env::default();
        let captured = setup("10.0.0.1:15012", true, Interception::Iptables).agent_env(&none);
        assert_eq!(captured["ISTIO_META_DNS_CAPTURE"], "true");
        assert_eq!(captured["DNS_PROXY_ADDR"], "localhost:15053");
        assert_eq!(captured["ISTIO_META_INTERCEPTION_MODE"], "REDIRECT");
        assert!(!captured.contains_key("ISTIO_META_HTTP_PROXY_PORT"));
        assert_eq!(captured["INSTANCE_IP"], "10.8.0.3");
        assert_eq!(captured["ISTIO_META_CLUSTER_ID"], "Kubernetes");
        assert_eq!(
            captured["ISTIO_META_POD_PORTS"],
            r#"[{"containerPort":8080,"name":"http","protocol":"TCP"}]"#
        );
        assert_eq!(
            captured["ISTIO_META_OWNER"],
            "kubernetes://apis/serving.knative.dev/v1/namespaces/ns/services/svc"
        );
        assert_eq!(
            captured["OUTPUT_CERTS"],
            "/base/var/run/secrets/istio-agent/"
        );
        assert!(!captured.contains_key("ISTIO_META_UNPRIVILEGED_POD"));
        assert_eq!(captured["CA_PROVIDER"], "GoogleGkeWorkloadCertificate");
        assert_eq!(captured["DISABLE_ENVOY"], "true");
        assert_eq!(captured["GCP_METADATA"], "|||");
        assert_eq!(
            captured["GRPC_XDS_BOOTSTRAP"],
            "/base/etc/istio/proxy/grpc_bootstrap.json"
        );
        let whitebox = setup("10.0.0.1:15012", false, Interception::Whitebox).agent_env(&none);
        assert_eq!(whitebox["ISTIO_META_UNPRIVILEGED_POD"], "true");
        assert_eq!(whitebox["ISTIO_META_INTERCEPTION_MODE"], "NONE");
        assert_eq!(whitebox["ISTIO_META_HTTP_PROXY_PORT"], "15007");
        assert!(!whitebox.contains_key("HTTP_PROXY_PORT"));
        assert!(!whitebox.contains_key("ISTIO_META_DNS_CAPTURE"));
    }

    #[test]
    fn facts_krun_established_override_the_user_and_the_rest_yields() {
        let user: Env = [
            ("ISTIO_META_INTERCEPTION_MODE", "REDIRECT"),
            ("DISABLE_ENVOY", "false"),
            ("POD_NAME", "mine"),
        ]
        .into_iter()
        .collect();
        let out = setup("a:443", true, Interception::Whitebox).agent_env(&user);
        assert_eq!(out["ISTIO_META_INTERCEPTION_MODE"], "NONE");
        assert_eq!(out["DISABLE_ENVOY"], "true");
        assert!(
            !out.contains_key("POD_NAME"),
            "inherited from krun: the user's value"
        );
        assert_eq!(out["PILOT_CERT_PROVIDER"], "system");
    }
}
