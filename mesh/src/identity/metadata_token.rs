//! ID tokens straight from the metadata server's `identity` endpoint: what hgate and
//! runsd-style callers use on GCP, where the instance's own service account is the caller.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, header};

use super::google_tokens::GoogleTokenError;
use super::http::HttpClient;
use super::jwt::Claims;
use super::token::Token;
use super::token_cache::{CacheKey, Mint, MintFuture};

const API: &str = "metadata server identity";

/// Mints ID tokens from the metadata server at `host` (`GCE_METADATA_HOST`, `host[:port]`).
#[derive(Clone)]
pub struct MetadataIdTokens {
    http: HttpClient,
    host: String,
}

impl MetadataIdTokens {
    /// A minter for the metadata server at `host`.
    pub fn new(http: HttpClient, host: &str) -> Self {
        MetadataIdTokens {
            http,
            host: host.to_owned(),
        }
    }

    /// One GET of `.../service-accounts/default/identity?audience=A&format=full`.
    pub async fn id_token(&self, audience: &str) -> Result<Token, GoogleTokenError> {
        let url = format!(
            "http://{}/computeMetadata/v1/instance/service-accounts/default/identity?audience={}&format=full",
            self.host,
            percent_encode(audience)
        );
        let response_err = |detail: String| GoogleTokenError::Response {
            api: API,
            url: url.clone(),
            detail,
        };
        let request = Request::get(&url)
            .header("Metadata-Flavor", "Google")
            .header(header::ACCEPT, "text/plain")
            .body(Full::new(Bytes::new()))
            .map_err(|e| response_err(e.to_string()))?;
        let (status, body) = self
            .http
            .send(request)
            .await
            .map_err(|source| GoogleTokenError::Transport { api: API, source })?;
        if !status.is_success() {
            return Err(GoogleTokenError::Status {
                api: API,
                url: url.clone(),
                status,
                message: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        let token = String::from_utf8_lossy(&body).trim().to_owned();
        let claims = Claims::decode(&token).map_err(|e| response_err(e.to_string()))?;
        Ok(Token::new(token, claims.expires_at()))
    }
}

impl Mint for MetadataIdTokens {
    type Error = GoogleTokenError;

    fn mint<'a>(&'a self, key: &'a CacheKey) -> MintFuture<'a, GoogleTokenError> {
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
