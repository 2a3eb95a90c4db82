//! The one owner of the workload certificate. Minting and rotation publish here; the data
//! plane, the file writer and the admin endpoint subscribe and reload without restarts.

use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::SpiffeId;

/// A verified certificate, its key and the roots peers are checked against: everything a
/// rustls `ServerConfig` or `ClientConfig` for mesh mTLS needs.
pub struct WorkloadCert {
    /// The identity the leaf certifies.
    pub identity: SpiffeId,
    /// Leaf first, then intermediates (and the root, as the CA returned it).
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    /// Trust anchors for peers.
    pub roots: Vec<CertificateDer<'static>>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Assembles a certificate from verified parts; `key_pkcs8` is the leaf's private key.
    pub fn new(
        identity: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
        roots: Vec<CertificateDer<'static>>,
        validity: (SystemTime, SystemTime),
    ) -> Self {
        WorkloadCert {
            identity,
            chain,
            key: PrivatePkcs8KeyDer::from(key_pkcs8),
            roots,
            not_before: validity.0,
            not_after: validity.1,
        }
    }

    /// The private key, for `with_single_cert`.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The PKCS#8 DER of the private key, for writing `key.pem`.
    pub fn key_pkcs8(&self) -> &[u8] {
        self.key.secret_pkcs8_der()
    }

    /// The roots as a rustls store, for peer verification.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut store = rustls::RootCertStore::empty();
        store.add_parsable_certificates(self.roots.iter().cloned());
        store
    }

    /// When rotation should replace this certificate: half its lifetime, as Istio does.
    pub fn half_life(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }
}

/// How rotation is going, for health reporting and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationHealth {
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// The last failure's message.
    pub last_error: Option<String>,
}

/// Publishes the current certificate to every subscriber.
pub struct CertStore {
    current: watch::Sender<Option<Arc<WorkloadCert>>>,
    health: watch::Sender<RotationHealth>,
}

impl Default for CertStore {
    fn default() -> Self {
        CertStore {
            current: watch::Sender::new(None),
            health: watch::Sender::new(RotationHealth::default()),
        }
    }
}

impl CertStore {
    /// The current certificate, if one was minted.
    pub fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.current.borrow().clone()
    }

    /// Updates as they happen; `None` only before the first certificate.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<WorkloadCert>>> {
        self.current.subscribe()
    }

    /// Rotation health updates.
    pub fn health(&self) -> watch::Receiver<RotationHealth> {
        self.health.subscribe()
    }

    pub(super) fn publish(&self, cert: Arc<WorkloadCert>) {
        self.current.send_replace(Some(cert));
        self.health.send_replace(RotationHealth::default());
    }

    pub(super) fn record_failure(&self, error: String) {
        self.health.send_modify(|h| {
            h.consecutive_failures += 1;
            h.last_error = Some(error);
        });
    }
}
