//! Outbound routing shared by the capture listener (15001), the HTTP proxy (15007) and the
//! `KRUN_FORWARD` listeners, decided per connection: a mesh destination (a workload istiod
//! lists as HBONE-capable, whose certificate must then carry the identity istiod gives, or an
//! IP inside `KRUN_MESH_CIDRS`; only when krun holds a workload certificate) goes over HBONE to
//! the peer's 15008; a Service VIP istiod lists goes to one of its healthy endpoints (on the
//! mapped target port) or to its waypoint, as ztunnel sends it, and is refused when it has no
//! healthy endpoint; anything else is a plain TCP connection (passthrough), so a destination
//! outside the mesh (Memorystore, Cloud SQL, a VM) works as it would without krun. krun's plain sockets
//! carry the capture mark, so the iptables rules never send them back to 15001.
//!
//! Every connection opened here counts in Istio's TCP metrics as the source reports them
//! (source: the workload's SPIFFE ID; destination: the identity the peer's certificate was
//! required to carry, `unknown` for passthrough or when only the trust domain is known).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hbone::SpiffeId;
use hbone::client::{HboneClient, StreamGuard};
use hbone::tls::ExpectedPeer;
use mesh::metrics::tcp::{Reporter, TcpConnection};
use tokio::io::{AsyncRead, AsyncWrite};

use super::connect_headers::connect_headers;
use crate::capture::rules::connect_marked;
use crate::config::{Cidr, PeerIdentity};
use mesh::xds::WorkloadStore;
use mesh::xds::store::{Hop, Resolved};

/// A byte stream to an upstream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open upstream connection; the guard (HBONE) counts the stream on its pooled connection.
pub struct Upstream {
    /// The stream.
    pub io: Box<dyn Io>,
    /// Held while the stream is in use.
    pub guard: Option<StreamGuard>,
    /// The connection in Istio's TCP metrics: counted closed when dropped, so hold it as long
    /// as the stream.
    pub metrics: TcpConnection,
}

/// The HBONE hop to mesh peers.
pub struct MeshHop {
    /// Pooled HBONE client with the workload certificate.
    pub client: Arc<HboneClient>,
    /// Destinations whose identity is known (`KRUN_PEER_IDENTITIES`): their certificate must
    /// carry exactly that SPIFFE ID.
    pub identities: Vec<PeerIdentity>,
    /// The workload's trust domain: all that is verified of any other destination.
    pub trust_domain: String,
    /// The peers' HBONE port.
    pub peer_port: u16,
    /// Set once a trust-domain-only verification has been logged.
    logged_trust_domain_only: AtomicBool,
    /// The `baggage` every CONNECT carries (who this workload is).
    baggage: Option<http::HeaderValue>,
}

impl MeshHop {
    /// A hop through `client` to the peers' `peer_port`, its CONNECTs carrying `baggage`.
    pub fn new(
        client: Arc<HboneClient>,
        identities: Vec<PeerIdentity>,
        trust_domain: String,
        peer_port: u16,
        baggage: Option<http::HeaderValue>,
    ) -> Self {
        MeshHop {
            client,
            identities,
            trust_domain,
            peer_port,
            logged_trust_domain_only: AtomicBool::new(false),
            baggage,
        }
    }

    /// What the peer serving `target` (named `host` by the app) must prove: the SPIFFE IDs
    /// configured for it, else any identity of the trust domain, which is logged once.
    fn expected(&self, host: &str, target: SocketAddr) -> ExpectedPeer {
        let ids: Vec<SpiffeId> = self
            .identities
            .iter()
            .filter(|known| known.names(host, target.ip()))
            .map(|known| known.id.clone())
            .collect();
        if !ids.is_empty() {
            return ExpectedPeer::OneOf(ids);
        }
        if !self.logged_trust_domain_only.swap(true, Ordering::Relaxed) {
            tracing::info!(%target, trust_domain = %self.trust_domain, "outbound HBONE verifies only the peer's trust domain: no SPIFFE ID is configured for this destination (KRUN_PEER_IDENTITIES); logged once for all such destinations");
        }
        ExpectedPeer::TrustDomain(self.trust_domain.clone())
    }
}

/// How one outbound connection is carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// HBONE to the destination's 15008: istiod lists it as an HBONE workload with this
    /// identity, which its certificate must carry.
    Workload(SpiffeId),
    /// HBONE to the destination's 15008: it is inside `KRUN_MESH_CIDRS`.
    MeshCidr,
    /// A Service VIP or a workload behind a waypoint: to the endpoint or waypoint istiod's
    /// state picked.
    Service(Hop),
    /// A Service VIP without a healthy endpoint (named): refused.
    NoEndpoint(String),
    /// Plain TCP, marked so capture leaves it alone.
    Passthrough,
}

impl Route {
    /// The name logged with each connection.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Workload(_) | Route::MeshCidr => "hbone",
            Route::Service(_) => "service",
            Route::NoEndpoint(_) => "refused",
            Route::Passthrough => "passthrough",
        }
    }

    /// Why a connection took this route, logged the first time it does.
    fn reason(&self) -> &'static str {
        match self {
            Route::Workload(_) => {
                "outbound HBONE: istiod lists the destination as an HBONE workload; its certificate must carry the identity istiod gives (logged once; later ones at debug)"
            }
            Route::MeshCidr => {
                "outbound HBONE: the destination is inside KRUN_MESH_CIDRS (logged once; later ones at debug)"
            }
            Route::Service(_) => {
                "outbound service: istiod lists the destination as a Service VIP (or behind a waypoint); the connection goes to the endpoint or waypoint picked (logged once; later ones at debug)"
            }
            Route::NoEndpoint(_) => {
                "outbound refused: istiod lists the destination as a Service VIP with no healthy endpoint"
            }
            Route::Passthrough => {
                "outbound passthrough: the destination is neither a workload istiod lists as HBONE-capable nor inside KRUN_MESH_CIDRS (or krun has no workload certificate), so it is reached directly as without krun (logged once; later ones at debug)"
            }
        }
    }
}

/// Connections per route since start: plain atomics, logged with each decision.
#[derive(Default)]
pub struct RouteCounts {
    workload: AtomicU64,
    mesh_cidr: AtomicU64,
    service: AtomicU64,
    refused: AtomicU64,
    passthrough: AtomicU64,
}

impl RouteCounts {
    fn counter(&self, route: &Route) -> &AtomicU64 {
        match route {
            Route::Workload(_) => &self.workload,
            Route::MeshCidr => &self.mesh_cidr,
            Route::Service(_) => &self.service,
            Route::NoEndpoint(_) => &self.refused,
            Route::Passthrough => &self.passthrough,
        }
    }

    /// Counts one connection on `route`; the new total.
    fn count(&self, route: &Route) -> u64 {
        self.counter(route).fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Connections routed `route` so far.
    pub fn get(&self, route: &Route) -> u64 {
        self.counter(route).load(Ordering::Relaxed)
    }
}

/// Decides and opens upstream connections.
pub struct Router {
    /// `None` without a workload certificate: everything is passthrough.
    mesh: Option<MeshHop>,
    /// What istiod lists, when krun discovers workloads from it.
    workloads: Option<Arc<WorkloadStore>>,
    /// The mesh's address ranges (`KRUN_MESH_CIDRS`).
    mesh_cidrs: Vec<Cidr>,
    /// Connections per route.
    counts: RouteCounts,
}

impl Router {
    /// Routes over `mesh` (when krun has a workload certificate) to the HBONE workloads
    /// istiod lists in `workloads` and to destinations inside `mesh_cidrs`, and everything
    /// else directly.
    pub fn new(
        mesh: Option<MeshHop>,
        workloads: Option<Arc<WorkloadStore>>,
        mesh_cidrs: Vec<Cidr>,
    ) -> Self {
        Router {
            mesh,
            workloads,
            mesh_cidrs,
            counts: RouteCounts::default(),
        }
    }

    /// True when HBONE is possible at all (krun holds a workload certificate).
    pub fn has_mesh(&self) -> bool {
        self.mesh.is_some()
    }

    /// Connections per route so far.
    pub fn counts(&self) -> &RouteCounts {
        &self.counts
    }

    /// The route to `target`: HBONE only to a mesh destination krun can reach over HBONE.
    pub fn decide(&self, target: SocketAddr) -> Route {
        if self.mesh.is_none() {
            return Route::Passthrough;
        }
        let ip = target.ip();
        let resolved = self
            .workloads
            .as_ref()
            .map_or(Resolved::Unlisted, |store| store.resolve(target));
        // istiod's word wins over KRUN_MESH_CIDRS: a listed workload outside the ambient mesh
        // does not accept HBONE.
        match resolved {
            Resolved::Workload(workload) if workload.hbone => Route::Workload(workload.identity),
            Resolved::Workload(_) => Route::Passthrough,
            Resolved::Hop(hop) => Route::Service(hop),
            Resolved::NoEndpoint { service } => Route::NoEndpoint(service),
            Resolved::Unlisted if self.mesh_cidrs.iter().any(|r| r.contains(ip)) => Route::MeshCidr,
            Resolved::Unlisted => Route::Passthrough,
        }
    }

    /// Decides, counts and logs the route of one connection to `target`; open it with
    /// [`Router::connect_routed`].
    pub fn route(&self, target: SocketAddr) -> Route {
        let route = self.decide(target);
        let total = self.counts.count(&route);
        if let Route::NoEndpoint(service) = &route {
            tracing::warn!(%target, %service, route = route.name(), total, "{}", route.reason());
        } else if let (Route::Service(hop), 1) = (&route, total) {
            tracing::info!(%target, via = %hop.via, upstream = %hop.authority, route = route.name(), "{}", route.reason());
        } else if total == 1 {
            tracing::info!(%target, route = route.name(), "{}", route.reason());
        } else {
            tracing::debug!(%target, route = route.name(), total, "outbound route decided");
        }
        route
    }

    /// Connects to `target`, which the app named `host` on a connection from `source`, on the
    /// `route` decided for it.
    pub async fn connect_routed(
        &self,
        route: Route,
        host: &str,
        target: SocketAddr,
        source: SocketAddr,
    ) -> io::Result<Upstream> {
        let (hop, expected, peer, authority) = match (&route, &self.mesh) {
            (Route::Workload(id), Some(hop)) => {
                let peer = SocketAddr::new(target.ip(), hop.peer_port);
                (hop, ExpectedPeer::OneOf(vec![id.clone()]), peer, target)
            }
            (Route::MeshCidr, Some(hop)) => {
                let peer = SocketAddr::new(target.ip(), hop.peer_port);
                (hop, hop.expected(host, target), peer, target)
            }
            (
                Route::Service(Hop {
                    peer: Some((ip, port)),
                    identity,
                    authority,
                    ..
                }),
                Some(hop),
            ) => {
                let expected = match identity {
                    Some(id) => ExpectedPeer::OneOf(vec![id.clone()]),
                    None => ExpectedPeer::TrustDomain(hop.trust_domain.clone()),
                };
                let peer = SocketAddr::new(*ip, port.unwrap_or(hop.peer_port));
                (hop, expected, peer, *authority)
            }
            (Route::NoEndpoint(service), _) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("service {service} has no healthy endpoint"),
                ));
            }
            _ => {
                let plain = match &route {
                    Route::Service(picked) => picked.authority,
                    _ => target,
                };
                let stream = connect_marked(plain).await?;
                let metrics = TcpConnection::open(Reporter::Source, self.source().as_ref(), None);
                return Ok(Upstream {
                    io: Box::new(metrics.count_upstream(stream)),
                    guard: None,
                    metrics,
                });
            }
        };
        let headers = connect_headers(hop.baggage.as_ref(), source);
        let (tunnel, guard) = hop
            .client
            .connect_with_headers(peer, Some(&expected), &authority.to_string(), headers)
            .await
            .map_err(io::Error::other)?;
        tracing::debug!(%target, %peer, %authority, verified = %expected, "outbound HBONE tunnel open");
        let destination = match &expected {
            ExpectedPeer::OneOf(ids) if ids.len() == 1 => ids.first(),
            _ => None,
        };
        let metrics = TcpConnection::open(Reporter::Source, self.source().as_ref(), destination);
        Ok(Upstream {
            io: Box::new(metrics.count_upstream(tunnel)),
            guard: Some(guard),
            metrics,
        })
    }

    /// The workload's own SPIFFE ID, the source principal of what it opens.
    fn source(&self) -> Option<SpiffeId> {
        self.mesh.as_ref().and_then(|hop| hop.client.identity())
    }

    /// Resolves `host:port` and connects to the first address, for a connection from
    /// `source`.
    pub async fn connect_host(&self, authority: &str, source: SocketAddr) -> io::Result<Upstream> {
        let target = tokio::net::lookup_host(authority)
            .await?
            .next()
            .ok_or_else(|| io::Error::other(format!("{authority} resolves to no address")))?;
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.connect_routed(self.route(target), host, target, source)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hop with no certificate to trust domain `td` on 15008, pinning `identities`.
    fn test_hop(identities: Vec<PeerIdentity>) -> MeshHop {
        MeshHop::new(
            Arc::new(HboneClient::new(hbone::H2Settings::default(), None)),
            identities,
            "td".into(),
            15008,
            None,
        )
    }

    /// A configured destination (by IP or host name, any case) gets exactly its IDs; any
    /// other gets the trust domain.
    #[test]
    fn expected_peer_identity() {
        let env: mesh::config::Env = [(
            "KRUN_PEER_IDENTITIES",
            "10.0.0.5=spiffe://td/ns/a/sa/one, db.prod=spiffe://td/ns/b/sa/db, fd00::5=spiffe://td/ns/c/sa/six, 10.0.0.5=spiffe://td/ns/a/sa/two",
        )]
        .into_iter()
        .collect();
        let config = crate::config::Config::from_env(&env).expect("valid");
        let hop = test_hop(config.launcher.peer_identities.value.clone());
        let id = |s: &str| s.parse::<SpiffeId>().expect("id");
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            hop.expected("10.0.0.5", addr("10.0.0.5:80")),
            ExpectedPeer::OneOf(vec![
                id("spiffe://td/ns/a/sa/one"),
                id("spiffe://td/ns/a/sa/two")
            ])
        );
        let db = ExpectedPeer::OneOf(vec![id("spiffe://td/ns/b/sa/db")]);
        assert_eq!(hop.expected("db.prod", addr("10.0.0.9:5432")), db);
        assert_eq!(hop.expected("DB.prod", addr("10.0.0.9:5432")), db);
        assert_eq!(
            hop.expected("fd00:0::5", addr("[fd00::5]:80")),
            ExpectedPeer::OneOf(vec![id("spiffe://td/ns/c/sa/six")])
        );
        assert_eq!(
            hop.expected("10.0.0.6", addr("10.0.0.6:80")),
            ExpectedPeer::TrustDomain("td".into())
        );
    }

    /// Only a destination inside KRUN_MESH_CIDRS goes over HBONE, and only with a workload
    /// certificate; everything else, other 10.x addresses included, is passthrough.
    #[test]
    fn only_mesh_cidrs_go_over_hbone() {
        let cidrs = Cidr::parse_list("10.1.2.3/32,fd00::/8").expect("valid");
        let hop = test_hop(Vec::new());
        let router = Router::new(Some(hop), None, cidrs.clone());
        let sock = |s: &str| SocketAddr::new(s.parse().expect("ip"), 80);
        assert_eq!(router.decide(sock("10.1.2.3")), Route::MeshCidr);
        assert_eq!(router.decide(sock("fd00::7")), Route::MeshCidr);
        assert_eq!(router.decide(sock("10.1.2.4")), Route::Passthrough);
        assert_eq!(router.decide(sock("8.8.8.8")), Route::Passthrough);
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        router.route(addr("10.1.2.3:80"));
        router.route(addr("10.9.9.9:6379"));
        router.route(addr("10.9.9.9:6379"));
        assert_eq!(router.counts().get(&Route::MeshCidr), 1);
        assert_eq!(router.counts().get(&Route::Passthrough), 2);
        let no_cert = Router::new(None, None, cidrs);
        assert_eq!(no_cert.decide(sock("10.1.2.3")), Route::Passthrough);
        let no_cidrs = Router::new(None, None, Vec::new());
        assert_eq!(no_cidrs.decide(sock("10.1.2.3")), Route::Passthrough);
    }

    /// A workload istiod lists as HBONE-capable goes over HBONE pinned to its identity; one
    /// listed without HBONE is passthrough even inside KRUN_MESH_CIDRS; unlisted addresses
    /// fall back to the ranges.
    #[test]
    fn istiod_listed_workloads_route_by_their_protocol() {
        use mesh::xds::proto::{TunnelProtocol, Workload};
        let store = Arc::new(WorkloadStore::default());
        let workload = |ip: [u8; 4], protocol: TunnelProtocol| Workload {
            name: "pod".into(),
            namespace: "prod".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: protocol as i32,
            trust_domain: "td".into(),
            service_account: "db".into(),
            ..Default::default()
        };
        store
            .upsert("a", "1", &workload([10, 0, 0, 5], TunnelProtocol::Hbone))
            .expect("valid");
        store
            .upsert("b", "1", &workload([10, 0, 0, 6], TunnelProtocol::None))
            .expect("valid");
        let hop = test_hop(Vec::new());
        let cidrs = Cidr::parse_list("10.0.0.0/8").expect("valid");
        let router = Router::new(Some(hop), Some(store), cidrs);
        let sock = |s: &str| SocketAddr::new(s.parse().expect("ip"), 80);
        assert_eq!(
            router.decide(sock("10.0.0.5")),
            Route::Workload("spiffe://td/ns/prod/sa/db".parse().expect("id"))
        );
        assert_eq!(router.decide(sock("10.0.0.6")), Route::Passthrough);
        assert_eq!(router.decide(sock("10.0.0.7")), Route::MeshCidr);
    }

    /// A Service VIP goes to the endpoint istiod's state picks, on its target port; one
    /// without a healthy endpoint is refused, naming the service.
    #[tokio::test]
    async fn a_service_vip_goes_to_an_endpoint_or_is_refused() {
        use mesh::xds::proto::{NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload};
        let store = Arc::new(WorkloadStore::default());
        let service = |vip: u8, hostname: &str| Service {
            name: "svc".into(),
            namespace: "prod".into(),
            hostname: hostname.into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, vip],
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
            }],
            waypoint: None,
        };
        store
            .upsert_service("a", "1", &service(10, "a.prod.svc.cluster.local"))
            .expect("valid");
        store
            .upsert_service("b", "1", &service(11, "b.prod.svc.cluster.local"))
            .expect("valid");
        let mut endpoint = Workload {
            namespace: "prod".into(),
            addresses: vec![vec![10, 0, 0, 5]],
            tunnel_protocol: TunnelProtocol::Hbone as i32,
            service_account: "a".into(),
            ..Default::default()
        };
        endpoint
            .services
            .insert("prod/a.prod.svc.cluster.local".into(), PortList::default());
        store.upsert("pod", "1", &endpoint).expect("valid");
        let hop = test_hop(Vec::new());
        let router = Router::new(Some(hop), Some(store), Vec::new());
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let Route::Service(picked) = router.decide(addr("10.96.0.10:80")) else {
            panic!("a service route");
        };
        assert_eq!(picked.authority, addr("10.0.0.5:8080"));
        let refused = router.route(addr("10.96.0.11:80"));
        assert_eq!(
            refused,
            Route::NoEndpoint("b.prod.svc.cluster.local".into())
        );
        let Err(e) = router
            .connect_routed(
                refused,
                "10.96.0.11",
                addr("10.96.0.11:80"),
                addr("127.0.0.6:40000"),
            )
            .await
        else {
            panic!("refused");
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("b.prod.svc.cluster.local"), "{e}");
        assert_eq!(router.counts().get(&Route::NoEndpoint(String::new())), 1);
    }
}
