//! What the gRPC CA clients (Istio CA, MeshCA) share: the TLS channel, the unary call, how a
//! gRPC status becomes an error that says what to check, and the chain-length rule.

use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Which CA, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaKind {
    /// istiod or another Istio CA.
    Istio,
    /// Google's MeshCA.
    MeshCa,
    /// Google Certificate Authority Service.
    Cas,
}

impl CaKind {
    fn name(self) -> &'static str {
        match self {
            CaKind::Istio => "Istio CA",
            CaKind::MeshCa => "MeshCA",
            CaKind::Cas => "CAS",
        }
    }

    fn auth_hint(self) -> &'static str {
        match self {
            CaKind::Istio => {
                "check the istio-token audience (the trust domain, or istio-ca with OSS_ISTIO) and that the CA trusts this cluster's tokens"
            }
            CaKind::MeshCa => {
                "check the STS federated token (TRUST_DOMAIN and the cluster's workload identity pool)"
            }
            CaKind::Cas => {
                "check the STS federated token and that the pool grants roles/privateca.workloadCertificateRequester to the workload identity pool"
            }
        }
    }
}

impl std::fmt::Display for CaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed CA call; the message names the CA, what it said and what to check.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Bad address, root or credential.
    #[error("{kind} {addr}: {detail}")]
    Config {
        /// Which CA.
        kind: CaKind,
        /// The CA address.
        addr: String,
        /// What is wrong.
        detail: String,
    },
    /// The CA rejected our credential.
    #[error("{kind} {addr} rejected the token (UNAUTHENTICATED: {message}); {hint}", hint = kind.auth_hint())]
    Unauthenticated {
        /// Which CA.
        kind: CaKind,
        /// The CA address.
        addr: String,
        /// The CA's message.
        message: String,
    },
    /// Any other gRPC failure, including the CA being unreachable.
    #[error("{kind} {addr}: {code:?}: {message}")]
    Rpc {
        /// Which CA.
        kind: CaKind,
        /// The CA address.
        addr: String,
        /// gRPC status code.
        code: tonic::Code,
        /// The CA's message.
        message: String,
    },
    /// The CA answered with fewer than two certificates.
    #[error("{kind} {addr} returned {count} certificate(s); a chain needs the leaf and the root")]
    ShortChain {
        /// Which CA.
        kind: CaKind,
        /// The CA address.
        addr: String,
        /// Count returned.
        count: usize,
    },
}

/// Where a CA is and how its TLS certificate is verified.
#[derive(Clone, Debug)]
pub struct CaTarget {
    /// Which CA.
    pub kind: CaKind,
    /// `host:port` or an `https://` URL.
    pub addr: String,
    /// PEM root for the CA's serving certificate; `None` means the system roots.
    pub root_pem: Option<String>,
    /// TLS server name to verify; `None` means the address's host.
    pub server_name: Option<String>,
}

impl CaTarget {
    pub(super) fn config_error(&self, detail: String) -> CaError {
        CaError::Config {
            kind: self.kind,
            addr: self.addr.clone(),
            detail,
        }
    }

    fn endpoint(&self) -> Result<Endpoint, CaError> {
        let url = if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("https://{}", self.addr)
        };
        let mut tls = match &self.root_pem {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Endpoint::from_shared(url)
            .map_err(|e| self.config_error(format!("not a valid address: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .tls_config(tls)
            .map_err(|e| self.config_error(format!("TLS setup: {e}")))
    }

    /// Connects now (TCP, TLS, HTTP/2); needs no token, so it can overlap the token fetch.
    pub async fn connect(&self) -> Result<Channel, CaError> {
        self.endpoint()?.connect().await.map_err(|e| CaError::Rpc {
            kind: self.kind,
            addr: self.addr.clone(),
            code: tonic::Code::Unavailable,
            message: format!("cannot connect: {e:?}"),
        })
    }

    /// A gRPC metadata value, or an error naming `what` when it is not ASCII.
    pub(super) fn metadata(&self, what: &str, value: &str) -> Result<AsciiMetadataValue, CaError> {
        value
            .parse()
            .map_err(|_| self.config_error(format!("{what} is not a valid gRPC metadata value")))
    }

    fn status_error(&self, status: tonic::Status) -> CaError {
        let (kind, addr, message) = (self.kind, self.addr.clone(), status.message().to_owned());
        match status.code() {
            tonic::Code::Unauthenticated => CaError::Unauthenticated {
                kind,
                addr,
                message,
            },
            code => CaError::Rpc {
                kind,
                addr,
                code,
                message,
            },
        }
    }

    /// One unary call of `path` on `channel`, returning the `cert_chain` the response holds.
    pub(super) async fn create_certificate<Req, Resp>(
        &self,
        channel: &Channel,
        path: &'static str,
        request: tonic::Request<Req>,
        chain: impl FnOnce(Resp) -> Vec<String>,
    ) -> Result<Vec<String>, CaError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready()
            .await
            .map_err(|e| self.status_error(tonic::Status::unavailable(e.to_string())))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let response = grpc
            .unary(request, PathAndQuery::from_static(path), codec)
            .await
            .map_err(|s| self.status_error(s))?
            .into_inner();
        let chain = chain(response);
        if chain.len() < 2 {
            return Err(CaError::ShortChain {
                kind: self.kind,
                addr: self.addr.clone(),
                count: chain.len(),
            });
        }
        Ok(chain)
    }
}
