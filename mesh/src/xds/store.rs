//! What istiod said about the mesh's workloads and services, indexed for the data plane's
//! per-connection question "where does a connection to this address go, and whose identity
//! must the peer prove?". The xDS client only writes it ([`WorkloadStore::upsert`],
//! [`WorkloadStore::upsert_service`], [`WorkloadStore::remove`]); the proxies only read it
//! ([`WorkloadStore::resolve`]) and the DNS answerer asks it for a Service's VIPs
//! ([`WorkloadStore::service_vips`]). It survives istiod outages: nothing but istiod's own
//! removals takes an entry out.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use hbone::SpiffeId;

use super::proto::{
    GatewayAddress, GatewayDestination, Port, Service, TunnelProtocol, Workload, WorkloadStatus,
};

/// Istio's defaults for fields the control plane elides.
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// A waypoint's HBONE port when istiod leaves it out.
const DEFAULT_WAYPOINT_PORT: u16 = 15008;

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

/// Where one outbound connection goes, as istiod's state says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// istiod lists nothing at this address.
    Unlisted,
    /// A workload, reached directly at the address the app named.
    Workload(KnownWorkload),
    /// A Service VIP or a workload behind a waypoint: the connection goes to another place
    /// than the app named.
    Hop(Hop),
    /// A Service VIP with no healthy endpoint: the connection must be refused.
    NoEndpoint {
        /// The service's hostname, for the log line.
        service: String,
    },
}

/// The upstream picked for a Service VIP or a waypoint, as ztunnel builds it: HBONE to an
/// endpoint (`peer` its pod IP, `authority` its pod IP and target port), HBONE to a waypoint
/// (`peer` the waypoint's HBONE address, `authority` the address the app named), or plain TCP
/// to an endpoint outside the ambient mesh (`authority`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// What the hop is for, for logs: the service hostname or `waypoint`.
    pub via: String,
    /// Where HBONE goes: the IP, and the port when it is not the peers' usual HBONE port
    /// (a waypoint's `hbone_mtls_port`). `None`: plain TCP to `authority`.
    pub peer: Option<(IpAddr, Option<u16>)>,
    /// The CONNECT authority (HBONE) or the plain TCP destination.
    pub authority: SocketAddr,
    /// The identity the peer must prove, when istiod lists the peer.
    pub identity: Option<SpiffeId>,
}

/// A waypoint as istiod names it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Waypoint {
    /// At an address.
    Ip(IpAddr, u16),
    /// The endpoints of the service `namespace/hostname`.
    Service(String, u16),
}

struct WorkloadEntry {
    known: KnownWorkload,
    addresses: Vec<IpAddr>,
    version: String,
    healthy: bool,
    waypoint: Option<Waypoint>,
    /// Service key (`namespace/hostname`) -> service port -> target port.
    services: Vec<(String, PortMap)>,
}

struct ServiceEntry {
    /// `namespace/hostname`, the key workloads name it by.
    key: String,
    hostname: String,
    vips: Vec<IpAddr>,
    version: String,
    /// Service port -> target port (0: the same port).
    ports: PortMap,
    waypoint: Option<Waypoint>,
    /// Round-robin position among the healthy endpoints.
    next: AtomicUsize,
}

#[derive(Default)]
struct Index {
    /// Resource name -> workload.
    workloads: HashMap<String, WorkloadEntry>,
    /// Address -> workload resource name.
    by_ip: HashMap<IpAddr, String>,
    /// Resource name -> service.
    services: HashMap<String, ServiceEntry>,
    /// VIP -> service resource name.
    by_vip: HashMap<IpAddr, String>,
    /// Service key (`namespace/hostname`) -> service resource name.
    by_key: HashMap<String, String>,
    /// Lower-case hostname -> service resource names (one per namespace that declares it).
    by_host: HashMap<String, BTreeSet<String>>,
    /// Service key -> resource names of the workloads naming it, healthy or not.
    endpoints: HashMap<String, BTreeSet<String>>,
}

/// The workloads and services istiod pushed, by address.
#[derive(Default)]
pub struct WorkloadStore {
    index: RwLock<Index>,
}

impl WorkloadStore {
    /// The workload at `ip`, if istiod listed one.
    pub fn lookup(&self, ip: IpAddr) -> Option<KnownWorkload> {
        let index = self.read();
        index.workload_at(ip).map(|w| w.known.clone())
    }

    /// Where a connection to `target` goes: a Service VIP first (as ztunnel looks it up), then
    /// a workload address.
    pub fn resolve(&self, target: SocketAddr) -> Resolved {
        let index = self.read();
        if let Some(service) = index
            .by_vip
            .get(&target.ip())
            .and_then(|n| index.services.get(n))
        {
            return index.through_service(service, target);
        }
        let Some(workload) = index.workload_at(target.ip()) else {
            return Resolved::Unlisted;
        };
        match &workload.waypoint {
            Some(waypoint) => index.through_waypoint(waypoint, target),
            None => Resolved::Workload(workload.known.clone()),
        }
    }

    /// The VIPs of the service named `hostname` (its FQDN), for DNS.
    pub fn service_vips(&self, hostname: &str) -> Vec<IpAddr> {
        let index = self.read();
        let Some(names) = index.by_host.get(&hostname.to_ascii_lowercase()) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| index.services.get(name))
            .flat_map(|s| s.vips.iter().copied())
            .collect()
    }

    /// How many workloads are known.
    pub fn len(&self) -> usize {
        self.read().workloads.len()
    }

    /// How many services are known.
    pub fn services(&self) -> usize {
        self.read().services.len()
    }

    /// True when istiod listed nothing (yet).
    pub fn is_empty(&self) -> bool {
        let index = self.read();
        index.workloads.is_empty() && index.services.is_empty()
    }

    /// Resource name -> version of everything held: what a reconnecting client tells istiod
    /// it already has, so istiod sends only the differences (removals included).
    pub fn versions(&self) -> HashMap<String, String> {
        let index = self.read();
        let workloads = index.workloads.iter().map(|(n, w)| (n, &w.version));
        let services = index.services.iter().map(|(n, s)| (n, &s.version));
        workloads
            .chain(services)
            .map(|(name, version)| (name.clone(), version.clone()))
            .collect()
    }

    /// Adds or replaces the workload named `name` at `version`.
    pub fn upsert(&self, name: &str, version: &str, workload: &Workload) -> Result<(), String> {
        let what = || format!("workload {name}");
        let addresses = workload
            .addresses
            .iter()
            .map(|raw| ip_of(raw, &what))
            .collect::<Result<Vec<_>, _>>()?;
        let waypoint = workload
            .waypoint
            .as_ref()
            .map(|w| waypoint_of(w, &what))
            .transpose()?;
        let services = workload
            .services
            .iter()
            .map(|(key, list)| Ok((key.clone(), PortMap::new(&list.ports, &what)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let entry = WorkloadEntry {
            known: KnownWorkload {
                name: name.to_owned(),
                identity: SpiffeId::new(
                    or_default(&workload.trust_domain, DEFAULT_TRUST_DOMAIN),
                    &workload.namespace,
                    or_default(&workload.service_account, DEFAULT_SERVICE_ACCOUNT),
                ),
                hbone: workload.tunnel_protocol == TunnelProtocol::Hbone as i32,
                authorization_policies: workload.authorization_policies.clone(),
            },
            addresses,
            version: version.to_owned(),
            healthy: workload.status == WorkloadStatus::Healthy as i32,
            waypoint,
            services,
        };
        let mut index = self.write();
        index.remove_workload(name);
        for ip in &entry.addresses {
            index.by_ip.insert(*ip, name.to_owned());
        }
        for (key, _) in &entry.services {
            let members = index.endpoints.entry(key.clone()).or_default();
            members.insert(name.to_owned());
        }
        index.workloads.insert(name.to_owned(), entry);
        Ok(())
    }

    /// Adds or replaces the service named `name` at `version`.
    pub fn upsert_service(
        &self,
        name: &str,
        version: &str,
        service: &Service,
    ) -> Result<(), String> {
        let what = || format!("service {name}");
        let vips = service
            .addresses
            .iter()
            .map(|a| ip_of(&a.address, &what))
            .collect::<Result<Vec<_>, _>>()?;
        let waypoint = service
            .waypoint
            .as_ref()
            .map(|w| waypoint_of(w, &what))
            .transpose()?;
        let entry = ServiceEntry {
            key: format!("{}/{}", service.namespace, service.hostname),
            hostname: service.hostname.clone(),
            vips,
            version: version.to_owned(),
            ports: PortMap::new(&service.ports, &what)?,
            waypoint,
            next: AtomicUsize::new(0),
        };
        let mut index = self.write();
        index.remove_service(name);
        for vip in &entry.vips {
            index.by_vip.insert(*vip, name.to_owned());
        }
        index.by_key.insert(entry.key.clone(), name.to_owned());
        let hosts = index.by_host.entry(entry.hostname.to_ascii_lowercase());
        hosts.or_default().insert(name.to_owned());
        index.services.insert(name.to_owned(), entry);
        Ok(())
    }

    /// Removes the workload or service named `name`; true when it was known.
    pub fn remove(&self, name: &str) -> bool {
        let mut index = self.write();
        index.remove_workload(name) || index.remove_service(name)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Index {
    fn workload_at(&self, ip: IpAddr) -> Option<&WorkloadEntry> {
        self.by_ip
            .get(&ip)
            .and_then(|name| self.workloads.get(name))
    }

    /// A connection to `service` at `target` (one of its VIPs): through its waypoint, else to
    /// a healthy endpoint picked round robin, on the target port.
    fn through_service(&self, service: &ServiceEntry, target: SocketAddr) -> Resolved {
        if let Some(waypoint) = &service.waypoint {
            return self.through_waypoint(waypoint, target);
        }
        let Some((ip, endpoint, ports)) = self.pick(service) else {
            return Resolved::NoEndpoint {
                service: service.hostname.clone(),
            };
        };
        let port = target_port(ports, &service.ports, target.port());
        let authority = SocketAddr::new(ip, port);
        let hbone = endpoint.known.hbone;
        Resolved::Hop(Hop {
            via: service.hostname.clone(),
            peer: hbone.then_some((ip, None)),
            authority,
            identity: hbone.then(|| endpoint.known.identity.clone()),
        })
    }

    /// A connection to `target` through `waypoint`: HBONE to the waypoint with the address the
    /// app named as the authority, as ztunnel sends it.
    fn through_waypoint(&self, waypoint: &Waypoint, target: SocketAddr) -> Resolved {
        let (ip, port) = match waypoint {
            Waypoint::Ip(ip, port) => (*ip, *port),
            Waypoint::Service(key, port) => {
                let picked = self
                    .by_key
                    .get(key)
                    .and_then(|name| self.services.get(name))
                    .and_then(|service| self.pick(service))
                    .map(|(ip, _, _)| ip);
                match picked {
                    Some(ip) => (ip, *port),
                    None => {
                        return Resolved::NoEndpoint {
                            service: format!("waypoint {key}"),
                        };
                    }
                }
            }
        };
        Resolved::Hop(Hop {
            via: "waypoint".to_owned(),
            peer: Some((ip, Some(port))),
            authority: target,
            identity: self.workload_at(ip).map(|w| w.known.identity.clone()),
        })
    }

    /// The next healthy endpoint of `service` with an address, round robin: that address,
    /// the endpoint, and its own port mapping for the service. Counted, then walked again to
    /// the turn's place (same order under the same lock): nothing allocated per connection.
    fn pick(&self, service: &ServiceEntry) -> Option<(IpAddr, &WorkloadEntry, &PortMap)> {
        let members = self.endpoints.get(&service.key)?;
        let healthy = || {
            members
                .iter()
                .filter_map(|name| self.workloads.get(name))
                .filter(|w| w.healthy)
                .filter_map(|w| Some((*w.addresses.first()?, w, w.ports_for(&service.key)?)))
        };
        let count = healthy().count();
        if count == 0 {
            return None;
        }
        let turn = service.next.fetch_add(1, Ordering::Relaxed);
        healthy().nth(turn % count)
    }

    fn remove_workload(&mut self, name: &str) -> bool {
        let Some(entry) = self.workloads.remove(name) else {
            return false;
        };
        for ip in entry.addresses {
            if self.by_ip.get(&ip).is_some_and(|n| n == name) {
                self.by_ip.remove(&ip);
            }
        }
        for (key, _) in &entry.services {
            if let Some(members) = self.endpoints.get_mut(key) {
                members.remove(name);
                if members.is_empty() {
                    self.endpoints.remove(key);
                }
            }
        }
        true
    }

    fn remove_service(&mut self, name: &str) -> bool {
        let Some(entry) = self.services.remove(name) else {
            return false;
        };
        for vip in entry.vips {
            if self.by_vip.get(&vip).is_some_and(|n| n == name) {
                self.by_vip.remove(&vip);
            }
        }
        if self.by_key.get(&entry.key).is_some_and(|n| n == name) {
            self.by_key.remove(&entry.key);
        }
        let host = entry.hostname.to_ascii_lowercase();
        if let Some(names) = self.by_host.get_mut(&host) {
            names.remove(name);
            if names.is_empty() {
                self.by_host.remove(&host);
            }
        }
        true
    }
}

/// Service port -> target port (0: the same port). A short list, not a map: services have a
/// handful of ports, and a map per workload would be most of the store's memory.
struct PortMap(Box<[(u16, u16)]>);

impl PortMap {
    /// The ports of `ports`, refusing any beyond 65535.
    fn new(ports: &[Port], what: &dyn Fn() -> String) -> Result<PortMap, String> {
        let port = |value: u32| {
            u16::try_from(value).map_err(|_| format!("{}: port {value} is beyond 65535", what()))
        };
        ports
            .iter()
            .map(|p| Ok((port(p.service_port)?, port(p.target_port)?)))
            .collect::<Result<Vec<_>, String>>()
            .map(|list| PortMap(list.into_boxed_slice()))
    }

    fn get(&self, service_port: u16) -> Option<u16> {
        self.0
            .iter()
            .find(|(port, _)| *port == service_port)
            .map(|(_, target)| *target)
    }
}

impl WorkloadEntry {
    /// This workload's own port mapping for the service `key`, when it is an endpoint of it.
    fn ports_for(&self, key: &str) -> Option<&PortMap> {
        self.services
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, ports)| ports)
    }
}

/// The port an endpoint serves `service_port` on, as ztunnel maps it: the endpoint's own
/// mapping, else the service's target port, else the same port.
fn target_port(endpoint: &PortMap, service: &PortMap, service_port: u16) -> u16 {
    [endpoint.get(service_port), service.get(service_port)]
        .into_iter()
        .flatten()
        .find(|port| *port != 0)
        .unwrap_or(service_port)
}

fn waypoint_of(gateway: &GatewayAddress, what: &dyn Fn() -> String) -> Result<Waypoint, String> {
    let port = match u16::try_from(gateway.hbone_mtls_port) {
        Ok(0) => DEFAULT_WAYPOINT_PORT,
        Ok(port) => port,
        Err(_) => {
            return Err(format!(
                "{}: waypoint port {} is beyond 65535",
                what(),
                gateway.hbone_mtls_port
            ));
        }
    };
    match &gateway.destination {
        Some(GatewayDestination::Address(address)) => {
            Ok(Waypoint::Ip(ip_of(&address.address, what)?, port))
        }
        Some(GatewayDestination::Hostname(host)) => Ok(Waypoint::Service(
            format!("{}/{}", host.namespace, host.hostname),
            port,
        )),
        None => Err(format!(
            "{}: a waypoint with neither address nor hostname",
            what()
        )),
    }
}

fn or_default<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

/// A 4- or 16-byte address as istiod encodes it.
fn ip_of(raw: &[u8], what: &dyn Fn() -> String) -> Result<IpAddr, String> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
    .ok_or_else(|| {
        format!(
            "{}: an address of {} bytes is neither IPv4 nor IPv6",
            what(),
            raw.len()
        )
    })
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
            service_account: sa.into(),
            ..Default::default()
        }
    }

    const SVC: &str = "prod/echo.prod.svc.cluster.local";

    /// `workload` as an endpoint of [`SVC`] mapping 80 to `target` (0: no own mapping).
    fn endpoint(ip: [u8; 4], target: u32, healthy: bool) -> Workload {
        let mut w = workload(ip, "echo", true);
        let ports = if target == 0 {
            Vec::new()
        } else {
            vec![Port {
                service_port: 80,
                target_port: target,
            }]
        };
        w.services
            .insert(SVC.into(), super::super::proto::PortList { ports });
        if !healthy {
            w.status = WorkloadStatus::Unhealthy as i32;
        }
        w
    }

    fn service(vip: [u8; 4], ports: &[(u32, u32)]) -> Service {
        Service {
            name: "echo".into(),
            namespace: "prod".into(),
            hostname: "echo.prod.svc.cluster.local".into(),
            addresses: vec![super::super::proto::NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
            }],
            ports: ports
                .iter()
                .map(|(service_port, target_port)| Port {
                    service_port: *service_port,
                    target_port: *target_port,
                })
                .collect(),
            waypoint: None,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// The authority the store picked for a connection to `target`.
    fn picked(store: &WorkloadStore, target: &str) -> Option<SocketAddr> {
        match store.resolve(addr(target)) {
            Resolved::Hop(hop) => Some(hop.authority),
            _ => None,
        }
    }

    /// A VIP reaches its healthy endpoints round robin, on the endpoint's own target port,
    /// else the service's, else the same port; endpoints come and go with their workloads.
    #[test]
    fn a_vip_picks_healthy_endpoints_with_the_port_mapped() {
        let store = WorkloadStore::default();
        store
            .upsert_service(
                "svc",
                "1",
                &service([10, 96, 0, 10], &[(80, 8080), (81, 0)]),
            )
            .expect("valid");
        assert_eq!(
            store.resolve(addr("10.96.0.10:80")),
            Resolved::NoEndpoint {
                service: "echo.prod.svc.cluster.local".into()
            }
        );
        store
            .upsert("a", "1", &endpoint([10, 0, 0, 5], 9090, true))
            .expect("valid");
        let Resolved::Hop(hop) = store.resolve(addr("10.96.0.10:80")) else {
            panic!("a hop");
        };
        assert_eq!(
            hop.authority,
            addr("10.0.0.5:9090"),
            "the endpoint's own mapping"
        );
        assert_eq!(hop.peer, Some(("10.0.0.5".parse().expect("ip"), None)));
        assert_eq!(
            hop.identity.map(|id| id.to_string()).as_deref(),
            Some("spiffe://cluster.local/ns/prod/sa/echo")
        );
        store
            .upsert("b", "1", &endpoint([10, 0, 0, 6], 0, true))
            .expect("valid");
        store
            .upsert("sick", "1", &endpoint([10, 0, 0, 7], 0, false))
            .expect("valid");
        let mut seen: Vec<_> = (0..4)
            .filter_map(|_| picked(&store, "10.96.0.10:80"))
            .collect();
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen,
            vec![addr("10.0.0.5:9090"), addr("10.0.0.6:8080")],
            "round robin over the healthy endpoints; b takes the service's target port"
        );
        assert_eq!(picked(&store, "10.96.0.10:81").map(|a| a.port()), Some(81));
        assert!(store.remove("a"));
        store
            .upsert("b", "2", &endpoint([10, 0, 0, 6], 0, false))
            .expect("valid");
        assert!(matches!(
            store.resolve(addr("10.96.0.10:80")),
            Resolved::NoEndpoint { .. }
        ));
        store
            .upsert("b", "3", &endpoint([10, 0, 0, 6], 0, true))
            .expect("valid");
        assert_eq!(picked(&store, "10.96.0.10:80"), Some(addr("10.0.0.6:8080")));
        assert_eq!(
            store.service_vips("ECHO.prod.svc.cluster.local"),
            vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]
        );
        assert!(store.remove("svc"));
        assert_eq!(store.resolve(addr("10.96.0.10:80")), Resolved::Unlisted);
        assert!(store.service_vips("echo.prod.svc.cluster.local").is_empty());
        assert_eq!(store.services(), 0);
    }

    /// A service or a workload with a waypoint is reached through it: HBONE to the waypoint's
    /// port with the address the app named as the authority, pinned to the waypoint's
    /// identity when istiod lists it.
    #[test]
    fn waypoints_carry_the_original_destination() {
        use super::super::proto::{GatewayAddress, GatewayDestination, NetworkAddress};
        let store = WorkloadStore::default();
        let waypoint = GatewayAddress {
            destination: Some(GatewayDestination::Address(NetworkAddress {
                network: String::new(),
                address: vec![10, 0, 0, 9],
            })),
            hbone_mtls_port: 15008,
        };
        let mut svc = service([10, 96, 0, 10], &[(80, 8080)]);
        svc.waypoint = Some(waypoint.clone());
        store.upsert_service("svc", "1", &svc).expect("valid");
        store
            .upsert("wp", "1", &workload([10, 0, 0, 9], "waypoint", true))
            .expect("valid");
        let mut behind = workload([10, 0, 0, 5], "echo", true);
        behind.waypoint = Some(waypoint);
        store.upsert("behind", "1", &behind).expect("valid");
        for target in ["10.96.0.10:80", "10.0.0.5:8080"] {
            let Resolved::Hop(hop) = store.resolve(addr(target)) else {
                panic!("{target}: a hop");
            };
            assert_eq!(hop.authority, addr(target));
            assert_eq!(
                hop.peer,
                Some(("10.0.0.9".parse().expect("ip"), Some(15008)))
            );
            assert_eq!(
                hop.identity.map(|id| id.to_string()).as_deref(),
                Some("spiffe://cluster.local/ns/prod/sa/waypoint")
            );
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
        let mut svc = service([10, 96, 0, 10], &[(70000, 80)]);
        let e = WorkloadStore::default()
            .upsert_service("s9", "1", &svc)
            .expect_err("bad port");
        assert!(e.contains("service s9") && e.contains("70000"), "{e}");
        svc.ports.clear();
        svc.addresses[0].address = vec![1];
        let e = WorkloadStore::default()
            .upsert_service("s9", "1", &svc)
            .expect_err("bad vip");
        assert!(e.contains("service s9"), "{e}");
    }
}
