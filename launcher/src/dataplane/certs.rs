//! The workload certificate as the data plane uses it: the identity step's, or read from the
//! files Istio's layout defines (`var/run/secrets/istio.io/` under `MESH_BASE_DIR`), published
//! through a watch so listeners pick up a rotated certificate for new connections while
//! established ones keep theirs.
//!
//! Key and chain always come from one certificate: the identity step publishes them as one
//! value, and the files are read as one generation ([`mesh::files::read_generation`]: through
//! `..data` when the directory has one) and then checked to belong together, so a directory
//! written file by file fails with a message instead of serving a key that is not the leaf's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hbone::server::FreshConfig;
use hbone::tls::{self, WorkloadCert};
use mesh::files::read_generation;
use mesh::identity::CertStore;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

/// Directory of `cert-chain.pem`, `key.pem`, `root-cert.pem`, relative to `MESH_BASE_DIR`.
pub const WORKLOAD_CERT_DIR: &str = "var/run/secrets/istio.io";

/// A certificate that cannot be used, naming the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file is missing or unreadable.
    #[error(
        "{path}: {source}; the workload certificate comes from the identity step (CA_ADDR) or must be mounted there"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM content is unusable.
    #[error("{dir}: {source}")]
    Invalid {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: tls::TlsError,
    },
    /// The key is not the leaf certificate's (the files come from two certificates).
    #[error(
        "{dir}: key.pem is not the private key of the leaf in cert-chain.pem ({detail}); the files come from different certificates: write them together, as one Kubernetes Secret volume or through a `..data` symlink swap"
    )]
    KeyMismatch {
        /// The directory.
        dir: PathBuf,
        /// rustls' finding.
        detail: String,
    },
    /// The leaf has no SPIFFE ID.
    #[error(
        "{dir}/cert-chain.pem: the leaf certificate has no spiffe:// URI SAN, so peers cannot authorize it"
    )]
    NoIdentity {
        /// The directory.
        dir: PathBuf,
    },
}

/// Loads the certificate under `base_dir`: chain, key and roots of one generation, the key
/// checked against the leaf.
fn load(base_dir: &Path) -> Result<WorkloadCert, CertError> {
    let dir = base_dir.join(WORKLOAD_CERT_DIR);
    let [chain, key, roots] = read_generation(&dir, ["cert-chain.pem", "key.pem", "root-cert.pem"])
        .map_err(|e| CertError::Read {
            path: e.path,
            source: e.source,
        })?;
    let cert =
        WorkloadCert::from_pem(&chain, &key, &roots).map_err(|source| CertError::Invalid {
            dir: dir.clone(),
            source,
        })?;
    let mismatch = |detail: String| CertError::KeyMismatch {
        dir: dir.clone(),
        detail,
    };
    let signing_key = tls::provider()
        .key_provider
        .load_private_key(cert.key.clone_key())
        .map_err(|e| mismatch(e.to_string()))?;
    match CertifiedKey::new(cert.chain.clone(), signing_key).keys_match() {
        // A key type whose public half rustls cannot tell is taken as it is.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => return Err(mismatch(e.to_string())),
    }
    if cert.identity().is_none() {
        return Err(CertError::NoIdentity { dir });
    }
    Ok(cert)
}

/// The identity store's certificate in the form the data plane uses.
fn convert(cert: &mesh::identity::WorkloadCert) -> Arc<WorkloadCert> {
    Arc::new(WorkloadCert {
        chain: cert.chain.clone(),
        key: cert.key(),
        roots: cert.roots.clone(),
    })
}

/// Follows the identity store: every certificate it mints or rotates is published in the
/// form the data plane uses.
pub fn follow_identity(
    store: &mesh::identity::CertStore,
) -> Option<watch::Receiver<Arc<WorkloadCert>>> {
    let mut updates = store.subscribe();
    let first = updates.borrow_and_update().as_deref().map(convert)?;
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            if let Some(cert) = updates.borrow_and_update().as_deref() {
                tx.send_replace(convert(cert));
            }
        }
    });
    Some(rx)
}

/// The certificate feed the data plane uses: the identity step's when it minted one, else a
/// certificate mounted in Istio's file layout under `base_dir`, read once.
pub fn workload_certs(
    minted: Option<watch::Receiver<Arc<WorkloadCert>>>,
    base_dir: &Path,
) -> Result<watch::Receiver<Arc<WorkloadCert>>, CertError> {
    match minted {
        Some(minted) => Ok(minted),
        None => Ok(watch::channel(Arc::new(load(base_dir)?)).1),
    }
}

/// Builds the server config of `listener` from each certificate the store publishes, and logs
/// (with the leaf's serial) when new handshakes start presenting a rotated one.
pub fn server_configs(
    certs: &watch::Receiver<Arc<WorkloadCert>>,
    trust_domain: String,
    alpn: &'static [&'static [u8]],
    listener: &'static str,
) -> Result<watch::Receiver<Arc<rustls::ServerConfig>>, tls::TlsError> {
    let first = tls::server_config(&certs.borrow(), &trust_domain, alpn)?;
    let (tx, rx) = watch::channel(first);
    let mut certs = certs.clone();
    tokio::spawn(async move {
        while certs.changed().await.is_ok() {
            let cert = certs.borrow_and_update().clone();
            match tls::server_config(&cert, &trust_domain, alpn) {
                Ok(config) => {
                    tx.send_replace(config);
                    tracing::info!(
                        listener,
                        serial = leaf_serial(&cert),
                        "new handshakes present the rotated certificate"
                    );
                }
                Err(e) => {
                    tracing::error!(listener, error = %e, "rotated certificate unusable; keeping the previous one")
                }
            }
        }
    });
    Ok(rx)
}

/// The identity store behind a mesh listener, asked before each handshake whether the
/// certificate is past its rotation time by the wall clock ([`CertStore::refresh_if_due`]).
/// A new connection is served a config built from the store's current certificate, not the
/// one the watch that rebuilds configs last delivered: that watch is two task hops behind the
/// store, so just after a rotation (a timer that fired late, or a refresh another connection
/// asked for) it may still hold the certificate past its rotation time.
pub struct OnDemand {
    store: Arc<CertStore>,
    trust_domain: String,
    alpn: &'static [&'static [u8]],
    listener: &'static str,
    /// The config built for the store's certificate, kept until the store holds another.
    built: Mutex<Option<(Arc<mesh::identity::WorkloadCert>, Arc<rustls::ServerConfig>)>>,
}

impl OnDemand {
    /// The hook for `listener`, building configs as [`server_configs`] does.
    pub fn hook(
        store: Arc<CertStore>,
        trust_domain: String,
        alpn: &'static [&'static [u8]],
        listener: &'static str,
    ) -> Arc<dyn FreshConfig> {
        Arc::new(OnDemand {
            store,
            trust_domain,
            alpn,
            listener,
            built: Mutex::new(None),
        })
    }

    /// The config built for `cert`, if the last one built was for it.
    fn built_for(
        &self,
        cert: &Arc<mesh::identity::WorkloadCert>,
    ) -> Option<Arc<rustls::ServerConfig>> {
        let built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        built
            .as_ref()
            .filter(|(for_cert, _)| Arc::ptr_eq(for_cert, cert))
            .map(|(_, config)| config.clone())
    }
}

impl FreshConfig for OnDemand {
    fn fresh(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<Arc<rustls::ServerConfig>>> + Send + '_>>
    {
        Box::pin(async move {
            let current = match self.store.refresh_if_due().await {
                Some(refreshed) => refreshed,
                None => self.store.current()?,
            };
            if let Some(config) = self.built_for(&current) {
                return Some(config);
            }
            let cert = convert(&current);
            match tls::server_config(&cert, &self.trust_domain, self.alpn) {
                Ok(config) => {
                    tracing::debug!(
                        listener = self.listener,
                        serial = leaf_serial(&cert),
                        "new connections served the store's current certificate"
                    );
                    *self.built.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((current, config.clone()));
                    Some(config)
                }
                Err(e) => {
                    tracing::error!(listener = self.listener, error = %e, "refreshed certificate unusable; serving the current one");
                    None
                }
            }
        })
    }
}

/// The leaf's serial number in lowercase hex (what `openssl x509 -serial` prints, in
/// lowercase), so a log line names which certificate a listener serves.
fn leaf_serial(cert: &WorkloadCert) -> String {
    cert.chain
        .first()
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf.as_ref()).ok())
        .map(|(_, leaf)| {
            leaf.tbs_certificate
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use mesh::files::{Access, write_atomic, write_generation};

    use super::*;

    /// A self-signed workload certificate for `id`: (chain PEM, key PEM).
    fn issued(id: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("URI"))];
        let cert = params.self_signed(&key).expect("self-sign");
        (cert.pem(), key.serialize_pem())
    }

    fn base(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("krun-certs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_generation_is_read_as_one_certificate() {
        let base = base("generation");
        let (chain, key) = issued("spiffe://cluster.local/ns/a/sa/b");
        write_generation(
            &base.join(WORKLOAD_CERT_DIR),
            &[
                ("cert-chain.pem", chain.as_bytes(), Access::Public),
                ("key.pem", key.as_bytes(), Access::Secret),
                ("root-cert.pem", chain.as_bytes(), Access::Public),
            ],
        )
        .expect("write");
        let cert = load(&base).expect("load");
        assert_eq!(
            cert.identity().map(|id| id.to_string()).as_deref(),
            Some("spiffe://cluster.local/ns/a/sa/b")
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_the_files() {
        let base = base("mismatch");
        let dir = base.join(WORKLOAD_CERT_DIR);
        let (chain, _) = issued("spiffe://cluster.local/ns/a/sa/b");
        let (_, other_key) = issued("spiffe://cluster.local/ns/a/sa/b");
        for (name, bytes) in [
            ("cert-chain.pem", &chain),
            ("key.pem", &other_key),
            ("root-cert.pem", &chain),
        ] {
            write_atomic(&dir.join(name), bytes.as_bytes(), Access::Public).expect("write");
        }
        let Err(err) = load(&base) else {
            panic!("a key of another certificate must be refused")
        };
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("key.pem is not the private key of the leaf in cert-chain.pem"),
            "{msg}"
        );
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
