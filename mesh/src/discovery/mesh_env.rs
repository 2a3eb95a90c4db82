//! The `istio-system/mesh-env` ConfigMap that hgate publishes (project number and id,
//! cluster, MCP tenant, hgate addresses, `CA_POOL`, `CAROOT_*` roots; any key is also a
//! fallback for a setting the environment leaves unset): read from the
//! cluster, or from a local YAML map (`MESH=file:///path.yaml`) with no K8s and no GCP.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

use crate::backoff::Backoff;

/// Namespace of the ConfigMap.
pub const NAMESPACE: &str = "istio-system";
/// Name of the ConfigMap.
pub const NAME: &str = "mesh-env";

/// Budget of one GET of the ConfigMap (connect, TLS, answer).
const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The mesh-env map: setting name to value.
pub type MeshEnv = BTreeMap<String, String>;

/// Loading mesh-env failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshEnvError {
    /// The YAML file could not be read.
    #[error("MESH=file://{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The K8s API failed after retries.
    #[error(
        "reading ConfigMap {NAMESPACE}/{NAME} from {cluster} failed after {attempts} attempts: {cause}; check that the cluster is reachable and the workload's identity may get ConfigMaps in {NAMESPACE}"
    )]
    Kube {
        /// Which cluster.
        cluster: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        cause: kube::Error,
    },
}

/// Loads a `MESH=file://` map: YAML keys and scalar values, as a ConfigMap's `data`.
pub fn from_file(path: &Path) -> Result<MeshEnv, MeshEnvError> {
    let fail = |reason: String| MeshEnvError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let map: BTreeMap<String, serde_json::Value> = serde_saphyr::from_str(&text)
        .map_err(|e| fail(format!("expected a YAML map of NAME: value: {e}")))?;
    map.into_iter()
        .map(|(k, v)| match scalar(&v) {
            Some(text) => Ok((k, text)),
            None => Err(fail(format!("{k}: expected a string, number or boolean"))),
        })
        .collect()
}

fn scalar(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => Some(String::new()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// Reads the ConfigMap. 404 is an empty map with a warning (a cluster without hgate yet);
/// other errors are retried, then reported.
pub async fn from_cluster(client: kube::Client, cluster: &str) -> Result<MeshEnv, MeshEnvError> {
    let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    let retryable = |e: &kube::Error| match e {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        _ => true,
    };
    let attempt = || async {
        tokio::time::timeout(ATTEMPT_TIMEOUT, api.get_opt(NAME))
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(
                    format!("no answer within {ATTEMPT_TIMEOUT:?}").into(),
                ))
            })
    };
    let found = Backoff::DISCOVERY
        .retry("mesh-env", retryable, attempt)
        .await
        .map_err(|(cause, attempts)| MeshEnvError::Kube {
            cluster: cluster.to_owned(),
            attempts,
            cause,
        })?;
    match found {
        Some(map) => Ok(map.data.unwrap_or_default()),
        None => {
            tracing::warn!(
                cluster,
                "ConfigMap {NAMESPACE}/{NAME} not found: continuing with env only (is hgate installed?)"
            );
            Ok(MeshEnv::new())
        }
    }
}
