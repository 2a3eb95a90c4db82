//! Client of Google's MeshCA: gRPC `google.security.meshca.v1.MeshCertificateService/
//! CreateCertificate` at `meshca.googleapis.com:443` over TLS with the system roots,
//! authenticated with the STS federated token, as Istio's pilot-agent calls it. Hand-written
//! messages, like the Istio CA's.

use std::sync::Arc;
use std::time::Duration;

use super::ca_grpc::{CaEndpoint, CaError, CaKind, GoogleCa, lifetime, request_id};
use super::google_tokens::GoogleTokens;
use super::token_cache::{TokenCache, TokenKind};

/// MeshCA's public endpoint.
pub const MESHCA_ADDR: &str = crate::config::DEFAULT_MESHCA_ENDPOINT;

/// The messages of `google/security/meshca/v1/meshca.proto`, by hand.
pub mod proto {
    #![allow(missing_docs)]

    /// gRPC path of the one method.
    pub const CREATE_CERTIFICATE: &str =
        "/google.security.meshca.v1.MeshCertificateService/CreateCertificate";
    /// gRPC service name.
    pub const SERVICE: &str = "google.security.meshca.v1.MeshCertificateService";

    /// `MeshCertificateRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MeshCertificateRequest {
        /// Idempotency key: a retry with the same id gets the same answer.
        #[prost(string, tag = "1")]
        pub request_id: String,
        /// PEM CSR.
        #[prost(string, tag = "2")]
        pub csr: String,
        /// Requested lifetime.
        #[prost(message, optional, tag = "3")]
        pub validity: Option<prost_types::Duration>,
    }

    /// `MeshCertificateResponse`: leaf first, root last.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MeshCertificateResponse {
        #[prost(string, repeated, tag = "1")]
        pub cert_chain: Vec<String>,
    }
}

/// Where MeshCA is.
#[derive(Clone, Debug)]
pub struct MeshCaConfig {
    /// The endpoint, normally [`MESHCA_ADDR`] with the system roots; a root and server name
    /// for tests and private endpoints.
    pub endpoint: CaEndpoint,
    /// Cluster location, sent as `x-goog-request-params: location=locations/<loc>`.
    pub location: Option<String>,
    /// PEM mesh root that MeshCA-issued chains lead to (mesh-env `CAROOT_*`).
    pub mesh_root_pem: String,
    /// The bearer: [`TokenKind::Federated`], or [`TokenKind::Access`] for the access token of
    /// the Google service account `KRUN_CA_SERVICE_ACCOUNT` names.
    pub bearer: TokenKind,
}

/// A MeshCA client; the bearer is a cached Google token.
pub struct MeshCaClient {
    ca: GoogleCa,
    config: MeshCaConfig,
}

impl MeshCaClient {
    /// Connects now (the handshake can overlap the first token exchange).
    pub async fn connect(
        config: MeshCaConfig,
        tokens: Arc<TokenCache<GoogleTokens>>,
    ) -> Result<Self, CaError> {
        let ca = GoogleCa::connect(
            CaKind::MeshCa,
            config.endpoint.clone(),
            tokens,
            config.bearer,
        )
        .await?;
        Ok(MeshCaClient { ca, config })
    }

    /// The mesh root chains must lead to.
    pub fn mesh_root_pem(&self) -> &str {
        &self.config.mesh_root_pem
    }

    /// The CA address, for logs.
    pub fn addr(&self) -> &str {
        self.ca.addr()
    }

    /// Sends `csr_pem` and returns the chain, leaf first.
    pub async fn sign(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let message = proto::MeshCertificateRequest {
            request_id: request_id(),
            csr: csr_pem.to_owned(),
            validity: Some(lifetime(ttl)),
        };
        let metadata: Vec<_> = self
            .config
            .location
            .iter()
            .map(|location| {
                (
                    "x-goog-request-params",
                    "the location",
                    format!("location=locations/{location}"),
                )
            })
            .collect();
        self.ca
            .create_certificate(
                proto::CREATE_CERTIFICATE,
                message,
                &metadata,
                |r: proto::MeshCertificateResponse| r.cert_chain,
            )
            .await
    }
}
