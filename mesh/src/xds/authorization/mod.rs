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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::authorization::proto::{Action, Authorization, Group, Rules, Scope};
    use crate::xds::proto::Workload;

    /// Denies everyone (a rule without matches holds).
    fn deny_all(ns: &str, name: &str, scope: Scope) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope: scope as i32,
            action: Action::Deny as i32,
            groups: vec![Group {
                rules: vec![Rules::default()],
            }],
        }
    }

    fn stream_to(destination: &str) -> StreamFacts {
        StreamFacts {
            peer: "spiffe://cluster.local/ns/x/sa/y".parse().ok(),
            source: "10.1.1.1:4000".parse().expect("addr"),
            destination: destination.parse().expect("addr"),
        }
    }

    /// A stream to an address istiod lists takes that workload's namespace and selector
    /// policies; any other address is this workload by its certificate's namespace, where
    /// selector policies cannot apply.
    #[test]
    fn the_workload_reached_decides_which_policies_apply() {
        let (policies, workloads) = (
            Arc::<PolicyStore>::default(),
            Arc::<WorkloadStore>::default(),
        );
        let listed = Workload {
            namespace: "shop".into(),
            addresses: vec![vec![10, 0, 0, 5]],
            authorization_policies: vec!["shop/sel".into()],
            ..Default::default()
        };
        workloads.upsert("w", "1", &listed).expect("valid");
        policies
            .upsert(
                "shop/sel",
                "1",
                &deny_all("shop", "sel", Scope::WorkloadSelector),
            )
            .expect("valid");
        policies
            .upsert("prod/ns", "1", &deny_all("prod", "ns", Scope::Namespace))
            .expect("valid");
        let local = "spiffe://cluster.local/ns/prod/sa/me".parse().ok();
        let authorizer = MeshAuthorizer::new(policies, workloads, local);
        assert_eq!(
            authorizer.authorize(&stream_to("10.0.0.5:80")),
            Err("denied by DENY policy shop/sel".into())
        );
        assert_eq!(
            authorizer.authorize(&stream_to("127.0.0.1:80")),
            Err("denied by DENY policy prod/ns".into())
        );
    }
}
