//! mTLS for the mesh, as ztunnel does it
//! (<https://github.com/istio/ztunnel/blob/master/src/tls/workload.rs>): TLS 1.3, client
//! certificates required and chained to the mesh roots, peers identified by the SPIFFE URI SAN
//! (no DNS names, no SNI).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::identity::{SpiffeId, identities};

/// ALPN of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// A TLS setup problem, naming what was wrong with which input.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// PEM input that does not parse.
    #[error("{what}: not valid PEM ({detail})")]
    Pem {
        /// Which input.
        what: &'static str,
        /// The parser's words.
        detail: String,
    },
    /// rustls refused the material.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The root list cannot form a verifier.
    #[error("mesh roots unusable: {0}")]
    Roots(String),
}

/// The workload's certificate, key and the mesh roots it trusts.
#[derive(Debug)]
pub struct WorkloadCert {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Trusted mesh roots.
    pub roots: Vec<CertificateDer<'static>>,
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        WorkloadCert {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
        }
    }
}

impl WorkloadCert {
    /// Parses the files Istio writes (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
    pub fn from_pem(chain: &[u8], key: &[u8], roots: &[u8]) -> Result<Self, TlsError> {
        let certs = |what: &'static str, pem: &[u8]| {
            let list = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Pem {
                    what,
                    detail: e.to_string(),
                })?;
            if list.is_empty() {
                Err(TlsError::Pem {
                    what,
                    detail: "no CERTIFICATE block".into(),
                })
            } else {
                Ok(list)
            }
        };
        Ok(WorkloadCert {
            chain: certs("certificate chain", chain)?,
            key: PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
                what: "private key",
                detail: e.to_string(),
            })?,
            roots: certs("root certificates", roots)?,
        })
    }

    /// The identity the leaf proves.
    pub fn identity(&self) -> Option<SpiffeId> {
        self.chain
            .first()
            .and_then(|leaf| identities(leaf).into_iter().next())
    }

    /// The mesh roots as a rustls trust store, for verifying peers and the control plane.
    pub fn root_store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| TlsError::Roots(e.to_string()))?;
        }
        Ok(Arc::new(store))
    }
}

/// The crypto provider: ring, and nothing else.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side of mesh mTLS: requires a client certificate chained to the mesh roots whose
/// SPIFFE ID is in `trust_domain` (another trust domain fails the handshake). Which peers may
/// go further is the caller's decision ([`crate::AllowedPeers`]).
pub fn server_config(
    cert: &WorkloadCert,
    trust_domain: &str,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(cert.root_store()?, provider.clone())
        .build()
        .map_err(|e| TlsError::Roots(e.to_string()))?;
    let verifier = Arc::new(TrustDomainClientVerifier {
        inner: webpki,
        trust_domain: trust_domain.to_owned(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Which server identities a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Any of these SPIFFE IDs (ztunnel's rule: any leaf SAN in the list).
    OneOf(Vec<SpiffeId>),
    /// Anyone in this trust domain (when the destination's identity is not known up front).
    TrustDomain(String),
}

impl ExpectedPeer {
    fn accepts(&self, ids: &[SpiffeId]) -> bool {
        match self {
            ExpectedPeer::OneOf(expected) => ids.iter().any(|id| expected.contains(id)),
            ExpectedPeer::TrustDomain(td) => ids.iter().any(|id| id.trust_domain == *td),
        }
    }
}

impl fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedPeer::OneOf(ids) => write!(
                f,
                "{}",
                ids.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            ExpectedPeer::TrustDomain(td) => write!(f, "any identity in trust domain {td}"),
        }
    }
}

/// Client side of mesh mTLS: presents the workload certificate, verifies the server's chain
/// against the mesh roots and its SPIFFE ID against `expected`. No SNI, no resumption.
pub fn client_config(
    cert: &WorkloadCert,
    expected: ExpectedPeer,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: cert.root_store()?,
        algorithms: provider.signature_verification_algorithms,
        expected,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server name handed to rustls: ignored by `SpiffeServerVerifier`, like ztunnel's.
pub fn unused_server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// The SPIFFE identity of the peer of an established connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| identities(leaf).into_iter().next())
}

#[derive(Debug)]
struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

/// A refused client certificate: the reason in an operator's words, and rustls' error.
#[derive(Debug)]
struct Rejected {
    reason: String,
    error: rustls::Error,
}

impl TrustDomainClientVerifier {
    /// The chain checked against the mesh roots, then the trust domain of its SPIFFE IDs.
    fn verdict(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Rejected> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|error| Rejected {
                reason: rejection_reason(&error),
                error,
            })?;
        let ids = identities(end_entity);
        if ids.iter().any(|id| id.trust_domain == self.trust_domain) {
            return Ok(verified);
        }
        let reason = match ids.first() {
            Some(id) => format!(
                "other trust domain: {} is not this workload's {}",
                id.trust_domain, self.trust_domain
            ),
            None => "no SPIFFE ID among its URI SANs".to_owned(),
        };
        Err(Rejected {
            reason,
            error: rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ),
        })
    }
}

/// Why rustls refused a peer's chain, in an operator's words.
fn rejection_reason(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired".to_owned(),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not valid yet (check the clocks)".to_owned(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "unknown root: not signed by this mesh's roots".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "unknown root: signed by a CA named like a mesh root but with another key".to_owned()
        }
        other => other.to_string(),
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    /// Logs a refused certificate with the SPIFFE ID it claims and the reason, so an
    /// operator sees "other trust domain", "expired" or "unknown root" instead of rustls'
    /// "invalid peer certificate".
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verdict(end_entity, intermediates, now)
            .map_err(|Rejected { reason, error }| {
                let claimed: Vec<String> = identities(end_entity)
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                let peer = if claimed.is_empty() {
                    "no SPIFFE ID".to_owned()
                } else {
                    claimed.join(",")
                };
                tracing::warn!(%peer, %reason, "peer certificate rejected");
                error
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: ExpectedPeer,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let ids = identities(end_entity);
        if self.expected.accepts(&ids) {
            Ok(ServerCertVerified::assertion())
        } else {
            let got: Vec<String> = ids.iter().map(ToString::to_string).collect();
            tracing::warn!(expected = %self.expected, got = ?got, "peer identity mismatch");
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use std::time::{Duration, SystemTime};

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        root: CertificateDer<'static>,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("key");
        let root = params.self_signed(&key).expect("root").der().clone();
        Ca { params, key, root }
    }

    fn leaf(ca: &Ca, id: &str, expired: bool) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
        let now = SystemTime::now();
        if expired {
            params.not_before = (now - Duration::from_secs(7200)).into();
            params.not_after = (now - Duration::from_secs(3600)).into();
        }
        let key = KeyPair::generate().expect("key");
        let issuer = Issuer::from_params(&ca.params, &ca.key);
        params.signed_by(&key, &issuer).expect("leaf").der().clone()
    }

    fn verifier(ca: &Ca) -> TrustDomainClientVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(ca.root.clone()).expect("root");
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("verifier");
        TrustDomainClientVerifier {
            inner,
            trust_domain: "cluster.local".into(),
        }
    }

    fn reason(verifier: &TrustDomainClientVerifier, leaf: &CertificateDer<'_>) -> Option<String> {
        verifier
            .verdict(leaf, &[], UnixTime::now())
            .err()
            .map(|r| r.reason)
    }

    const ID: &str = "spiffe://cluster.local/ns/prod/sa/client";

    /// Each refusal names its reason: another trust domain, an expired certificate, a root
    /// the mesh does not trust; a good certificate passes.
    #[test]
    fn a_rejected_peer_certificate_says_why() {
        let mesh = ca("cluster.local");
        let verifier = verifier(&mesh);
        assert_eq!(reason(&verifier, &leaf(&mesh, ID, false)), None);
        let foreign = leaf(&mesh, "spiffe://other.domain/ns/prod/sa/client", false);
        assert_eq!(
            reason(&verifier, &foreign).as_deref(),
            Some("other trust domain: other.domain is not this workload's cluster.local")
        );
        assert_eq!(
            reason(&verifier, &leaf(&mesh, ID, true)).as_deref(),
            Some("expired")
        );
        let stranger = ca("another mesh");
        assert_eq!(
            reason(&verifier, &leaf(&stranger, ID, false)).as_deref(),
            Some("unknown root: not signed by this mesh's roots")
        );
        let namesake = ca("cluster.local");
        assert_eq!(
            reason(&verifier, &leaf(&namesake, ID, false)).as_deref(),
            Some("unknown root: signed by a CA named like a mesh root but with another key")
        );
        let no_id = leaf(&mesh, "https://example.com/", false);
        assert_eq!(
            reason(&verifier, &no_id).as_deref(),
            Some("no SPIFFE ID among its URI SANs")
        );
    }
}
