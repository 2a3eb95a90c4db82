//! Access tokens from a credentials file ([`super::key_file`]) at the OAuth 2.0 token endpoint
//! the file names: a service-account key signs an RS256 JWT assertion (RFC 7523 JWT-bearer
//! grant, scope `cloud-platform`, `aud` = `token_uri`); an authorized user sends its refresh
//! token (RFC 6749 `refresh_token` grant). Tokens sit in a [`TokenCache`]: kept until shortly
//! before they expire, and minted once for all concurrent callers. A service-account key also
//! mints ID tokens for any audience (the assertion names `target_audience` instead of a scope,
//! and the endpoint answers an `id_token`), for hgate off GCP; the caller caches those.
//!
//! Hand-written rather than `gcp_auth` (the crate the design names): gcp_auth 0.12 sends
//! authorized-user refresh tokens to a hard-coded `accounts.google.com` URL, so that path cannot
//! be tested against a fake, and it brings a second HTTP client; signing needs only `ring`,
//! which the workspace already uses for TLS.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, header};
use ring::rand::SystemRandom;
use ring::signature::RSA_PKCS1_SHA256;
use serde::Deserialize;

use super::key_file::{CredentialsFile, Located, ServiceAccountKey};
use super::{AccessTokens, BoxFuture, CredentialsError};
use crate::backoff::Backoff;
use crate::http::{HttpClient, google_error_message};
use crate::identity::google_tokens::CLOUD_PLATFORM_SCOPE;
use crate::identity::jwt::Claims;
use crate::identity::token::Token;
use crate::identity::token_cache::{
    CacheKey, CachePolicy, Mint, MintFuture, TokenCache, TokenKind,
};

/// The JWT-bearer grant type (RFC 7523).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime asked of an assertion; Google accepts at most one hour.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// Deadline of one token request.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// No access token from the token endpoint.
#[derive(Debug, thiserror::Error)]
pub enum FileTokenError {
    /// The assertion could not be signed.
    #[error("signing the JWT assertion with the key of {path}: {reason}")]
    Sign {
        /// The credentials file.
        path: String,
        /// Why.
        reason: String,
    },
    /// No answer, after retries.
    #[error("token endpoint {url} (from {path}) unreachable after {attempts} attempts: {reason}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// The credentials file.
        path: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
    /// The endpoint refused.
    #[error(
        "token endpoint {url} refused the credentials in {path}: HTTP {status}: {message}; {fix}"
    )]
    Refused {
        /// The endpoint.
        url: String,
        /// The credentials file.
        path: String,
        /// HTTP status.
        status: u16,
        /// Google's message (`invalid_grant: ...`).
        message: String,
        /// What to do.
        fix: &'static str,
    },
    /// An authorized user asked for an ID token.
    #[error(
        "{path} is an authorized-user login, which cannot mint ID tokens for other audiences; use a service-account key, or name a service account to impersonate (HGATE_ID_TOKEN_SERVICE_ACCOUNT)"
    )]
    NoIdTokens {
        /// The credentials file.
        path: String,
    },
    /// An answer without the token asked for, or its lifetime.
    #[error("token endpoint {url} answered without {expected}: {reason}")]
    Body {
        /// The endpoint.
        url: String,
        /// What was expected.
        expected: &'static str,
        /// What the parser said.
        reason: String,
    },
}

/// One attempt's failure, before it is sorted into retryable or not.
#[derive(Debug, thiserror::Error)]
enum Attempt {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {0}: {1}")]
    Status(u16, String),
}

impl Attempt {
    fn retryable(&self) -> bool {
        match self {
            Attempt::Transport(_) => true,
            Attempt::Status(status, _) => *status == 429 || *status >= 500,
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize)]
struct IdTokenAnswer {
    id_token: String,
}

/// What an assertion asks for: an access token with a scope, or an ID token for an audience.
#[derive(Clone, Copy, Debug)]
pub enum Grant<'a> {
    /// `scope`: an access token.
    Scope(&'a str),
    /// `target_audience`: a Google-signed ID token for that audience.
    TargetAudience(&'a str),
}

/// Mints access tokens from one credentials file.
pub struct FileMint {
    http: HttpClient,
    file: CredentialsFile,
    path: String,
    backoff: Backoff,
    rng: SystemRandom,
}

impl FileMint {
    /// The form sent to the token endpoint, and the endpoint.
    fn request_form(&self, now: SystemTime) -> Result<(String, String), FileTokenError> {
        match &self.file {
            CredentialsFile::ServiceAccount(key) => {
                self.assertion_form(key, Grant::Scope(CLOUD_PLATFORM_SCOPE), now)
            }
            CredentialsFile::AuthorizedUser(user) => {
                let form = form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "refresh_token")
                    .append_pair("client_id", &user.client_id)
                    .append_pair("client_secret", &user.client_secret)
                    .append_pair("refresh_token", &user.refresh_token)
                    .finish();
                Ok((user.token_uri.clone(), form))
            }
        }
    }

    /// The JWT-bearer form for `grant`, and the endpoint.
    fn assertion_form(
        &self,
        key: &ServiceAccountKey,
        grant: Grant<'_>,
        now: SystemTime,
    ) -> Result<(String, String), FileTokenError> {
        let assertion =
            sign_assertion(key, grant, now, &self.rng).map_err(|reason| FileTokenError::Sign {
                path: self.path.clone(),
                reason,
            })?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", JWT_BEARER_GRANT)
            .append_pair("assertion", &assertion)
            .finish();
        Ok((key.token_uri.clone(), form))
    }

    /// What to do when the endpoint refuses, by kind of file and OAuth error code.
    fn fix(&self, message: &str) -> &'static str {
        let service_account = matches!(self.file, CredentialsFile::ServiceAccount(_));
        match (service_account, message.split(':').next().unwrap_or("")) {
            (true, "invalid_grant") => {
                "the key was deleted or disabled, or this machine's clock is off: create a new key (gcloud iam service-accounts keys create) and check the clock"
            }
            (false, "invalid_grant") => {
                "the refresh token expired or was revoked: run `gcloud auth application-default login` again"
            }
            (false, "invalid_client" | "unauthorized_client") => {
                "client_id or client_secret is wrong: run `gcloud auth application-default login` again"
            }
            (true, _) => {
                "check that the key file is the one Google issued and that token_uri is Google's token endpoint"
            }
            (false, _) => "run `gcloud auth application-default login` again",
        }
    }

    async fn access_token(&self) -> Result<Token, FileTokenError> {
        let (url, form) = self.request_form(SystemTime::now())?;
        let body = self.exchange(&url, &form).await?;
        let answer: TokenAnswer =
            serde_json::from_slice(&body).map_err(|e| FileTokenError::Body {
                url: url.clone(),
                expected: "access_token and expires_in",
                reason: e.to_string(),
            })?;
        Ok(Token::new(
            answer.access_token,
            SystemTime::now() + Duration::from_secs(answer.expires_in),
        ))
    }

    /// A Google-signed ID token for `audience`, valid until its own `exp`.
    /// The key that signs ID token assertions: only a service-account file has one.
    fn id_token_key(&self) -> Result<&ServiceAccountKey, FileTokenError> {
        match &self.file {
            CredentialsFile::ServiceAccount(key) => Ok(key),
            CredentialsFile::AuthorizedUser(_) => Err(FileTokenError::NoIdTokens {
                path: self.path.clone(),
            }),
        }
    }

    async fn id_token(&self, audience: &str) -> Result<Token, FileTokenError> {
        let key = self.id_token_key()?;
        let (url, form) =
            self.assertion_form(key, Grant::TargetAudience(audience), SystemTime::now())?;
        let body = self.exchange(&url, &form).await?;
        let bad = |reason: String| FileTokenError::Body {
            url: url.clone(),
            expected: "an id_token JWT",
            reason,
        };
        let answer: IdTokenAnswer =
            serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let claims = Claims::decode(&answer.id_token).map_err(|e| bad(e.to_string()))?;
        Ok(Token::new(answer.id_token, claims.expires_at()))
    }

    /// POSTs `form` to `url`, retrying 5xx, 429 and transport failures; the answer's body.
    async fn exchange(&self, url: &str, form: &str) -> Result<Bytes, FileTokenError> {
        let url = url.to_owned();
        let attempt = || async {
            let request = Request::builder()
                .method(Method::POST)
                .uri(&url)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(header::ACCEPT, "application/json")
                .body(Full::new(Bytes::from(form.to_owned())))
                .map_err(|e| Attempt::Transport(e.to_string()))?;
            let response = self
                .http
                .send(request)
                .await
                .map_err(|e| Attempt::Transport(e.detail))?;
            match response.status.as_u16() {
                200 => Ok(response.body),
                status => Err(Attempt::Status(
                    status,
                    google_error_message(&response.body),
                )),
            }
        };
        self.backoff
            .retry(&url, Attempt::retryable, attempt)
            .await
            .map_err(|(e, attempts)| match e {
                Attempt::Status(status, message) => FileTokenError::Refused {
                    url: url.clone(),
                    path: self.path.clone(),
                    status,
                    fix: self.fix(&message),
                    message,
                },
                Attempt::Transport(reason) => FileTokenError::Unreachable {
                    url: url.clone(),
                    path: self.path.clone(),
                    attempts,
                    reason,
                },
            })
    }
}

impl Mint for FileMint {
    type Error = FileTokenError;

    fn mint<'a>(&'a self, _key: &'a CacheKey) -> MintFuture<'a, FileTokenError> {
        Box::pin(self.access_token())
    }
}

/// The signed JWT a service-account key trades for a token: header `{alg: RS256, typ: JWT,
/// kid}`, claims `{iss: client_email, aud: token_uri, iat, exp: iat + 1h}` and the `scope`
/// or `target_audience` of `grant`.
pub fn sign_assertion(
    key: &ServiceAccountKey,
    grant: Grant<'_>,
    now: SystemTime,
    rng: &SystemRandom,
) -> Result<String, String> {
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("clock before 1970: {e}"))?
        .as_secs();
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &key.private_key_id {
        header["kid"] = kid.clone().into();
    }
    let mut claims = serde_json::json!({
        "iss": key.client_email,
        "aud": key.token_uri,
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME.as_secs(),
    });
    match grant {
        Grant::Scope(scope) => claims["scope"] = scope.into(),
        Grant::TargetAudience(audience) => claims["target_audience"] = audience.into(),
    }
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; key.key.public().modulus_len()];
    key.key
        .sign(
            &RSA_PKCS1_SHA256,
            rng,
            signing_input.as_bytes(),
            &mut signature,
        )
        .map_err(|_| "ring refused to sign".to_owned())?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// Access tokens from a credentials file, cached until shortly before they expire.
pub struct FileTokens {
    cache: TokenCache<FileMint>,
}

/// The one key of the cache: one scope, one account.
const KEY: CacheKey = CacheKey {
    kind: TokenKind::Access,
    audience: String::new(),
};

impl FileTokens {
    /// Reads the file `located` names and builds its token source, off the runtime's threads
    /// (the file and the system trust store are blocking reads).
    pub async fn load(located: &Located) -> Result<Self, CredentialsError> {
        let located = located.clone();
        tokio::task::spawn_blocking(move || {
            let file = CredentialsFile::load(&located)?;
            let http =
                HttpClient::new(TOKEN_TIMEOUT).map_err(|e| CredentialsError::Client(e.detail))?;
            Ok(FileTokens {
                cache: TokenCache::new(
                    FileMint {
                        http,
                        file,
                        path: located.path.display().to_string(),
                        backoff: Backoff::DISCOVERY,
                        rng: SystemRandom::new(),
                    },
                    CachePolicy {
                        capacity: 1,
                        ..CachePolicy::default()
                    },
                ),
            })
        })
        .await
        .map_err(|e| CredentialsError::Client(e.to_string()))?
    }

    /// The file the tokens come from.
    pub fn credentials(&self) -> &CredentialsFile {
        &self.cache.minter().file
    }

    /// `Ok` when this file can mint ID tokens for any audience (a service-account key); else
    /// why not, with the fix, for a caller to refuse at startup rather than per request.
    pub fn can_mint_id_tokens(&self) -> Result<(), FileTokenError> {
        self.cache.minter().id_token_key().map(|_| ())
    }

    /// A fresh Google-signed ID token for `audience` (a service-account key only; not cached
    /// here: the caller's cache is bounded by audience).
    pub async fn id_token(&self, audience: &str) -> Result<Token, FileTokenError> {
        self.cache.minter().id_token(audience).await
    }
}

impl AccessTokens for FileTokens {
    fn access_token(&self) -> BoxFuture<'_, Result<String, CredentialsError>> {
        Box::pin(async move {
            let token = self.cache.get(&KEY).await?;
            Ok(token.secret().to_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::key_file::AuthorizedUser;

    fn user() -> FileMint {
        FileMint {
            http: HttpClient::plain(TOKEN_TIMEOUT),
            file: CredentialsFile::AuthorizedUser(AuthorizedUser {
                client_id: "id".into(),
                client_secret: "s&cret".into(),
                refresh_token: "1//r=".into(),
                token_uri: "http://127.0.0.1:1/token".into(),
                quota_project_id: None,
                account: None,
            }),
            path: "/adc.json".into(),
            backoff: Backoff::DISCOVERY,
            rng: SystemRandom::new(),
        }
    }

    #[test]
    fn the_refresh_form_is_url_encoded() {
        let (url, form) = user().request_form(SystemTime::now()).expect("form");
        assert_eq!(url, "http://127.0.0.1:1/token");
        assert_eq!(
            form,
            "grant_type=refresh_token&client_id=id&client_secret=s%26cret&refresh_token=1%2F%2Fr%3D"
        );
    }

    #[test]
    fn invalid_grant_of_a_user_says_to_log_in_again() {
        let fix = user().fix("invalid_grant: Token has been expired or revoked.");
        assert!(
            fix.contains("gcloud auth application-default login"),
            "{fix}"
        );
    }
}
