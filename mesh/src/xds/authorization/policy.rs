//! One authorization policy as the data plane evaluates it, converted once from istiod's
//! message ([`Policy::from_xds`]) and matched per stream ([`Policy::matches`]) with ztunnel's
//! semantics (`src/rbac.rs`): groups are OR-ed, the rules of a group AND-ed, the matches of a
//! rule OR-ed; inside a match every kind given must hold (one of its values, none of its
//! `not_` values); a policy without groups matches nothing.

use std::net::IpAddr;

use hbone::authorize::StreamFacts;
use ipnet::IpNet;

use super::proto::{self, Action, MatchType, Scope};

/// Which workloads a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyScope {
    /// Every workload of the mesh (a policy in the root namespace).
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// The workloads whose own xDS entry lists the policy.
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    /// Lets the stream through (when any ALLOW policy applies, one must match).
    Allow,
    /// Refuses the stream.
    Deny,
}

/// A policy, ready to match.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// `namespace/name`, the key workloads list it under.
    pub key: String,
    /// The policy's namespace.
    pub namespace: String,
    /// Who it applies to.
    pub scope: PolicyScope,
    /// What it does.
    pub action: PolicyAction,
    groups: Vec<Vec<Vec<Match>>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Match {
    namespaces: Either<StringMatch>,
    principals: Either<StringMatch>,
    source_ips: Either<IpNet>,
    destination_ips: Either<IpNet>,
    destination_ports: Either<u16>,
}

/// The values of one kind and their `not_` form.
#[derive(Clone, Debug, PartialEq)]
struct Either<T> {
    any_of: Vec<T>,
    none_of: Vec<T>,
}

impl<T> Default for Either<T> {
    fn default() -> Self {
        Either {
            any_of: Vec::new(),
            none_of: Vec::new(),
        }
    }
}

impl<T> Either<T> {
    fn holds(&self, predicate: impl Fn(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&predicate))
            && !self.none_of.iter().any(predicate)
    }

    fn is_empty(&self) -> bool {
        self.any_of.is_empty() && self.none_of.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl Match {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.principals.is_empty()
            && self.source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.destination_ports.is_empty()
    }

    fn matches(&self, stream: &StreamFacts) -> bool {
        // Istio writes principals without `spiffe://` (`cluster.local/ns/a/sa/b`); a stream
        // without an identity has the empty namespace, as in ztunnel. The principal is only
        // formatted when a rule names one (this runs per stream and per push).
        let namespace = stream.peer.as_ref().map_or("", |p| p.namespace.as_str());
        let principal_holds = match &stream.peer {
            _ if self.principals.is_empty() => true,
            Some(peer) => {
                let principal = peer.to_string();
                let principal = principal.trim_start_matches("spiffe://");
                self.principals.holds(|m| m.matches(principal))
            }
            // ztunnel: a principal match needs an identity to match at all.
            None => self.principals.any_of.is_empty(),
        };
        principal_holds
            && self.namespaces.holds(|m| m.matches(namespace))
            && self
                .source_ips
                .holds(|net| net.contains(&stream.source.ip()))
            && self
                .destination_ips
                .holds(|net| net.contains(&stream.destination.ip()))
            && self
                .destination_ports
                .holds(|port| *port == stream.destination.port())
    }
}

impl Policy {
    /// Converts istiod's message; an unknown scope or action, or a malformed address, is an
    /// error naming the policy (the push is then NACKed).
    pub fn from_xds(policy: &proto::Authorization) -> Result<Policy, String> {
        let key = format!("{}/{}", policy.namespace, policy.name);
        let scope = match Scope::try_from(policy.scope) {
            Ok(Scope::Global) => PolicyScope::Global,
            Ok(Scope::Namespace) => PolicyScope::Namespace,
            Ok(Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
            Err(_) => return Err(format!("policy {key}: unknown scope {}", policy.scope)),
        };
        let action = match Action::try_from(policy.action) {
            Ok(Action::Allow) => PolicyAction::Allow,
            Ok(Action::Deny) => PolicyAction::Deny,
            Err(_) => return Err(format!("policy {key}: unknown action {}", policy.action)),
        };
        let mut groups = Vec::with_capacity(policy.groups.len());
        for group in &policy.groups {
            let mut rules = Vec::with_capacity(group.rules.len());
            for rule in &group.rules {
                let matches = rule.matches.iter().map(|m| convert(m, &key));
                rules.push(matches.collect::<Result<Vec<Match>, String>>()?);
            }
            groups.push(rules);
        }
        Ok(Policy {
            key,
            namespace: policy.namespace.clone(),
            scope,
            action,
            groups,
        })
    }

    /// True when the policy's rules match `stream` (whatever its action).
    pub fn matches(&self, stream: &StreamFacts) -> bool {
        self.groups.iter().any(|rules| {
            rules.iter().all(|matches| {
                // A rule without matches holds; an empty match never does.
                matches.is_empty() || matches.iter().any(|m| !m.is_empty() && m.matches(stream))
            })
        })
    }
}

fn convert(m: &proto::Match, key: &str) -> Result<Match, String> {
    let strings = |values: &[proto::StringMatch]| -> Vec<StringMatch> {
        values
            .iter()
            .filter_map(|v| {
                Some(match v.match_type.as_ref()? {
                    MatchType::Exact(s) => StringMatch::Exact(s.clone()),
                    MatchType::Prefix(s) => StringMatch::Prefix(s.clone()),
                    MatchType::Suffix(s) => StringMatch::Suffix(s.clone()),
                    MatchType::Presence(()) => StringMatch::Presence,
                })
            })
            .collect()
    };
    let nets = |values: &[proto::Address]| -> Result<Vec<IpNet>, String> {
        values.iter().map(|a| net(a, key)).collect()
    };
    let ports = |values: &[u32]| -> Result<Vec<u16>, String> {
        values
            .iter()
            .map(|p| u16::try_from(*p).map_err(|_| format!("policy {key}: port {p} out of range")))
            .collect()
    };
    Ok(Match {
        namespaces: Either {
            any_of: strings(&m.namespaces),
            none_of: strings(&m.not_namespaces),
        },
        principals: Either {
            any_of: strings(&m.principals),
            none_of: strings(&m.not_principals),
        },
        source_ips: Either {
            any_of: nets(&m.source_ips)?,
            none_of: nets(&m.not_source_ips)?,
        },
        destination_ips: Either {
            any_of: nets(&m.destination_ips)?,
            none_of: nets(&m.not_destination_ips)?,
        },
        destination_ports: Either {
            any_of: ports(&m.destination_ports)?,
            none_of: ports(&m.not_destination_ports)?,
        },
    })
}

fn net(address: &proto::Address, key: &str) -> Result<IpNet, String> {
    let ip = match address.address.len() {
        4 => <[u8; 4]>::try_from(address.address.as_slice())
            .map(IpAddr::from)
            .ok(),
        16 => <[u8; 16]>::try_from(address.address.as_slice())
            .map(IpAddr::from)
            .ok(),
        _ => None,
    }
    .ok_or_else(|| {
        format!(
            "policy {key}: an address of {} bytes is neither IPv4 nor IPv6",
            address.address.len()
        )
    })?;
    let length = u8::try_from(address.length).unwrap_or(u8::MAX);
    IpNet::new(ip, length)
        .map_err(|_| format!("policy {key}: {ip}/{} is not a prefix", address.length))
}
