//! The hook through which the embedder's authorization policy (Istio AuthorizationPolicy, in
//! krun) decides on every tunnel stream, and takes back its decision when the policy changes:
//! the protocol code asks, the embedder answers, so this crate stays free of policy.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::identity::SpiffeId;

/// The facts of one stream a policy decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamFacts {
    /// The peer's verified identity (none on a plaintext listener).
    pub peer: Option<SpiffeId>,
    /// The peer's address.
    pub source: SocketAddr,
    /// The workload address and the port the stream reaches.
    pub destination: SocketAddr,
}

/// Decides whether a stream may proceed, and says when that may have changed.
pub trait StreamAuthorizer: Send + Sync + 'static {
    /// `Ok` when the stream may proceed; otherwise why not, naming the policy.
    fn authorize(&self, stream: &StreamFacts) -> Result<(), String>;
    /// Changes value whenever the policy changed: open streams are checked again then.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Resolves, with the reason, once a policy change denies `stream`; never while it is
/// allowed. Streams race their copy loop against this to be closed when revoked. `changes`
/// must be taken before the stream's first check, so a change between the two is not missed.
pub async fn revoked(
    authorizer: &Arc<dyn StreamAuthorizer>,
    stream: &StreamFacts,
    mut changes: watch::Receiver<u64>,
) -> String {
    loop {
        if changes.changed().await.is_err() {
            // The policy source is gone: its last decision stands.
            return std::future::pending().await;
        }
        if let Err(reason) = authorizer.authorize(stream) {
            return reason;
        }
    }
}

/// Resolves once a policy change denies the stream, logged (peer, reason naming the policy)
/// and counted in [`crate::metrics::REVOKED`]; never without an authorizer. A stream races its
/// copy against it; `authorization` is the authorizer with the changes taken before the
/// stream's first check.
pub async fn revocation(
    authorization: Option<(Arc<dyn StreamAuthorizer>, watch::Receiver<u64>)>,
    facts: &StreamFacts,
) {
    let Some((authorizer, changes)) = authorization else {
        return std::future::pending().await;
    };
    let reason = revoked(&authorizer, facts, changes).await;
    let revoked_total = crate::metrics::REVOKED.increment();
    let peer = facts.peer.as_ref().map(ToString::to_string);
    tracing::warn!(remote = %facts.source, peer = ?peer, %reason, revoked_total, "open stream closed: a policy change denies it");
}
