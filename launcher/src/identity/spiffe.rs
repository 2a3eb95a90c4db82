//! The workload's SPIFFE identity: the one name every certificate krun mints must carry.

use std::fmt;

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, Istio's identity form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// Trust domain, e.g. `my-project.svc.id.goog` or `cluster.local`.
    pub trust_domain: String,
    /// K8s namespace of the workload.
    pub namespace: String,
    /// K8s service account of the workload.
    pub service_account: String,
}

impl SpiffeId {
    /// The identity of `service_account` in `namespace` of `trust_domain`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}
