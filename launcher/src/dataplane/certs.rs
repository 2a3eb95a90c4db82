//! The workload certificate as the data plane uses it: read from the files Istio's layout
//! defines (`var/run/secrets/istio.io/` under `MESH_BASE_DIR`), published through a watch so
//! listeners pick up a rotated certificate for new connections while established ones keep
//! theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hbone::tls::{self, WorkloadCert};
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
    /// The leaf has no SPIFFE ID.
    #[error(
        "{dir}/cert-chain.pem: the leaf certificate has no spiffe:// URI SAN, so peers cannot authorize it"
    )]
    NoIdentity {
        /// The directory.
        dir: PathBuf,
    },
}

/// Loads the certificate under `base_dir`.
fn load(base_dir: &Path) -> Result<WorkloadCert, CertError> {
    let dir = base_dir.join(WORKLOAD_CERT_DIR);
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| CertError::Read { path, source })
    };
    let cert = WorkloadCert::from_pem(
        &read("cert-chain.pem")?,
        &read("key.pem")?,
        &read("root-cert.pem")?,
    )
    .map_err(|source| CertError::Invalid {
        dir: dir.clone(),
        source,
    })?;
    if cert.identity().is_none() {
        return Err(CertError::NoIdentity { dir });
    }
    Ok(cert)
}

/// Follows the identity store: every certificate it mints or rotates is published in the
/// form the data plane uses.
pub fn follow_identity(
    store: &mesh::identity::CertStore,
) -> Option<watch::Receiver<Arc<WorkloadCert>>> {
    let convert = |cert: &mesh::identity::WorkloadCert| {
        Arc::new(WorkloadCert {
            chain: cert.chain.clone(),
            key: cert.key(),
            roots: cert.roots.clone(),
        })
    };
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

/// Builds the server config of a listener from each certificate the store publishes.
pub fn server_configs(
    certs: &watch::Receiver<Arc<WorkloadCert>>,
    trust_domain: String,
    alpn: &'static [&'static [u8]],
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
                }
                Err(e) => {
                    tracing::error!(error = %e, "rotated certificate unusable; keeping the previous one")
                }
            }
        }
    });
    Ok(rx)
}
