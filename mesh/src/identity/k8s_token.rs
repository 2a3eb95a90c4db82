//! The istio-token: a Kubernetes TokenRequest for the workload's KSA
//! (<https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-request-v1/>),
//! written for pilot-agent and the CA client and refreshed at ~80 % of its real lifetime.
//! cloud-run-mesh sent no `expirationSeconds` (so the lifetime was whatever the cluster
//! defaulted to), wrote the file world-readable (0644) and only logged a failed refresh,
//! trying again 30 minutes later on a token of about an hour; here the lifetime is explicit,
//! the file is private and a failed refresh is retried with backoff.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use super::jwt::Claims;
use super::token::Token;
use crate::backoff::Backoff;
use crate::files::{Access, WriteError, write_atomic};

/// Requested lifetime: one hour, the API server default, but explicit so the refresh
/// schedule does not depend on the cluster's defaults.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// The audience Istio's CA accepts: `istio-ca` for open-source istiod (`OSS_ISTIO`, detected by
/// the launcher when unset), else the trust domain (ASM, MCP, and the STS subject token). An istiod that must accept both lists
/// them in its `TOKEN_AUDIENCES`.
pub fn istio_token_audience(trust_domain: &str, oss_istio: bool) -> String {
    if oss_istio {
        "istio-ca".to_owned()
    } else {
        trust_domain.to_owned()
    }
}

/// `<MESH_BASE_DIR>/var/run/secrets/tokens/istio-token`, where pilot-agent reads it.
pub fn istio_token_path(base_dir: &Path) -> PathBuf {
    base_dir.join("var/run/secrets/tokens/istio-token")
}

/// A token could not be obtained or saved.
#[derive(Debug, thiserror::Error)]
pub enum K8sTokenError {
    /// The API server refused or could not be reached.
    #[error(
        "TokenRequest for serviceaccount {namespace}/{service_account} (audience {audience}) failed: {source}; check that the KSA exists and krun's credentials may create serviceaccounts/token"
    )]
    Request {
        /// Namespace.
        namespace: String,
        /// KSA.
        service_account: String,
        /// Audience.
        audience: String,
        /// kube's error.
        #[source]
        source: kube::Error,
    },
    /// The API server returned something that is not a JWT.
    #[error("TokenRequest for serviceaccount {namespace}/{service_account}: {source}")]
    NotJwt {
        /// Namespace.
        namespace: String,
        /// KSA.
        service_account: String,
        /// The parse error.
        #[source]
        source: super::jwt::NotAJwt,
    },
    /// The token file could not be written.
    #[error("{0}; check that MESH_BASE_DIR points to a writable directory")]
    Write(#[from] WriteError),
}

/// Mints tokens for one KSA and audience.
#[derive(Clone)]
pub struct K8sTokenSource {
    api: Api<ServiceAccount>,
    namespace: String,
    service_account: String,
    audience: String,
    lifetime: Duration,
}

impl K8sTokenSource {
    /// Tokens for `service_account` in `namespace` with `audience`, valid for `lifetime`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        service_account: &str,
        audience: &str,
        lifetime: Duration,
    ) -> Self {
        K8sTokenSource {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            audience: audience.to_owned(),
            lifetime,
        }
    }

    /// One TokenRequest; the expiry is the token's own `exp`.
    pub async fn request(&self) -> Result<Token, K8sTokenError> {
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![self.audience.clone()]),
                expiration_seconds: Some(i64::try_from(self.lifetime.as_secs()).unwrap_or(3600)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let response = self
            .api
            .create_token_request(&self.service_account, &PostParams::default(), &request)
            .await
            .map_err(|source| K8sTokenError::Request {
                namespace: self.namespace.clone(),
                service_account: self.service_account.clone(),
                audience: self.audience.clone(),
                source,
            })?;
        let secret = response.status.and_then(|s| s.token).unwrap_or_default();
        let claims = Claims::decode(&secret).map_err(|source| K8sTokenError::NotJwt {
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            source,
        })?;
        Ok(Token::new(secret, claims.expires_at()))
    }
}

/// When to refresh a token fetched at `fetched`: 80 % of its real lifetime.
fn refresh_at(fetched: SystemTime, token: &Token) -> SystemTime {
    let lifetime = token.expires_at.duration_since(fetched).unwrap_or_default();
    fetched + lifetime.mul_f64(0.8)
}

/// Keeps a token file fresh and publishes each token to subscribers (the CA client).
pub struct TokenFile {
    token: watch::Receiver<Token>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl TokenFile {
    /// Fetches and writes the first token (errors are startup failures), then refreshes it in
    /// the background; a failed refresh is retried with jittered backoff while the old token
    /// stays in place.
    pub async fn start(source: K8sTokenSource, path: PathBuf) -> Result<TokenFile, K8sTokenError> {
        let fetched = SystemTime::now();
        let first = source.request().await?;
        write_atomic(&path, first.secret().as_bytes(), Access::Secret)?;
        tracing::info!(path = %path.display(), audience = source.audience, "istio-token written");
        let (tx, token) = watch::channel(first.clone());
        let refresher = tokio::spawn(refresh(source, path, tx, fetched, first));
        Ok(TokenFile { token, refresher })
    }

    /// The current token, for the CA client.
    pub fn subscribe(&self) -> watch::Receiver<Token> {
        self.token.clone()
    }
}

async fn refresh(
    source: K8sTokenSource,
    path: PathBuf,
    tx: watch::Sender<Token>,
    mut fetched: SystemTime,
    mut current: Token,
) {
    loop {
        let wait = refresh_at(fetched, &current)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        let mut backoff =
            Backoff::until_success(Duration::from_millis(500), Duration::from_secs(30)).delays();
        loop {
            let attempt = SystemTime::now();
            let result = match source.request().await {
                Ok(token) => write_atomic(&path, token.secret().as_bytes(), Access::Secret)
                    .map(|()| token)
                    .map_err(K8sTokenError::from),
                Err(e) => Err(e),
            };
            match result {
                Ok(token) => {
                    tracing::info!(path = %path.display(), "istio-token refreshed");
                    fetched = attempt;
                    current = token.clone();
                    tx.send_replace(token);
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let still_valid = current.expires_at > SystemTime::now();
                    crate::metrics::TOKEN_REFRESH_FAILURES.inc();
                    tracing::warn!(
                        error = %e,
                        still_valid,
                        retry_in_ms = delay.as_millis() as u64,
                        "istio-token refresh failed; the previous token stays in place"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_follows_oss_istio() {
        assert_eq!(
            istio_token_audience("p.svc.id.goog", false),
            "p.svc.id.goog"
        );
        assert_eq!(istio_token_audience("p.svc.id.goog", true), "istio-ca");
    }

    #[test]
    fn refresh_is_at_eighty_percent_of_the_real_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let token = Token::new("x", t0 + Duration::from_secs(600));
        assert_eq!(refresh_at(t0, &token), t0 + Duration::from_secs(480));
    }
}
