//! Outbound routing shared by the capture listener (15001), the HTTP proxy (15007) and the
//! `KRUN_FORWARD` listeners: a mesh destination (an IP inside `OUTBOUND_IP_RANGES_INCLUDE`,
//! when krun holds a workload certificate) goes over HBONE to the peer's 15008; anything else
//! is a plain TCP connection. krun's plain sockets carry the capture mark, so the iptables
//! rules never send them back to 15001.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hbone::SpiffeId;
use hbone::client::{HboneClient, StreamGuard};
use hbone::tls::ExpectedPeer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

use crate::capture::rules::KRUN_MARK;
use crate::config::PeerIdentity;

/// A byte stream to an upstream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open upstream connection; the guard (HBONE) counts the stream on its pooled connection.
pub struct Upstream {
    /// The stream.
    pub io: Box<dyn Io>,
    /// Held while the stream is in use.
    pub guard: Option<StreamGuard>,
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
}

impl MeshHop {
    /// A hop through `client` to the peers' `peer_port`.
    pub fn new(
        client: Arc<HboneClient>,
        identities: Vec<PeerIdentity>,
        trust_domain: String,
        peer_port: u16,
    ) -> Self {
        MeshHop {
            client,
            identities,
            trust_domain,
            peer_port,
            logged_trust_domain_only: AtomicBool::new(false),
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

/// Decides and opens upstream connections.
pub struct Router {
    /// `None` without a workload certificate: everything is passthrough.
    pub mesh: Option<MeshHop>,
    /// The mesh's address ranges (`OUTBOUND_IP_RANGES_INCLUDE`).
    pub ranges: Vec<Cidr>,
}

impl Router {
    /// True when `ip` is a mesh destination reachable over HBONE.
    pub fn is_mesh(&self, ip: IpAddr) -> bool {
        self.mesh.is_some() && self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Connects to `target`, over HBONE when it is a mesh destination.
    pub async fn connect(&self, target: SocketAddr) -> io::Result<Upstream> {
        self.connect_named(&target.ip().to_string(), target).await
    }

    /// Connects to `target`, which the app named `host`.
    async fn connect_named(&self, host: &str, target: SocketAddr) -> io::Result<Upstream> {
        match &self.mesh {
            Some(hop) if self.is_mesh(target.ip()) => {
                let peer = SocketAddr::new(target.ip(), hop.peer_port);
                let expected = hop.expected(host, target);
                let (tunnel, guard) = hop
                    .client
                    .connect(peer, Some(&expected), &target.to_string())
                    .await
                    .map_err(io::Error::other)?;
                tracing::debug!(%target, %peer, verified = %expected, "outbound HBONE tunnel open");
                Ok(Upstream {
                    io: Box::new(tunnel),
                    guard: Some(guard),
                })
            }
            _ => Ok(Upstream {
                io: Box::new(connect_marked(target).await?),
                guard: None,
            }),
        }
    }

    /// Resolves `host:port` and connects to the first address.
    pub async fn connect_host(&self, authority: &str) -> io::Result<Upstream> {
        let target = tokio::net::lookup_host(authority)
            .await?
            .next()
            .ok_or_else(|| io::Error::other(format!("{authority} resolves to no address")))?;
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host);
        self.connect_named(host.trim_start_matches('[').trim_end_matches(']'), target)
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

/// An address range such as `10.0.0.0/8`; `*` is every address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cidr {
    /// Every address.
    Any,
    /// `addr/len`.
    Net(IpAddr, u8),
}

impl Cidr {
    /// Parses `OUTBOUND_IP_RANGES_INCLUDE`; entries that do not parse are skipped (the
    /// iptables rules would reject them first).
    pub fn parse_list(raw: &str) -> Vec<Cidr> {
        mesh::config::values::list(raw)
            .iter()
            .filter_map(|item| Cidr::parse(item))
            .collect()
    }

    fn parse(item: &str) -> Option<Cidr> {
        if item == "*" {
            return Some(Cidr::Any);
        }
        let (addr, len) = item.split_once('/').unwrap_or((item, ""));
        let addr: IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if len.is_empty() {
            max
        } else {
            len.parse().ok()?
        };
        (len <= max).then_some(Cidr::Net(addr, len))
    }

    /// True when `ip` is inside the range.
    pub fn contains(self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Cidr::Any, _) => true,
            (Cidr::Net(IpAddr::V4(net), len), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (Cidr::Net(IpAddr::V6(net), len), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
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

    /// Ranges decide what a mesh destination is.
    #[test]
    fn ranges() {
        let ranges = Cidr::parse_list("10.0.0.0/8, fd00::/8, 192.168.1.1, bogus");
        assert_eq!(ranges.len(), 3);
        let inside = |ip: &str| {
            let ip: IpAddr = ip.parse().expect("ip");
            ranges.iter().any(|r| r.contains(ip))
        };
        assert!(inside("10.1.2.3"));
        assert!(!inside("11.0.0.1"));
        assert!(inside("fd12::1"));
        assert!(inside("192.168.1.1"));
        assert!(!inside("192.168.1.2"));
        assert!(Cidr::parse_list("*")[0].contains("8.8.8.8".parse().expect("ip")));
        assert!(Cidr::parse_list("0.0.0.0/0")[0].contains("8.8.8.8".parse().expect("ip")));
    }
}
