//! HBONE data path: throughput, added latency and memory of krun's mTLS tunnels, each against a
//! baseline measured in the same run (direct TCP on loopback, an idle krun).
//!
//! client (hbone crate, mTLS) -> krun HBONE :15008 -> sink/echo on loopback
//!
//! Run: `make bench` (or `cargo build --profile perf -p krun -p krun-tests && cargo bench
//! --profile perf -p krun-tests --bench hbone`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::client::HboneClient;
use hbone::tls::ExpectedPeer;
use krun_tests::bench::{echo, sink};
use krun_tests::fakes::pki::TestCa;
use krun_tests::{Krun, TempDir, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const BULK: usize = 1 << 30;
const PINGS: usize = 5_000;
const IDLE_TUNNELS: usize = 1_000;
const IDLE_CONNECTIONS: usize = 100;

async fn bulk<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S) -> f64 {
    let chunk = vec![7u8; 256 << 10];
    let start = Instant::now();
    let mut sent = 0;
    while sent < BULK {
        stream.write_all(&chunk).await.expect("write");
        sent += chunk.len();
    }
    stream.shutdown().await.expect("half-close");
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await.expect("sink count");
    assert_eq!(u64::from_le_bytes(count), BULK as u64);
    BULK as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

async fn ping_pong<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(PINGS);
    let mut byte = [0u8; 1];
    for _ in 0..PINGS {
        let start = Instant::now();
        stream.write_all(b"x").await.expect("ping");
        stream.flush().await.expect("flush");
        stream.read_exact(&mut byte).await.expect("pong");
        samples.push(start.elapsed());
    }
    samples.sort();
    (samples[PINGS / 2], samples[PINGS * 99 / 100])
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn krun_pid(krun: &krun_tests::Running) -> i32 {
    krun.pid.as_raw()
}

fn main() {
    let runtime = krun_tests::bench::runtime();
    let ca = TestCa::new("cluster.local");
    let dir = TempDir::new("bench-hbone");
    ca.install_workload(&dir.join(""), "spiffe://cluster.local/ns/default/sa/server");
    let client_files = ca.install_client(
        &dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let client_cert = client_files.workload_cert();
    let (sink_addr, echo_addr) = runtime.block_on(async {
        let sink_listener = TcpListener::bind("127.0.0.1:0").await.expect("sink");
        let echo_listener = TcpListener::bind("127.0.0.1:0").await.expect("echo");
        let addrs = (
            sink_listener.local_addr().expect("addr"),
            echo_listener.local_addr().expect("addr"),
        );
        tokio::spawn(sink(sink_listener));
        tokio::spawn(echo(echo_listener));
        addrs
    });
    let hbone_port = free_port();
    let mut krun = Krun::new()
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("KRUN_HBONE_PORT", hbone_port.to_string())
        .env("PORT_http", echo_addr.port().to_string())
        .env("PORT_sink", sink_addr.port().to_string())
        .env("KRUN_LOG_FORMAT", "text")
        .args(["sleep", "1000000"])
        .start();
    krun.wait_for_line("app-ready");
    let peer = SocketAddr::from(([127, 0, 0, 1], hbone_port));
    let certs = watch::channel(Arc::new(client_cert)).1;
    let expected = ExpectedPeer::TrustDomain("cluster.local".into());
    let new_client = || HboneClient::new(hbone::H2Settings::default(), Some(certs.clone()));

    runtime.block_on(async {
        let client = new_client();
        println!("HBONE data path (client -> mTLS HBONE -> krun -> loopback server), one run:");
        let direct = bulk(TcpStream::connect(sink_addr).await.expect("direct")).await;
        let (tunnel, _guard) = client.connect(peer, Some(&expected), &sink_addr.to_string()).await.expect("tunnel");
        let through = bulk(tunnel).await;
        println!("  throughput, one 1 GiB stream: direct TCP {direct:.0} MiB/s, HBONE {through:.0} MiB/s, ratio {:.2} (goal >= 0.5)", through / direct);

        let (direct_p50, direct_p99) = ping_pong(TcpStream::connect(echo_addr).await.expect("direct")).await;
        let (tunnel, _guard) = client.connect(peer, Some(&expected), &echo_addr.to_string()).await.expect("tunnel");
        let (hbone_p50, hbone_p99) = ping_pong(tunnel).await;
        println!(
            "  1-byte request/response, {PINGS} rounds on an open stream: direct p50 {} us p99 {} us, HBONE p50 {} us p99 {} us, added p50 {} us (goal <= 40 us)",
            direct_p50.as_micros(), direct_p99.as_micros(), hbone_p50.as_micros(), hbone_p99.as_micros(),
            hbone_p50.saturating_sub(direct_p50).as_micros()
        );

        let before = rss_kib(krun_pid(&krun));
        let mut held = Vec::with_capacity(IDLE_TUNNELS);
        for _ in 0..IDLE_TUNNELS {
            held.push(client.connect(peer, Some(&expected), &echo_addr.to_string()).await.expect("idle tunnel"));
        }
        let with_tunnels = rss_kib(krun_pid(&krun));
        println!(
            "  {IDLE_TUNNELS} idle tunnels held by one krun: RSS {before} KiB -> {with_tunnels} KiB, {:.1} KiB per idle tunnel (goal <= 16 KiB)",
            (with_tunnels.saturating_sub(before)) as f64 / IDLE_TUNNELS as f64
        );
        drop(held);
        let before = rss_kib(krun_pid(&krun));
        let mut clients = Vec::with_capacity(IDLE_CONNECTIONS);
        for _ in 0..IDLE_CONNECTIONS {
            let client = new_client();
            let tunnel = client.connect(peer, Some(&expected), &echo_addr.to_string()).await.expect("connection");
            clients.push((client, tunnel));
        }
        let with_connections = rss_kib(krun_pid(&krun));
        println!(
            "  {IDLE_CONNECTIONS} idle mTLS HTTP/2 connections (one tunnel each): RSS {before} KiB -> {with_connections} KiB, {:.1} KiB per connection",
            (with_connections.saturating_sub(before)) as f64 / IDLE_CONNECTIONS as f64
        );
    });
    krun.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = krun.finish();
}
