//! The workload key and its certificate signing request: a fresh ECDSA P-256 key per request,
//! an empty subject and one critical URI SAN with the SPIFFE identity (as ztunnel and
//! pilot-agent send; cloud-run-mesh sent an RSA key and no SAN, leaving the CA to infer
//! the identity).

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
    string::Ia5String,
};

use super::SpiffeId;

/// A CSR and the key it was made for. The key never leaves krun.
pub struct CertRequest {
    /// The new private key.
    pub key: KeyPair,
    /// The PEM CSR sent to the CA.
    pub csr_pem: String,
}

/// The CSR could not be built (the identity is not a valid URI, or key generation failed).
#[derive(Debug, thiserror::Error)]
#[error("cannot build a CSR for {identity}: {source}")]
pub struct CsrError {
    identity: String,
    #[source]
    source: rcgen::Error,
}

/// Generates a key and a CSR for `identity`.
pub fn new_request(identity: &SpiffeId) -> Result<CertRequest, CsrError> {
    let err = |source| CsrError {
        identity: identity.to_string(),
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    // An empty subject makes rcgen mark the SAN extension critical (RFC 5280 §4.2.1.6).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(identity.to_string()).map_err(err)?,
    )];
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(err)?;
    Ok(CertRequest { key, csr_pem })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn csr_has_only_a_critical_spiffe_uri_san_and_a_p256_key() {
        let id = SpiffeId::new("td.example", "prod", "reviews");
        let req = new_request(&id).expect("csr");
        let (_, pem) = parse_x509_pem(req.csr_pem.as_bytes()).expect("pem");
        let (_, csr) = X509CertificationRequest::from_der(&pem.contents).expect("der");
        csr.verify_signature().expect("self-signed CSR");
        assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
        let extensions: Vec<&X509Extension<'_>> = csr
            .certification_request_info
            .iter_attributes()
            .filter_map(|a| match a.parsed_attribute() {
                ParsedCriAttribute::ExtensionRequest(r) => Some(&r.extensions),
                _ => None,
            })
            .flatten()
            .collect();
        let [ext] = extensions.as_slice() else {
            panic!("expected exactly one extension, got {}", extensions.len());
        };
        assert!(ext.critical, "the SAN extension is critical");
        let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
            panic!("expected a SAN extension, got {:?}", ext.parsed_extension());
        };
        assert_eq!(
            san.general_names,
            vec![GeneralName::URI("spiffe://td.example/ns/prod/sa/reviews")]
        );
        assert_eq!(req.key.algorithm(), &PKCS_ECDSA_P256_SHA256);
    }
}
