//! SPIFFE identities (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`): what a
//! mesh certificate proves, and what authorization decides on.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// A workload identity in Istio's SPIFFE form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// Trust domain, e.g. `cluster.local` or `my-project.svc.id.goog`.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
}

/// A string that is not an Istio SPIFFE ID.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a SPIFFE ID of the form spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT"
)]
pub struct BadSpiffeId(pub String);

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

impl FromStr for SpiffeId {
    type Err = BadSpiffeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSpiffeId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(SpiffeId {
                    trust_domain: (*td).to_owned(),
                    namespace: (*ns).to_owned(),
                    service_account: (*sa).to_owned(),
                })
            }
            _ => Err(bad()),
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

/// The SPIFFE IDs among a certificate's URI SANs, in order (the first is "the" identity, as
/// in ztunnel). Unparsable certificates and non-SPIFFE URIs give none.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<SpiffeId> {
    uri_sans(cert.as_ref())
        .iter()
        .filter_map(|uri| uri.parse().ok())
        .collect()
}

/// Every URI SAN of a DER certificate, SPIFFE or not, in order; an unparsable certificate
/// has none. The one SAN reader of the workspace: peer authorization ([`identities`]),
/// krun's check of a CA's answer (which must name the whole list in its error) and the
/// tests all read SANs through it, so they cannot disagree on what a certificate claims.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// Who may connect: exact SPIFFE IDs, namespace patterns (`spiffe://td/ns/<ns>/*`), or, when
/// the list is empty, anyone from the given trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedPeers {
    trust_domain: String,
    principals: Vec<String>,
}

impl AllowedPeers {
    /// `principals` as in `KRUN_ALLOWED_PRINCIPALS`; empty means "same trust domain".
    pub fn new(trust_domain: impl Into<String>, principals: Vec<String>) -> Self {
        AllowedPeers {
            trust_domain: trust_domain.into(),
            principals,
        }
    }

    /// True when `peer` may reach the workload.
    pub fn allows(&self, peer: &SpiffeId) -> bool {
        if self.principals.is_empty() {
            return peer.trust_domain == self.trust_domain;
        }
        let id = peer.to_string();
        self.principals.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => id.starts_with(prefix),
            None => *p == id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("valid SPIFFE ID")
    }

    #[test]
    fn parses_only_the_istio_form() {
        assert_eq!(
            id("spiffe://td/ns/default/sa/web").to_string(),
            "spiffe://td/ns/default/sa/web"
        );
        assert!("spiffe://td/ns/default".parse::<SpiffeId>().is_err());
        assert!("spiffe://td/ns//sa/x".parse::<SpiffeId>().is_err());
        assert!("https://td/ns/a/sa/b".parse::<SpiffeId>().is_err());
    }

    #[test]
    fn allowed_peers_default_to_the_trust_domain() {
        let same_td = AllowedPeers::new("td", vec![]);
        assert!(same_td.allows(&id("spiffe://td/ns/a/sa/b")));
        assert!(!same_td.allows(&id("spiffe://other/ns/a/sa/b")));
        let listed = AllowedPeers::new(
            "td",
            vec![
                "spiffe://td/ns/prod/*".into(),
                "spiffe://td/ns/dev/sa/ci".into(),
            ],
        );
        assert!(listed.allows(&id("spiffe://td/ns/prod/sa/any")));
        assert!(listed.allows(&id("spiffe://td/ns/dev/sa/ci")));
        assert!(!listed.allows(&id("spiffe://td/ns/dev/sa/other")));
        assert!(!listed.allows(&id("spiffe://td/ns/production/sa/x")));
    }
}
