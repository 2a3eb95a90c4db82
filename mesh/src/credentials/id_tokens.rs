//! Where ID tokens for Cloud Run come from: the metadata server's `identity` endpoint (the
//! instance's own account), or IAM Credentials `generateIdToken` for another service account
//! that the caller's account may impersonate (`roles/iam.serviceAccountOpenIdTokenCreator`).
//! Off GCP a service-account key mints its own ([`super::file_tokens`]). Each sits behind a [`TokenCache`](crate::identity::token_cache::TokenCache) as its
//! [`Mint`].

use std::sync::Arc;

use super::file_tokens::{FileTokenError, FileTokens};
use super::{AccessTokens, CredentialsError};
use crate::http::HttpClient;
use crate::identity::google_tokens::{GoogleTokenError, generate_id_token};
use crate::identity::token_cache::{CacheKey, Mint, MintFuture};
use crate::metadata::{MetadataClient, MetadataError};

/// No ID token.
#[derive(Debug, thiserror::Error)]
pub enum IdTokenError {
    /// The metadata server refused or failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// No access token to call IAM with.
    #[error("no access token to call IAM generateIdToken for {gsa}: {cause}")]
    Caller {
        /// The service account asked for.
        gsa: String,
        /// Why.
        #[source]
        cause: CredentialsError,
    },
    /// The credentials file's token endpoint refused or failed.
    #[error(transparent)]
    File(#[from] FileTokenError),
    /// IAM refused or failed.
    #[error(
        "{0}; the caller needs roles/iam.serviceAccountOpenIdTokenCreator on the service account"
    )]
    Iam(#[source] GoogleTokenError),
}

/// ID tokens of service account `gsa`, minted by IAM Credentials with the caller's access
/// token.
pub struct ServiceAccountIdTokens {
    http: HttpClient,
    iam_endpoint: String,
    gsa: String,
    caller: Arc<dyn AccessTokens>,
}

impl ServiceAccountIdTokens {
    /// ID tokens of `gsa` from IAM at `iam_endpoint` (a base URL), asked with `caller`'s
    /// access tokens.
    pub fn new(
        http: HttpClient,
        iam_endpoint: &str,
        gsa: &str,
        caller: Arc<dyn AccessTokens>,
    ) -> Self {
        ServiceAccountIdTokens {
            http,
            iam_endpoint: iam_endpoint.to_owned(),
            gsa: gsa.to_owned(),
            caller,
        }
    }

    /// The service account whose tokens these are.
    pub fn service_account(&self) -> &str {
        &self.gsa
    }
}

impl Mint for ServiceAccountIdTokens {
    type Error = IdTokenError;

    fn mint<'a>(&'a self, key: &'a CacheKey) -> MintFuture<'a, IdTokenError> {
        Box::pin(async move {
            let bearer =
                self.caller
                    .access_token()
                    .await
                    .map_err(|cause| IdTokenError::Caller {
                        gsa: self.gsa.clone(),
                        cause,
                    })?;
            generate_id_token(
                &self.http,
                &self.iam_endpoint,
                &self.gsa,
                &bearer,
                &key.audience,
            )
            .await
            .map_err(IdTokenError::Iam)
        })
    }
}

/// The ID-token source a binary was configured with.
pub enum IdTokenSource {
    /// The metadata server's `identity` endpoint: the instance's own account.
    Metadata(MetadataClient),
    /// IAM `generateIdToken` for a named service account.
    ServiceAccount(ServiceAccountIdTokens),
    /// Off GCP: a service-account key's own ID tokens, from its token endpoint.
    KeyFile(Arc<FileTokens>),
}

impl Mint for IdTokenSource {
    type Error = IdTokenError;

    fn mint<'a>(&'a self, key: &'a CacheKey) -> MintFuture<'a, IdTokenError> {
        match self {
            IdTokenSource::Metadata(metadata) => {
                Box::pin(async move { Ok(metadata.id_token(&key.audience).await?) })
            }
            IdTokenSource::ServiceAccount(iam) => iam.mint(key),
            IdTokenSource::KeyFile(file) => {
                Box::pin(async move { Ok(file.id_token(&key.audience).await?) })
            }
        }
    }
}
