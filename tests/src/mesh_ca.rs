//! A throw-away mesh CA for tests: issues SPIFFE workload certificates the way istiod does
//! (EC P-256 leaf, URI SAN, client and server auth) and lays them out in Istio's file layout.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A self-signed root that signs workload certificates.
pub struct MeshCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
pub struct Issued {
    /// Leaf certificate.
    pub cert_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
}

impl MeshCa {
    /// A new root named after `org`.
    pub fn new(org: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        MeshCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed CA"),
        }
    }

    /// The root certificate.
    pub fn root_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A workload certificate for `spiffe_id` (e.g. `spiffe://cluster.local/ns/default/sa/web`).
    pub fn issue(&self, spiffe_id: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("URI SAN"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes a workload identity where krun reads it: `<base>/var/run/secrets/istio.io/`.
    pub fn install_workload(&self, base: &Path, spiffe_id: &str) {
        let dir = base.join("var/run/secrets/istio.io");
        std::fs::create_dir_all(&dir).expect("cert dir");
        let issued = self.issue(spiffe_id);
        std::fs::write(dir.join("cert-chain.pem"), issued.cert_pem).expect("write chain");
        std::fs::write(dir.join("key.pem"), issued.key_pem).expect("write key");
        std::fs::write(dir.join("root-cert.pem"), self.root_pem()).expect("write root");
    }

    /// Writes a client identity for an external client (openssl, Python): returns the paths
    /// of its certificate, key and the CA root.
    pub fn install_client(&self, dir: &Path, name: &str, spiffe_id: &str) -> ClientFiles {
        let issued = self.issue(spiffe_id);
        let files = ClientFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.crt")),
        };
        std::fs::write(&files.cert, issued.cert_pem).expect("write cert");
        std::fs::write(&files.key, issued.key_pem).expect("write key");
        std::fs::write(&files.ca, self.root_pem()).expect("write ca");
        files
    }
}

/// File paths of a client identity.
pub struct ClientFiles {
    /// Certificate PEM.
    pub cert: PathBuf,
    /// Key PEM.
    pub key: PathBuf,
    /// Trusted root PEM.
    pub ca: PathBuf,
}
