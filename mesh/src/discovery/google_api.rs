//! JSON GETs against Google REST APIs (Container API, Cloud Resource Manager): bearer token,
//! optional quota project, per-attempt timeout, retries on 429/5xx and connection errors, and
//! errors that carry Google's own message.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use serde::de::DeserializeOwned;

use crate::backoff::Backoff;
use crate::credentials::{AccessTokens, CredentialsError};
use crate::http::{Failure, HttpClient};

/// Per-attempt budget of a Google API call.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that bills a call to another project
/// (<https://cloud.google.com/apis/docs/system-parameters>): in a multi-project mesh the
/// workload's project calls APIs of the config project, as cloud-run-mesh's multi-project
/// support did.
pub const QUOTA_PROJECT_HEADER: &str = "x-goog-user-project";

/// A Google API call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token to call with.
    #[error("no access token for {url}: {cause}")]
    Token {
        /// The URL.
        url: String,
        /// Why.
        cause: CredentialsError,
    },
    /// An error status (after retries for 429/5xx).
    #[error("{url} answered HTTP {status} after {attempts} attempts: {message}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// Google's error message, or the start of the body.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// No connection or no answer.
    #[error("{url} unreachable after {attempts} attempts: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
    /// A body that is not the documented JSON.
    #[error("{url} answered with unexpected JSON: {reason}")]
    Body {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The HTTPS client could not be built.
    #[error("HTTPS client for Google APIs: {0}")]
    Tls(String),
}

impl ApiError {
    /// The HTTP status, when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Attempt {
    #[error("{0}")]
    Token(CredentialsError),
    #[error("HTTP {0}: {1}")]
    Status(u16, String),
    #[error("{0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Attempt {
    fn retryable(&self) -> bool {
        match self {
            Attempt::Status(status, _) => *status == 429 || *status >= 500,
            Attempt::Transport(_) | Attempt::Timeout(_) => true,
            Attempt::Token(_) => false,
        }
    }
}

/// A client for Google REST APIs. HTTPS with the system roots (plain `http://` too, for
/// private endpoints and tests).
#[derive(Clone)]
pub struct GoogleApi {
    http: HttpClient,
    tokens: Arc<dyn AccessTokens>,
    backoff: Backoff,
}

impl GoogleApi {
    /// A client that authenticates with `tokens` and gives each attempt [`API_TIMEOUT`].
    /// Loads the system trust store: a blocking call.
    pub fn new(tokens: Arc<dyn AccessTokens>, backoff: Backoff) -> Result<Self, ApiError> {
        Ok(GoogleApi {
            http: HttpClient::new(API_TIMEOUT).map_err(|e| ApiError::Tls(e.detail))?,
            tokens,
            backoff,
        })
    }

    /// The same client, authenticating with `tokens` instead (the source is known only once
    /// the metadata probe has answered; the client may be built before).
    pub fn with_tokens(mut self, tokens: Arc<dyn AccessTokens>) -> Self {
        self.tokens = tokens;
        self
    }

    /// GETs `url` and decodes the JSON answer; `quota_project` adds `x-goog-user-project`.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        url: &str,
        quota_project: Option<&str>,
    ) -> Result<T, ApiError> {
        let body = self
            .backoff
            .retry(url, Attempt::retryable, || self.attempt(url, quota_project))
            .await
            .map_err(|(e, attempts)| match e {
                Attempt::Token(cause) => ApiError::Token {
                    url: url.to_owned(),
                    cause,
                },
                Attempt::Status(status, message) => ApiError::Status {
                    url: url.to_owned(),
                    status,
                    message,
                    attempts,
                },
                other => ApiError::Unreachable {
                    url: url.to_owned(),
                    attempts,
                    reason: other.to_string(),
                },
            })?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Body {
            url: url.to_owned(),
            reason: e.to_string(),
        })
    }

    async fn attempt(&self, url: &str, quota_project: Option<&str>) -> Result<Bytes, Attempt> {
        let token = self.tokens.access_token().await.map_err(Attempt::Token)?;
        let mut request = http::Request::get(url)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::ACCEPT, "application/json");
        if let Some(project) = quota_project {
            request = request.header(QUOTA_PROJECT_HEADER, project);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| Attempt::Transport(e.to_string()))?;
        let response = self.http.send(request).await.map_err(|e| match e.failure {
            Failure::Timeout => Attempt::Timeout(self.http.timeout()),
            _ => Attempt::Transport(e.detail),
        })?;
        match response.status.as_u16() {
            200 => Ok(response.body),
            status => Err(Attempt::Status(
                status,
                crate::http::google_error_message(&response.body),
            )),
        }
    }
}
