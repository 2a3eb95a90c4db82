//! Mesh discovery: where is the mesh, which cluster holds its configuration, and what does
//! `istio-system/mesh-env` say. The sources and their precedence are cloud-run-mesh's; its
//! bugs are not kept: mesh-env no longer replaces environment values, the cluster resource
//! name is `clusters/` not `cluster/`, the path of `gke://` is honoured, the first `istio*`
//! cluster wins (not the last), `TRUST_DOMAIN` is not overwritten, a failed lookup no longer
//! skips the steps after it, and a missing project or client is an error instead of a panic.
//!
//! cloud-run-mesh makes about nine calls one after another. Here the calls form a graph and
//! each runs as soon as its inputs exist:
//!
//! ```text
//! metadata: probe | project | number | email | region | token      (all at once)
//!                    \-> Resource Manager (only when namespace or number is still unknown)
//!                    \-> GKE get or list+select -> K8s client -> mesh-env
//! kubeconfig / in-cluster client -> mesh-env                        (at once, MESH unset)
//! ```
//!
//! The result is two [`Layer`]s (discovered values with their sources, then mesh-env) that
//! [`apply`] merges below the environment: the environment always wins.

pub mod gcp_hint;
pub mod gke;
pub mod google_api;
pub mod kube_client;
pub mod mesh_env;
pub mod mesh_url;
pub mod resource_manager;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::config::{ConfigError, Layer, Merge, MeshConfig, Setting, Source, names};
use crate::credentials::AccessTokens;
use crate::credentials::CredentialsError;
use crate::credentials::file_tokens::FileTokens;
use crate::credentials::key_file::{self, Located, Origin};
use crate::metadata::{
    MetadataClient, MetadataError, NotGcp, Platform, ProbeOptions, last_segment, paths,
};
use gcp_hint::GcpHint;
use gke::{Cluster, ClusterSelector, ContainerApi};
use google_api::{ApiError, GoogleApi};
use kube_client::KubeClientError;
use mesh_env::{MeshEnv, MeshEnvError};
use mesh_url::{GkeTarget, MeshUrl, MeshUrlError};

/// Discovery failed; each message names the input at fault and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// `MESH` does not parse.
    #[error(transparent)]
    Mesh(#[from] MeshUrlError),
    /// A metadata lookup failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The mesh needs GCP, and there is no metadata server.
    #[error(
        "MESH={mesh} needs Google credentials, but there is no metadata server at {host} ({why}); run on GCP, set GCE_METADATA_HOST, set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run `gcloud auth application-default login`"
    )]
    NotOnGcp {
        /// The `MESH` value.
        mesh: String,
        /// The metadata host probed.
        host: String,
        /// What the probe saw.
        why: NotGcp,
    },
    /// No project to look for clusters in.
    #[error(
        "no config project: MESH names none, PROJECT_ID is unset and the metadata server has no project/project-id"
    )]
    NoProject,
    /// `PROJECT_ID` and `MESH` disagree on the config project.
    #[error(
        "PROJECT_ID={env} but MESH names project {mesh}: the config project is the cluster's; unset PROJECT_ID or make them agree"
    )]
    ProjectConflict {
        /// `PROJECT_ID`.
        env: String,
        /// The project in `MESH`.
        mesh: String,
    },
    /// A Google API call failed.
    #[error("{what}: {cause}")]
    Api {
        /// Which lookup.
        what: String,
        /// Why.
        cause: Box<ApiError>,
    },
    /// `MESH` names a project with no usable cluster.
    #[error("no GKE cluster {filter} in project {project}; {fix}")]
    NoCluster {
        /// The project listed.
        project: String,
        /// What was looked for.
        filter: String,
        /// What to do.
        fix: String,
    },
    /// The credentials file cannot be used, or no token source could be built from it.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The K8s client could not be built.
    #[error(transparent)]
    KubeClient(#[from] KubeClientError),
    /// mesh-env could not be read.
    #[error(transparent)]
    MeshEnv(#[from] MeshEnvError),
    /// The whole discovery took longer than its budget.
    #[error(
        "mesh discovery did not finish within KRUN_DISCOVERY_TIMEOUT={0:?}; the log shows the last step that started"
    )]
    Timeout(Duration),
}

/// What discovery found.
#[derive(Default)]
pub struct Discovery {
    /// Values from metadata, MESH, GKE and Resource Manager, each with its source.
    pub discovered: Layer,
    /// The mesh-env map (cluster ConfigMap or `MESH=file://`).
    pub mesh_env: MeshEnv,
    /// Whether a mesh was found: `false` means krun runs as a plain supervisor.
    pub mesh: bool,
    /// The config cluster's K8s client, when discovery built one: the identity phase mints
    /// the istio-token with it.
    pub kube: Option<kube::Client>,
    /// Where this instance runs (metadata `instance/*`), for the Traffic Director bootstrap.
    pub instance: InstanceFacts,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("discovered", &self.discovered)
            .field("mesh_env", &self.mesh_env)
            .field("mesh", &self.mesh)
            .field("kube", &self.kube.as_ref().map(|_| "kube::Client"))
            .field("instance", &self.instance)
            .finish()
    }
}

/// The instance's zone, id and IP from the metadata server; read only for Traffic Director,
/// whose bootstrap names the node and its locality.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceFacts {
    /// Last path segment of `instance/zone` (`us-central1-a`).
    pub zone: Option<String>,
    /// `instance/id`.
    pub id: Option<String>,
    /// `instance/network-interfaces/0/ip`.
    pub ip: Option<String>,
}

/// Merges what discovery found below the environment: discovered values first, then
/// mesh-env. Values the environment set, `PORT_*` included, are kept.
pub fn apply(config: &mut impl Merge, discovery: &Discovery) -> Result<(), ConfigError> {
    config.merge(discovery.discovered.clone())?;
    config.merge(Layer::from_map(Source::MeshEnv, &discovery.mesh_env))
}

/// Runs `fut` as a named discovery step and logs how long it took.
pub async fn phase<T>(name: &str, fut: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let out = fut.await;
    tracing::info!(
        step = name,
        step_ms = start.elapsed().as_secs_f64() * 1000.0,
        "discovery step done"
    );
    out
}

/// Discovers the mesh for `config`, within `KRUN_DISCOVERY_TIMEOUT`. Read-only: GETs only,
/// nothing written, so `--print-config` runs it too.
pub async fn discover(config: &MeshConfig) -> Result<Discovery, DiscoveryError> {
    let budget = config.discovery_timeout.value;
    let mesh = config
        .mesh
        .as_ref()
        .map(|m| MeshUrl::parse(&m.value))
        .transpose()?;
    if let Some(MeshUrl::File(path)) = &mesh {
        let mesh_env = mesh_env::from_file(path)?;
        tracing::info!(
            path = %path.display(),
            keys = mesh_env.len(),
            "mesh-env from MESH=file://: no GCP and no K8s calls"
        );
        return Ok(Discovery {
            mesh_env,
            mesh: true,
            ..Discovery::default()
        });
    }
    tokio::time::timeout(budget, Discoverer::new(config, mesh)?.run())
        .await
        .map_err(|_| DiscoveryError::Timeout(budget))?
}

/// What the metadata server told us.
#[derive(Debug, Default)]
struct Facts {
    project_id: Option<String>,
    project_number: Option<String>,
    email: Option<String>,
    region: Option<String>,
    cluster_name: Option<String>,
    cluster_location: Option<String>,
    instance: InstanceFacts,
    /// The project and email came from a credentials file, not the metadata server.
    from_file: bool,
    /// The project an authorized user's calls bill (`quota_project_id` of the file).
    quota_project: Option<String>,
}

impl Facts {
    /// The source `--print-config` shows for these facts: `metadata`, or `derived` (from the
    /// credentials file `GOOGLE_APPLICATION_CREDENTIALS` or gcloud's names).
    fn source(&self) -> Source {
        if self.from_file {
            Source::Derived
        } else {
            Source::Metadata
        }
    }
}

/// Where the config cluster's K8s client comes from.
enum KubeSource {
    /// GKE discovery (MESH names a project or cluster, or MESH is unset on GCP).
    Gke,
    /// `KUBECONFIG` (MESH unset).
    Kubeconfig(String),
    /// The pod's service account (MESH unset, `KUBERNETES_SERVICE_HOST` set).
    InCluster,
    /// Traffic Director: no K8s.
    None,
}

/// One discovery run: the inputs it needs, shared by its steps.
struct Discoverer<'a> {
    config: &'a MeshConfig,
    mesh: Option<MeshUrl>,
    /// Built on first use: a plain supervisor (nothing suggests GCP) never builds the HTTP
    /// client and its TLS configuration.
    metadata: std::sync::OnceLock<Arc<MetadataClient>>,
    kube: KubeSource,
    /// The Google credentials file, when one is configured (used only off GCP).
    credentials_file: Option<Located>,
    /// What suggests GCP; `None` skips the metadata probe.
    gcp_hint: Option<GcpHint>,
}

impl<'a> Discoverer<'a> {
    fn new(config: &'a MeshConfig, mesh: Option<MeshUrl>) -> Result<Self, DiscoveryError> {
        let kube = match &mesh {
            Some(MeshUrl::TrafficDirector(_)) => KubeSource::None,
            Some(_) => KubeSource::Gke,
            None => match (&config.kubeconfig, &config.kubernetes_service_host) {
                (Some(path), _) => KubeSource::Kubeconfig(path.value.clone()),
                (None, Some(_)) => KubeSource::InCluster,
                (None, None) => KubeSource::Gke,
            },
        };
        let gcp_hint = gcp_hint::gcp_hint(
            config,
            mesh.as_ref(),
            gcp_hint::dmi_product_name().as_deref(),
        );
        Ok(Discoverer {
            gcp_hint,
            metadata: std::sync::OnceLock::new(),
            credentials_file: key_file::locate(
                config
                    .google_application_credentials
                    .as_ref()
                    .map(|s| s.value.as_path()),
                config.cloudsdk_config.as_ref().map(|s| s.value.as_path()),
                config.home.as_ref().map(|s| s.value.as_path()),
            ),
            config,
            mesh,
            kube,
        })
    }

    /// The credentials file to use off GCP: any one when `MESH` names a GKE mesh; with `MESH`
    /// unset only one named by `GOOGLE_APPLICATION_CREDENTIALS`, so a developer's gcloud login
    /// alone does not make krun look for a mesh.
    fn usable_credentials_file(&self) -> Option<&Located> {
        let needs_gcp = matches!(self.mesh, Some(MeshUrl::Gke(_)));
        let wants_gke = matches!(self.kube, KubeSource::Gke);
        self.credentials_file
            .as_ref()
            .filter(|file| needs_gcp || (wants_gke && file.origin == Origin::Env))
    }

    /// Reads the credentials file and builds its token source. Logs the one line saying
    /// which source and why.
    async fn file_credentials(
        &self,
        located: &Located,
        why: &NotGcp,
    ) -> Result<(Facts, Arc<dyn AccessTokens>), DiscoveryError> {
        let tokens = FileTokens::load(located).await?;
        let file = tokens.credentials();
        let facts = Facts {
            project_id: file.project().map(str::to_owned),
            email: file.service_account().map(str::to_owned),
            from_file: true,
            quota_project: file.quota_project().map(str::to_owned),
            ..Facts::default()
        };
        let description = file.describe();
        tracing::info!(
            credentials = %description,
            path = %located.path.display(),
            from = %located.origin,
            metadata = self.config.gce_metadata_host.value.as_str(),
            %why,
            "Google credentials from a file: no metadata server answered"
        );
        Ok((facts, Arc::new(tokens)))
    }

    /// The metadata server's client, built on first use.
    fn metadata(&self) -> &Arc<MetadataClient> {
        self.metadata.get_or_init(|| {
            Arc::new(MetadataClient::new(
                &self.config.gce_metadata_host.value,
                self.config.metadata_timeout.value,
            ))
        })
    }

    fn env_value(&self, setting: Option<&Setting<String>>) -> Option<String> {
        setting
            .filter(|s| s.source == Source::Env)
            .map(|s| s.value.clone())
    }

    fn gke_target(&self) -> Option<&GkeTarget> {
        match &self.mesh {
            Some(MeshUrl::Gke(target)) => Some(target),
            _ => None,
        }
    }

    /// Builds the Google API client asking `tokens`, on a blocking thread (it reads the system
    /// trust store).
    fn build_api(
        &self,
        tokens: Arc<dyn AccessTokens>,
    ) -> tokio::task::JoinHandle<Result<GoogleApi, ApiError>> {
        tokio::task::spawn_blocking(move || GoogleApi::new(tokens, Backoff::DISCOVERY))
    }

    async fn run(self) -> Result<Discovery, DiscoveryError> {
        // A kubeconfig or in-cluster client needs nothing from GCP: read mesh-env at once.
        let early_mesh_env = async {
            match &self.kube {
                KubeSource::Kubeconfig(path) => {
                    let (client, context) = kube_client::from_kubeconfig(path).await?;
                    tracing::info!(
                        kubeconfig = %path,
                        context_names = %context.as_ref().map_or("no GKE cluster".to_owned(), |c| {
                            format!("{}/{}/{}", c.project, c.location.as_deref().unwrap_or("-"), c.name)
                        }),
                        "config cluster from KUBECONFIG"
                    );
                    let env =
                        phase("mesh-env", mesh_env::from_cluster(client.clone(), path)).await?;
                    Ok(Some((env, context, client)))
                }
                KubeSource::InCluster => {
                    let client = kube_client::in_cluster()?;
                    tracing::info!("config cluster: this cluster (in-cluster service account)");
                    let env = phase(
                        "mesh-env",
                        mesh_env::from_cluster(client.clone(), "in-cluster"),
                    )
                    .await?;
                    Ok(Some((env, None, client)))
                }
                KubeSource::Gke | KubeSource::None => Ok::<_, DiscoveryError>(None),
            }
        };
        // Loading the system trust store for Google APIs takes milliseconds: when GCP is
        // suggested (`gcp_hint`: Cloud Run, a GKE or TD mesh, a GCE VM...), do it while the
        // metadata answers are in flight; elsewhere (a laptop, plain docker) only once the
        // metadata server has answered, so a plain supervisor never pays for it.
        let early_api = self
            .gcp_hint
            .is_some()
            .then(|| self.build_api(self.metadata().clone()));
        let (facts, early_mesh_env) =
            tokio::join!(phase("metadata", self.metadata_facts()), early_mesh_env);
        let (early_mesh_env, context, early_kube) = match early_mesh_env? {
            Some((env, context, client)) => (Some(env), context, Some(client)),
            None => (None, None, None),
        };
        let mut discovered = Layer::default();
        if let Some(context) = context {
            // The kubeconfig context names the cluster (`gke_P_L_N` or `connectgateway_P_N`).
            discovered.set_if_unset(names::PROJECT_ID, &context.project, Source::Discovered);
            discovered.set_if_unset(names::CLUSTER_NAME, &context.name, Source::Discovered);
            if let Some(location) = &context.location {
                discovered.set_if_unset(names::CLUSTER_LOCATION, location, Source::Discovered);
            }
        }
        let (facts, tokens) = match facts? {
            Some(found) => found,
            None => {
                return Ok(Discovery {
                    mesh: early_mesh_env.is_some(),
                    mesh_env: early_mesh_env.unwrap_or_default(),
                    discovered,
                    kube: early_kube,
                    instance: InstanceFacts::default(),
                });
            }
        };
        let config_project = self.config_project(&facts, &mut discovered)?;
        let multi_project = match (&config_project, &facts.project_id) {
            (Some(config), Some(workload)) if config != workload => Some(config.clone()),
            _ => None,
        };
        let same_project = multi_project.is_none();
        // A user's gcloud login bills the quota project it recorded, as Google's libraries do;
        // otherwise a multi-project mesh bills the config project.
        let (quota_project, why) = match (&facts.quota_project, multi_project) {
            (Some(quota), _) => (Some(quota.clone()), "the gcloud login's quota_project_id"),
            (None, Some(config)) => (Some(config), "multi-project mesh: the config project"),
            (None, None) => (None, ""),
        };
        if let Some(billed) = &quota_project {
            tracing::info!(
                billed = %billed,
                config_project = config_project.as_deref().unwrap_or("-"),
                workload_project = facts.project_id.as_deref().unwrap_or("-"),
                "Google API calls bill {why} (x-goog-user-project)"
            );
        }
        let namespace_from_email = facts.email.as_deref().and_then(namespace_from_email);
        let number_known = self
            .env_value(self.config.project_number.as_ref())
            .is_some()
            || (same_project && facts.project_number.is_some());
        let namespace_known = self
            .env_value(Some(&self.config.workload_namespace))
            .is_some()
            || namespace_from_email.is_some();
        let api = match early_api {
            Some(building) => building,
            None => self.build_api(tokens.clone()),
        }
        .await
        .map_err(|e| ApiError::Tls(e.to_string()))
        .and_then(|built| built)
        .map_err(|cause| DiscoveryError::Api {
            what: "Google API client".into(),
            cause: Box::new(cause),
        })?
        .with_tokens(tokens.clone());
        let project_lookup = async {
            match &config_project {
                Some(project) if !(number_known && namespace_known) => {
                    phase(
                        "resource-manager",
                        resource_manager::get_project(
                            &api,
                            &self.config.resource_manager_endpoint.value,
                            project,
                            quota_project.as_deref(),
                        ),
                    )
                    .await
                    .map(Some)
                    .or_else(|e| {
                        // A failed lookup skips only this step (cloud-run-mesh returned
                        // early and skipped the project-id namespace rule too).
                        tracing::warn!(project = %project, error = %e, "project lookup failed: namespace falls back to the project id rule");
                        Ok::<_, DiscoveryError>(None)
                    })
                }
                _ => Ok(None),
            }
        };
        let cluster_and_mesh_env = async {
            if !matches!(self.kube, KubeSource::Gke) {
                return Ok(None);
            }
            let Some(project) = &config_project else {
                return Err(DiscoveryError::NoProject);
            };
            let container = ContainerApi {
                api: &api,
                endpoint: &self.config.container_api_endpoint.value,
                quota_project: quota_project.as_deref(),
            };
            let Some(cluster) =
                phase("gke", self.find_cluster(&container, project, &facts)).await?
            else {
                return Ok(None);
            };
            let client = kube_client::for_gke_cluster(&cluster, tokens.clone())?;
            let name = format!("{}/{}", cluster.location, cluster.name);
            let mesh_env = phase("mesh-env", mesh_env::from_cluster(client.clone(), &name)).await?;
            Ok::<_, DiscoveryError>(Some((cluster, mesh_env, client)))
        };
        let (project, cluster) = tokio::join!(project_lookup, cluster_and_mesh_env);
        let (project, cluster) = (project?, cluster?);

        // Precedence chains, highest first (the environment is above all of them).
        if let Some(ns) = namespace_from_email {
            discovered.set_if_unset(names::WORKLOAD_NAMESPACE, ns, facts.source());
        }
        if let Some(project) = &project {
            if let Some(ns) = project.labels.get(resource_manager::NAMESPACE_LABEL) {
                discovered.set_if_unset(names::WORKLOAD_NAMESPACE, ns, Source::Discovered);
            }
            discovered.set_if_unset(
                names::PROJECT_NUMBER,
                &project.project_number,
                Source::Discovered,
            );
        }
        if same_project && let Some(number) = &facts.project_number {
            discovered.set_if_unset(names::PROJECT_NUMBER, number, facts.source());
        }
        let mesh = match &cluster {
            Some((cluster, _, _)) => {
                discovered.set_if_unset(names::CLUSTER_NAME, &cluster.name, Source::Discovered);
                discovered.set_if_unset(
                    names::CLUSTER_LOCATION,
                    &cluster.location,
                    Source::Discovered,
                );
                true
            }
            None => early_mesh_env.is_some() || self.mesh.is_some(),
        };
        if let Some(name) = &facts.cluster_name {
            discovered.set_if_unset(names::CLUSTER_NAME, name, facts.source());
        }
        if let Some(location) = &facts.cluster_location {
            discovered.set_if_unset(names::CLUSTER_LOCATION, location, facts.source());
        }
        let (mesh_env, kube) = match cluster {
            Some((_, env, client)) => (Some(env), Some(client)),
            None => (None, None),
        };
        Ok(Discovery {
            discovered,
            mesh_env: mesh_env.or(early_mesh_env).unwrap_or_default(),
            mesh,
            kube: kube.or(early_kube),
            instance: facts.instance,
        })
    }

    /// All metadata lookups at once, raced against the platform probe, with the credentials
    /// to call Google with: the metadata server's on GCP, else a credentials file's
    /// ([`Self::usable_credentials_file`]). `None`: not on GCP, and nothing here needs GCP.
    async fn metadata_facts(
        &self,
    ) -> Result<Option<(Facts, Arc<dyn AccessTokens>)>, DiscoveryError> {
        let Some(hint) = self.gcp_hint else {
            return match self.usable_credentials_file() {
                Some(file) => Ok(Some(
                    self.file_credentials(file, &NotGcp::NothingSuggestsGcp)
                        .await?,
                )),
                None => self.not_on_gcp(NotGcp::NothingSuggestsGcp).map(|()| None),
            };
        };
        let md = self.metadata();
        tracing::info!(host = md.host(), %hint, "GCP suggested: asking the metadata server");
        let explicit_host = self.config.gce_metadata_host.source == Source::Env;
        let wants_gke = matches!(self.kube, KubeSource::Gke);
        // My region only matters when a cluster is picked from a list.
        let cluster_named = self.gke_target().is_some_and(|t| t.cluster.is_some())
            || (self.env_value(self.config.cluster_name.as_ref()).is_some()
                && self
                    .env_value(self.config.cluster_location.as_ref())
                    .is_some());
        let in_cluster = self.config.kubernetes_service_host.is_some();
        let td = matches!(self.mesh, Some(MeshUrl::TrafficDirector(_)));
        let optional = |wanted: bool, path: &'static str| async move {
            if wanted { md.get(path).await } else { Ok(None) }
        };
        let lookups = async {
            let instance = async {
                let (zone, id, ip) = tokio::join!(
                    optional(td, paths::ZONE),
                    optional(td, paths::INSTANCE_ID),
                    optional(td, paths::INSTANCE_IP),
                );
                Ok::<_, MetadataError>(InstanceFacts {
                    zone: zone?.map(|z| last_segment(&z).to_owned()),
                    id: id?,
                    ip: ip?,
                })
            };
            let (
                project_id,
                project_number,
                email,
                region,
                cluster_name,
                cluster_location,
                instance,
                _,
            ) = tokio::join!(
                md.get(paths::PROJECT_ID),
                optional(
                    self.config.project_number.is_none(),
                    paths::NUMERIC_PROJECT_ID
                ),
                optional(
                    self.env_value(Some(&self.config.workload_namespace))
                        .is_none(),
                    paths::EMAIL
                ),
                optional(wants_gke && !cluster_named, paths::REGION),
                optional(in_cluster, paths::CLUSTER_NAME),
                optional(in_cluster, paths::CLUSTER_LOCATION),
                instance,
                // Warm the token cache while the other answers are in flight: the GKE and
                // Resource Manager calls need it next.
                async {
                    if wants_gke && let Err(e) = md.access_token().await {
                        tracing::debug!(error = %e, "token prefetch failed; the API call will retry");
                    }
                },
            );
            Ok::<_, MetadataError>(Facts {
                project_id: project_id?,
                project_number: project_number?,
                email: email?,
                region: region?.map(|r| last_segment(&r).to_owned()),
                cluster_name: cluster_name?,
                cluster_location: cluster_location?,
                instance: instance?,
                from_file: false,
                quota_project: None,
            })
        };
        let probe = async {
            if explicit_host {
                // The Google client convention: an explicit GCE_METADATA_HOST is trusted, and
                // its failures are errors rather than "not on GCP".
                Platform::Gcp
            } else {
                md.probe(&ProbeOptions {
                    timeout: self.config.metadata_probe_timeout.value,
                    // Only the default host has a well-known name to race against.
                    dns_name: Some(crate::metadata::METADATA_DNS_NAME.to_owned()),
                    wait_for_both: self.config.k_service.is_some(),
                })
                .await
            }
        };
        tokio::pin!(lookups, probe);
        let platform_and_facts = tokio::select! {
            biased;
            platform = &mut probe => match platform {
                Platform::Gcp => (Platform::Gcp, Some(lookups.await)),
                not_gcp => (not_gcp, None),
            },
            facts = &mut lookups => match facts {
                Ok(facts) => (Platform::Gcp, Some(Ok(facts))),
                Err(e) => match probe.await {
                    Platform::Gcp => (Platform::Gcp, Some(Err(e))),
                    not_gcp => (not_gcp, None),
                },
            },
        };
        match platform_and_facts {
            (_, Some(facts)) => {
                let facts = facts?;
                tracing::info!(
                    host = md.host(),
                    project = facts.project_id.as_deref().unwrap_or("-"),
                    region = facts.region.as_deref().unwrap_or("-"),
                    credentials_file_ignored = self
                        .credentials_file
                        .as_ref()
                        .map(|f| f.path.display().to_string()),
                    "metadata server answered: running on GCP, Google credentials from the metadata server"
                );
                Ok(Some((facts, md.clone())))
            }
            (Platform::NotGcp(why), None) if let Some(file) = self.usable_credentials_file() => {
                Ok(Some(self.file_credentials(file, &why).await?))
            }
            (Platform::NotGcp(why), None) => self.not_on_gcp(why).map(|()| None),
            (Platform::Gcp, None) => Ok(None),
        }
    }

    /// No metadata values, and why: an error when the mesh needs GCP, else one log line.
    fn not_on_gcp(&self, why: NotGcp) -> Result<(), DiscoveryError> {
        let host = self.config.gce_metadata_host.value.as_str();
        // Traffic Director takes its project from MESH; the metadata facts (zone, instance)
        // only refine its bootstrap, so their absence is not fatal.
        if matches!(self.mesh, Some(MeshUrl::Gke(_))) {
            return Err(DiscoveryError::NotOnGcp {
                mesh: self
                    .config
                    .mesh
                    .as_ref()
                    .map(|m| m.value.clone())
                    .unwrap_or_default(),
                host: host.to_owned(),
                why,
            });
        }
        if matches!(self.kube, KubeSource::Gke) {
            tracing::info!(
                metadata = host,
                %why,
                "no mesh configured: running as a plain supervisor (no MESH, not on GCP, no KUBECONFIG)"
            );
        } else {
            tracing::info!(metadata = host, %why, "not on GCP: no metadata values");
        }
        Ok(())
    }

    /// The config project: MESH's, else `PROJECT_ID`, else the kubeconfig context's, else the
    /// metadata project; recorded in `discovered` with its source.
    fn config_project(
        &self,
        facts: &Facts,
        discovered: &mut Layer,
    ) -> Result<Option<String>, DiscoveryError> {
        let env_project = self.env_value(self.config.project_id.as_ref());
        if let Some(target) = self.gke_target() {
            if let Some(env) = &env_project
                && env != &target.project
            {
                return Err(DiscoveryError::ProjectConflict {
                    env: env.clone(),
                    mesh: target.project.clone(),
                });
            }
            discovered.set_if_unset(names::PROJECT_ID, &target.project, Source::Derived);
            if let Some(location) = &target.location {
                discovered.set_if_unset(names::CLUSTER_LOCATION, location, Source::Derived);
            }
            if let Some(cluster) = &target.cluster {
                discovered.set_if_unset(names::CLUSTER_NAME, cluster, Source::Derived);
            }
            return Ok(Some(target.project.clone()));
        }
        if let Some(project) = env_project {
            return Ok(Some(project));
        }
        if let Some(from_context) = discovered.get(names::PROJECT_ID) {
            return Ok(Some(from_context.value.clone()));
        }
        if let Some(project) = &facts.project_id {
            discovered.set_if_unset(names::PROJECT_ID, project, facts.source());
        }
        Ok(facts.project_id.clone())
    }

    /// Gets the explicit cluster, or lists and selects one. `None`: MESH is unset and the
    /// project has no cluster labelled `mesh_id`, so there is no mesh.
    async fn find_cluster(
        &self,
        container: &ContainerApi<'_>,
        project: &str,
        facts: &Facts,
    ) -> Result<Option<Cluster>, DiscoveryError> {
        let target = self.gke_target();
        let name = target
            .and_then(|t| t.cluster.clone())
            .or_else(|| self.env_value(self.config.cluster_name.as_ref()));
        let location = target
            .and_then(|t| t.location.clone())
            .or_else(|| self.env_value(self.config.cluster_location.as_ref()));
        if let (Some(name), Some(location)) = (&name, &location) {
            let cluster = container
                .get(project, location, name)
                .await
                .map_err(|source| DiscoveryError::Api {
                    cause: Box::new(source),
                    what: format!(
                        "GKE cluster projects/{project}/locations/{location}/clusters/{name}"
                    ),
                })?;
            tracing::info!(
                cluster = %format!("{}/{}", cluster.location, cluster.name),
                project,
                "config cluster: named by MESH or CLUSTER_NAME/CLUSTER_LOCATION"
            );
            return Ok(Some(cluster));
        }
        // gke://PROJECT lists every cluster (the user named the project); no MESH lists only
        // the clusters that declare a mesh.
        let labelled = target.is_none();
        let list_location = target.and_then(|t| t.location.as_deref());
        let clusters = match container.list(project, list_location, labelled).await {
            Ok(clusters) => clusters,
            // Without MESH, a service that may not list clusters is simply not in a mesh.
            Err(e) if labelled && e.status() == Some(403) => {
                tracing::warn!(
                    project,
                    error = %e,
                    "no mesh configured: running as a plain supervisor (no MESH, and the service account may not list GKE clusters; grant roles/container.clusterViewer to join a mesh)"
                );
                return Ok(None);
            }
            Err(source) => {
                return Err(DiscoveryError::Api {
                    what: format!("listing GKE clusters of project {project}"),
                    cause: Box::new(source),
                });
            }
        };
        let selector = ClusterSelector {
            name,
            region: facts.region.clone().or(location),
        };
        match selector.select(&clusters) {
            Some(selection) => {
                tracing::info!(
                    cluster = %format!("{}/{}", selection.cluster.location, selection.cluster.name),
                    project,
                    candidates = clusters.len(),
                    reason = %selection.reason,
                    "config cluster chosen"
                );
                Ok(Some(selection.cluster))
            }
            None if labelled => {
                tracing::info!(
                    project,
                    "no mesh configured: running as a plain supervisor (no MESH, and no GKE cluster labelled {} in the project)",
                    gke::MESH_LABEL
                );
                Ok(None)
            }
            None => Err(DiscoveryError::NoCluster {
                project: project.to_owned(),
                filter: match &selector.name {
                    Some(name) => format!("named {name}"),
                    None => format!("in {}", list_location.unwrap_or("any location")),
                },
                fix: "check MESH and CLUSTER_NAME, and that the service account may list clusters (roles/container.clusterViewer)".into(),
            }),
        }
    }
}

/// `k8s-<ns>@<project>.iam.gserviceaccount.com` names namespace `<ns>`: cloud-run-mesh's
/// convention for the service account of a namespace's Cloud Run services.
fn namespace_from_email(email: &str) -> Option<String> {
    let local = email.split_once('@')?.0;
    local
        .strip_prefix("k8s-")
        .filter(|ns| !ns.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_comes_from_a_k8s_prefixed_service_account() {
        assert_eq!(
            namespace_from_email("k8s-fortio@p.iam.gserviceaccount.com"),
            Some("fortio".into())
        );
        assert_eq!(namespace_from_email("k8s-@p.iam.gserviceaccount.com"), None);
        assert_eq!(
            namespace_from_email("123-compute@developer.gserviceaccount.com"),
            None
        );
        assert_eq!(
            last_segment("projects/1/regions/us-central1"),
            "us-central1"
        );
    }
}
