//! Workload identity: tokens, certificates and their rotation.
//!
//! [`Identity::start`] mints the first certificate (CSR → signer → verified chain → files →
//! [`CertStore`]) and then rotates it at half-life in the background, keeping the old
//! certificate when the CA is down. The [`Signer`] is chosen by the caller: a local CA for
//! `CA_ADDR=file:///dir`, Istio's CA with the istio-token (`k8s_token`), or Google's MeshCA
//! or CAS with the STS federated token (`google_tokens`). See docs/identity.md.

pub mod ca_grpc;
pub mod cas;
pub mod cert_store;
pub mod csr;
pub mod google_tokens;
pub mod istio_ca;
pub mod jwt;
pub mod k8s_token;
mod keys;
pub mod local_ca;
pub mod meshca;
pub mod roots;
pub mod signer;
pub mod token;
pub mod token_cache;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::PublicKeyData;
use rustls_pki_types::CertificateDer;

use crate::backoff::Backoff;

pub use cert_store::{CertResolver, CertStore, RotationHealth, WorkloadCert};
pub use hbone::SpiffeId;
pub use signer::{SignError, Signer};

use crate::files::{Access, WriteError, write_generation};
use local_ca::to_pem;

/// Istio's default certificate lifetime (`SECRET_TTL`).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Istio's default trust domain, used when TRUST_DOMAIN is not known.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The directory of a local CA when `CA_ADDR` is `file:///dir`.
pub fn local_ca_dir(ca_addr: &str) -> Option<PathBuf> {
    ca_addr
        .strip_prefix("file://")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// How long the first certificate may take, transient CA failures retried included: as
/// long as discovery's budget (`KRUN_DISCOVERY_TIMEOUT`'s default).
pub const DEFAULT_STARTUP_BUDGET: Duration = Duration::from_secs(30);

/// Rotations that failed (each failed attempt counts; the current certificate stayed in use).
pub static ROTATION_FAILURES: hbone::metrics::Counter = hbone::metrics::Counter::new();

/// Lifetime and retry pacing of certificates.
#[derive(Clone, Debug)]
pub struct RotationPolicy {
    /// Requested certificate lifetime.
    pub ttl: Duration,
    /// First retry delay after a failed rotation or a transient failure at startup.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long the first mint retries transient CA failures before startup fails.
    pub startup_budget: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        // ztunnel's pacing: 0.5 s doubling; capped lower (60 s) so a recovered CA is used soon.
        RotationPolicy {
            ttl: DEFAULT_CERT_TTL,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            startup_budget: DEFAULT_STARTUP_BUDGET,
        }
    }
}

/// Everything [`Identity::start`] needs; the caller decides the signer and its token source.
pub struct IdentityInputs {
    /// The identity to certify.
    pub identity: SpiffeId,
    /// Who signs.
    pub signer: Signer,
    /// `MESH_BASE_DIR`: files go to `<base>/var/run/secrets/istio.io/`.
    pub base_dir: PathBuf,
    /// Lifetime and retries.
    pub policy: RotationPolicy,
    /// Roots peers may chain to beyond the signer's own (mesh-env `CAROOT_*`, see
    /// [`roots::mesh_env_roots`]); published with the certificate and in `root-cert.pem`.
    pub trust_bundle: Vec<CertificateDer<'static>>,
}

/// Minting failed; each variant's message names the step and the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Building the CSR.
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    /// The CA call.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// The returned chain.
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
    /// Writing the files.
    #[error("{0}; check that MESH_BASE_DIR points to a writable directory")]
    Write(#[from] WriteError),
    /// rustls cannot use the key with the chain.
    #[error("the new workload key cannot be used for TLS: {0}")]
    Tls(#[from] rustls::Error),
}

impl IdentityError {
    /// Worth retrying: the CA (or a token hop before it) failed transiently.
    fn is_transient(&self) -> bool {
        match self {
            IdentityError::Sign(SignError::Grpc(e)) => e.is_transient(),
            _ => false,
        }
    }
}

/// Where Istio's agent and Envoy expect the workload certificate (pilot-agent `OUTPUT_CERTS`).
pub fn istio_output_dir(base_dir: &Path) -> PathBuf {
    base_dir.join("var/run/secrets/istio.io")
}

/// GKE's workload certificate directory (`certificates.pem`, `private_key.pem`,
/// `ca_certificates.pem`, what GKE mounts for pods with workload certificates), written too
/// for CAS: pilot-agent reads it with `CA_PROVIDER=GoogleGkeWorkloadCertificate`.
pub fn workload_spiffe_dir(base_dir: &Path) -> PathBuf {
    base_dir.join("var/run/secrets/workload-spiffe-credentials")
}

/// File names of one certificate layout: (chain, key, roots).
struct Layout {
    dir: PathBuf,
    chain: &'static str,
    key: &'static str,
    roots: &'static str,
}

/// The running identity: the store with the current certificate and the rotation task.
pub struct Identity {
    store: Arc<CertStore>,
    rotation: tokio::task::JoinHandle<()>,
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.rotation.abort();
    }
}

impl Identity {
    /// Mints the first certificate (an error here is a startup failure) and starts rotation.
    pub async fn start(inputs: IdentityInputs) -> Result<Identity, IdentityError> {
        let anchors = inputs.signer.roots();
        let mut layouts = vec![Layout {
            dir: istio_output_dir(&inputs.base_dir),
            chain: "cert-chain.pem",
            key: "key.pem",
            roots: "root-cert.pem",
        }];
        if matches!(inputs.signer, Signer::Cas(_)) {
            layouts.push(Layout {
                dir: workload_spiffe_dir(&inputs.base_dir),
                chain: "certificates.pem",
                key: "private_key.pem",
                roots: "ca_certificates.pem",
            });
        }
        let minter = Minter {
            identity: inputs.identity,
            bundle: roots::bundle(&anchors, &inputs.trust_bundle),
            anchors,
            signer: inputs.signer,
            layouts,
            ttl: inputs.policy.ttl,
        };
        let store = Arc::new(CertStore::default());
        let cert = minter.first_mint(&inputs.policy).await?;
        tracing::info!(
            identity = %minter.identity,
            ca = minter.signer.describe(),
            dir = %minter.layouts[0].dir.display(),
            "workload certificate minted and written"
        );
        store.publish(Arc::new(cert));
        let rotation = tokio::spawn(rotate(minter, store.clone(), inputs.policy));
        Ok(Identity { store, rotation })
    }

    /// The certificate store the data plane subscribes to.
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }
}

/// One mint: CSR, signature, verification, files.
struct Minter {
    identity: SpiffeId,
    signer: Signer,
    /// What the signer's chains must lead to.
    anchors: Vec<CertificateDer<'static>>,
    /// What peers may lead to: the anchors and the mesh-env roots.
    bundle: Vec<CertificateDer<'static>>,
    /// Where the files go (Istio's layout, and GKE's for CAS).
    layouts: Vec<Layout>,
    ttl: Duration,
}

impl Minter {
    async fn mint(&self) -> Result<WorkloadCert, IdentityError> {
        let request = csr::new_request(&self.identity)?;
        let chain_pem = self.signer.sign(&request.csr_pem, self.ttl).await?;
        let chain = verify::parse_pem_chain(&chain_pem)?;
        let verified = verify::verify_chain(
            chain,
            &self.anchors,
            &self.identity,
            &request.key.subject_public_key_info(),
            SystemTime::now(),
        )?;
        let cert = WorkloadCert::new(
            self.identity.clone(),
            verified.chain,
            request.key.serialize_der(),
            self.bundle.clone(),
            (verified.not_before, verified.not_after),
        )?;
        self.write(&cert, &request.key.serialize_pem())?;
        Ok(cert)
    }

    /// Writes the chain, the key and the roots in every layout, each layout as one generation
    /// ([`write_generation`]): a reader never pairs a new key with an old chain.
    fn write(&self, cert: &WorkloadCert, key_pem: &str) -> Result<(), WriteError> {
        let pems = |certs: &[CertificateDer<'_>]| certs.iter().map(to_pem).collect::<String>();
        let (chain, roots) = (pems(&cert.chain), pems(&cert.roots));
        for layout in &self.layouts {
            write_generation(
                &layout.dir,
                &[
                    (layout.key, key_pem.as_bytes(), Access::Secret),
                    (layout.chain, chain.as_bytes(), Access::Public),
                    (layout.roots, roots.as_bytes(), Access::Public),
                ],
            )?;
        }
        Ok(())
    }
}

impl Minter {
    /// The first certificate: transient CA failures are retried with backoff (one warning per
    /// attempt) until `policy.startup_budget` is spent; any other failure ends startup at once.
    async fn first_mint(&self, policy: &RotationPolicy) -> Result<WorkloadCert, IdentityError> {
        let deadline = tokio::time::Instant::now() + policy.startup_budget;
        let mut backoff =
            Backoff::until_success(policy.initial_backoff, policy.max_backoff).delays();
        let mut attempt = 1u32;
        loop {
            match self.mint().await {
                Ok(cert) => return Ok(cert),
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(e);
                    }
                    tracing::warn!(
                        error = %e,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        "first certificate: transient CA failure; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Replaces the certificate at (jittered) half-life; on failure keeps the old one and retries
/// with capped backoff until a new one is minted.
async fn rotate(minter: Minter, store: Arc<CertStore>, policy: RotationPolicy) {
    loop {
        let Some(cert) = store.current() else { return };
        let lifetime = cert
            .not_after
            .duration_since(cert.not_before)
            .unwrap_or_default();
        // Up to 5 % early, so instances started together do not hit the CA together.
        let due = cert.half_life() - lifetime.mul_f64(0.05 * crate::backoff::unit_random());
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tracing::info!(
            identity = %minter.identity,
            in_secs = wait.as_secs(),
            "certificate rotation scheduled at half-life"
        );
        wait_until(due, &store).await;
        let mut backoff =
            Backoff::until_success(policy.initial_backoff, policy.max_backoff).delays();
        loop {
            match minter.mint().await {
                Ok(new) => {
                    tracing::info!(identity = %minter.identity, "certificate rotated");
                    store.publish(Arc::new(new));
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    // Counted outside the log macro, which skips its fields when nothing
                    // records warnings.
                    let failures = ROTATION_FAILURES.increment();
                    tracing::warn!(
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        rotation_failures = failures,
                        "certificate rotation failed; keeping the current certificate"
                    );
                    store.record_failure(e.to_string());
                    crate::metrics::CERTIFICATE_REFRESH_FAILURES.inc();
                    nap(delay, &store).await;
                }
            }
        }
    }
}

/// Longest a rotation deadline is left to a monotonic timer before the wall clock is read
/// again: a timer stalls with a throttled or frozen CPU, the wall clock does not.
const WALL_CLOCK_RECHECK: Duration = Duration::from_secs(30);

/// Returns once the wall clock reaches `due`. Timers only pace the checks (at most
/// [`WALL_CLOCK_RECHECK`] apart); a connection that finds the certificate due wakes it at once.
async fn wait_until(due: SystemTime, store: &CertStore) {
    while let Ok(left) = due.duration_since(SystemTime::now()) {
        if left.is_zero() {
            return;
        }
        nap(left.min(WALL_CLOCK_RECHECK), store).await;
    }
}

/// Sleeps for `delay`, or less when a connection asks for a refresh.
async fn nap(delay: Duration, store: &CertStore) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = store.refresh_requested() => {}
    }
}
