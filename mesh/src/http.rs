//! The one HTTP client stack of the mesh side, for Google APIs (STS, IAM, Container, Resource
//! Manager) and the metadata server: hyper-util's pooled client over hyper-rustls (ring),
//! `TCP_NODELAY` (requests are small and latency-bound), a connect timeout and a deadline for
//! the whole exchange, and a cap on the answer's size so a broken or hostile server cannot
//! make krun buffer without end: an answer whose `Content-Length` is over the cap is refused
//! before its body is read, and one that streams past it is cut off at the cap (the
//! connection is closed, not returned to the pool). The Kubernetes client is kube's own stack (see
//! `discovery::kube_client`), not this one.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{HeaderMap, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// The largest answer read by default; Google's JSON answers and tokens are a few kilobytes.
pub const RESPONSE_LIMIT: usize = 16 << 20;

/// What kind of failure an [`HttpError`] is, for callers that sort them (retry or not,
/// "not on GCP" or not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The request could not be built (a URL or header that is not valid).
    Request,
    /// The connection failed or broke; the OS error's kind when there is one.
    Connect(Option<std::io::ErrorKind>),
    /// No whole answer within the deadline.
    Timeout,
    /// The answer could not be read.
    Body,
    /// The answer was larger than the client's limit; not read further.
    TooLarge,
}

/// A request that got no usable answer (an answer with an error status is not an error here).
#[derive(Debug, thiserror::Error)]
#[error("{url}: {detail}")]
pub struct HttpError {
    /// The URL.
    pub url: String,
    /// What kind of failure.
    pub failure: Failure,
    /// What failed, with the underlying errors.
    pub detail: String,
}

/// An answer, its body read whole.
#[derive(Debug)]
pub struct Response {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// HTTPS (and `http://`) with ring, trusting the system roots (`SSL_CERT_FILE` /
/// `SSL_CERT_DIR` replace them): the TLS half of every client that talks to public Google
/// endpoints. Reads the trust store: a blocking call.
pub fn system_roots_tls()
-> std::io::Result<hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>> {
    hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
}

/// A shared, pooled client; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    limit: usize,
}

impl HttpClient {
    /// HTTPS trusting the system roots (and `http://`, for private endpoints and tests); each
    /// connect and each whole exchange gets `timeout`. Reads the trust store: a blocking call.
    pub fn new(timeout: Duration) -> Result<Self, HttpError> {
        let tls = system_roots_tls().map_err(|e| HttpError {
            url: "https://".into(),
            failure: Failure::Request,
            detail: format!(
                "cannot load the system roots: {e}; install CA certificates (ca-certificates) in the image"
            ),
        })?;
        Ok(Self::with(tls, timeout))
    }

    /// Plain `http://` only (the metadata server on its link-local address): no trust store
    /// is read, so this works in images without CA certificates; HTTPS URLs fail, as no root
    /// is trusted.
    pub fn plain(timeout: Duration) -> Self {
        let roots = rustls::RootCertStore::empty();
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        // ring supports the default versions, so this never fails; were it to, rustls picks its
        // one compiled-in provider (ring: the workspace builds no other) for the fallback.
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
        Self::with(
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls),
            timeout,
        )
    }

    fn with(
        tls: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
        timeout: Duration,
    ) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeout));
        tcp.enforce_http(false);
        let connector = tls.https_or_http().enable_http1().wrap_connector(tcp);
        HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
            limit: RESPONSE_LIMIT,
        }
    }

    /// The same client reading at most `limit` bytes of an answer (default [`RESPONSE_LIMIT`]).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The connect timeout and the deadline of [`HttpClient::send`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `request` and reads the whole answer within the client's timeout.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response, HttpError> {
        self.send_within(request, self.timeout).await
    }

    /// Same, within `deadline` (a probe's shorter budget).
    pub async fn send_within(
        &self,
        request: Request<Full<Bytes>>,
        deadline: Duration,
    ) -> Result<Response, HttpError> {
        let url = request.uri().to_string();
        let err = |failure, detail: String| HttpError {
            url: url.clone(),
            failure,
            detail,
        };
        let call = async {
            let response = self.inner.request(request).await.map_err(|e| {
                let failure = match io_kind(&e) {
                    Some(kind) => Failure::Connect(Some(kind)),
                    None if e.is_connect() => Failure::Connect(None),
                    None => Failure::Body,
                };
                err(failure, error_chain(&e))
            })?;
            let (parts, body) = response.into_parts();
            let too_large = || {
                err(
                    Failure::TooLarge,
                    format!("answer larger than {} bytes, refused", self.limit),
                )
            };
            let declared = parts
                .headers
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|n| n > self.limit as u64) {
                return Err(too_large());
            }
            let body = Limited::new(body, self.limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        too_large()
                    } else {
                        err(Failure::Body, format!("reading the answer: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(deadline, call)
            .await
            .map_err(|_| err(Failure::Timeout, format!("no answer within {deadline:?}")))?
    }
}

/// Google's error text: OAuth style (`error`, `error_description`, STS) or API style
/// (`error.status`, `error.message`: IAM, Container, Resource Manager); the start of the raw
/// body when it is neither. The one reader of Google's error answers.
pub fn google_error_message(body: &[u8]) -> String {
    let raw = || String::from_utf8_lossy(body).chars().take(300).collect();
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return raw();
    };
    match &json["error"] {
        Value::String(code) => match json["error_description"].as_str() {
            Some(desc) => format!("{code}: {desc}"),
            None => code.clone(),
        },
        Value::Object(e) => match (
            e.get("status").and_then(Value::as_str),
            e.get("message").and_then(Value::as_str),
        ) {
            (Some(status), Some(msg)) => format!("{status}: {msg}"),
            (None, Some(msg)) => msg.to_owned(),
            _ => raw(),
        },
        _ => raw(),
    }
}

/// The kind of the first OS error in `e`'s chain.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = err.source();
    }
    None
}

/// `e` and its sources, joined with `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::google_error_message;

    #[test]
    fn both_google_error_shapes_are_read() {
        let sts = br#"{"error":"invalid_grant","error_description":"The audience is invalid."}"#;
        assert_eq!(
            google_error_message(sts),
            "invalid_grant: The audience is invalid."
        );
        let iam = br#"{"error":{"code":403,"message":"Permission 'iam.serviceAccounts.getOpenIdToken' denied","status":"PERMISSION_DENIED"}}"#;
        assert_eq!(
            google_error_message(iam),
            "PERMISSION_DENIED: Permission 'iam.serviceAccounts.getOpenIdToken' denied"
        );
        assert_eq!(google_error_message(b"upstream down"), "upstream down");
    }
}
