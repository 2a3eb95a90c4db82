//! The local DNS server: local answerers first (the run zone, `metadata.google.internal`, and
//! the mesh's Service names from istiod), every other query forwarded to the
//! upstream resolver unchanged. A forwarded query goes out as the bytes the app sent, over the
//! transport the app used (UDP stays UDP, TCP stays TCP), and the upstream's answer comes back
//! as the bytes it sent: EDNS options, DNSSEC records and the truncation bit are the upstream's,
//! never ours.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::names::RunZone;
use crate::capture::rules::{connect_marked, mark_socket};

/// How long the upstream may take to answer one forwarded query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest DNS message (TCP's 16-bit length; EDNS UDP answers are smaller).
const MAX_MESSAGE: usize = 65_535;
/// UDP queries handled at once; a flood beyond it is dropped (clients retry).
const MAX_UDP_IN_FLIGHT: usize = 1024;
/// TTL of local answers: short, so a changed setting is seen soon.
const LOCAL_TTL: u32 = 10;

/// What a local answerer says about a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalAnswer {
    /// The name exists with these addresses (A answers get the IPv4 ones, AAAA the IPv6
    /// ones; none of the asked family is an empty NOERROR answer).
    Addresses(Vec<IpAddr>),
    /// The name is in a zone we own and does not exist.
    NxDomain,
}

/// A zone answered locally, consulted before forwarding; each zone is one implementation
/// handed to [`DnsServer::new`].
pub trait LocalAnswerer: Send + Sync {
    /// The answer for `fqdn` (lower case, with the trailing dot), or `None` when the name is
    /// not this answerer's.
    fn answer(&self, fqdn: &str) -> Option<LocalAnswer>;
}

/// The run zone: every service name is the proxy's loopback address.
pub struct RunAnswerer {
    /// Which names are services.
    pub zone: Arc<RunZone>,
    /// The proxy's address, the answer for every service.
    pub proxy_ip: IpAddr,
}

impl LocalAnswerer for RunAnswerer {
    fn answer(&self, fqdn: &str) -> Option<LocalAnswer> {
        Some(match self.zone.dns_name(fqdn)? {
            Ok(_) => LocalAnswer::Addresses(vec![self.proxy_ip]),
            Err(e) => {
                tracing::debug!(name = fqdn, error = %e, "run zone: NXDOMAIN");
                LocalAnswer::NxDomain
            }
        })
    }
}

/// `metadata.google.internal`: answered here so it resolves whatever the upstream does
/// (Cloud Run's resolver once returned SERVFAIL for names in google.internal).
pub struct MetadataAnswerer;

impl LocalAnswerer for MetadataAnswerer {
    fn answer(&self, fqdn: &str) -> Option<LocalAnswer> {
        (fqdn == mesh::metadata::METADATA_DNS_NAME)
            .then(|| LocalAnswer::Addresses(vec![IpAddr::V4(mesh::metadata::METADATA_IP)]))
    }
}

/// The mesh's Service names, from what istiod lists: `svc.ns.svc.cluster.local` and the short
/// forms a Kubernetes search path would complete (`svc` in the workload's namespace, `svc.ns`,
/// `svc.ns.svc`), answered with the Service's VIPs. A name no listed Service has is not this
/// answerer's (forwarded, never NXDOMAIN): the mesh does not own `cluster.local` names istiod
/// has not pushed, nor single labels.
#[derive(Clone)]
pub struct MeshAnswerer {
    /// What istiod listed.
    pub store: Arc<mesh::xds::WorkloadStore>,
    /// The workload's namespace, completing single-label names.
    pub namespace: String,
}

/// The Kubernetes cluster domain Service hostnames end with.
const CLUSTER_DOMAIN: &str = "cluster.local";

impl MeshAnswerer {
    /// The Service hostname `name` (no trailing dot) stands for.
    fn hostname(&self, name: &str) -> String {
        let ns = &self.namespace;
        match name.split('.').count() {
            1 => format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
            2 => format!("{name}.svc.{CLUSTER_DOMAIN}"),
            3 if name.ends_with(".svc") => format!("{name}.{CLUSTER_DOMAIN}"),
            _ => name.to_owned(),
        }
    }
}

impl LocalAnswerer for MeshAnswerer {
    fn answer(&self, fqdn: &str) -> Option<LocalAnswer> {
        let name = fqdn.strip_suffix('.').unwrap_or(fqdn);
        let vips = self.store.service_vips(&self.hostname(name));
        (!vips.is_empty()).then_some(LocalAnswer::Addresses(vips))
    }
}

/// The DNS server DNS capture (`KRUN_CAPTURE_DNS=true`) sends the app's queries to when the
/// builtin data plane runs (pilot-agent's DNS proxy is not there): `answerers` first, every
/// other query forwarded to `upstream` (resolv.conf's nameserver, the file left as it is: the
/// iptables rules redirect the queries to it). Listens on 127.0.0.1:15053 (udp and tcp) until
/// `drain`.
pub async fn start_captured(
    answerers: Vec<Box<dyn LocalAnswerer>>,
    upstream: SocketAddr,
    limit: hbone::listen::ConnectionLimit,
    drain: CancellationToken,
) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, mesh::istio::DNS_PORT));
    let udp = UdpSocket::bind(addr)
        .await
        .map_err(|e| format!("{addr}: UDP bind failed: {e}"))?;
    // Marked: the capture rules put krun's answers in the app's conntrack zone by this mark.
    mark_socket(&udp);
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{addr}: TCP bind failed: {e}"))?;
    let server = Arc::new(DnsServer::new(answerers, upstream));
    tokio::spawn(server.serve(udp, tcp, Arc::new(limit), drain));
    Ok(())
}

/// The server: its answerers and the upstream resolver.
pub struct DnsServer {
    answerers: Vec<Box<dyn LocalAnswerer>>,
    upstream: SocketAddr,
}

impl DnsServer {
    /// A server asking `answerers` in order, then forwarding to `upstream`.
    pub fn new(answerers: Vec<Box<dyn LocalAnswerer>>, upstream: SocketAddr) -> DnsServer {
        DnsServer {
            answerers,
            upstream,
        }
    }

    /// Serves UDP and TCP until `drain` is cancelled.
    pub async fn serve(
        self: Arc<Self>,
        udp: UdpSocket,
        tcp: TcpListener,
        limit: Arc<hbone::listen::ConnectionLimit>,
        drain: CancellationToken,
    ) {
        let tcp_server = self.clone();
        let tcp_drain = drain.clone();
        tokio::join!(self.serve_udp(udp, drain), async move {
            hbone::listen::serve_each(tcp, &limit, &tcp_drain, |stream, _| {
                let server = tcp_server.clone();
                async move { server.serve_tcp(stream).await }
            })
            .await
        });
    }

    async fn serve_udp(self: Arc<Self>, socket: UdpSocket, drain: CancellationToken) {
        let socket = Arc::new(socket);
        let in_flight = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (len, peer) = tokio::select! {
                () = drain.cancelled() => return,
                received = socket.recv_from(&mut buf) => match received {
                    Ok(received) => received,
                    Err(e) => {
                        tracing::debug!(error = %e, "DNS: UDP receive failed");
                        continue;
                    }
                },
            };
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                continue;
            };
            let query = buf[..len].to_vec();
            let (server, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                let reply = match server.local_reply(&query) {
                    Some(reply) => Some(reply),
                    None => server.forward_udp(&query).await,
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer).await;
                }
                drop(permit);
            });
        }
    }

    async fn serve_tcp(&self, mut stream: TcpStream) {
        while let Ok(Some(query)) = read_framed(&mut stream).await {
            let reply = match self.local_reply(&query) {
                Some(reply) => Some(reply),
                None => self.forward_tcp(&query).await,
            };
            let Some(reply) = reply else {
                return;
            };
            if write_framed(&mut stream, &reply).await.is_err() {
                return;
            }
        }
    }

    /// The answer to a query a local answerer owns, or `None` to forward it. Only plain
    /// queries with one question are answered here; anything else is the upstream's business.
    pub fn local_reply(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
            || request.queries.len() != 1
        {
            return None;
        }
        let question = &request.queries[0];
        let fqdn = question.name.to_lowercase().to_string();
        let fqdn = if fqdn.ends_with('.') {
            fqdn
        } else {
            format!("{fqdn}.")
        };
        let answer = self.answerers.iter().find_map(|a| a.answer(&fqdn))?;
        let mut reply = Message::response(request.metadata.id, OpCode::Query);
        reply.metadata.authoritative = true;
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_query(question.clone());
        match answer {
            LocalAnswer::NxDomain => reply.metadata.response_code = ResponseCode::NXDomain,
            LocalAnswer::Addresses(ips) => {
                for ip in ips {
                    let rdata = match (question.query_type, ip) {
                        (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
                        (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                        _ => continue,
                    };
                    reply.add_answer(Record::from_rdata(question.name.clone(), LOCAL_TTL, rdata));
                }
            }
        }
        // An EDNS query gets an EDNS answer (RFC 6891); our answers are tiny.
        if let Some(edns) = &request.edns {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().max(512));
            reply.set_edns(ours);
        }
        reply.to_vec().ok()
    }

    async fn forward_udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let bind: SocketAddr = match self.upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let exchange = async {
            let socket = UdpSocket::bind(bind).await?;
            // Marked, so DNS capture does not send krun's own forwarding back to krun.
            mark_socket(&socket);
            socket.connect(self.upstream).await?;
            socket.send(query).await?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            // A datagram that is not the answer to this query (another id) is ignored.
            loop {
                let len = socket.recv(&mut buf).await?;
                if len >= 2 && buf[..2] == query[..2.min(query.len())] {
                    buf.truncate(len);
                    return Ok::<_, std::io::Error>(buf);
                }
            }
        };
        self.finish(
            tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await,
            query,
        )
    }

    async fn forward_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let exchange = async {
            let mut upstream = connect_marked(self.upstream).await?;
            write_framed(&mut upstream, query).await?;
            read_framed(&mut upstream)
                .await?
                .ok_or_else(|| std::io::Error::other("upstream closed without an answer"))
        };
        self.finish(
            tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await,
            query,
        )
    }

    /// The upstream's answer, or SERVFAIL (logged) when it failed or was silent.
    fn finish(
        &self,
        result: Result<std::io::Result<Vec<u8>>, tokio::time::error::Elapsed>,
        query: &[u8],
    ) -> Option<Vec<u8>> {
        let why = match result {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {UPSTREAM_TIMEOUT:?}"),
        };
        tracing::debug!(upstream = %self.upstream, error = %why, "DNS: forwarding failed; answering SERVFAIL");
        let request = Message::from_vec(query).ok()?;
        let mut reply = Message::error_msg(
            request.metadata.id,
            request.metadata.op_code,
            ResponseCode::ServFail,
        );
        reply.add_queries(request.queries);
        reply.to_vec().ok()
    }
}

/// One length-prefixed DNS message from a TCP stream; `None` at a clean end.
async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::other("DNS message longer than 65535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_str(name).expect("name"), kind));
        m.to_vec().expect("encode")
    }

    fn server() -> DnsServer {
        DnsServer::new(
            vec![Box::new(MetadataAnswerer)],
            "127.0.0.1:1".parse().expect("addr"),
        )
    }

    #[test]
    fn metadata_is_answered_and_other_names_are_forwarded() {
        let s = server();
        let reply = s
            .local_reply(&query("metadata.google.internal.", RecordType::A))
            .expect("local");
        let reply = Message::from_vec(&reply).expect("decode");
        assert_eq!(reply.answers.len(), 1);
        assert!(reply.metadata.authoritative);
        let aaaa = s
            .local_reply(&query("metadata.google.internal.", RecordType::AAAA))
            .expect("local");
        let aaaa = Message::from_vec(&aaaa).expect("decode");
        assert!(aaaa.answers.is_empty());
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(
            s.local_reply(&query("example.com.", RecordType::A))
                .is_none()
        );
        assert!(s.local_reply(b"garbage").is_none());
    }

    /// A listed Service answers under its FQDN and the short forms; other names (and a
    /// `cluster.local` name istiod did not list) are forwarded.
    #[test]
    fn mesh_service_names_answer_with_their_vips() {
        use mesh::xds::proto::{NetworkAddress, Service};
        let store = Arc::new(mesh::xds::WorkloadStore::default());
        let service = Service {
            name: "echo".into(),
            namespace: "prod".into(),
            hostname: "echo.prod.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 10],
            }],
            ..Default::default()
        };
        store
            .upsert_service("prod/echo", "1", &service)
            .expect("valid");
        let mesh = MeshAnswerer {
            store,
            namespace: "prod".into(),
        };
        let vip = Some(LocalAnswer::Addresses(vec![
            "10.96.0.10".parse().expect("ip"),
        ]));
        for name in [
            "echo.prod.svc.cluster.local.",
            "echo.prod.svc.",
            "echo.prod.",
            "echo.",
        ] {
            assert_eq!(mesh.answer(name), vip, "{name}");
        }
        let other_ns = MeshAnswerer {
            namespace: "dev".into(),
            ..mesh.clone()
        };
        assert_eq!(other_ns.answer("echo."), None, "echo.dev is not listed");
        assert_eq!(other_ns.answer("echo.prod."), vip);
        for name in ["example.com.", "other.prod.svc.cluster.local.", "prod."] {
            assert_eq!(mesh.answer(name), None, "{name}");
        }
    }
}
