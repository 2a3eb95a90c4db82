//! Checks a chain returned by a CA before krun uses it: the leaf names exactly the requested
//! identity and carries our key, the chain ends at a root we trust, and the validity is sane.
//! A CA that answers with someone else's certificate must not become our identity.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::SpiffeId;

/// Clock skew tolerated between krun and the CA for `notBefore`.
const MAX_SKEW: Duration = Duration::from_secs(300);

/// A chain that passed every check.
#[derive(Clone, Debug)]
pub struct VerifiedChain {
    /// Leaf first, then intermediates and root as the CA returned them.
    pub chain: Vec<CertificateDer<'static>>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

/// Why a CA's answer was rejected.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No certificate at all.
    #[error("the CA returned no certificate for {0}")]
    Empty(String),
    /// Not parseable.
    #[error("the CA returned a certificate krun cannot parse: {0}")]
    Malformed(String),
    /// The leaf is for another workload.
    #[error(
        "the CA returned a certificate for {got} but krun requested {requested}; the CA signed another identity (check the token's service account and WORKLOAD_SERVICE_ACCOUNT)"
    )]
    WrongIdentity {
        /// What krun asked for.
        requested: String,
        /// What the leaf names.
        got: String,
    },
    /// The leaf certifies a key that is not the one in our CSR.
    #[error("the CA returned a certificate for {0} whose public key is not the CSR's key")]
    WrongKey(String),
    /// The chain does not lead to a trusted root.
    #[error(
        "the certificate for {identity} does not chain to a trusted root ({reason}); check the CA root (CAROOT_ISTIOD or the local CA's root-cert.pem)"
    )]
    Untrusted {
        /// The identity.
        identity: String,
        /// webpki's reason.
        reason: String,
    },
    /// Expired, not yet valid, or inverted.
    #[error("the certificate for {identity} has an unusable validity ({reason})")]
    Validity {
        /// The identity.
        identity: String,
        /// What is wrong.
        reason: String,
    },
}

/// Parses every certificate in the PEM strings a CA returned, in order.
pub fn parse_pem_chain(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, VerifyError> {
    let mut out = Vec::new();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            out.push(cert.map_err(|e| VerifyError::Malformed(e.to_string()))?);
        }
    }
    Ok(out)
}

/// Verifies `chain` (leaf first) for `identity` and the key whose SPKI is `key_spki`.
pub fn verify_chain(
    chain: Vec<CertificateDer<'static>>,
    roots: &[CertificateDer<'static>],
    identity: &SpiffeId,
    key_spki: &[u8],
    now: SystemTime,
) -> Result<VerifiedChain, VerifyError> {
    let requested = identity.to_string();
    let leaf_der = chain
        .first()
        .ok_or_else(|| VerifyError::Empty(requested.clone()))?;
    let (_, leaf) =
        X509Certificate::from_der(leaf_der).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let uris = hbone::identity::uri_sans(leaf_der);
    if uris != [requested.clone()] {
        let got = if uris.is_empty() {
            "no URI SAN".to_owned()
        } else {
            uris.join(", ")
        };
        return Err(VerifyError::WrongIdentity { requested, got });
    }
    if leaf.public_key().raw != key_spki {
        return Err(VerifyError::WrongKey(requested));
    }
    let not_before = to_system_time(leaf.validity().not_before.timestamp());
    let not_after = to_system_time(leaf.validity().not_after.timestamp());
    let validity = |reason: &str| VerifyError::Validity {
        identity: requested.clone(),
        reason: reason.to_owned(),
    };
    if not_after <= not_before {
        return Err(validity("notAfter is not after notBefore"));
    }
    if not_after <= now {
        return Err(validity("already expired"));
    }
    if not_before > now + MAX_SKEW {
        return Err(validity(
            "not valid yet; check the clocks of krun and the CA",
        ));
    }
    let anchors: Vec<TrustAnchor<'_>> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    let untrusted = |reason: String| VerifyError::Untrusted {
        identity: requested.clone(),
        reason,
    };
    if anchors.is_empty() {
        return Err(untrusted("no usable trusted root was configured".into()));
    }
    let end_entity =
        webpki::EndEntityCert::try_from(leaf_der).map_err(|e| untrusted(format!("{e:?}")))?;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            UnixTime::since_unix_epoch(since_epoch),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| untrusted(format!("{e:?}")))?;
    Ok(VerifiedChain {
        chain,
        not_before,
        not_after,
    })
}

/// The end of `leaf`'s validity, for reporting (a mounted certificate's expiry); `None` when it
/// does not parse.
pub fn not_after(leaf: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    Some(to_system_time(cert.validity().not_after.timestamp()))
}

fn to_system_time(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        PublicKeyData, SanType,
    };

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        root: CertificateDer<'static>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).expect("root").der().clone();
        Ca { params, key, root }
    }

    fn id() -> SpiffeId {
        SpiffeId::new("td", "ns", "sa")
    }

    /// A leaf for `id()` with `key`, valid `from`..`to` seconds around now.
    fn leaf(ca: &Ca, key: &KeyPair, from: i64, to: i64) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id().to_string().try_into().expect("URI"))];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = at(from).into();
        params.not_after = at(to).into();
        let issuer = Issuer::from_params(&ca.params, &ca.key);
        params.signed_by(key, &issuer).expect("leaf").der().clone()
    }

    /// Now plus `secs` (negative: in the past).
    fn at(secs: i64) -> SystemTime {
        let offset = Duration::from_secs(secs.unsigned_abs());
        if secs < 0 {
            SystemTime::now() - offset
        } else {
            SystemTime::now() + offset
        }
    }

    fn verify(
        ca: &Ca,
        trusted: &Ca,
        leaf: CertificateDer<'static>,
        key: &KeyPair,
    ) -> Result<VerifiedChain, VerifyError> {
        verify_chain(
            vec![leaf, ca.root.clone()],
            std::slice::from_ref(&trusted.root),
            &id(),
            &key.subject_public_key_info(),
            SystemTime::now(),
        )
    }

    #[test]
    fn a_good_chain_passes_and_reports_its_validity() {
        let (ca, key) = (ca(), KeyPair::generate().expect("key"));
        let ok = verify(&ca, &ca, leaf(&ca, &key, -60, 3600), &key).expect("valid");
        assert!(ok.not_after > SystemTime::now());
    }

    #[test]
    fn an_untrusted_root_is_rejected() {
        let (ca, other, key) = (ca(), ca(), KeyPair::generate().expect("key"));
        let err = verify(&ca, &other, leaf(&ca, &key, -60, 3600), &key).expect_err("untrusted");
        assert!(matches!(err, VerifyError::Untrusted { .. }), "{err}");
        assert!(err.to_string().contains("spiffe://td/ns/ns/sa/sa"), "{err}");
    }

    #[test]
    fn a_leaf_for_another_key_is_rejected() {
        let (ca, key, ours) = (
            ca(),
            KeyPair::generate().expect("key"),
            KeyPair::generate().expect("key"),
        );
        let err = verify(&ca, &ca, leaf(&ca, &key, -60, 3600), &ours).expect_err("wrong key");
        assert!(matches!(err, VerifyError::WrongKey(_)), "{err}");
    }

    #[test]
    fn expired_and_future_leaves_are_rejected() {
        let (ca, key) = (ca(), KeyPair::generate().expect("key"));
        let err = verify(&ca, &ca, leaf(&ca, &key, -7200, -3600), &key).expect_err("expired");
        assert!(err.to_string().contains("already expired"), "{err}");
        let err = verify(&ca, &ca, leaf(&ca, &key, 3600, 7200), &key).expect_err("future");
        assert!(err.to_string().contains("not valid yet"), "{err}");
    }
}
