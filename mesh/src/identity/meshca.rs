//! Client of Google's MeshCA: gRPC `google.security.meshca.v1.MeshCertificateService/
//! CreateCertificate` over TLS with the system roots, authenticated with the STS federated
//! token (reference §5.4). Hand-written messages, like the Istio CA's.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;

use super::ca_grpc::{CaError, CaKind, CaTarget};
use super::google_tokens::GoogleTokens;
use super::token_cache::{CacheKey, TokenCache, TokenKind};

/// MeshCA's public endpoint.
pub const MESHCA_ADDR: &str = "meshca.googleapis.com:443";

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
    /// `host:port`, normally [`MESHCA_ADDR`].
    pub addr: String,
    /// PEM root of MeshCA's serving certificate; `None` (production) means the system roots.
    pub root_pem: Option<String>,
    /// TLS server name when it differs from the address host (tests, private endpoints).
    pub server_name: Option<String>,
    /// Cluster location, sent as `x-goog-request-params: location=locations/<loc>`.
    pub location: Option<String>,
    /// PEM mesh root that MeshCA-issued chains lead to (mesh-env `CAROOT_*`).
    pub mesh_root_pem: String,
}

/// A MeshCA client; the bearer is the cached STS federated token.
pub struct MeshCaClient {
    channel: Channel,
    target: CaTarget,
    config: MeshCaConfig,
    tokens: Arc<TokenCache<GoogleTokens>>,
}

impl MeshCaClient {
    /// Connects now (the handshake can overlap the first token exchange).
    pub async fn connect(
        config: MeshCaConfig,
        tokens: Arc<TokenCache<GoogleTokens>>,
    ) -> Result<Self, CaError> {
        let target = CaTarget {
            kind: CaKind::MeshCa,
            addr: config.addr.clone(),
            root_pem: config.root_pem.clone(),
            server_name: config.server_name.clone(),
        };
        let channel = target.connect().await?;
        Ok(MeshCaClient {
            channel,
            target,
            config,
            tokens,
        })
    }

    /// The mesh root chains must lead to.
    pub fn mesh_root_pem(&self) -> &str {
        &self.config.mesh_root_pem
    }

    /// The CA address, for logs.
    pub fn addr(&self) -> &str {
        &self.config.addr
    }

    /// Sends `csr_pem` and returns the chain, leaf first.
    pub async fn sign(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let key = CacheKey {
            kind: TokenKind::Federated,
            audience: String::new(),
        };
        let token = self
            .tokens
            .get(&key)
            .await
            .map_err(|e| self.target.config_error(format!("no federated token: {e}")))?;
        let mut request = tonic::Request::new(proto::MeshCertificateRequest {
            request_id: request_id(),
            csr: csr_pem.to_owned(),
            validity: Some(prost_types::Duration {
                seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        });
        let bearer = format!("Bearer {}", token.secret());
        let authorization = self.target.metadata("the federated token", &bearer)?;
        request
            .metadata_mut()
            .insert("authorization", authorization);
        if let Some(location) = &self.config.location {
            let params = self
                .target
                .metadata("the location", &format!("location=locations/{location}"))?;
            request
                .metadata_mut()
                .insert("x-goog-request-params", params);
        }
        self.target
            .create_certificate(
                &self.channel,
                proto::CREATE_CERTIFICATE,
                request,
                |r: proto::MeshCertificateResponse| r.cert_chain,
            )
            .await
    }
}

/// A random UUID v4: MeshCA's and CAS's idempotency key.
pub(super) fn request_id() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_uuid_v4() {
        let id = super::request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, super::request_id());
    }
}
