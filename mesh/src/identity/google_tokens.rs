//! Google token exchange: the K8s token becomes a federated token at Security Token Service
//! (`https://sts.googleapis.com/v1/token`, an RFC 8693 token exchange), which IAM Credentials
//! (`generateAccessToken` / `generateIdToken`) turns into an access token or an ID token of the
//! mesh data plane service account. cloud-run-mesh sent the STS body without a Content-Type,
//! ignored HTTP statuses (a refusal surfaced as an empty token or a JSON error) and sent
//! `lifetime` as an object instead of the duration string `"3600s"`; here all three are
//! right, and Google's own error message is carried in the error.

use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::jwt::Claims;
use super::token::Token;
use super::token_cache::{CacheKey, Mint, MintFuture, TokenKind};
use crate::http::HttpClient;

/// The scope of access tokens krun asks for.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The STS hop, as errors name it.
const STS: &str = "STS token exchange";
/// Lifetime of access tokens.
const ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// The ASM mesh data plane P4SA of a project: the service account whose access and ID
/// tokens IAM Credentials mints from the federated token.
pub fn mesh_dataplane_gsa(project_number: &str) -> String {
    format!("service-{project_number}@gcp-sa-meshdataplane.iam.gserviceaccount.com")
}

/// A GKE cluster's URL, as the STS audience and pilot-agent's `GKE_CLUSTER_URL` name it.
pub fn cluster_url(project: &str, location: &str, cluster: &str) -> String {
    format!(
        "https://container.googleapis.com/v1/projects/{project}/locations/{location}/clusters/{cluster}"
    )
}

/// The STS audience for a workload identity pool: `identitynamespace:<TD>:<cluster URL>`.
pub fn sts_audience(trust_domain: &str, cluster_url: &str) -> String {
    format!("identitynamespace:{trust_domain}:{cluster_url}")
}

/// An exchange failed; the message names the API, the status and Google's own message.
#[derive(Debug, thiserror::Error)]
pub enum GoogleTokenError {
    /// The API answered with an error status.
    #[error("{api} {url}: HTTP {status}: {message}{fix}")]
    Status {
        /// Which call.
        api: &'static str,
        /// The URL.
        url: String,
        /// HTTP status.
        status: StatusCode,
        /// Google's message.
        message: String,
        /// What to check or grant, `; ...`, or empty when the status says nothing about it.
        fix: String,
    },
    /// No answer.
    #[error("{api}: {source}")]
    Transport {
        /// Which call.
        api: &'static str,
        /// The transport error.
        #[source]
        source: crate::http::HttpError,
    },
    /// A 2xx answer krun cannot use.
    #[error("{api} {url}: unexpected response: {detail}")]
    Response {
        /// Which call.
        api: &'static str,
        /// The URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
}

impl GoogleTokenError {
    /// Worth retrying: no answer, a 5xx or a 429 (Google's transient statuses); a 4xx is an
    /// answer about the request or a permission and would be the same next time.
    pub fn is_transient(&self) -> bool {
        match self {
            GoogleTokenError::Transport { .. } => true,
            GoogleTokenError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            GoogleTokenError::Response { .. } => false,
        }
    }
}

/// Exchanges the workload's K8s token for Google tokens.
#[derive(Clone)]
pub struct GoogleTokens {
    http: HttpClient,
    sts_endpoint: String,
    iam_endpoint: String,
    subject: watch::Receiver<Token>,
    sts_audience: String,
    gsa: Option<String>,
}

impl GoogleTokens {
    /// `subject` holds the current K8s token (audience: the trust domain); `gsa` is the
    /// service account whose access and ID tokens IAM mints (`None`: only federated tokens);
    /// endpoints are base URLs.
    pub fn new(
        http: HttpClient,
        sts_endpoint: &str,
        iam_endpoint: &str,
        subject: watch::Receiver<Token>,
        sts_audience: String,
        gsa: Option<String>,
    ) -> Self {
        GoogleTokens {
            http,
            sts_endpoint: sts_endpoint.trim_end_matches('/').to_owned(),
            iam_endpoint: iam_endpoint.trim_end_matches('/').to_owned(),
            subject,
            sts_audience,
            gsa,
        }
    }

    /// STS: K8s token → federated access token.
    pub async fn federated(&self) -> Result<Token, GoogleTokenError> {
        let url = format!("{}/v1/token", self.sts_endpoint);
        let subject = self.subject.borrow().secret().to_owned();
        let body = json!({
            "grantType": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subjectTokenType": "urn:ietf:params:oauth:token-type:jwt",
            "requestedTokenType": "urn:ietf:params:oauth:token-type:access_token",
            "audience": self.sts_audience,
            "subjectToken": subject,
            "scope": CLOUD_PLATFORM_SCOPE,
        });
        let reply = self.post(STS, &url, None, &body).await?;
        let token = string_field(&reply, "access_token", STS, &url)?;
        let expires_in = reply["expires_in"].as_u64().unwrap_or(3600);
        Ok(Token::new(
            token,
            SystemTime::now() + Duration::from_secs(expires_in),
        ))
    }

    /// IAM `generateAccessToken` for the GSA.
    pub async fn access_token(&self, federated: &Token) -> Result<Token, GoogleTokenError> {
        const API: &str = "IAM generateAccessToken";
        let url = self.iam_url(API, "generateAccessToken")?;
        let body = json!({
            "scope": [CLOUD_PLATFORM_SCOPE],
            "lifetime": format!("{}s", ACCESS_TOKEN_LIFETIME.as_secs()),
        });
        let reply = self.post(API, &url, Some(federated), &body).await?;
        let token = string_field(&reply, "accessToken", API, &url)?;
        let expires_at = reply["expireTime"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .ok_or_else(|| GoogleTokenError::Response {
                api: API,
                url: url.clone(),
                detail: "no RFC 3339 expireTime".into(),
            })?;
        Ok(Token::new(token, expires_at))
    }

    /// IAM `generateIdToken` for the GSA and `audience`.
    pub async fn id_token(
        &self,
        federated: &Token,
        audience: &str,
    ) -> Result<Token, GoogleTokenError> {
        const API: &str = "IAM generateIdToken";
        let gsa = self.gsa(API)?;
        generate_id_token(
            &self.http,
            &self.iam_endpoint,
            gsa,
            federated.secret(),
            audience,
        )
        .await
        .map_err(|e| self.with_fix(e))
    }

    /// The IAM Credentials URL of `method` for the configured service account.
    fn iam_url(&self, api: &'static str, method: &str) -> Result<String, GoogleTokenError> {
        Ok(iam_url(&self.iam_endpoint, self.gsa(api)?, method))
    }

    /// The service account IAM mints for; `api` names the call that needs it.
    fn gsa(&self, api: &'static str) -> Result<&str, GoogleTokenError> {
        self.gsa
            .as_deref()
            .ok_or_else(|| GoogleTokenError::Response {
                api,
                url: self.iam_endpoint.clone(),
                detail: "no Google service account configured to mint for".into(),
            })
    }

    /// A refusal with what to check or grant added ([`GoogleTokens::fix`]).
    fn with_fix(&self, error: GoogleTokenError) -> GoogleTokenError {
        match error {
            GoogleTokenError::Status {
                api,
                url,
                status,
                message,
                ..
            } => GoogleTokenError::Status {
                fix: self.fix(api, status),
                api,
                url,
                status,
                message,
            },
            other => other,
        }
    }

    /// What to do about a refusal, from the hop that refused and its status: STS refusals are
    /// about the audience (trust domain and cluster), IAM's about the binding that lets the
    /// workload identity act as the service account.
    fn fix(&self, api: &'static str, status: StatusCode) -> String {
        let Some(workload) = self.workload_member() else {
            return String::new();
        };
        match (api, status) {
            (STS, StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                format!(
                    "; check TRUST_DOMAIN and the cluster (PROJECT_ID, CLUSTER_LOCATION, CLUSTER_NAME): the STS audience {} must name the workload identity pool that trusts the K8s token of {workload}",
                    self.sts_audience
                )
            }
            (_, StatusCode::FORBIDDEN) => format!(
                "; grant the binding: gcloud iam service-accounts add-iam-policy-binding {gsa} --role=roles/iam.workloadIdentityUser --member='{workload}'",
                gsa = self.gsa.as_deref().unwrap_or_default()
            ),
            (_, StatusCode::NOT_FOUND) => format!(
                "; check that the service account {} exists",
                self.gsa.as_deref().unwrap_or_default()
            ),
            _ => String::new(),
        }
    }

    /// The IAM member the federated token stands for, `serviceAccount:TD[NS/KSA]`, from the
    /// STS audience's trust domain and the K8s token's subject.
    fn workload_member(&self) -> Option<String> {
        let trust_domain = self
            .sts_audience
            .strip_prefix("identitynamespace:")?
            .split(':')
            .next()?;
        let claims = Claims::decode(self.subject.borrow().secret()).ok()?;
        let (namespace, ksa) = claims
            .sub
            .strip_prefix("system:serviceaccount:")?
            .split_once(':')?;
        Some(format!("serviceAccount:{trust_domain}[{namespace}/{ksa}]"))
    }

    async fn post(
        &self,
        api: &'static str,
        url: &str,
        bearer: Option<&Token>,
        body: &Value,
    ) -> Result<Value, GoogleTokenError> {
        post(&self.http, api, url, bearer.map(Token::secret), body)
            .await
            .map_err(|e| self.with_fix(e))
    }
}

/// IAM Credentials `generateIdToken`: an ID token of service account `gsa` for `audience`,
/// asked with `bearer`, an access token of a caller holding `roles/iam.serviceAccountOpenIdTokenCreator`
/// on `gsa` (the federated token here; hgate's own account for
/// `HGATE_ID_TOKEN_SERVICE_ACCOUNT`). The expiry is the token's own `exp`.
pub async fn generate_id_token(
    http: &HttpClient,
    iam_endpoint: &str,
    gsa: &str,
    bearer: &str,
    audience: &str,
) -> Result<Token, GoogleTokenError> {
    const API: &str = "IAM generateIdToken";
    let url = iam_url(iam_endpoint, gsa, "generateIdToken");
    let body = json!({ "audience": audience, "includeEmail": true });
    let reply = post(http, API, &url, Some(bearer), &body).await?;
    let token = string_field(&reply, "token", API, &url)?;
    let claims = Claims::decode(&token).map_err(|e| GoogleTokenError::Response {
        api: API,
        url,
        detail: e.to_string(),
    })?;
    Ok(Token::new(token, claims.expires_at()))
}

/// `{endpoint}/v1/projects/-/serviceAccounts/{gsa}:{method}`.
fn iam_url(iam_endpoint: &str, gsa: &str, method: &str) -> String {
    format!(
        "{}/v1/projects/-/serviceAccounts/{gsa}:{method}",
        iam_endpoint.trim_end_matches('/')
    )
}

/// POSTs JSON `body` to a Google token API, with `bearer` when given; a non-2xx answer is an
/// error carrying Google's message (the caller adds what to do about it).
async fn post(
    http: &HttpClient,
    api: &'static str,
    url: &str,
    bearer: Option<&str>,
    body: &Value,
) -> Result<Value, GoogleTokenError> {
    let response_err = |detail: String| GoogleTokenError::Response {
        api,
        url: url.to_owned(),
        detail,
    };
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json");
    if let Some(token) = bearer {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| response_err(format!("cannot build the request: {e}")))?;
    let crate::http::Response {
        status,
        body: bytes,
        ..
    } = http
        .send(request)
        .await
        .map_err(|source| GoogleTokenError::Transport { api, source })?;
    if !status.is_success() {
        return Err(GoogleTokenError::Status {
            api,
            url: url.to_owned(),
            status,
            message: crate::http::google_error_message(&bytes),
            fix: String::new(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| response_err(format!("not JSON: {e}")))
}

fn string_field(
    reply: &Value,
    field: &str,
    api: &'static str,
    url: &str,
) -> Result<String, GoogleTokenError> {
    reply[field]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| GoogleTokenError::Response {
            api,
            url: url.to_owned(),
            detail: format!("no {field}"),
        })
}

impl Mint for GoogleTokens {
    type Error = GoogleTokenError;

    fn mint<'a>(&'a self, key: &'a CacheKey) -> MintFuture<'a, GoogleTokenError> {
        Box::pin(async move {
            let federated = self.federated().await?;
            match key.kind {
                TokenKind::Federated => Ok(federated),
                TokenKind::Access => self.access_token(&federated).await,
                TokenKind::Id => self.id_token(&federated, &key.audience).await,
            }
        })
    }
}
