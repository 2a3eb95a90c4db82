//! Client of Istio's CA: gRPC `istio.v1.auth.IstioCertificateService/CreateCertificate` over
//! TLS verified with the istiod root, authenticated with the istio-token (reference §5.4,
//! ztunnel's `caclient.rs`). The messages are hand-written so no protoc is needed.

use std::time::Duration;

use tokio::sync::watch;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::token::Token;

/// The messages of `security/proto/istioca.proto`, by hand.
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

/// A failed CA call; the message says what the CA said and what to check.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Bad address or root.
    #[error("Istio CA {addr}: {detail}")]
    Config {
        /// The CA address.
        addr: String,
        /// What is wrong.
        detail: String,
    },
    /// The CA rejected our token.
    #[error(
        "Istio CA {addr} rejected the istio-token (UNAUTHENTICATED: {message}); check the token audience (the trust domain, or istio-ca with OSS_ISTIO) and that the CA trusts this cluster's tokens"
    )]
    Unauthenticated {
        /// The CA address.
        addr: String,
        /// The CA's message.
        message: String,
    },
    /// Any other gRPC failure, including the CA being unreachable.
    #[error("Istio CA {addr}: {code:?}: {message}")]
    Rpc {
        /// The CA address.
        addr: String,
        /// gRPC status code.
        code: tonic::Code,
        /// The CA's message.
        message: String,
    },
    /// The CA answered with fewer than two certificates.
    #[error("Istio CA {addr} returned {count} certificate(s); a chain needs the leaf and the root")]
    ShortChain {
        /// The CA address.
        addr: String,
        /// Count returned.
        count: usize,
    },
}

/// A connection to the CA; cheap to clone, reconnects by itself.
#[derive(Clone)]
pub struct IstioCaClient {
    channel: Channel,
    config: IstioCaConfig,
    token: watch::Receiver<Token>,
}

impl IstioCaConfig {
    fn endpoint(&self) -> Result<Endpoint, CaError> {
        let cfg_err = |detail: String| CaError::Config {
            addr: self.addr.clone(),
            detail,
        };
        let url = if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("https://{}", self.addr)
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.root_pem))
            .domain_name(self.server_name.clone());
        Endpoint::from_shared(url)
            .map_err(|e| cfg_err(format!("not a valid address: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .tls_config(tls)
            .map_err(|e| cfg_err(format!("TLS setup: {e}")))
    }
}

/// An established connection to the CA (TCP, TLS and HTTP/2 done). Connecting needs no token,
/// so it can run while the istio-token is being requested: the handshakes then leave the
/// critical path, which is just the token and the CSR round trips.
pub struct CaConnection(Channel);

/// Connects to the CA now, verifying its certificate against the configured root.
pub async fn connect(config: &IstioCaConfig) -> Result<CaConnection, CaError> {
    let channel = config
        .endpoint()?
        .connect()
        .await
        .map_err(|e| CaError::Rpc {
            addr: config.addr.clone(),
            code: tonic::Code::Unavailable,
            message: format!("cannot connect: {e:?}"),
        })?;
    Ok(CaConnection(channel))
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
            channel: connection.0,
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
        &self.config.addr
    }

    /// Sends `csr_pem` and returns the chain, leaf first.
    pub async fn sign(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let addr = self.config.addr.clone();
        let rpc_err = |status: tonic::Status| match status.code() {
            tonic::Code::Unauthenticated => CaError::Unauthenticated {
                addr: addr.clone(),
                message: status.message().to_owned(),
            },
            code => CaError::Rpc {
                addr: addr.clone(),
                code,
                message: status.message().to_owned(),
            },
        };
        let mut request = tonic::Request::new(proto::IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        let bearer = format!("Bearer {}", self.token.borrow().secret());
        let header = |name: &str, value: &str| {
            value.parse().map_err(|_| CaError::Config {
                addr: addr.clone(),
                detail: format!("{name} is not a valid gRPC metadata value"),
            })
        };
        request
            .metadata_mut()
            .insert("authorization", header("the istio-token", &bearer)?);
        request.metadata_mut().insert(
            "clusterid",
            header("the cluster id", &self.config.cluster_id)?,
        );
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| rpc_err(tonic::Status::unavailable(e.to_string())))?;
        let codec = tonic_prost::ProstCodec::<
            proto::IstioCertificateRequest,
            proto::IstioCertificateResponse,
        >::default();
        let response = grpc
            .unary(
                request,
                PathAndQuery::from_static(proto::CREATE_CERTIFICATE),
                codec,
            )
            .await
            .map_err(rpc_err)?
            .into_inner();
        if response.cert_chain.len() < 2 {
            return Err(CaError::ShortChain {
                addr,
                count: response.cert_chain.len(),
            });
        }
        Ok(response.cert_chain)
    }
}
