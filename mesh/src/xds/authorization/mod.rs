//! Istio authorization for the builtin data plane, as ztunnel enforces it: istiod pushes
//! `istio.security.Authorization` policies ([`proto`]) on the xDS stream, the
//! [`store::PolicyStore`] holds them, and [`MeshAuthorizer`] answers, for every inbound
//! stream, whether the policies that apply to the workload it reaches let it through.

pub mod policy;
pub mod proto;
pub mod store;

use std::sync::Arc;

use hbone::SpiffeId;
use hbone::authorize::{StreamAuthorizer, StreamFacts};
use tokio::sync::watch;

use super::WorkloadStore;
pub use store::{PolicyStore, PolicyTarget};

/// Answers the inbound listeners' per-stream question from what istiod pushed.
///
/// The workload a stream reaches is the one istiod lists at the stream's destination address
/// (ztunnel looks it up the same way), with the policies its entry selects; when istiod does
/// not list that address (a Cloud Run instance behind its front end), it is this workload by
/// its certificate: GLOBAL policies and those of its namespace apply.
pub struct MeshAuthorizer {
    policies: Arc<PolicyStore>,
    workloads: Arc<WorkloadStore>,
    local: Option<SpiffeId>,
}

impl MeshAuthorizer {
    /// An authorizer over istiod's `policies` and `workloads`, for the workload `local`.
    pub fn new(
        policies: Arc<PolicyStore>,
        workloads: Arc<WorkloadStore>,
        local: Option<SpiffeId>,
    ) -> Self {
        MeshAuthorizer {
            policies,
            workloads,
            local,
        }
    }

    fn target(&self, stream: &StreamFacts) -> PolicyTarget {
        match self.workloads.lookup(stream.destination.ip()) {
            Some(workload) => PolicyTarget {
                namespace: workload.identity.namespace,
                selected: workload.authorization_policies,
            },
            None => PolicyTarget {
                namespace: self
                    .local
                    .as_ref()
                    .map(|id| id.namespace.clone())
                    .unwrap_or_default(),
                selected: Vec::new(),
            },
        }
    }
}

impl StreamAuthorizer for MeshAuthorizer {
    fn authorize(&self, stream: &StreamFacts) -> Result<(), String> {
        self.policies.decide(&self.target(stream), stream)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.policies.changes()
    }
}
