//! The Google CAs at startup (docs/identity.md, "Google CAs"): `CA_ADDR=meshca` (or MeshCA's
//! address) and `CA_POOL` sign with a Google token minted hop by hop, each hop's failure
//! naming the hop, its HTTP status and the fix: K8s TokenRequest (audience: the trust domain)
//! → STS token exchange (audience `identitynamespace:TD:CLUSTER_URL`) → for MeshCA with
//! `KRUN_CA_SERVICE_ACCOUNT`, IAM `generateAccessToken` → the CA call.

use std::sync::Arc;

use anyhow::anyhow;
use mesh::discovery;
use mesh::http::HttpClient;
use mesh::identity::ca_grpc::CaEndpoint;
use mesh::identity::cas::{CasClient, CasConfig};
use mesh::identity::google_tokens::{self, GoogleTokens};
use mesh::identity::k8s_token::{self, K8sTokenSource, TokenFile, istio_token_path};
use mesh::identity::meshca::{MeshCaClient, MeshCaConfig};
use mesh::identity::token_cache::{CachePolicy, TokenCache, TokenKind};
use mesh::identity::{Signer, roots};

use super::{Config, Started, mint_from_cluster_ca, trust_domain, workload_identity};

/// A Google CA the configuration selects.
pub(super) enum GoogleCa {
    /// `CA_ADDR=meshca` or an address naming `meshca.googleapis.com`.
    MeshCa,
    /// `CA_POOL`: the pool.
    Cas(String),
}

impl GoogleCa {
    /// The setting that chose it, as errors name it.
    fn setting(&self, config: &Config) -> String {
        match self {
            GoogleCa::MeshCa => format!(
                "CA_ADDR={}",
                config.ca_addr.as_ref().map_or("", |s| s.value.as_str())
            ),
            GoogleCa::Cas(pool) => format!("CA_POOL={pool}"),
        }
    }
}

/// `CA_POOL` selects CAS; else `CA_ADDR=meshca` or an address naming
/// `meshca.googleapis.com` selects MeshCA.
pub(super) fn select(config: &Config) -> Option<GoogleCa> {
    if let Some(pool) = &config.ca_pool {
        return Some(GoogleCa::Cas(pool.value.clone()));
    }
    let addr = &config.ca_addr.as_ref()?.value;
    (addr == "meshca" || addr.contains("meshca.googleapis.com")).then_some(GoogleCa::MeshCa)
}

/// Mints the first certificate from `ca` and keeps it rotated; every precondition missing is
/// a one-line startup error naming the setting and the fix.
pub(super) async fn start(
    config: &Config,
    found: &discovery::Discovery,
    ca: GoogleCa,
) -> anyhow::Result<Started> {
    let setting = ca.setting(config);
    let client = found.kube.clone().ok_or_else(|| {
        anyhow!(
            "{setting}: the STS token exchange needs a K8s token from the config cluster, and discovery built no K8s client; set KUBECONFIG, run in a cluster, or point MESH at a GKE cluster"
        )
    })?;
    let cluster = cluster_url(config).ok_or_else(|| {
        anyhow!(
            "{setting}: the STS audience names the GKE cluster, and it is not known; set PROJECT_ID, CLUSTER_LOCATION and CLUSTER_NAME, or MESH=gke://PROJECT/LOCATION/CLUSTER"
        )
    })?;
    let gsa = config.ca_service_account.as_ref().map(|s| s.value.clone());
    let root_pem = ca_root(&ca, &found.mesh_env, &setting)?;
    if matches!(ca, GoogleCa::Cas(_)) && gsa.is_some() {
        anyhow::bail!(
            "{setting} with KRUN_CA_SERVICE_ACCOUNT: CAS reflects the caller's SPIFFE identity, which only the federated token carries; unset KRUN_CA_SERVICE_ACCOUNT"
        );
    }
    let id = workload_identity(config);
    let td = trust_domain(config);
    let audience = google_tokens::sts_audience(&td, &cluster);
    tracing::info!(
        identity = %id,
        ca = %setting,
        sts_audience = %audience,
        service_account = gsa.as_deref().unwrap_or("-"),
        "identity: a Google CA signs with a token from K8s TokenRequest, STS and (with a service account) IAM"
    );
    let base = config.mesh_base_dir.value.clone();
    let source = K8sTokenSource::new(
        client,
        &config.workload_namespace.value,
        &config.workload_service_account.value,
        &td,
        k8s_token::DEFAULT_TOKEN_LIFETIME,
    );
    let tokens = TokenFile::start(source, istio_token_path(&base)).await?;
    let google = GoogleTokens::new(
        HttpClient::new(discovery::google_api::API_TIMEOUT)?,
        &config.sts_endpoint.value,
        &config.iam_credentials_endpoint.value,
        tokens.subscribe(),
        audience,
        gsa.clone(),
    );
    let cache = Arc::new(TokenCache::new(google, CachePolicy::default()));
    let signer = match ca {
        GoogleCa::MeshCa => Signer::MeshCa(
            MeshCaClient::connect(
                MeshCaConfig {
                    endpoint: system_roots(&config.meshca_endpoint.value),
                    location: config.cluster_location.as_ref().map(|s| s.value.clone()),
                    mesh_root_pem: root_pem,
                    bearer: if gsa.is_some() {
                        TokenKind::Access
                    } else {
                        TokenKind::Federated
                    },
                },
                cache,
            )
            .await?,
        ),
        GoogleCa::Cas(pool) => Signer::Cas(
            CasClient::connect(
                CasConfig {
                    endpoint: system_roots(&config.cas_endpoint.value),
                    pool,
                    pool_root_pem: root_pem,
                },
                cache,
            )
            .await?,
        ),
    };
    mint_from_cluster_ca(config, found, id, signer, tokens).await
}

/// The config cluster's URL, from PROJECT_ID, CLUSTER_LOCATION and CLUSTER_NAME (which a
/// GKE `MESH` fills in).
fn cluster_url(config: &Config) -> Option<String> {
    let value = |s: &Option<mesh::config::Setting<String>>| s.as_ref().map(|s| s.value.clone());
    Some(google_tokens::cluster_url(
        &value(&config.project_id)?,
        &value(&config.cluster_location)?,
        &value(&config.cluster_name)?,
    ))
}

/// What the CA's chains must lead to: mesh-env `CAROOT_CAS` for CAS; for MeshCA every
/// `CAROOT_*` root the mesh publishes.
fn ca_root(
    ca: &GoogleCa,
    mesh_env: &discovery::mesh_env::MeshEnv,
    setting: &str,
) -> anyhow::Result<String> {
    let wanted = |key: &str| match ca {
        GoogleCa::MeshCa => key.starts_with(roots::CAROOT_PREFIX),
        GoogleCa::Cas(_) => key == "CAROOT_CAS",
    };
    let pems: Vec<&String> = mesh_env
        .iter()
        .filter(|(k, v)| wanted(k) && !v.trim().is_empty())
        .map(|(_, v)| v)
        .collect();
    if pems.is_empty() {
        let wanted = match ca {
            GoogleCa::MeshCa => "CAROOT_* root (the mesh root MeshCA chains lead to)",
            GoogleCa::Cas(_) => "CAROOT_CAS (the pool's root)",
        };
        anyhow::bail!(
            "{setting}: mesh-env has no {wanted} to verify the issued chains; publish it in istio-system/mesh-env"
        );
    }
    Ok(pems
        .iter()
        .map(|pem| pem.trim_end())
        .collect::<Vec<_>>()
        .join("\n"))
}

/// A Google endpoint verified with the system roots and the address's own host name.
fn system_roots(addr: &str) -> CaEndpoint {
    CaEndpoint {
        addr: addr.to_owned(),
        root_pem: None,
        server_name: None,
    }
}
