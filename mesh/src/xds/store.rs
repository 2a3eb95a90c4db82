//! What istiod said about the mesh's workloads, indexed for the data plane's per-connection
//! question "is this address a mesh workload, and whose identity must it prove?". The xDS
//! client only writes it ([`WorkloadStore::apply`]); the proxies only read it
//! ([`WorkloadStore::lookup`]). It survives istiod outages: nothing but istiod's own removals
//! takes an entry out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;

use hbone::SpiffeId;

use super::proto::{TunnelProtocol, Workload};

/// Istio's defaults for fields the control plane elides.
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// A workload as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownWorkload {
    /// istiod's resource name (the workload's uid), for logs.
    pub name: String,
    /// The identity its certificate must carry.
    pub identity: SpiffeId,
    /// True when it accepts HBONE on 15008 (it is in the ambient mesh).
    pub hbone: bool,
    /// The WORKLOAD_SELECTOR authorization policies selecting it (`namespace/name`).
    pub authorization_policies: Vec<String>,
}

#[derive(Default)]
struct Index {
    /// Resource name -> its addresses and version.
    by_name: HashMap<String, (Vec<IpAddr>, String)>,
    by_ip: HashMap<IpAddr, KnownWorkload>,
}

/// The workloads istiod pushed, by address.
#[derive(Default)]
pub struct WorkloadStore {
    index: RwLock<Index>,
}

impl WorkloadStore {
    /// The workload at `ip`, if istiod listed one.
    pub fn lookup(&self, ip: IpAddr) -> Option<KnownWorkload> {
        self.read().by_ip.get(&ip).cloned()
    }

    /// How many workloads are known.
    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    /// True when istiod listed nothing (yet).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resource name -> version of everything held: what a reconnecting client tells istiod
    /// it already has, so istiod sends only the differences (removals included).
    pub fn versions(&self) -> HashMap<String, String> {
        self.read()
            .by_name
            .iter()
            .map(|(name, (_, version))| (name.clone(), version.clone()))
            .collect()
    }

    /// Adds or replaces the workload named `name` at `version`.
    pub fn upsert(&self, name: &str, version: &str, workload: &Workload) -> Result<(), String> {
        let mut addresses = Vec::with_capacity(workload.addresses.len());
        for raw in &workload.addresses {
            addresses.push(ip_of(raw).ok_or_else(|| {
                format!(
                    "workload {name}: an address of {} bytes is neither IPv4 nor IPv6",
                    raw.len()
                )
            })?);
        }
        let known = KnownWorkload {
            name: name.to_owned(),
            identity: SpiffeId::new(
                or_default(&workload.trust_domain, DEFAULT_TRUST_DOMAIN),
                &workload.namespace,
                or_default(&workload.service_account, DEFAULT_SERVICE_ACCOUNT),
            ),
            hbone: workload.tunnel_protocol == TunnelProtocol::Hbone as i32,
            authorization_policies: workload.authorization_policies.clone(),
        };
        let mut index = self.write();
        remove(&mut index, name);
        for ip in &addresses {
            index.by_ip.insert(*ip, known.clone());
        }
        index
            .by_name
            .insert(name.to_owned(), (addresses, version.to_owned()));
        Ok(())
    }

    /// Removes the workload named `name`; true when it was known.
    pub fn remove(&self, name: &str) -> bool {
        remove(&mut self.write(), name)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn remove(index: &mut Index, name: &str) -> bool {
    let Some((addresses, _)) = index.by_name.remove(name) else {
        return false;
    };
    for ip in addresses {
        if index.by_ip.get(&ip).is_some_and(|w| w.name == name) {
            index.by_ip.remove(&ip);
        }
    }
    true
}

fn or_default<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

/// A 4- or 16-byte address as istiod encodes it.
fn ip_of(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ip: [u8; 4], sa: &str, hbone: bool) -> Workload {
        Workload {
            name: "pod".into(),
            namespace: "prod".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: if hbone {
                TunnelProtocol::Hbone as i32
            } else {
                TunnelProtocol::None as i32
            },
            trust_domain: String::new(),
            service_account: sa.into(),
            ..Default::default()
        }
    }

    /// Pushes add, replace (moving the address) and remove; elided fields take Istio's
    /// defaults.
    #[test]
    fn upsert_replace_and_remove() {
        let store = WorkloadStore::default();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        store
            .upsert("w1", "1", &workload([10, 0, 0, 5], "", true))
            .expect("valid");
        let known = store.lookup(ip("10.0.0.5")).expect("listed");
        assert_eq!(
            known.identity.to_string(),
            "spiffe://cluster.local/ns/prod/sa/default"
        );
        assert!(known.hbone);
        store
            .upsert("w1", "2", &workload([10, 0, 0, 6], "db", false))
            .expect("valid");
        assert_eq!(store.lookup(ip("10.0.0.5")), None);
        assert!(!store.lookup(ip("10.0.0.6")).expect("moved").hbone);
        assert_eq!(store.versions().get("w1").map(String::as_str), Some("2"));
        assert!(store.remove("w1"));
        assert!(!store.remove("w1"));
        assert!(store.is_empty());
        assert_eq!(store.lookup(ip("10.0.0.6")), None);
    }

    /// An address that is not 4 or 16 bytes is refused with the workload's name.
    #[test]
    fn a_bad_address_is_refused() {
        let mut bad = workload([10, 0, 0, 5], "", true);
        bad.addresses = vec![vec![1, 2, 3]];
        let e = WorkloadStore::default()
            .upsert("w9", "1", &bad)
            .expect_err("bad");
        assert!(e.contains("workload w9"), "{e}");
    }
}
