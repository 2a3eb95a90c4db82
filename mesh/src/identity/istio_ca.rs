//! Client of Istio's CA: gRPC `istio.v1.auth.IstioCertificateService/CreateCertificate` over
//! TLS verified with the istiod root, authenticated with the istio-token, as ztunnel's
//! client does (<https://github.com/istio/ztunnel/blob/master/src/identity/caclient.rs>).
//! The messages are hand-written from Istio's
//! <https://github.com/istio/api/blob/master/security/v1alpha1/ca.proto>, so no protoc is
//! needed.

use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;

use super::ca_grpc::{CaChannel, CaEndpoint, CaError, CaKind, CaTarget, lifetime_seconds};
use super::token::Token;

pub mod proto {
    #![allow(missing_docs)]

    /// gRPC path of the one method.
    pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
    /// gRPC service name.
    pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";

    /// `IstioCertificateRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateRequest {
        /// PEM CSR.
        #[prost(string, tag = "1")]
        pub csr: String,
        /// Requested lifetime in seconds.
        #[prost(int64, tag = "3")]
        pub validity_duration: i64,
        /// Options such as `CertSigner`.
        #[prost(message, optional, tag = "4")]
        pub metadata: Option<prost_types::Struct>,
    }

    /// `IstioCertificateResponse`: leaf first, root last.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateResponse {
        #[prost(string, repeated, tag = "1")]
        pub cert_chain: Vec<String>,
    }
}

/// The SAN istiod's serving certificate carries (what pilot-agent gets as `ISTIOD_SAN`).
pub const ISTIOD_SERVER_NAME: &str = "istiod.istio-system.svc";

/// Where and how to reach the CA.
#[derive(Clone, Debug)]
pub struct IstioCaConfig {
    /// `host:port` (or an `https://` URL) of the CA, usually istiod on :15012.
    pub addr: String,
    /// PEM root that signed istiod's serving certificate (mesh-env `CAROOT_ISTIOD`).
    pub root_pem: String,
    /// TLS server name to verify, normally [`ISTIOD_SERVER_NAME`].
    pub server_name: String,
    /// Sent as the `ClusterID` metadata.
    pub cluster_id: String,
}

impl IstioCaConfig {
    fn target(&self) -> CaTarget {
        CaTarget {
            kind: CaKind::Istio,
            endpoint: CaEndpoint {
                addr: self.addr.clone(),
                root_pem: Some(self.root_pem.clone()),
                server_name: Some(self.server_name.clone()),
            },
        }
    }
}

/// An established connection to the CA (TCP, TLS and HTTP/2 done). Connecting needs no token,
/// so it can run while the istio-token is being requested: the handshakes then leave the
/// critical path, which is just the token and the CSR round trips.
pub struct CaConnection(Channel);

/// Connects to the CA now, verifying its certificate against the configured root.
pub async fn connect(config: &IstioCaConfig) -> Result<CaConnection, CaError> {
    config.target().connect().await.map(CaConnection)
}

/// A connection to the CA; cheap to clone, reconnects by itself.
#[derive(Clone)]
pub struct IstioCaClient {
    ca: CaChannel,
    config: IstioCaConfig,
    token: watch::Receiver<Token>,
}

impl IstioCaClient {
    /// A client over a connection made by [`connect`]; `token` always holds the current
    /// istio-token. The channel reconnects by itself if the connection drops.
    pub fn new(
        config: IstioCaConfig,
        connection: CaConnection,
        token: watch::Receiver<Token>,
    ) -> Self {
        IstioCaClient {
            ca: CaChannel::new(connection.0, config.target()),
            config,
            token,
        }
    }

    /// The configured CA root, the trust anchor for the returned chains.
    pub fn root_pem(&self) -> &str {
        &self.config.root_pem
    }

    /// The CA address, for logs.
    pub fn addr(&self) -> &str {
        self.ca.addr()
    }

    /// Sends `csr_pem` and returns the chain, leaf first.
    pub async fn sign(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let message = proto::IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: lifetime_seconds(ttl),
            metadata: None,
        };
        let bearer = self.token.borrow().secret().to_owned();
        self.ca
            .create_certificate(
                proto::CREATE_CERTIFICATE,
                message,
                ("the istio-token", &bearer),
                &[(
                    "clusterid",
                    "the cluster id",
                    self.config.cluster_id.clone(),
                )],
                |r: proto::IstioCertificateResponse| r.cert_chain,
            )
            .await
    }
}
