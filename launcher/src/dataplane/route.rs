//! Outbound routing shared by the capture listener (15001), the HTTP proxy (15007) and the
//! `KRUN_FORWARD` listeners, decided per connection: a mesh destination (a workload istiod
//! lists as HBONE-capable, whose certificate must then carry the identity istiod gives, or an
//! IP inside `KRUN_MESH_CIDRS`; only when krun holds a workload certificate) goes over HBONE to
//! the peer's 15008; anything else is a plain TCP connection (passthrough), so a destination
//! outside the mesh (Memorystore, Cloud SQL, a VM) works as it would without krun. krun's plain sockets
//! carry the capture mark, so the iptables rules never send them back to 15001.
//!
//! Every connection opened here counts in Istio's TCP metrics as the source reports them
//! (source: the workload's SPIFFE ID; destination: the identity the peer's certificate was
//! required to carry, `unknown` for passthrough or when only the trust domain is known).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hbone::SpiffeId;
use hbone::client::{HboneClient, StreamGuard};
use hbone::tls::ExpectedPeer;
use mesh::metrics::tcp::{Reporter, TcpConnection};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

use super::connect_headers::connect_headers;
use crate::capture::rules::KRUN_MARK;
use crate::config::{Cidr, PeerIdentity};
use mesh::xds::WorkloadStore;

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
    /// Plain TCP, marked so capture leaves it alone.
    Passthrough,
}

impl Route {
    /// The name logged with each connection.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Workload(_) | Route::MeshCidr => "hbone",
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
    passthrough: AtomicU64,
}

impl RouteCounts {
    fn counter(&self, route: &Route) -> &AtomicU64 {
        match route {
            Route::Workload(_) => &self.workload,
            Route::MeshCidr => &self.mesh_cidr,
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

    /// The route to `ip`: HBONE only to a mesh destination krun can reach over HBONE.
    pub fn decide(&self, ip: IpAddr) -> Route {
        if self.mesh.is_none() {
            return Route::Passthrough;
        }
        // istiod's word wins over KRUN_MESH_CIDRS: a listed workload outside the ambient mesh
        // does not accept HBONE.
        match self.workloads.as_ref().and_then(|store| store.lookup(ip)) {
            Some(workload) if workload.hbone => Route::Workload(workload.identity),
            Some(_) => Route::Passthrough,
            None if self.mesh_cidrs.iter().any(|r| r.contains(ip)) => Route::MeshCidr,
            None => Route::Passthrough,
        }
    }

    /// Decides, counts and logs the route of one connection to `target`; open it with
    /// [`Router::connect_routed`].
    pub fn route(&self, target: SocketAddr) -> Route {
        let route = self.decide(target.ip());
        let total = self.counts.count(&route);
        if total == 1 {
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
        let (hop, expected) = match (&route, &self.mesh) {
            (Route::Workload(id), Some(hop)) => (hop, ExpectedPeer::OneOf(vec![id.clone()])),
            (Route::MeshCidr, Some(hop)) => (hop, hop.expected(host, target)),
            _ => {
                let stream = connect_marked(target).await?;
                let metrics = TcpConnection::open(Reporter::Source, self.source().as_ref(), None);
                return Ok(Upstream {
                    io: Box::new(metrics.count_upstream(stream)),
                    guard: None,
                    metrics,
                });
            }
        };
        let peer = SocketAddr::new(target.ip(), hop.peer_port);
        let headers = connect_headers(hop.baggage.as_ref(), source);
        let (tunnel, guard) = hop
            .client
            .connect_with_headers(peer, Some(&expected), &target.to_string(), headers)
            .await
            .map_err(io::Error::other)?;
        tracing::debug!(%target, %peer, verified = %expected, "outbound HBONE tunnel open");
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

/// A plain TCP connection carrying krun's mark, so capture leaves it alone.
pub async fn connect_marked(target: SocketAddr) -> io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Without CAP_NET_ADMIN the mark cannot be set, but then there is no capture either.
    let _ = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &KRUN_MARK);
    socket.connect(target).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let hop = MeshHop::new(
            Arc::new(HboneClient::new(hbone::H2Settings::default(), None)),
            config.launcher.peer_identities.value.clone(),
            "td".into(),
            15008,
            None,
        );
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
        let hop = MeshHop::new(
            Arc::new(HboneClient::new(hbone::H2Settings::default(), None)),
            Vec::new(),
            "td".into(),
            15008,
            None,
        );
        let router = Router::new(Some(hop), None, cidrs.clone());
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(router.decide(ip("10.1.2.3")), Route::MeshCidr);
        assert_eq!(router.decide(ip("fd00::7")), Route::MeshCidr);
        assert_eq!(router.decide(ip("10.1.2.4")), Route::Passthrough);
        assert_eq!(router.decide(ip("8.8.8.8")), Route::Passthrough);
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        router.route(addr("10.1.2.3:80"));
        router.route(addr("10.9.9.9:6379"));
        router.route(addr("10.9.9.9:6379"));
        assert_eq!(router.counts().get(&Route::MeshCidr), 1);
        assert_eq!(router.counts().get(&Route::Passthrough), 2);
        let no_cert = Router::new(None, None, cidrs);
        assert_eq!(no_cert.decide(ip("10.1.2.3")), Route::Passthrough);
        let no_cidrs = Router::new(None, None, Vec::new());
        assert_eq!(no_cidrs.decide(ip("10.1.2.3")), Route::Passthrough);
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
        let hop = MeshHop::new(
            Arc::new(HboneClient::new(hbone::H2Settings::default(), None)),
            Vec::new(),
            "td".into(),
            15008,
            None,
        );
        let cidrs = Cidr::parse_list("10.0.0.0/8").expect("valid");
        let router = Router::new(Some(hop), Some(store), cidrs);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            router.decide(ip("10.0.0.5")),
            Route::Workload("spiffe://td/ns/prod/sa/db".parse().expect("id"))
        );
        assert_eq!(router.decide(ip("10.0.0.6")), Route::Passthrough);
        assert_eq!(router.decide(ip("10.0.0.7")), Route::MeshCidr);
    }
}
