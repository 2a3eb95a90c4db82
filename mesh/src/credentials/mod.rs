//! Credentials for calling Google: access tokens for Google APIs and for the GKE API server,
//! behind one small trait so the source (the metadata server on GCP, a credentials file off
//! it: [`key_file`], [`file_tokens`]) changes without touching the callers, and the ID tokens
//! sent to Cloud Run ([`id_tokens`]).

pub mod file_tokens;
pub mod id_tokens;
pub mod key_file;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::header::{AUTHORIZATION, HeaderValue};
use tower::BoxError;
use tower::filter::AsyncPredicate;

use crate::identity::token_cache::TokenCacheError;
use crate::metadata::{MetadataClient, MetadataError};
use file_tokens::FileTokenError;

/// A boxed future, as the trait object needs.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// No access token, from whichever source.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The metadata server refused or failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The token endpoint of a credentials file refused or failed.
    #[error(transparent)]
    File(#[from] TokenCacheError<FileTokenError>),
    /// The credentials file cannot be used.
    #[error(transparent)]
    KeyFile(#[from] key_file::KeyFileError),
    /// The HTTPS client for the token endpoint could not be built.
    #[error("HTTPS client for the Google token endpoint: {0}")]
    Client(String),
}

/// Something that hands out OAuth access tokens, refreshing them before they expire.
pub trait AccessTokens: Send + Sync {
    /// A currently valid bearer token.
    fn access_token(&self) -> BoxFuture<'_, Result<String, CredentialsError>>;
}

impl AccessTokens for MetadataClient {
    fn access_token(&self) -> BoxFuture<'_, Result<String, CredentialsError>> {
        Box::pin(async move { Ok(MetadataClient::access_token(self).await?.secret) })
    }
}

/// Adds `Authorization: Bearer <token>` to every K8s API request, asking the token source
/// each time so a token is replaced before it expires (a tower `AsyncFilter` predicate, the
/// shape kube uses for its own refreshable tokens).
#[derive(Clone)]
pub struct BearerAuth(pub Arc<dyn AccessTokens>);

impl<B: Send + 'static> AsyncPredicate<http::Request<B>> for BearerAuth {
    type Future = BoxFuture<'static, Result<http::Request<B>, BoxError>>;
    type Request = http::Request<B>;

    fn check(&mut self, mut request: http::Request<B>) -> Self::Future {
        let tokens = self.0.clone();
        Box::pin(async move {
            let token = tokens.access_token().await?;
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))?;
            value.set_sensitive(true);
            request.headers_mut().insert(AUTHORIZATION, value);
            Ok(request)
        })
    }
}
