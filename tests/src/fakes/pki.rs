//! A test PKI: a mesh root, istiod's serving certificate, leaves signed from CSRs (optionally
//! for another identity), Istio `cacerts` directories, and JWT-shaped tokens.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A root CA that can sign intermediates, servers and workload leaves.
pub struct TestCa {
    /// Root certificate PEM.
    pub root_pem: String,
    params: CertificateParams,
    key: KeyPair,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "krun-test");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl TestCa {
    /// A self-signed EC P-256 root.
    pub fn new(cn: &str) -> TestCa {
        TestCa::with_key(cn, KeyPair::generate().expect("root key"))
    }

    /// A self-signed root with `key` (e.g. RSA 4096 made by the test).
    pub fn with_key(cn: &str, key: KeyPair) -> TestCa {
        let params = ca_params(cn);
        let root = params.self_signed(&key).expect("self-sign root");
        TestCa {
            root_pem: root.pem(),
            params,
            key,
        }
    }

    /// An intermediate CA signed by this root: (cert PEM, key).
    pub fn intermediate(&self, cn: &str, key: KeyPair) -> String {
        let issuer = Issuer::from_params(&self.params, &self.key);
        ca_params(cn)
            .signed_by(&key, &issuer)
            .expect("sign intermediate")
            .pem()
    }

    /// A TLS server certificate for `dns_names` (istiod's, `localhost`): (cert PEM, key PEM).
    pub fn server_cert(&self, dns_names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("server key");
        let names = dns_names
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign server");
        (cert.pem(), key.serialize_pem())
    }

    /// Signs `csr_pem` for `ttl`; `uri_override` replaces the CSR's SAN (a misbehaving CA).
    pub fn sign_csr(&self, csr_pem: &str, ttl: Duration, uri_override: Option<&str>) -> String {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).expect("valid CSR");
        if let Some(uri) = uri_override {
            csr.params.subject_alt_names =
                vec![SanType::URI(uri.to_owned().try_into().expect("URI"))];
        }
        let now = SystemTime::now();
        csr.params.not_before = now.into();
        csr.params.not_after = (now + ttl).into();
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_params(&self.params, &self.key);
        csr.signed_by(&issuer).expect("sign leaf").pem()
    }

    /// A workload certificate for `spiffe_id` (e.g. `spiffe://cluster.local/ns/default/sa/web`)
    /// as istiod issues them: EC P-256 leaf, URI SAN, server and client auth.
    pub fn workload_cert(&self, spiffe_id: &str) -> Issued {
        let mut params = CertificateParams::default();
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
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Installs a workload identity where krun reads a mounted one:
    /// `<base>/var/run/secrets/istio.io/{cert-chain.pem,key.pem,root-cert.pem}`.
    pub fn install_workload(&self, base: &Path, spiffe_id: &str) {
        let dir = base.join("var/run/secrets/istio.io");
        std::fs::create_dir_all(&dir).expect("cert dir");
        let issued = self.workload_cert(spiffe_id);
        std::fs::write(dir.join("cert-chain.pem"), issued.cert_pem).expect("write chain");
        std::fs::write(dir.join("key.pem"), issued.key_pem).expect("write key");
        std::fs::write(dir.join("root-cert.pem"), &self.root_pem).expect("write root");
    }

    /// Writes a client identity for an external client (openssl, Python) as
    /// `<dir>/<name>.crt`, `<name>.key` and `<name>-ca.crt`.
    pub fn install_client(&self, dir: &Path, name: &str, spiffe_id: &str) -> ClientFiles {
        let issued = self.workload_cert(spiffe_id);
        let files = ClientFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.crt")),
        };
        std::fs::write(&files.cert, issued.cert_pem).expect("write cert");
        std::fs::write(&files.key, issued.key_pem).expect("write key");
        std::fs::write(&files.ca, &self.root_pem).expect("write ca");
        files
    }

    /// Writes this root as an Istio `cacerts` directory where the root itself signs.
    pub fn write_cacerts(&self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("cacerts dir");
        std::fs::write(dir.join("ca-cert.pem"), &self.root_pem).expect("ca-cert");
        std::fs::write(dir.join("ca-key.pem"), self.key.serialize_pem()).expect("ca-key");
        std::fs::write(dir.join("root-cert.pem"), &self.root_pem).expect("root-cert");
        std::fs::write(dir.join("cert-chain.pem"), &self.root_pem).expect("cert-chain");
    }
}

/// A certificate and its key, as PEM.
pub struct Issued {
    /// Leaf certificate.
    pub cert_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
}

/// File paths of a client identity.
pub struct ClientFiles {
    /// Certificate PEM.
    pub cert: std::path::PathBuf,
    /// Key PEM.
    pub key: std::path::PathBuf,
    /// Trusted root PEM.
    pub ca: std::path::PathBuf,
}

impl ClientFiles {
    /// The files as the hbone client's certificate (a client the test drives in process).
    pub fn workload_cert(&self) -> hbone::tls::WorkloadCert {
        hbone::tls::WorkloadCert::from_pem(
            &std::fs::read(&self.cert).expect("cert"),
            &std::fs::read(&self.key).expect("key"),
            &std::fs::read(&self.ca).expect("ca"),
        )
        .expect("client cert")
    }
}

/// A JWT-shaped token with these claims (signature not verifiable: krun never verifies).
pub fn jwt(sub: &str, aud: &str, lifetime: Duration) -> String {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = (SystemTime::now() + lifetime)
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    format!(
        "{}.{}.c2ln",
        b64(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
        b64(
            serde_json::json!({"sub": sub, "aud": [aud], "exp": exp, "iss": "https://kubernetes.default.svc"})
        )
    )
}
