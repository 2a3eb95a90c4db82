//! The authorization policies istiod pushed, and the decision they give for one stream as
//! ztunnel makes it (`state.rs::assert_rbac`): of the policies that apply to the workload
//! (GLOBAL ones, NAMESPACE ones of its namespace, WORKLOAD_SELECTOR ones its own xDS entry
//! lists), a matching DENY refuses; otherwise, when any ALLOW applies, one must match;
//! with no ALLOW policy the stream is allowed. Like the workload store it survives istiod
//! outages; every change bumps a generation open streams watch to be checked again.

use std::collections::HashMap;
use std::sync::RwLock;

use hbone::authorize::StreamFacts;
use tokio::sync::watch;

use super::policy::{Policy, PolicyAction, PolicyScope};
use super::proto::Authorization;

/// The workload a stream reaches, as far as policy scope is concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTarget {
    /// Its namespace (NAMESPACE-scoped policies of it apply).
    pub namespace: String,
    /// The `namespace/name` keys of the WORKLOAD_SELECTOR policies selecting it.
    pub selected: Vec<String>,
}

/// The policies istiod pushed, by resource name (`namespace/name`).
pub struct PolicyStore {
    policies: RwLock<HashMap<String, (Policy, String)>>,
    generation: watch::Sender<u64>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        PolicyStore {
            policies: RwLock::default(),
            generation: watch::Sender::new(0),
        }
    }
}

impl PolicyStore {
    /// Adds or replaces the policy named `name` at `version`.
    pub fn upsert(&self, name: &str, version: &str, policy: &Authorization) -> Result<(), String> {
        let policy = Policy::from_xds(policy)?;
        self.write()
            .insert(name.to_owned(), (policy, version.to_owned()));
        Ok(())
    }

    /// Removes the policy named `name`; true when it was known.
    pub fn remove(&self, name: &str) -> bool {
        self.write().remove(name).is_some()
    }

    /// Tells open streams that the policies changed (once per applied push).
    pub fn publish(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes after every applied push.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How many policies are known.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True when istiod sent no policy (yet).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resource name -> version, for a reconnecting client's `initial_resource_versions`.
    pub fn versions(&self) -> HashMap<String, String> {
        self.read()
            .iter()
            .map(|(name, (_, version))| (name.clone(), version.clone()))
            .collect()
    }

    /// `Ok` when `stream` to `target` may proceed, else why not, naming the policy.
    pub fn decide(&self, target: &PolicyTarget, stream: &StreamFacts) -> Result<(), String> {
        let policies = self.read();
        let applying = || {
            policies
                .values()
                .map(|(policy, _)| policy)
                .filter(|policy| applies(policy, target))
        };
        if let Some(deny) = applying().find(|p| p.action == PolicyAction::Deny && p.matches(stream))
        {
            return Err(format!("denied by DENY policy {}", deny.key));
        }
        let mut allows = applying()
            .filter(|p| p.action == PolicyAction::Allow)
            .peekable();
        if allows.peek().is_none() {
            return Ok(());
        }
        let mut keys = Vec::new();
        for allow in allows {
            if allow.matches(stream) {
                return Ok(());
            }
            keys.push(allow.key.as_str());
        }
        keys.sort_unstable();
        Err(format!("no ALLOW policy matched ({})", keys.join(", ")))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, (Policy, String)>> {
        self.policies.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, (Policy, String)>> {
        self.policies.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn applies(policy: &Policy, target: &PolicyTarget) -> bool {
    match policy.scope {
        PolicyScope::Global => true,
        PolicyScope::Namespace => policy.namespace == target.namespace,
        PolicyScope::WorkloadSelector => target.selected.contains(&policy.key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::authorization::proto::{
        Action, Address, Group, Match, MatchType, Rules, Scope, StringMatch,
    };
    use hbone::SpiffeId;

    fn exact(s: &str) -> StringMatch {
        StringMatch {
            match_type: Some(MatchType::Exact(s.into())),
        }
    }

    fn policy(ns: &str, name: &str, scope: Scope, action: Action, m: Match) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope: scope as i32,
            action: action as i32,
            groups: vec![Group {
                rules: vec![Rules { matches: vec![m] }],
            }],
        }
    }

    fn stream(peer: &str, source: &str, port: u16) -> StreamFacts {
        StreamFacts {
            peer: Some(peer.parse::<SpiffeId>().expect("id")),
            source: format!("{source}:40000").parse().expect("addr"),
            destination: format!("10.0.0.9:{port}").parse().expect("addr"),
        }
    }

    fn prod() -> PolicyTarget {
        PolicyTarget {
            namespace: "prod".into(),
            selected: Vec::new(),
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/prod/sa/client";
    const OTHER: &str = "spiffe://cluster.local/ns/dev/sa/other";

    /// No policy allows; a matching DENY refuses naming itself, and wins over an ALLOW that
    /// matches too; its removal allows again.
    #[test]
    fn deny_first_then_allow() {
        let store = PolicyStore::default();
        assert_eq!(
            store.decide(&prod(), &stream(CLIENT, "10.1.1.1", 80)),
            Ok(())
        );
        let deny = Match {
            principals: vec![exact("cluster.local/ns/prod/sa/client")],
            ..Default::default()
        };
        let allow_all = Match {
            namespaces: vec![StringMatch {
                match_type: Some(MatchType::Presence(())),
            }],
            ..Default::default()
        };
        store
            .upsert(
                "prod/no-client",
                "1",
                &policy("prod", "no-client", Scope::Namespace, Action::Deny, deny),
            )
            .expect("valid");
        store
            .upsert(
                "prod/all",
                "1",
                &policy("prod", "all", Scope::Namespace, Action::Allow, allow_all),
            )
            .expect("valid");
        let denied = store.decide(&prod(), &stream(CLIENT, "10.1.1.1", 80));
        assert_eq!(denied, Err("denied by DENY policy prod/no-client".into()));
        assert_eq!(
            store.decide(&prod(), &stream(OTHER, "10.1.1.1", 80)),
            Ok(())
        );
        assert!(store.remove("prod/no-client"));
        assert_eq!(
            store.decide(&prod(), &stream(CLIENT, "10.1.1.1", 80)),
            Ok(())
        );
    }

    /// Once an ALLOW policy applies, a stream it does not match is refused; ports, source
    /// ranges and their `not_` forms all take part, kinds AND-ed.
    #[test]
    fn allow_needs_a_match_of_every_kind_given() {
        let store = PolicyStore::default();
        let m = Match {
            namespaces: vec![StringMatch {
                match_type: Some(MatchType::Prefix("pro".into())),
            }],
            source_ips: vec![Address {
                address: vec![10, 1, 0, 0],
                length: 16,
            }],
            not_source_ips: vec![Address {
                address: vec![10, 1, 9, 9],
                length: 32,
            }],
            destination_ports: vec![80, 8080],
            not_principals: vec![StringMatch {
                match_type: Some(MatchType::Suffix("/sa/evil".into())),
            }],
            ..Default::default()
        };
        store
            .upsert(
                "prod/web",
                "1",
                &policy("prod", "web", Scope::Namespace, Action::Allow, m),
            )
            .expect("valid");
        let decide = |s: StreamFacts| store.decide(&prod(), &s);
        assert_eq!(decide(stream(CLIENT, "10.1.2.3", 8080)), Ok(()));
        let refused = Err("no ALLOW policy matched (prod/web)".to_owned());
        assert_eq!(decide(stream(CLIENT, "10.1.2.3", 22)), refused, "port");
        assert_eq!(
            decide(stream(CLIENT, "10.2.2.3", 80)),
            refused,
            "source range"
        );
        assert_eq!(
            decide(stream(CLIENT, "10.1.9.9", 80)),
            refused,
            "not_source_ips"
        );
        assert_eq!(
            decide(stream(OTHER, "10.1.2.3", 80)),
            refused,
            "namespace prefix"
        );
        let evil = "spiffe://cluster.local/ns/prod/sa/evil";
        assert_eq!(
            decide(stream(evil, "10.1.2.3", 80)),
            refused,
            "not_principals"
        );
        let anonymous = StreamFacts {
            peer: None,
            ..stream(CLIENT, "10.1.2.3", 80)
        };
        assert_eq!(decide(anonymous), refused, "no identity, no namespace");
    }

    /// GLOBAL policies apply everywhere, NAMESPACE ones in their namespace, selector ones
    /// only to workloads listing them.
    #[test]
    fn scope_decides_which_workloads_a_policy_applies_to() {
        let store = PolicyStore::default();
        let everyone = || Match {
            not_namespaces: vec![exact("nobody")],
            ..Default::default()
        };
        store
            .upsert(
                "dev/ns",
                "1",
                &policy("dev", "ns", Scope::Namespace, Action::Deny, everyone()),
            )
            .expect("valid");
        store
            .upsert(
                "prod/sel",
                "1",
                &policy(
                    "prod",
                    "sel",
                    Scope::WorkloadSelector,
                    Action::Deny,
                    everyone(),
                ),
            )
            .expect("valid");
        let s = stream(CLIENT, "10.1.1.1", 80);
        assert_eq!(store.decide(&prod(), &s), Ok(()), "neither applies to prod");
        let selected = PolicyTarget {
            selected: vec!["prod/sel".into()],
            ..prod()
        };
        assert!(store.decide(&selected, &s).is_err());
        store
            .upsert(
                "istio-system/g",
                "1",
                &policy("istio-system", "g", Scope::Global, Action::Deny, everyone()),
            )
            .expect("valid");
        assert_eq!(
            store.decide(&prod(), &s),
            Err("denied by DENY policy istio-system/g".into())
        );
    }

    /// A malformed policy is refused naming it; versions are kept for reconnects; every
    /// publish wakes the watchers.
    #[test]
    fn bad_policies_are_refused_and_changes_are_published() {
        let store = PolicyStore::default();
        let bad = Match {
            source_ips: vec![Address {
                address: vec![1, 2, 3],
                length: 8,
            }],
            ..Default::default()
        };
        let e = store
            .upsert(
                "prod/bad",
                "1",
                &policy("prod", "bad", Scope::Global, Action::Allow, bad),
            )
            .expect_err("bad");
        assert!(e.contains("policy prod/bad"), "{e}");
        let unknown = Authorization {
            action: 7,
            ..policy(
                "prod",
                "odd",
                Scope::Global,
                Action::Allow,
                Match::default(),
            )
        };
        assert!(store.upsert("prod/odd", "1", &unknown).is_err());
        assert!(store.is_empty());
        let changes = store.changes();
        store.publish();
        assert!(changes.has_changed().expect("open"));
        store
            .upsert(
                "prod/ok",
                "3",
                &policy("prod", "ok", Scope::Global, Action::Allow, Match::default()),
            )
            .expect("valid");
        assert_eq!(
            store.versions().get("prod/ok").map(String::as_str),
            Some("3")
        );
    }
}
