//! The one client of the GCE / Cloud Run metadata server (plain HTTP on the link-local IP, or
//! `GCE_METADATA_HOST`), for discovery (project, region, cluster, the access token), identity
//! and hgate (ID tokens). Our own because gcp_auth hard-codes `metadata.google.internal` and
//! cannot be pointed at a test server.
//!
//! Every request carries `Metadata-Flavor: Google` and every answer must carry it back (that
//! header is how Google's client libraries tell a metadata server from a captive portal or a
//! proxy), ID tokens included; an answer larger than [`ANSWER_LIMIT`] is refused unread. Values are cached; the access token is cached until shortly before it expires;
//! ID tokens are cached by the caller's [`TokenCache`](crate::identity::token_cache::TokenCache).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use serde::Deserialize;

use crate::backoff::Backoff;
use crate::http::{Failure, HttpClient};
use crate::identity::jwt::Claims;
use crate::identity::token::Token;
use crate::identity::token_cache::{CacheKey, Mint, MintFuture};

/// The header a metadata server requires and answers with.
pub const FLAVOR_HEADER: &str = "metadata-flavor";
/// Its value.
pub const FLAVOR: &str = "Google";
/// Path prefix of the v1 API.
pub const API_PREFIX: &str = "/computeMetadata/v1/";
/// The largest answer read from the metadata server: its values, access and ID tokens are a
/// few kilobytes at most.
pub const ANSWER_LIMIT: usize = 64 << 10;
/// A token this close to expiry is refreshed before use.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Metadata paths krun reads.
pub mod paths {
    #![allow(missing_docs)]
    pub const PROJECT_ID: &str = "project/project-id";
    pub const NUMERIC_PROJECT_ID: &str = "project/numeric-project-id";
    pub const EMAIL: &str = "instance/service-accounts/default/email";
    pub const TOKEN: &str = "instance/service-accounts/default/token";
    pub const REGION: &str = "instance/region";
    pub const CLUSTER_NAME: &str = "instance/attributes/cluster-name";
    pub const CLUSTER_LOCATION: &str = "instance/attributes/cluster-location";
    pub const ZONE: &str = "instance/zone";
    pub const INSTANCE_ID: &str = "instance/id";
    pub const INSTANCE_IP: &str = "instance/network-interfaces/0/ip";
    pub const IDENTITY: &str = "instance/service-accounts/default/identity";
}

/// A metadata request that failed; each message names the server and what to check.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// No connection or no answer, after all attempts.
    #[error(
        "metadata server {host} unreachable for {path} after {attempts} attempts: {reason}; set GCE_METADATA_HOST to the right host:port, or run on GCP"
    )]
    Unreachable {
        /// `host[:port]`.
        host: String,
        /// The path asked for.
        path: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
    /// The server answered without `Metadata-Flavor: Google`.
    #[error(
        "{host} answered {path} without Metadata-Flavor: Google, so it is not a metadata server; check GCE_METADATA_HOST"
    )]
    NotMetadataServer {
        /// `host[:port]`.
        host: String,
        /// The path asked for.
        path: String,
    },
    /// An HTTP error status other than 404.
    #[error("metadata server {host} answered {path} with HTTP {status} after {attempts} attempts")]
    Status {
        /// `host[:port]`.
        host: String,
        /// The path asked for.
        path: String,
        /// The status.
        status: u16,
        /// Attempts made.
        attempts: u32,
    },
    /// An ID token that is not a JWT.
    #[error("metadata server {host} answered {path} with a token that is not a JWT: {reason}")]
    NotAJwt {
        /// `host[:port]`.
        host: String,
        /// The path asked for.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A body that is not what the metadata API documents.
    #[error("metadata server {host} answered {path} with an unreadable body: {reason}")]
    Body {
        /// `host[:port]`.
        host: String,
        /// The path asked for.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// Why krun concluded it is not on GCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotGcp {
    /// Nothing listens at the metadata address (the usual laptop / docker answer).
    Refused,
    /// The address is unreachable (no route, host down).
    Unreachable,
    /// No answer within the probe timeout (packets dropped on the floor).
    NoAnswer,
    /// Something answered, but not a metadata server (no `Metadata-Flavor: Google`).
    NotMetadataServer,
    /// `metadata.google.internal` does not resolve to the metadata IP.
    NoMetadataDns,
    /// Nothing local suggests GCP ([`crate::discovery::gcp_hint`]), so no probe was sent.
    NothingSuggestsGcp,
}

impl std::fmt::Display for NotGcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotGcp::Refused => "connection refused",
            NotGcp::Unreachable => "address unreachable",
            NotGcp::NoAnswer => "no answer within the probe timeout",
            NotGcp::NotMetadataServer => "the answer lacked Metadata-Flavor: Google",
            NotGcp::NoMetadataDns => "metadata.google.internal does not resolve to 169.254.169.254",
            NotGcp::NothingSuggestsGcp => {
                "nothing suggests GCP (no K_SERVICE, CLOUD_RUN_JOB, GCE_METADATA_HOST, KUBERNETES_SERVICE_HOST or GKE/TD MESH; DMI product name not Google), probe skipped"
            }
        })
    }
}

/// What the platform probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// A metadata server answered.
    Gcp,
    /// No metadata server, and why.
    NotGcp(NotGcp),
}

/// The last segment of a resource path the metadata server answers with:
/// `projects/123/zones/us-central1-a` is `us-central1-a`.
pub fn last_segment(value: &str) -> &str {
    value.rsplit('/').next().unwrap_or(value)
}

/// The region part of a GCE zone name (`us-central1-a` is `us-central1`: zones are
/// `<region>-<letter>`); `None` for a name with no `-`.
pub fn region_of_zone(zone: &str) -> Option<&str> {
    zone.rsplit_once('-').map(|(region, _)| region)
}

/// The DNS name of the metadata server on GCP (fully qualified, no search domains).
pub const METADATA_DNS_NAME: &str = "metadata.google.internal.";
/// The metadata server's link-local address.
pub const METADATA_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 169, 254);

/// How [`MetadataClient::probe`] decides.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Budget of each probe.
    pub timeout: Duration,
    /// Name to resolve in the race (`metadata.google.internal.`); `None` probes HTTP only.
    pub dns_name: Option<String>,
    /// Wait for both probes and take any positive answer (when GCP is likely).
    pub wait_for_both: bool,
}

async fn resolves_to_metadata_ip(name: &str) -> Platform {
    let metadata_ip = std::net::IpAddr::V4(METADATA_IP);
    match tokio::net::lookup_host((name, 80)).await {
        Ok(mut addrs) => {
            if addrs.any(|a| a.ip() == metadata_ip) {
                Platform::Gcp
            } else {
                Platform::NotGcp(NotGcp::NoMetadataDns)
            }
        }
        Err(_) => Platform::NotGcp(NotGcp::NoMetadataDns),
    }
}

/// An OAuth access token from the metadata server.
#[derive(Clone)]
pub struct AccessToken {
    /// The bearer value.
    pub secret: String,
    /// When it stops working.
    pub expires_at: Instant,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &crate::config::REDACTED)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

/// One failed attempt, before it is classified as retryable or not.
#[derive(Debug, thiserror::Error)]
enum Attempt {
    #[error("connection failed: {0}")]
    Connect(NotGcp, String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answer without Metadata-Flavor: Google")]
    NoFlavor,
    #[error("HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Other(String),
}

impl Attempt {
    fn retryable(&self) -> bool {
        match self {
            Attempt::Connect(..) | Attempt::Timeout(_) | Attempt::Other(_) => true,
            Attempt::Status(status) => *status >= 500,
            Attempt::NoFlavor | Attempt::TooLarge(_) => false,
        }
    }
}

/// The metadata client. Cheap to share behind an `Arc`.
pub struct MetadataClient {
    host: String,
    http: HttpClient,
    backoff: Backoff,
    cache: Mutex<HashMap<String, Option<String>>>,
    token: tokio::sync::Mutex<Option<AccessToken>>,
}

impl MetadataClient {
    /// A client for `host[:port]` whose attempts each get `timeout` (connect and answer).
    pub fn new(host: &str, timeout: Duration) -> Self {
        Self::with_backoff(host, timeout, Backoff::DISCOVERY)
    }

    /// Same, with an explicit retry policy (tests use a fast one).
    pub fn with_backoff(host: &str, timeout: Duration, backoff: Backoff) -> Self {
        let host = host
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        MetadataClient {
            host,
            http: HttpClient::plain(timeout).with_limit(ANSWER_LIMIT),
            backoff,
            cache: Mutex::new(HashMap::new()),
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// The server's `host[:port]`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Decides whether krun runs on GCP the way Google's client libraries do (Go's
    /// `metadata.OnGCE`): one quick request to the server root races a DNS lookup of
    /// `metadata.google.internal`, and the first answer wins. A refused or unreachable
    /// connection, silence until the timeout, an answer without the flavor header, or a name
    /// that does not resolve to the metadata IP all mean "not on GCP", with no retries; so a
    /// laptop or plain docker run where packets to the link-local IP are dropped still learns
    /// it at once from DNS. With `wait_for_both` (Cloud Run's env is present) either positive
    /// answer wins.
    pub async fn probe(&self, options: &ProbeOptions) -> Platform {
        let timeout = options.timeout.min(self.http.timeout());
        let http = async {
            match self.attempt("/", timeout).await {
                Ok(_) => Platform::Gcp,
                Err(Attempt::Connect(why, _)) => Platform::NotGcp(why),
                Err(Attempt::Timeout(_)) => Platform::NotGcp(NotGcp::NoAnswer),
                Err(Attempt::NoFlavor) => Platform::NotGcp(NotGcp::NotMetadataServer),
                // It speaks the metadata protocol but is unhappy: treat as GCP, the real
                // calls will retry and report.
                Err(Attempt::Status(_) | Attempt::TooLarge(_) | Attempt::Other(_)) => Platform::Gcp,
            }
        };
        let dns = async {
            match &options.dns_name {
                Some(name) => tokio::time::timeout(timeout, resolves_to_metadata_ip(name))
                    .await
                    .unwrap_or(Platform::NotGcp(NotGcp::NoAnswer)),
                None => std::future::pending().await,
            }
        };
        if options.wait_for_both && options.dns_name.is_some() {
            let (http, dns) = tokio::join!(http, dns);
            return if dns == Platform::Gcp { dns } else { http };
        }
        tokio::select! {
            platform = http => platform,
            platform = dns => platform,
        }
    }

    /// The value at `path` (relative to `/computeMetadata/v1/`), `None` when the server says
    /// 404 (an attribute that is not set). Retried on 5xx and connection errors; cached.
    pub async fn get(&self, path: &str) -> Result<Option<String>, MetadataError> {
        if let Some(hit) = self.cached(path) {
            return Ok(hit);
        }
        let full = format!("{API_PREFIX}{path}");
        let result = self
            .backoff
            .retry(&full, Attempt::retryable, || {
                self.attempt(&full, self.http.timeout())
            })
            .await;
        let value = match result {
            Ok(Some(body)) => Some(body.trim().to_owned()),
            Ok(None) => None,
            Err((e, attempts)) => return Err(self.error(path, e, attempts)),
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(path.to_owned(), value.clone());
        }
        Ok(value)
    }

    /// An access token of the instance's service account, fetched once and reused until
    /// five minutes before it expires.
    pub async fn access_token(&self) -> Result<AccessToken, MetadataError> {
        let mut slot = self.token.lock().await;
        if let Some(token) = slot.as_ref()
            && token.expires_at > Instant::now() + TOKEN_REFRESH_MARGIN
        {
            return Ok(token.clone());
        }
        let full = format!("{API_PREFIX}{}", paths::TOKEN);
        let fetched_at = Instant::now();
        let body = self
            .backoff
            .retry(&full, Attempt::retryable, || {
                self.attempt(&full, self.http.timeout())
            })
            .await
            .map_err(|(e, attempts)| self.error(paths::TOKEN, e, attempts))?
            .ok_or_else(|| MetadataError::Status {
                host: self.host.clone(),
                path: paths::TOKEN.to_owned(),
                status: 404,
                attempts: 1,
            })?;
        let parsed: TokenResponse =
            serde_json::from_str(&body).map_err(|e| MetadataError::Body {
                host: self.host.clone(),
                path: paths::TOKEN.to_owned(),
                reason: format!("expected {{access_token, expires_in}}: {e}"),
            })?;
        let token = AccessToken {
            secret: parsed.access_token,
            expires_at: fetched_at + Duration::from_secs(parsed.expires_in),
        };
        *slot = Some(token.clone());
        Ok(token)
    }

    /// An ID token for `audience` of the instance's service account: one GET of
    /// `.../identity?audience=A&format=full`, no retries (the caller's cache retries).
    pub async fn id_token(&self, audience: &str) -> Result<Token, MetadataError> {
        let path = format!(
            "{}?audience={}&format=full",
            paths::IDENTITY,
            percent_encode(audience)
        );
        let full = format!("{API_PREFIX}{path}");
        let token = self
            .attempt(&full, self.http.timeout())
            .await
            .map_err(|e| self.error(&path, e, 1))?
            .ok_or_else(|| MetadataError::Status {
                host: self.host.clone(),
                path: path.clone(),
                status: 404,
                attempts: 1,
            })?;
        let token = token.trim().to_owned();
        let claims = Claims::decode(&token).map_err(|e| MetadataError::NotAJwt {
            host: self.host.clone(),
            path,
            reason: e.to_string(),
        })?;
        Ok(Token::new(token, claims.expires_at()))
    }

    fn cached(&self, path: &str) -> Option<Option<String>> {
        self.cache.lock().ok()?.get(path).cloned()
    }

    /// One GET; an answer without `Metadata-Flavor: Google` is refused whatever its status,
    /// so a captive portal or proxy never becomes a project id or a token.
    async fn attempt(&self, path: &str, timeout: Duration) -> Result<Option<String>, Attempt> {
        let request = http::Request::get(format!("http://{}{path}", self.host))
            .header(FLAVOR_HEADER, FLAVOR)
            .header(http::header::ACCEPT, "text/plain")
            .body(Full::new(Bytes::new()))
            .map_err(|e| Attempt::Other(e.to_string()))?;
        let response =
            self.http
                .send_within(request, timeout)
                .await
                .map_err(|e| match e.failure {
                    Failure::Connect(kind) => Attempt::Connect(not_gcp(kind), e.detail),
                    Failure::Timeout => Attempt::Timeout(timeout),
                    Failure::TooLarge => Attempt::TooLarge(e.detail),
                    Failure::Request | Failure::Body => Attempt::Other(e.detail),
                })?;
        let flavored = response
            .headers
            .get(FLAVOR_HEADER)
            .is_some_and(|v| v == FLAVOR);
        if !flavored {
            return Err(Attempt::NoFlavor);
        }
        match response.status.as_u16() {
            200 => Ok(Some(String::from_utf8_lossy(&response.body).into_owned())),
            404 => Ok(None),
            other => Err(Attempt::Status(other)),
        }
    }

    fn error(&self, path: &str, attempt: Attempt, attempts: u32) -> MetadataError {
        let host = self.host.clone();
        let path = path.to_owned();
        match attempt {
            Attempt::NoFlavor => MetadataError::NotMetadataServer { host, path },
            Attempt::TooLarge(reason) => MetadataError::Body { host, path, reason },
            Attempt::Status(status) => MetadataError::Status {
                host,
                path,
                status,
                attempts,
            },
            other => MetadataError::Unreachable {
                host,
                path,
                attempts,
                reason: other.to_string(),
            },
        }
    }
}

/// Sorts a connection failure into the "not on GCP" reasons by its OS error.
fn not_gcp(kind: Option<std::io::ErrorKind>) -> NotGcp {
    use std::io::ErrorKind::*;
    match kind {
        Some(ConnectionRefused) => NotGcp::Refused,
        Some(TimedOut) => NotGcp::NoAnswer,
        _ => NotGcp::Unreachable,
    }
}

impl Mint for MetadataClient {
    type Error = MetadataError;

    fn mint<'a>(&'a self, key: &'a CacheKey) -> MintFuture<'a, MetadataError> {
        Box::pin(self.id_token(&key.audience))
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn audiences_are_percent_encoded() {
        assert_eq!(
            super::percent_encode("https://svc.a.run.app/x?y"),
            "https%3A%2F%2Fsvc.a.run.app%2Fx%3Fy"
        );
    }
}
