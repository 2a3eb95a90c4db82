//! Client of Google Certificate Authority Service (`CA_POOL`, a pool name
//! `projects/*/locations/*/caPools/*`): gRPC
//! `google.cloud.security.privateca.v1.CertificateAuthorityService/CreateCertificate` with the
//! STS federated token. The subject mode is `REFLECTED_SPIFFE`: CAS puts the caller's own
//! SPIFFE identity in the certificate, so the CSR only carries the key. Hand-written messages
//! with just the fields krun uses.

use std::sync::Arc;
use std::time::Duration;

use super::ca_grpc::{CaEndpoint, CaError, CaKind, GoogleCa, lifetime, request_id};
use super::google_tokens::GoogleTokens;
use super::token_cache::{TokenCache, TokenKind};

/// CAS's public endpoint.
pub const CAS_ADDR: &str = crate::config::DEFAULT_CAS_ENDPOINT;

/// The messages of `google/cloud/security/privateca/v1/{service,resources}.proto` that krun
/// sends and reads, with their real field numbers.
pub mod proto {
    #![allow(missing_docs)]

    /// gRPC path of the method.
    pub const CREATE_CERTIFICATE: &str =
        "/google.cloud.security.privateca.v1.CertificateAuthorityService/CreateCertificate";
    /// `SubjectRequestMode.REFLECTED_SPIFFE`.
    pub const REFLECTED_SPIFFE: i32 = 2;
    /// `PublicKey.KeyFormat.PEM`.
    pub const KEY_FORMAT_PEM: i32 = 1;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateCertificateRequest {
        #[prost(string, tag = "1")]
        pub parent: String,
        #[prost(string, tag = "2")]
        pub certificate_id: String,
        #[prost(message, optional, tag = "3")]
        pub certificate: Option<Certificate>,
        #[prost(string, tag = "4")]
        pub request_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Certificate {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "3")]
        pub config: Option<CertificateConfig>,
        #[prost(message, optional, tag = "5")]
        pub lifetime: Option<prost_types::Duration>,
        #[prost(int32, tag = "7")]
        pub subject_mode: i32,
        #[prost(string, tag = "9")]
        pub pem_certificate: String,
        #[prost(string, repeated, tag = "11")]
        pub pem_certificate_chain: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CertificateConfig {
        #[prost(message, optional, tag = "1")]
        pub subject_config: Option<SubjectConfig>,
        #[prost(message, optional, tag = "2")]
        pub x509_config: Option<X509Parameters>,
        #[prost(message, optional, tag = "3")]
        pub public_key: Option<PublicKey>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubjectConfig {
        /// Empty: the identity is reflected from the caller.
        #[prost(message, optional, tag = "1")]
        pub subject: Option<Subject>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Subject {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509Parameters {
        #[prost(message, optional, tag = "1")]
        pub key_usage: Option<KeyUsage>,
        #[prost(message, optional, tag = "2")]
        pub ca_options: Option<CaOptions>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyUsage {
        #[prost(message, optional, tag = "1")]
        pub base_key_usage: Option<KeyUsageOptions>,
        #[prost(message, optional, tag = "2")]
        pub extended_key_usage: Option<ExtendedKeyUsageOptions>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyUsageOptions {
        #[prost(bool, tag = "1")]
        pub digital_signature: bool,
        #[prost(bool, tag = "3")]
        pub key_encipherment: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExtendedKeyUsageOptions {
        #[prost(bool, tag = "1")]
        pub server_auth: bool,
        #[prost(bool, tag = "2")]
        pub client_auth: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CaOptions {
        #[prost(bool, optional, tag = "1")]
        pub is_ca: Option<bool>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PublicKey {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(int32, tag = "2")]
        pub format: i32,
    }
}

/// Where CAS is and which pool signs.
#[derive(Clone, Debug)]
pub struct CasConfig {
    /// The endpoint, normally [`CAS_ADDR`] with the system roots; a root and server name for
    /// tests and private endpoints.
    pub endpoint: CaEndpoint,
    /// `CA_POOL`: `projects/P/locations/L/caPools/NAME`.
    pub pool: String,
    /// PEM root of the pool (mesh-env `CAROOT_CAS`): the trust anchor of issued chains.
    pub pool_root_pem: String,
}

/// A CAS client; the bearer is the cached STS federated token (not the P4SA's: CAS needs the
/// workload's own SPIFFE identity to reflect).
pub struct CasClient {
    ca: GoogleCa,
    config: CasConfig,
}

impl CasClient {
    /// Connects now (the handshake can overlap the first token exchange).
    pub async fn connect(
        config: CasConfig,
        tokens: Arc<TokenCache<GoogleTokens>>,
    ) -> Result<Self, CaError> {
        let ca = GoogleCa::connect(
            CaKind::Cas,
            config.endpoint.clone(),
            tokens,
            TokenKind::Federated,
        )
        .await?;
        Ok(CasClient { ca, config })
    }

    /// The pool root chains must lead to.
    pub fn pool_root_pem(&self) -> &str {
        &self.config.pool_root_pem
    }

    /// The pool, for logs.
    pub fn pool(&self) -> &str {
        &self.config.pool
    }

    /// Sends the CSR and returns the chain, leaf first.
    pub async fn sign(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let suffix = &request_id()[..8];
        let message = proto::CreateCertificateRequest {
            parent: self.config.pool.clone(),
            certificate_id: format!("csr-workload-{suffix}"),
            certificate: Some(certificate(csr_pem, ttl)),
            request_id: request_id(),
        };
        let routing = (
            "x-goog-request-params",
            "CA_POOL",
            format!("parent={}", self.config.pool),
        );
        self.ca
            .create_certificate(
                proto::CREATE_CERTIFICATE,
                message,
                &[routing],
                |c: proto::Certificate| {
                    std::iter::once(c.pem_certificate)
                        .filter(|p| !p.is_empty())
                        .chain(c.pem_certificate_chain)
                        .collect()
                },
            )
            .await
    }
}

/// The certificate request as Istio's CAS plugin sends it: an empty subject, a leaf's key
/// usages, the CSR (PEM) as the public key, and the reflected SPIFFE subject mode.
fn certificate(csr_pem: &str, ttl: Duration) -> proto::Certificate {
    use proto::*;
    Certificate {
        config: Some(CertificateConfig {
            subject_config: Some(SubjectConfig {
                subject: Some(Subject {}),
            }),
            x509_config: Some(X509Parameters {
                key_usage: Some(KeyUsage {
                    base_key_usage: Some(KeyUsageOptions {
                        digital_signature: true,
                        key_encipherment: true,
                    }),
                    extended_key_usage: Some(ExtendedKeyUsageOptions {
                        server_auth: true,
                        client_auth: true,
                    }),
                }),
                ca_options: Some(CaOptions { is_ca: Some(false) }),
            }),
            public_key: Some(PublicKey {
                key: csr_pem.as_bytes().to_vec(),
                format: KEY_FORMAT_PEM,
            }),
        }),
        lifetime: Some(lifetime(ttl)),
        subject_mode: REFLECTED_SPIFFE,
        ..Default::default()
    }
}
