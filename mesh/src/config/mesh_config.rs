//! The settings discovery, identity and logging read: the mesh side of krun's configuration,
//! declared in one table.

use std::path::PathBuf;
use std::time::Duration;

use super::table::{parse, text};
use super::{Inputs, LogFormat, Setting, values};

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
/// Google's MeshCA, the default of `MESHCA_ENDPOINT`.
pub const DEFAULT_MESHCA_ENDPOINT: &str = "meshca.googleapis.com:443";
/// Google Certificate Authority Service, the default of `CAS_ENDPOINT`.
pub const DEFAULT_CAS_ENDPOINT: &str = "privateca.googleapis.com:443";

crate::settings! {
    /// What discovery, identity and logging read, shared by krun (which adds its own table)
    /// and anything else that discovers the mesh.
    #[derive(Clone, Debug)]
    pub struct MeshConfig {
        /// Mesh locator (`gke://`, `//container.googleapis.com/...`, `td:`, `file://`).
        mesh: Option<Setting<String>> = MESH => text(),
        /// K8s namespace of the workload: env, metadata (GSA `k8s-<ns>@`), project label, the
        /// project id rule, then `default`.
        workload_namespace: Setting<String> = WORKLOAD_NAMESPACE =>
            text().or_derive(namespace_from_project).or_default("default".to_owned()),
        /// Canonical service name.
        workload_name: Option<Setting<String>> = WORKLOAD_NAME =>
            text().or_derive(workload_name_from_k_service),
        /// KSA whose token and identity the workload uses.
        workload_service_account: Setting<String> = WORKLOAD_SERVICE_ACCOUNT =>
            text().or_default("default".to_owned()),
        /// Cloud Run service.
        k_service: Option<Setting<String>> = K_SERVICE => text(),
        /// Set by Cloud Run jobs, as `K_SERVICE` is by services.
        cloud_run_job: Option<Setting<String>> = CLOUD_RUN_JOB => text(),
        /// Cloud Run revision.
        k_revision: Option<Setting<String>> = K_REVISION => text(),
        /// Config (cluster) project id.
        project_id: Option<Setting<String>> = PROJECT_ID => text(),
        /// Project number.
        project_number: Option<Setting<String>> = PROJECT_NUMBER => parse(project_number),
        /// GKE cluster name.
        cluster_name: Option<Setting<String>> = CLUSTER_NAME => text(),
        /// GKE cluster location.
        cluster_location: Option<Setting<String>> = CLUSTER_LOCATION => text(),
        /// XDS address; `-` disables the agent.
        xds_addr: Option<Setting<String>> = XDS_ADDR => text(),
        /// Managed control plane tenant.
        mesh_tenant: Option<Setting<String>> = MESH_TENANT => text(),
        /// SPIFFE trust domain.
        trust_domain: Option<Setting<String>> = TRUST_DOMAIN =>
            text().or_derive(trust_domain_from_project),
        /// Istio ProxyConfig (YAML/JSON).
        proxy_config: Option<Setting<String>> = PROXY_CONFIG => text(),
        /// CA address (Istio CA, MeshCA, or `file:///dir`).
        ca_addr: Option<Setting<String>> = CA_ADDR => text(),
        /// Google CAS pool.
        ca_pool: Option<Setting<String>> = CA_POOL => parse(ca_pool),
        /// Google service account whose access token (IAM `generateAccessToken` from the STS
        /// federated token) authenticates krun to MeshCA; unset: the federated token itself.
        ca_service_account: Option<Setting<String>> = KRUN_CA_SERVICE_ACCOUNT =>
            parse(values::service_account_email),
        /// Where MeshCA is (`host:port` or an `https://` URL), verified with the system roots.
        meshca_endpoint: Setting<String> = MESHCA_ENDPOINT =>
            text().or_default(DEFAULT_MESHCA_ENDPOINT.to_owned()),
        /// Where CAS is (`host:port` or an `https://` URL), verified with the system roots.
        cas_endpoint: Setting<String> = CAS_ENDPOINT =>
            text().or_default(DEFAULT_CAS_ENDPOINT.to_owned()),
        /// Open-source Istio: istio-token audience `istio-ca`; unset: detected (managed
        /// tenant or not).
        oss_istio: Option<Setting<bool>> = OSS_ISTIO => parse(values::boolean),
        /// Verbose logs.
        mesh_debug: Setting<bool> = MESH_DEBUG => parse(values::boolean).or_default(false),
        /// Base directory for mesh files.
        mesh_base_dir: Setting<PathBuf> = MESH_BASE_DIR =>
            parse(values::path).or_compute(base_dir_for_user),
        /// kubeconfig path.
        kubeconfig: Option<Setting<String>> = KUBECONFIG => text(),
        /// Set by Kubernetes in a pod: krun runs in-cluster.
        kubernetes_service_host: Option<Setting<String>> = KUBERNETES_SERVICE_HOST => text(),
        /// A Google credentials file (service-account key or authorized user) for Google API
        /// calls off GCP; the metadata server stays first on GCP.
        google_application_credentials: Option<Setting<PathBuf>> =
            GOOGLE_APPLICATION_CREDENTIALS => parse(values::path),
        /// gcloud's configuration directory, where `gcloud auth application-default login`
        /// writes its credentials file.
        cloudsdk_config: Option<Setting<PathBuf>> = CLOUDSDK_CONFIG => parse(values::path),
        /// The user's home: gcloud's configuration directory is `$HOME/.config/gcloud` unless
        /// `CLOUDSDK_CONFIG` says otherwise.
        home: Option<Setting<PathBuf>> = HOME => parse(values::path),
        /// Metadata server `host[:port]`.
        gce_metadata_host: Setting<String> = GCE_METADATA_HOST =>
            text().or_default(DEFAULT_METADATA_HOST.to_owned()),
        /// GKE Container API base URL.
        container_api_endpoint: Setting<String> = CONTAINER_API_ENDPOINT =>
            parse(values::base_url).or_default(DEFAULT_CONTAINER_API.to_owned()),
        /// Google STS base URL.
        sts_endpoint: Setting<String> = STS_ENDPOINT =>
            parse(values::base_url).or_default(DEFAULT_STS.to_owned()),
        /// IAM Credentials base URL.
        iam_credentials_endpoint: Setting<String> = IAM_CREDENTIALS_ENDPOINT =>
            parse(values::base_url).or_default(DEFAULT_IAM_CREDENTIALS.to_owned()),
        /// Cloud Resource Manager base URL.
        resource_manager_endpoint: Setting<String> = RESOURCE_MANAGER_ENDPOINT =>
            parse(values::base_url).or_default(DEFAULT_RESOURCE_MANAGER.to_owned()),
        /// Per-attempt budget of a metadata server request.
        metadata_timeout: Setting<Duration> = KRUN_METADATA_TIMEOUT =>
            parse(values::duration).or_default(DEFAULT_METADATA_TIMEOUT),
        /// Budget of the "are we on GCP" probe.
        metadata_probe_timeout: Setting<Duration> = KRUN_METADATA_PROBE_TIMEOUT =>
            parse(values::duration).or_default(DEFAULT_METADATA_PROBE_TIMEOUT),
        /// Budget of the whole discovery phase.
        discovery_timeout: Setting<Duration> = KRUN_DISCOVERY_TIMEOUT =>
            parse(values::duration).or_default(DEFAULT_DISCOVERY_TIMEOUT),
        /// Log format.
        log_format: Setting<LogFormat> = KRUN_LOG_FORMAT =>
            parse(log_format).or_derive(json_on_cloud_run).or_default(LogFormat::Text),
    }
    /// Env var names of [`MeshConfig`]. Constants so a typo is a compile error.
    pub mod names;
}

impl MeshConfig {
    /// Resolves the environment alone (no layers): for tools and benchmarks that only
    /// discover.
    pub fn from_env(env: &super::Env) -> Result<Self, super::ConfigError> {
        Self::resolve(&Inputs::new(env))
    }
}

/// cloud-run-mesh's last guess before `default`, kept so its deployments resolve the same: project `acme-fortio-prod` serves namespace
/// `fortio` (the second-to-last of three or more dash-separated parts).
fn namespace_from_project(inputs: &Inputs) -> Option<String> {
    let project = inputs.string(names::PROJECT_ID)?.value;
    let parts: Vec<&str> = project.split('-').collect();
    (parts.len() > 2).then(|| parts[parts.len() - 2].to_owned())
}

/// `K_SERVICE=v2--reviews` is service `reviews`, version `v2`: cloud-run-mesh took the whole
/// `v2--reviews` as the name, so such revisions joined the mesh under the wrong service.
fn workload_name_from_k_service(inputs: &Inputs) -> Option<String> {
    let service = inputs.string(names::K_SERVICE)?.value;
    let name = service
        .split_once("--")
        .map_or(service.as_str(), |(_, name)| name);
    Some(name.to_owned())
}

/// The GKE workload identity pool of the config project.
fn trust_domain_from_project(inputs: &Inputs) -> Option<String> {
    let project = inputs.string(names::PROJECT_ID)?.value;
    Some(format!("{project}.svc.id.goog"))
}

/// Cloud Logging parses JSON lines into structured entries with severities. Only the
/// environment says whether this is Cloud Run.
fn json_on_cloud_run(inputs: &Inputs) -> Option<LogFormat> {
    let env = inputs.env();
    (env.get(names::K_SERVICE).is_some() || env.get(names::CLOUD_RUN_JOB).is_some())
        .then_some(LogFormat::Json)
}

/// Root writes the real paths; anyone else writes under the working directory.
fn base_dir_for_user(_: &Inputs) -> PathBuf {
    PathBuf::from(if nix::unistd::geteuid().is_root() {
        "/"
    } else {
        "."
    })
}

fn project_number(raw: &str) -> Result<String, &'static str> {
    raw.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| raw.to_owned())
        .ok_or("the numeric project number")
}

/// A CAS pool resource name: `projects/P/locations/L/caPools/NAME`, no part empty.
fn ca_pool(raw: &str) -> Result<String, &'static str> {
    let parts: Vec<&str> = raw.trim().split('/').collect();
    let valid = parts.len() == 6
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "caPools"
        && parts.iter().all(|p| !p.is_empty());
    valid
        .then(|| raw.trim().to_owned())
        .ok_or("a pool name projects/PROJECT/locations/LOCATION/caPools/NAME")
}

fn log_format(raw: &str) -> Result<LogFormat, &'static str> {
    match raw.trim() {
        "json" => Ok(LogFormat::Json),
        "text" => Ok(LogFormat::Text),
        _ => Err("json or text"),
    }
}
