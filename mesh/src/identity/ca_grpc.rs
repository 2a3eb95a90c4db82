//! What the gRPC CA clients (Istio CA, MeshCA, CAS) share: the endpoint and its TLS channel,
//! the authenticated unary call, how a gRPC status becomes an error that says what to check,
//! the chain-length rule, and for Google's CAs the federated bearer and the request id.

use std::sync::Arc;
use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::google_tokens::GoogleTokens;
use super::token_cache::{CacheKey, TokenCache, TokenCacheError, TokenKind};

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
                "check the istio-token audience (istio-ca for open-source istiod, the trust domain for managed control planes; OSS_ISTIO chooses) and that the CA trusts this cluster's tokens"
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
    /// The bearer token for a Google CA could not be minted (STS or IAM failed); the detail
    /// names the hop, its HTTP status and the fix.
    #[error("{kind} {addr}: no bearer token: {detail}")]
    Token {
        /// Which CA.
        kind: CaKind,
        /// The CA address.
        addr: String,
        /// The hop's error.
        detail: String,
        /// Whether the hop failed in a way worth retrying (no answer, 5xx, 429).
        transient: bool,
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

impl CaError {
    /// Worth retrying: the CA unreachable or overloaded (gRPC `Unavailable`, which a refused
    /// connection also becomes, `DeadlineExceeded`, `ResourceExhausted`), or a token hop that
    /// failed transiently. Anything else is an answer that would be the same next time.
    pub fn is_transient(&self) -> bool {
        match self {
            CaError::Rpc { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
            ),
            CaError::Token { transient, .. } => *transient,
            CaError::Config { .. }
            | CaError::Unauthenticated { .. }
            | CaError::ShortChain { .. } => false,
        }
    }
}

/// Where a CA listens and how its serving certificate is verified; part of every CA's config.
#[derive(Clone, Debug)]
pub struct CaEndpoint {
    /// `host:port` or an `https://` URL.
    pub addr: String,
    /// PEM root for the CA's serving certificate; `None` means the system roots.
    pub root_pem: Option<String>,
    /// TLS server name to verify; `None` means the address's host.
    pub server_name: Option<String>,
}

/// Which CA is at an endpoint (what errors name).
#[derive(Clone, Debug)]
pub struct CaTarget {
    /// Which CA.
    pub kind: CaKind,
    /// Where it is.
    pub endpoint: CaEndpoint,
}

impl CaTarget {
    pub(super) fn config_error(&self, detail: String) -> CaError {
        CaError::Config {
            kind: self.kind,
            addr: self.endpoint.addr.clone(),
            detail,
        }
    }

    fn endpoint(&self) -> Result<Endpoint, CaError> {
        let url = if self.endpoint.addr.contains("://") {
            self.endpoint.addr.clone()
        } else {
            format!("https://{}", self.endpoint.addr)
        };
        let mut tls = match &self.endpoint.root_pem {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let Some(name) = &self.endpoint.server_name {
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
    /// A CA that cannot be reached yet (refused, restarting) is not an error here: the
    /// channel connects on the first call, whose `Unavailable` the caller retries.
    pub async fn connect(&self) -> Result<Channel, CaError> {
        let endpoint = self.endpoint()?;
        match endpoint.connect().await {
            Ok(channel) => Ok(channel),
            Err(e) => {
                tracing::warn!(ca = %self.kind, addr = %self.endpoint.addr, error = ?e, "cannot connect to the CA yet; connecting again on the first request");
                Ok(endpoint.connect_lazy())
            }
        }
    }

    /// A gRPC metadata value, or an error naming `what` when it is not ASCII.
    pub(super) fn metadata(&self, what: &str, value: &str) -> Result<AsciiMetadataValue, CaError> {
        value
            .parse()
            .map_err(|_| self.config_error(format!("{what} is not a valid gRPC metadata value")))
    }

    fn status_error(&self, status: tonic::Status) -> CaError {
        let (kind, addr, message) = (
            self.kind,
            self.endpoint.addr.clone(),
            status.message().to_owned(),
        );
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
}

/// The largest CA answer decoded: a certificate chain is a few kilobytes; tonic's default
/// (4 MiB) is stated lower here so a broken or hostile CA cannot make krun buffer more.
const CA_ANSWER_LIMIT: usize = 1 << 20;

/// A connection to a CA (TCP, TLS and HTTP/2; tonic reconnects it by itself) and its target:
/// what every CA client signs through.
#[derive(Clone)]
pub(super) struct CaChannel {
    channel: Channel,
    target: CaTarget,
}

impl CaChannel {
    /// Connects to `target` now.
    pub(super) async fn connect(target: CaTarget) -> Result<Self, CaError> {
        let channel = target.connect().await?;
        Ok(CaChannel { channel, target })
    }

    /// A channel connected earlier.
    pub(super) fn new(channel: Channel, target: CaTarget) -> Self {
        CaChannel { channel, target }
    }

    /// The CA's address, for logs.
    pub(super) fn addr(&self) -> &str {
        &self.target.endpoint.addr
    }

    /// One unary call of `path` with `message`, authenticated with `bearer` (`credential` names
    /// it in errors) and carrying `metadata` (name, what it is for errors, value); returns the
    /// chain `chain` finds in the response, leaf first.
    pub(super) async fn create_certificate<Req, Resp>(
        &self,
        path: &'static str,
        message: Req,
        (credential, bearer): (&str, &str),
        metadata: &[(&'static str, &str, String)],
        chain: impl FnOnce(Resp) -> Vec<String>,
    ) -> Result<Vec<String>, CaError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let target = &self.target;
        let mut request = tonic::Request::new(message);
        let authorization = target.metadata(credential, &format!("Bearer {bearer}"))?;
        request
            .metadata_mut()
            .insert("authorization", authorization);
        for (name, what, value) in metadata {
            let value = target.metadata(what, value)?;
            request.metadata_mut().insert(*name, value);
        }
        let mut grpc = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(CA_ANSWER_LIMIT);
        grpc.ready()
            .await
            .map_err(|e| target.status_error(tonic::Status::unavailable(e.to_string())))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let response = grpc
            .unary(request, PathAndQuery::from_static(path), codec)
            .await
            .map_err(|s| target.status_error(s))?
            .into_inner();
        let chain = chain(response);
        if chain.len() < 2 {
            return Err(CaError::ShortChain {
                kind: target.kind,
                addr: target.endpoint.addr.clone(),
                count: chain.len(),
            });
        }
        Ok(chain)
    }
}

/// A Google CA (MeshCA, CAS): the channel, and the bearer from the token cache: the STS
/// federated token, or ([`TokenKind::Access`]) a Google service account's access token that
/// IAM mints from it.
pub(super) struct GoogleCa {
    ca: CaChannel,
    tokens: Arc<TokenCache<GoogleTokens>>,
    bearer: TokenKind,
}

impl GoogleCa {
    /// Connects to the `kind` CA at `endpoint` now (the handshake can overlap the first token
    /// exchange); calls carry a `bearer` token.
    pub(super) async fn connect(
        kind: CaKind,
        endpoint: CaEndpoint,
        tokens: Arc<TokenCache<GoogleTokens>>,
        bearer: TokenKind,
    ) -> Result<Self, CaError> {
        let ca = CaChannel::connect(CaTarget { kind, endpoint }).await?;
        Ok(GoogleCa { ca, tokens, bearer })
    }

    /// The CA's address, for logs.
    pub(super) fn addr(&self) -> &str {
        self.ca.addr()
    }

    /// [`CaChannel::create_certificate`] with the cached federated token.
    pub(super) async fn create_certificate<Req, Resp>(
        &self,
        path: &'static str,
        message: Req,
        metadata: &[(&'static str, &str, String)],
        chain: impl FnOnce(Resp) -> Vec<String>,
    ) -> Result<Vec<String>, CaError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let key = CacheKey {
            kind: self.bearer,
            audience: String::new(),
        };
        let token = self.tokens.get(&key).await.map_err(|e| CaError::Token {
            kind: self.ca.target.kind,
            addr: self.ca.target.endpoint.addr.clone(),
            transient: match &e {
                TokenCacheError::Mint(e) => e.is_transient(),
                TokenCacheError::Budget { .. } => true,
            },
            detail: e.to_string(),
        })?;
        let credential = match self.bearer {
            TokenKind::Access => "the service account's access token",
            TokenKind::Federated | TokenKind::Id => "the federated token",
        };
        self.ca
            .create_certificate(path, message, (credential, token.secret()), metadata, chain)
            .await
    }
}

/// A certificate lifetime as protobuf seconds.
pub(super) fn lifetime_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
}

/// A certificate lifetime as a protobuf `Duration`.
pub(super) fn lifetime(ttl: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: lifetime_seconds(ttl),
        nanos: 0,
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
