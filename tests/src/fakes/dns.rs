//! Stand-in upstream DNS server (the resolver krun forwards to): UDP and TCP on one address,
//! answers `example.com` and `www.example.com` (A 93.184.216.34, with an EDNS OPT when the
//! query had one), every `*.run.app` name with 127.0.0.1 (so the discovery proxy reaches the
//! run.app stand-in), NXDOMAIN otherwise. It records every question it gets, so tests count
//! upstream queries.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::io::{Read, Write};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::server::runtime;

/// The running stand-in.
pub struct FakeDns {
    /// Where it listens (UDP and TCP).
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl FakeDns {
    /// Every question so far, as `udp example.com. A` / `tcp ...`.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Starts it on `addr`, bound on the calling thread.
pub fn start(addr: SocketAddr) -> FakeDns {
    let udp = std::net::UdpSocket::bind(addr).expect("bind fake DNS (udp)");
    udp.set_nonblocking(true).expect("nonblocking");
    let tcp = std::net::TcpListener::bind(addr).expect("bind fake DNS (tcp)");
    tcp.set_nonblocking(true).expect("nonblocking");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (udp_seen, tcp_seen) = (seen.clone(), seen.clone());
    runtime().spawn(async move {
        let socket = UdpSocket::from_std(udp).expect("udp");
        let mut buf = vec![0u8; 65_535];
        while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
            if let Some(reply) = answer(&buf[..len], "udp", &udp_seen) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    runtime().spawn(async move {
        let listener = TcpListener::from_std(tcp).expect("tcp");
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = tcp_seen.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                while stream.read_exact(&mut len).await.is_ok() {
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let Some(reply) = answer(&query, "tcp", &seen) else {
                        return;
                    };
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    FakeDns { addr, seen }
}

fn answer(query: &[u8], transport: &str, seen: &Mutex<Vec<String>>) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let name = question.name.to_lowercase().to_string();
    if let Ok(mut seen) = seen.lock() {
        seen.push(format!("{transport} {name} {}", question.query_type));
    }
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    let a = |ip: Ipv4Addr| Record::from_rdata(question.name.clone(), 300, RData::A(A(ip)));
    match (name.as_str(), question.query_type) {
        ("example.com." | "www.example.com.", RecordType::A) => {
            reply.add_answer(a(Ipv4Addr::new(93, 184, 216, 34)));
            // Something only this server says, so a relayed answer is recognisable.
            reply.add_additional(Record::from_rdata(
                Name::from_str("stand-in.example.com.").ok()?,
                60,
                RData::TXT(TXT::new(vec!["fake upstream".to_owned()])),
            ));
        }
        ("example.com." | "www.example.com.", _) => {}
        (n, RecordType::A) if n.ends_with(".run.app.") => {
            reply.add_answer(a(Ipv4Addr::LOCALHOST));
        }
        (n, _) if n.ends_with(".run.app.") => {}
        _ => reply.metadata.response_code = ResponseCode::NXDomain,
    }
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().min(1232));
        reply.set_edns(ours);
    }
    reply.to_vec().ok()
}

/// An A query for `name` with EDNS (payload 4096) and id 0x4242: the same bytes every call,
/// so two answers to it compare byte for byte.
pub fn edns_query(name: &str) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = 0x4242;
    message.metadata.recursion_desired = true;
    message.add_query(hickory_proto::op::Query::query(
        Name::from_str(name).expect("name"),
        RecordType::A,
    ));
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    message.set_edns(edns);
    message.to_vec().expect("encode")
}

/// One UDP exchange of `query` with `server`, from the calling thread's namespace.
pub fn udp(query: &[u8], server: &str) -> Vec<u8> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    socket
        .send_to(query, server.parse::<SocketAddr>().expect("addr"))
        .expect("send");
    let mut buf = vec![0u8; 65_535];
    let len = socket.recv(&mut buf).expect("answer");
    buf.truncate(len);
    buf
}

/// One TCP (length-framed) exchange of `query` with `server`.
pub fn tcp(query: &[u8], server: &str) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(server).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).expect("write");
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).expect("length");
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).expect("answer");
    answer
}
