//! The small HTTPS client the token exchanges use: hyper over rustls (ring, system roots),
//! `http://` allowed for tests and local fakes, with a per-request deadline.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Deadline of one request, as the reference's 5 s client plus slack for cold TLS.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A transport failure (no HTTP status).
#[derive(Debug, thiserror::Error)]
#[error("{url}: {detail}")]
pub struct HttpError {
    /// The URL.
    pub url: String,
    /// What failed.
    pub detail: String,
}

/// Shared, pooled HTTP client.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    /// A client trusting the system roots.
    pub fn new() -> Result<Self, HttpError> {
        // Requests are small and latency-bound: no Nagle delay.
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .map_err(|e| HttpError {
                url: "https://".into(),
                detail: format!("cannot load system roots: {e}"),
            })?
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        Ok(HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends `request` and reads the whole body.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let url = request.uri().to_string();
        let err = |detail: String| HttpError {
            url: url.clone(),
            detail,
        };
        let call = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|e| err(format!("{e:#}")))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| err(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| err(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }
}
