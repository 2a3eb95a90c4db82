//! Credentials for calling Google: access tokens for Google APIs and for the GKE API server,
//! behind one small trait so the source can change (metadata server today; application-default
//! credentials later) without touching the callers, and the ID tokens sent to Cloud Run
//! ([`id_tokens`]).

pub mod id_tokens;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::header::{AUTHORIZATION, HeaderValue};
use tower::BoxError;
use tower::filter::AsyncPredicate;

use crate::metadata::{MetadataClient, MetadataError};

/// A boxed future, as the trait object needs.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that hands out OAuth access tokens, refreshing them before they expire.
pub trait AccessTokens: Send + Sync {
    /// A currently valid bearer token.
    fn access_token(&self) -> BoxFuture<'_, Result<String, MetadataError>>;
}

impl AccessTokens for MetadataClient {
    fn access_token(&self) -> BoxFuture<'_, Result<String, MetadataError>> {
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
