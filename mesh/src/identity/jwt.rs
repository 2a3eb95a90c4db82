//! Reads the claims of a JWT (K8s service account tokens, Google ID tokens) without verifying
//! it: krun only needs the real expiry to schedule refreshes, and the issuer verifies tokens.

use base64::Engine;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The claims krun looks at.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Subject, e.g. `system:serviceaccount:NS:KSA`.
    #[serde(default)]
    pub sub: String,
    /// Audience: one string or a list.
    #[serde(default)]
    pub aud: Audience,
}

/// JWT `aud`: RFC 7519 allows a string or an array.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// Absent.
    #[default]
    None,
    /// One audience.
    One(String),
    /// Several audiences.
    Many(Vec<String>),
}

impl Audience {
    /// Whether `aud` is one of the audiences.
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::None => false,
            Audience::One(a) => a == aud,
            Audience::Many(list) => list.iter().any(|a| a == aud),
        }
    }
}

/// A token that is not a JWT with an `exp` claim.
#[derive(Debug, thiserror::Error)]
#[error("the token is not a JWT with an exp claim: {0}")]
pub struct NotAJwt(String);

impl Claims {
    /// Decodes the payload. JWTs use URL-safe base64 without padding
    /// (<https://www.rfc-editor.org/rfc/rfc7515#section-2>); cloud-run-mesh decoded it as
    /// standard base64, which fails on payloads containing `-` or `_`.
    pub fn decode(token: &str) -> Result<Claims, NotAJwt> {
        let payload = token
            .split('.')
            .nth(1)
            .ok_or_else(|| NotAJwt("no payload segment".into()))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|e| NotAJwt(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| NotAJwt(e.to_string()))
    }

    /// The expiry as a time.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}
