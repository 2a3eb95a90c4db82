//! The trust bundle: every root a peer's certificate may chain to. Mesh-env publishes them as
//! `CAROOT_*` keys (`CAROOT_ISTIOD` from istiod's `istio-ca-root-cert`, `CAROOT_CAS`, ...);
//! the signer adds its own. One deduplicated list feeds `root-cert.pem` and the data plane.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Prefix of mesh-env keys that hold PEM roots: every `CAROOT*` value (`CAROOT_ISTIOD`,
/// `CAROOT_CAS`, ...) joins the trust bundle, as in cloud-run-mesh.
pub const CAROOT_PREFIX: &str = "CAROOT";

/// A `CAROOT*` value that is not PEM certificates.
#[derive(Debug, thiserror::Error)]
#[error("mesh-env {key}: {detail}; expected one or more PEM CERTIFICATE blocks")]
pub struct RootsError {
    /// The mesh-env key.
    pub key: String,
    /// What is wrong.
    pub detail: String,
}

/// Every root in the `CAROOT*` entries of `mesh_env`, in key order.
pub fn mesh_env_roots<'a>(
    mesh_env: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<CertificateDer<'static>>, RootsError> {
    let mut entries: Vec<(&str, &str)> = mesh_env
        .into_iter()
        .filter(|(k, v)| k.starts_with(CAROOT_PREFIX) && !v.trim().is_empty())
        .collect();
    entries.sort();
    let mut roots = Vec::new();
    for (key, pem) in entries {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RootsError {
                key: key.to_owned(),
                detail: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(RootsError {
                key: key.to_owned(),
                detail: "no CERTIFICATE block".to_owned(),
            });
        }
        roots.extend(certs);
    }
    Ok(roots)
}

/// `first` then `more`, without duplicates, order kept.
pub fn bundle(
    first: &[CertificateDer<'static>],
    more: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    let mut out: Vec<CertificateDer<'static>> = Vec::new();
    for root in first.iter().chain(more) {
        if !out.contains(root) {
            out.push(root.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_pem(cn: &str) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.self_signed(&key).expect("cert").pem()
    }

    #[test]
    fn every_caroot_key_contributes_and_duplicates_collapse() {
        let (istiod, cas) = (root_pem("istiod"), root_pem("cas"));
        let both = format!("{istiod}{cas}");
        let env = [
            ("CAROOT_ISTIOD", istiod.as_str()),
            ("CAROOT_CAS", both.as_str()),
            ("XDS_ADDR", "not a root"),
        ];
        let roots = mesh_env_roots(env).expect("roots");
        assert_eq!(roots.len(), 3, "CAROOT_CAS (2) then CAROOT_ISTIOD (1)");
        assert_eq!(bundle(&roots[2..], &roots).len(), 2);
    }

    #[test]
    fn a_bad_caroot_is_named() {
        let err = mesh_env_roots([("CAROOT_CAS", "garbage")]).expect_err("not PEM");
        assert!(
            err.to_string().starts_with("mesh-env CAROOT_CAS: "),
            "{err}"
        );
    }
}
