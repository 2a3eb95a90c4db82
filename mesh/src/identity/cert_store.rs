//! The one owner of the workload certificate. Minting and rotation publish here (after the
//! files are written); TLS configs read the current certificate on every handshake through
//! [`CertResolver`], other components follow updates with [`CertStore::subscribe`], and
//! [`CertStore::health`] reports how rotation is going. Nothing restarts when it changes.
//!
//! Rotation is not left to a timer alone: where CPU is allocated only during requests (Cloud
//! Run), a timer can fire long after its time. A listener calls [`CertStore::refresh_if_due`]
//! before each new connection; a certificate past its rotation time by the wall clock is then
//! replaced on the spot (and a refresh that failed is retried by the next connection).

use std::sync::Arc;
use std::time::SystemTime;

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{Notify, watch};

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
    /// The chain and a signing key, ready for rustls handshakes.
    certified: Arc<CertifiedKey>,
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
    /// Fails only when rustls cannot sign with the key.
    pub fn new(
        identity: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
        roots: Vec<CertificateDer<'static>>,
        validity: (SystemTime, SystemTime),
    ) -> Result<Self, rustls::Error> {
        let key = PrivatePkcs8KeyDer::from(key_pkcs8);
        let signing_key =
            rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(key.clone_key()))?;
        Ok(WorkloadCert {
            identity,
            certified: Arc::new(CertifiedKey::new(chain.clone(), signing_key)),
            chain,
            key,
            roots,
            not_before: validity.0,
            not_after: validity.1,
        })
    }

    /// The chain and signing key for rustls (what [`CertResolver`] hands out).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
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

    /// True when the wall clock says this certificate should have been replaced by now.
    pub fn is_due(&self, now: SystemTime) -> bool {
        now >= self.half_life()
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

/// A rustls certificate resolver over the store: every handshake (server or client side) uses
/// the certificate current at that moment, so rotation needs no listener restart and open
/// connections are not dropped. Use with `with_cert_resolver` / `with_client_cert_resolver`.
#[derive(Debug)]
pub struct CertResolver {
    certs: watch::Receiver<Option<Arc<WorkloadCert>>>,
}

impl CertResolver {
    /// A resolver following `store`.
    pub fn new(store: &CertStore) -> Self {
        CertResolver {
            certs: store.subscribe(),
        }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.certs.borrow().as_ref().map(|c| c.certified_key())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.certs.borrow().is_some()
    }
}

/// Publishes the current certificate to every subscriber.
pub struct CertStore {
    current: watch::Sender<Option<Arc<WorkloadCert>>>,
    health: watch::Sender<RotationHealth>,
    /// Wakes the rotation task to look at the wall clock now (a connection found the
    /// certificate due).
    wake_rotation: Notify,
}

impl Default for CertStore {
    fn default() -> Self {
        CertStore {
            current: watch::Sender::new(None),
            health: watch::Sender::new(RotationHealth::default()),
            wake_rotation: Notify::new(),
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

    /// `None` while the current certificate is not due by the wall clock (the common case: one
    /// clock read). Otherwise asks the rotation task to replace it now, waits for the outcome
    /// and returns the certificate to serve: the new one, or the old one when the refresh
    /// failed (the next call asks again). Bound the wait with the caller's handshake deadline.
    pub async fn refresh_if_due(&self) -> Option<Arc<WorkloadCert>> {
        if !self.current()?.is_due(SystemTime::now()) {
            return None;
        }
        let mut certs = self.subscribe();
        let mut health = self.health();
        certs.borrow_and_update();
        health.borrow_and_update();
        // Looked at again after subscribing, so a rotation that finished in between counts.
        let current = self.current()?;
        if current.is_due(SystemTime::now()) {
            tracing::debug!(
                identity = %current.identity,
                "certificate past its rotation time by the wall clock; refreshing before serving"
            );
            self.wake_rotation.notify_one();
            tokio::select! {
                _ = certs.changed() => {}
                _ = health.changed() => {}
            }
        }
        self.current()
    }

    /// Resolves when a connection asked for a refresh ([`CertStore::refresh_if_due`]).
    pub(super) async fn refresh_requested(&self) {
        self.wake_rotation.notified().await;
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
