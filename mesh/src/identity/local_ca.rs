//! A CA in Istio's `cacerts` layout (`CA_ADDR=file:///dir`) that signs in-process: laptops,
//! VMs without a cluster and tests get real mesh certificates with no network at all.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::keys;

/// Backdating of `notBefore`, for peers whose clocks are slightly behind.
const BACKDATE: Duration = Duration::from_secs(60);

/// The cacerts directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalCaError {
    /// A file is missing or unreadable.
    #[error(
        "local CA {path}: {source}; CA_ADDR=file:///DIR expects ca-cert.pem, ca-key.pem and root-cert.pem (cert-chain.pem optional), Istio's cacerts layout"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("local CA {path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Signing failed.
    #[error("local CA cannot sign the CSR: {0}")]
    Sign(String),
}

/// A loaded local CA.
pub struct LocalCa {
    dir: PathBuf,
    ca_cert_pem: String,
    key: KeyPair,
    /// Certificates that follow the leaf: the CA cert, intermediates, the root.
    chain_pem: Vec<String>,
    roots: Vec<CertificateDer<'static>>,
}

impl LocalCa {
    /// Loads `dir`: `ca-cert.pem` and `ca-key.pem` sign, `root-cert.pem` is the trust anchor,
    /// `cert-chain.pem` (if present) is the chain from the CA cert to the root.
    pub fn load(dir: &Path) -> Result<LocalCa, LocalCaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| LocalCaError::Read { path, source })
        };
        let invalid = |name: &str, detail: String| LocalCaError::Invalid {
            path: dir.join(name),
            detail,
        };
        let certs = |name: &str, bytes: &[u8]| {
            CertificateDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(name, e.to_string()))
                .and_then(|c| {
                    if c.is_empty() {
                        Err(invalid(name, "no CERTIFICATE block".into()))
                    } else {
                        Ok(c)
                    }
                })
        };
        let ca_cert = read("ca-cert.pem")?;
        let ca_cert_pem = String::from_utf8(ca_cert.clone())
            .map_err(|_| invalid("ca-cert.pem", "not UTF-8 PEM".into()))?;
        let ca_certs = certs("ca-cert.pem", &ca_cert)?;
        let key = keys::signing_key_from_pem(&read("ca-key.pem")?, "ca-key.pem")
            .map_err(|e| invalid("ca-key.pem", e.to_string()))?;
        let roots = certs("root-cert.pem", &read("root-cert.pem")?)?;
        let mut chain = match std::fs::read(dir.join("cert-chain.pem")) {
            Ok(bytes) => certs("cert-chain.pem", &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ca_certs.clone(),
            Err(source) => {
                return Err(LocalCaError::Read {
                    path: dir.join("cert-chain.pem"),
                    source,
                });
            }
        };
        // Istio returns the root last; add it when the chain file stops short of it.
        if let Some(root) = roots.first()
            && chain.last() != Some(root)
        {
            chain.push(root.clone());
        }
        Ok(LocalCa {
            dir: dir.to_owned(),
            ca_cert_pem,
            key,
            chain_pem: chain.iter().map(to_pem).collect(),
            roots,
        })
    }

    /// The directory it was loaded from, for logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trust anchors of certificates this CA issues.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Signs `csr_pem` for `ttl`, copying only the CSR's SANs, and returns the chain as a CA
    /// server would: leaf first, root last.
    pub fn sign(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, LocalCaError> {
        let sign_err = |e: rcgen::Error| LocalCaError::Sign(e.to_string());
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(sign_err)?;
        let now = SystemTime::now();
        let params = &mut csr.params;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(random_serial().map_err(LocalCaError::Sign)?);
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &self.key).map_err(|e| {
            LocalCaError::Invalid {
                path: self.dir.join("ca-cert.pem"),
                detail: e.to_string(),
            }
        })?;
        let leaf = csr.signed_by(&issuer).map_err(sign_err)?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        Ok(chain)
    }
}

fn random_serial() -> Result<rcgen::SerialNumber, String> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "no randomness available for a serial number".to_owned())?;
    bytes[0] &= 0x7f;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// PEM text of one certificate.
pub fn to_pem(cert: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cacerts_file_names_the_path_and_the_layout() {
        let dir = std::env::temp_dir().join(format!("krun-empty-cacerts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let err = LocalCa::load(&dir).err().expect("nothing to load");
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.join("ca-cert.pem").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("Istio's cacerts layout"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
