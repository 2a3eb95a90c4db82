//! A bearer token and its real expiry. Debug never prints the token itself.

use std::sync::Arc;
use std::time::SystemTime;

/// A bearer token (K8s, federated, access or ID token).
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    secret: Arc<str>,
    /// When the issuer stops accepting it.
    pub expires_at: SystemTime,
}

impl Token {
    /// A token valid until `expires_at`.
    pub fn new(secret: impl Into<Arc<str>>, expires_at: SystemTime) -> Self {
        Token {
            secret: secret.into(),
            expires_at,
        }
    }

    /// The token text, for an `Authorization` header or a file.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("secret", &crate::config::REDACTED)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}
