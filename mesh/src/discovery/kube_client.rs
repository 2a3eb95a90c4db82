//! The Kubernetes client of the config cluster, from one of three sources: the GKE cluster
//! discovery chose (its endpoint, its CA from `masterAuth`, a Google access token refreshed
//! before expiry), a kubeconfig file, or the in-cluster service account.
//!
//! Every answer's body is capped at [`RESPONSE_LIMIT`] (kube reads bodies whole): a larger one
//! fails the call instead of growing the process. Lists that could be large are paged.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::Limited;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::{ClientBuilder, ConfigExt};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tower::filter::AsyncFilterLayer;
use tower::util::MapResponseLayer;
use tower::{BoxError, ServiceBuilder};

use crate::http::RESPONSE_LIMIT;

use super::gke::Cluster;
use crate::credentials::{AccessTokens, BearerAuth};

/// A client that could not be built; the message names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    /// The GKE cluster description is not usable.
    #[error("GKE cluster {cluster}: {problem}")]
    Cluster {
        /// `location/name`.
        cluster: String,
        /// What is wrong.
        problem: String,
    },
    /// The kubeconfig file could not be used.
    #[error("KUBECONFIG={path}: {cause}")]
    Kubeconfig {
        /// The path.
        path: String,
        /// Why.
        cause: kube::config::KubeconfigError,
    },
    /// The in-cluster configuration could not be used.
    #[error(
        "in-cluster Kubernetes config (KUBERNETES_SERVICE_HOST is set): {0}; mount the service account token or unset KUBERNETES_SERVICE_HOST"
    )]
    InCluster(kube::config::InClusterError),
    /// kube refused the configuration.
    #[error("Kubernetes client: {0}")]
    Client(kube::Error),
}

/// Timeouts of K8s API calls made during startup.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for the GKE cluster discovery chose, authenticated with `tokens`.
pub fn for_gke_cluster(
    cluster: &Cluster,
    tokens: Arc<dyn AccessTokens>,
) -> Result<kube::Client, KubeClientError> {
    let name = format!("{}/{}", cluster.location, cluster.name);
    let fail = |problem: String| KubeClientError::Cluster {
        cluster: name.clone(),
        problem,
    };
    if cluster.endpoint.is_empty() {
        return Err(fail("no endpoint in the Container API answer".into()));
    }
    let pem = base64::engine::general_purpose::STANDARD
        .decode(cluster.master_auth.cluster_ca_certificate.trim())
        .map_err(|e| {
            fail(format!(
                "masterAuth.clusterCaCertificate is not base64: {e}"
            ))
        })?;
    let roots: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("masterAuth.clusterCaCertificate is not PEM: {e}")))?;
    if roots.is_empty() {
        return Err(fail(
            "masterAuth.clusterCaCertificate holds no certificate".into(),
        ));
    }
    let url: http::Uri = format!("https://{}", cluster.endpoint)
        .parse()
        .map_err(|e| {
            fail(format!(
                "endpoint {:?} is not a host: {e}",
                cluster.endpoint
            ))
        })?;
    let mut config = kube::Config::new(url);
    config.root_cert = Some(roots);
    // Our own stack instead of kube's default one: the bearer filter needs a cloneable
    // inner service, and kube's boxed default stack is not.
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = config
        .rustls_https_connector_with_connector(http)
        .map_err(KubeClientError::Client)?;
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
    let service = ServiceBuilder::new()
        .layer(MapResponseLayer::new(limit_body))
        .layer(config.base_uri_layer())
        .layer(AsyncFilterLayer::new(BearerAuth(tokens)))
        .map_err(BoxError::from)
        .service(client);
    Ok(ClientBuilder::new(service, config.default_namespace).build())
}

/// A cluster named by a kubeconfig context in gcloud's conventions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextCluster {
    /// Project id.
    pub project: String,
    /// Location (absent for Connect gateway contexts).
    pub location: Option<String>,
    /// Cluster name.
    pub name: String,
}

impl ContextCluster {
    /// `gke_PROJECT_LOCATION_NAME` (gcloud container clusters get-credentials) or
    /// `connectgateway_PROJECT_NAME` (fleet Connect gateway), as cloud-run-mesh read them.
    pub fn parse(context: &str) -> Option<Self> {
        if let Some(rest) = context.strip_prefix("gke_") {
            let mut parts = rest.splitn(3, '_');
            let (project, location, name) = (parts.next()?, parts.next()?, parts.next()?);
            return [project, location, name]
                .iter()
                .all(|p| !p.is_empty())
                .then(|| ContextCluster {
                    project: project.to_owned(),
                    location: Some(location.to_owned()),
                    name: name.to_owned(),
                });
        }
        let (project, name) = context.strip_prefix("connectgateway_")?.split_once('_')?;
        (!project.is_empty() && !name.is_empty()).then(|| ContextCluster {
            project: project.to_owned(),
            location: None,
            name: name.to_owned(),
        })
    }
}

/// A client from a kubeconfig file (its current context and its own auth), and the GKE
/// cluster that context names, if it follows gcloud's naming.
pub async fn from_kubeconfig(
    path: &str,
) -> Result<(kube::Client, Option<ContextCluster>), KubeClientError> {
    let fail = |cause| KubeClientError::Kubeconfig {
        path: path.to_owned(),
        cause,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(fail)?;
    let context = kubeconfig
        .current_context
        .as_deref()
        .and_then(ContextCluster::parse);
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(fail)?;
    Ok((limited(config)?, context))
}

/// The in-cluster client (service account token and CA of the pod).
pub fn in_cluster() -> Result<kube::Client, KubeClientError> {
    limited(kube::Config::incluster().map_err(KubeClientError::InCluster)?)
}

/// kube's default stack for `config`, with krun's timeouts and the answer size cap.
fn limited(mut config: kube::Config) -> Result<kube::Client, KubeClientError> {
    with_timeouts(&mut config);
    Ok(ClientBuilder::try_from(config)
        .map_err(KubeClientError::Client)?
        .with_layer(&MapResponseLayer::new(limit_body))
        .build())
}

/// Caps an answer's body at [`RESPONSE_LIMIT`]: reading past it fails the call.
fn limit_body<B>(response: http::Response<B>) -> http::Response<Limited<B>> {
    response.map(|body| Limited::new(body, RESPONSE_LIMIT))
}

/// Startup calls get bounded waits, and krun's own retry policy instead of kube's 15 retries.
fn with_timeouts(config: &mut kube::Config) {
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    config.default_retry = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcloud_context_names_give_the_cluster() {
        assert_eq!(
            ContextCluster::parse("gke_my-proj_us-central1_istio_main"),
            Some(ContextCluster {
                project: "my-proj".into(),
                location: Some("us-central1".into()),
                name: "istio_main".into(),
            })
        );
        assert_eq!(
            ContextCluster::parse("connectgateway_my-proj_istio"),
            Some(ContextCluster {
                project: "my-proj".into(),
                location: None,
                name: "istio".into(),
            })
        );
        assert_eq!(ContextCluster::parse("gke_p_l"), None);
        assert_eq!(ContextCluster::parse("kind-kind"), None);
    }
}
