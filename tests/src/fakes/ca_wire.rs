//! The fake CAs' own definitions of the CA protocols, written from the upstream protos and
//! never shared with the product: a field number krun gets wrong decodes to an empty field
//! here and fails the fake's checks.
//! - Istio: `istio.v1.auth` in istio/api `security/v1alpha1/ca.proto`;
//! - MeshCA: `google.security.meshca.v1` in istio/istio
//!   `security/proto/providers/google/meshca.proto`;
//! - CAS: `google.cloud.security.privateca.v1` in googleapis `service.proto`
//!   (`CreateCertificateRequest`) and `resources.proto` (`Certificate` and what it holds).
#![allow(missing_docs)]

/// `istio.v1.auth.IstioCertificateService`.
pub mod istio {
    pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
    pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateRequest {
        #[prost(string, tag = "1")]
        pub csr: String,
        #[prost(int64, tag = "3")]
        pub validity_duration: i64,
        #[prost(message, optional, tag = "4")]
        pub metadata: Option<prost_types::Struct>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateResponse {
        #[prost(string, repeated, tag = "1")]
        pub cert_chain: Vec<String>,
    }
}

/// `google.security.meshca.v1.MeshCertificateService`.
pub mod meshca {
    pub const CREATE_CERTIFICATE: &str =
        "/google.security.meshca.v1.MeshCertificateService/CreateCertificate";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MeshCertificateRequest {
        #[prost(string, tag = "1")]
        pub request_id: String,
        #[prost(string, tag = "2")]
        pub csr: String,
        #[prost(message, optional, tag = "3")]
        pub validity: Option<prost_types::Duration>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MeshCertificateResponse {
        #[prost(string, repeated, tag = "1")]
        pub cert_chain: Vec<String>,
    }
}

/// `google.cloud.security.privateca.v1.CertificateAuthorityService`.
pub mod cas {
    pub const CREATE_CERTIFICATE: &str =
        "/google.cloud.security.privateca.v1.CertificateAuthorityService/CreateCertificate";
    /// `SubjectRequestMode.REFLECTED_SPIFFE`.
    pub const REFLECTED_SPIFFE: i32 = 2;
    /// `PublicKey.KeyFormat.PEM`.
    pub const PEM: i32 = 1;

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
        #[prost(bool, tag = "5")]
        pub validate_only: bool,
        #[prost(string, tag = "6")]
        pub issuing_certificate_authority_id: String,
    }

    /// `Certificate`; `pem_csr` and `config` are the `certificate_config` oneof.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Certificate {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub pem_csr: String,
        #[prost(message, optional, tag = "3")]
        pub config: Option<CertificateConfig>,
        #[prost(string, tag = "4")]
        pub issuer_certificate_authority: String,
        #[prost(message, optional, tag = "5")]
        pub lifetime: Option<prost_types::Duration>,
        #[prost(string, tag = "6")]
        pub certificate_template: String,
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
        #[prost(message, optional, tag = "1")]
        pub subject: Option<Subject>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Subject {
        #[prost(string, tag = "1")]
        pub common_name: String,
    }

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
        #[prost(bool, tag = "2")]
        pub content_commitment: bool,
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
