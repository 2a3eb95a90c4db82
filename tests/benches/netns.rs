//! The mesh data path across a real interface, as a user evaluating krun measures it: two
//! "pods" (network namespaces) on a veth pair, each with its own krun (builtin data plane), the
//! client's app traffic captured by iptables and tunnelled over HBONE mTLS to the server's krun,
//! which hands it to the server app. Every figure is set against direct TCP between the same two
//! namespaces, measured in the same run, interleaved round by round; medians are printed.
//!
//! ```text
//! client ns: bench thread -> (iptables REDIRECT) krun :15001 -> HBONE mTLS -> veth ->
//! server ns: krun :15008 -> sink/echo (bench thread)        direct: bench -> veth -> sink/echo
//! ```
//!
//! Needs root (namespaces, iptables). Run: `make bench`, or `cargo build --profile perf -p krun
//! --bins && cargo bench --profile perf -p krun-tests --bench netns`. `NETNS_BENCH_ROUNDS=N`
//! (default 5) sets the number of interleaved rounds; `KRUN_BENCH_BASELINE=/path/to/krun` adds
//! another build (e.g. main's) on a second pair of pods, measured round by round with this one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use krun_tests::bench::{connect, connect_round_trip_close, median, serve_in};
use krun_tests::fakes::pki::TestCa;
use krun_tests::netns::Netns;
use krun_tests::{Krun, Running, TempDir, binary};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of one bulk transfer.
const BULK: usize = 1 << 30;
/// Round trips of 1 byte on one open connection, per round.
const PINGS: usize = 2_000;
/// Connections opened, used for one round trip and closed, per round; also the connections the
/// idle-RSS figure follows.
const CONNECTIONS: usize = 300;
/// The mesh address of the server pod (on its loopback; the client routes it over the veth).
const SERVER_MESH_IP: &str = "10.1.2.3";
/// The server pod's address on the veth: not captured, so the direct path.
const SERVER_DIRECT_IP: &str = "192.0.2.2";
/// How long a krun runs idle before its memory is read, at most (see `main`).
const SETTLED: Duration = Duration::from_secs(5);
const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 8080;

/// One bulk transfer to the sink; MiB/s.
async fn bulk(addr: SocketAddr) -> f64 {
    let mut stream = connect(addr).await;
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
    assert_eq!(
        u64::from_le_bytes(count),
        BULK as u64,
        "the sink got every byte"
    );
    BULK as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

/// p50 of a 1-byte round trip on one open connection.
async fn ping_pong(addr: SocketAddr) -> Duration {
    let mut stream = connect(addr).await;
    let mut samples = Vec::with_capacity(PINGS);
    let mut byte = [0u8; 1];
    for _ in 0..PINGS {
        let start = Instant::now();
        stream.write_all(b"x").await.expect("ping");
        stream.read_exact(&mut byte).await.expect("pong");
        samples.push(start.elapsed());
    }
    median(samples)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Memory of an idle krun: `VmRSS (RssAnon anonymous)` in KiB.
fn memory(krun: &Running) -> String {
    format!(
        "{} KiB ({} KiB anon)",
        krun.rss_kib(),
        krun.status_kib("RssAnon")
    )
}

/// One krun build under test: its two pods, their krun processes and the addresses to reach
/// the server app directly and through the mesh.
struct Pods {
    label: String,
    client_ns: Netns,
    client: Running,
    server: Running,
    _dirs: (TempDir, TempDir, Netns),
}

/// Two pods joined by a veth pair, each with `krun` (builtin data plane) and workload
/// certificates from `ca`; the server app runs on a thread in the server pod.
fn pods(label: &str, krun: PathBuf, ca: &TestCa) -> Pods {
    let (client_ns, server_ns) = Netns::pair("bench", SERVER_MESH_IP);
    serve_in(&server_ns, SINK_PORT, ECHO_PORT);
    let server_dir = TempDir::new("bench-netns-server");
    ca.install_workload(
        &server_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/server",
    );
    let mut server = Krun::wrapped_binary(&server_ns.wrapper(), krun.clone())
        .env("MESH_BASE_DIR", server_dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("PORT_http", ECHO_PORT.to_string())
        .env("PORT_sink", SINK_PORT.to_string())
        .env("KRUN_HBONE_PORT", "15008")
        .env("KRUN_TUNNEL_PORT", "15009")
        .args(["sleep", "1000000"])
        .start();
    server.wait_for_line("tunnel port open");
    let client_dir = TempDir::new("bench-netns-client");
    ca.install_workload(
        &client_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let mut client = Krun::wrapped_binary(&client_ns.wrapper(), krun)
        .env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT")
        .env("OUTBOUND_IP_RANGES_INCLUDE", format!("{SERVER_MESH_IP}/32"))
        // The server pod is a mesh workload: tunnel to it over HBONE (without this, krun
        // reaches it directly, as it does any address outside KRUN_MESH_CIDRS).
        .env("KRUN_MESH_CIDRS", format!("{SERVER_MESH_IP}/32"))
        .env("MESH_BASE_DIR", client_dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .args(["sleep", "1000000"])
        .start();
    client.wait_for_all(&[
        "traffic capture: iptables",
        "capture listener (iptables REDIRECT target) listening",
    ]);
    Pods {
        label: label.to_owned(),
        client_ns,
        client,
        server,
        _dirs: (server_dir, client_dir, server_ns),
    }
}

/// Per-round figures of one build.
#[derive(Default)]
struct Figures {
    direct_rate: Vec<f64>,
    mesh_rate: Vec<f64>,
    client_cpu: Vec<f64>,
    server_cpu: Vec<f64>,
    client_faults: Vec<f64>,
    server_faults: Vec<f64>,
    direct_ping: Vec<Duration>,
    mesh_ping: Vec<Duration>,
    direct_crc: Vec<Duration>,
    mesh_crc: Vec<Duration>,
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// One round: each figure direct, then through the mesh.
fn round(pods: &Pods, runtime: &tokio::runtime::Runtime, f: &mut Figures) {
    // Sockets this thread opens from here on live in this build's client pod.
    pods.client_ns.enter_this_thread();
    let (client, server) = (&pods.client, &pods.server);
    f.direct_rate
        .push(runtime.block_on(bulk(addr(SERVER_DIRECT_IP, SINK_PORT))));
    let cpu = (client.cpu_seconds(), server.cpu_seconds());
    let faults = (client.minor_faults(), server.minor_faults());
    f.mesh_rate
        .push(runtime.block_on(bulk(addr(SERVER_MESH_IP, SINK_PORT))));
    let gib = BULK as f64 / (1u64 << 30) as f64;
    f.client_cpu.push((client.cpu_seconds() - cpu.0) / gib);
    let server_cpu = server.cpu_seconds() - cpu.1;
    // A gibibyte of mTLS costs the server krun CPU time: none means the stream bypassed it.
    assert!(
        server_cpu > 0.0,
        "{}: the server krun did no work for the mesh stream: it did not go through HBONE",
        pods.label
    );
    f.server_cpu.push(server_cpu / gib);
    f.client_faults
        .push((client.minor_faults() - faults.0) as f64 / gib);
    f.server_faults
        .push((server.minor_faults() - faults.1) as f64 / gib);
    let (direct_echo, mesh_echo) = (
        addr(SERVER_DIRECT_IP, ECHO_PORT),
        addr(SERVER_MESH_IP, ECHO_PORT),
    );
    f.direct_ping.push(runtime.block_on(ping_pong(direct_echo)));
    f.mesh_ping.push(runtime.block_on(ping_pong(mesh_echo)));
    f.direct_crc
        .push(runtime.block_on(connect_round_trip_close(direct_echo, CONNECTIONS)));
    f.mesh_crc
        .push(runtime.block_on(connect_round_trip_close(mesh_echo, CONNECTIONS)));
}

fn report(pods: &Pods, f: Figures) {
    let label = &pods.label;
    let ratios: Vec<f64> = f
        .direct_rate
        .iter()
        .zip(&f.mesh_rate)
        .map(|(d, m)| m / d)
        .collect();
    println!(
        "  {label}: one {} MiB stream: direct {:.0} MiB/s, through krun {:.0} MiB/s, ratio {:.2} \
         (rounds: {}) (goal >= 0.50)",
        BULK >> 20,
        median(f.direct_rate),
        median(f.mesh_rate),
        median(ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  {label}: CPU s per GiB tunnelled: client krun {:.2}, server krun {:.2} (goal server \
         <= 0.5); minor page faults per GiB: client {:.0}, server {:.0}",
        median(f.client_cpu),
        median(f.server_cpu),
        median(f.client_faults),
        median(f.server_faults)
    );
    let (direct, mesh) = (median(f.direct_ping), median(f.mesh_ping));
    println!(
        "  {label}: 1-byte request/response on an open connection, p50: direct {:.0} us, \
         through krun {:.0} us, added {:.0} us (goal <= 40)",
        micros(direct),
        micros(mesh),
        micros(mesh) - micros(direct)
    );
    let (direct, mesh) = (median(f.direct_crc), median(f.mesh_crc));
    println!(
        "  {label}: connect + 1-byte round trip + close, p50: direct {:.0} us, through krun \
         {:.0} us, added {:.0} us (goal <= 150)",
        micros(direct),
        micros(mesh),
        micros(mesh) - micros(direct)
    );
    println!(
        "  {label}: RSS after the run: client krun {}, server krun {}",
        memory(&pods.client),
        memory(&pods.server)
    );
}

fn main() {
    let rounds: usize = std::env::var("NETNS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let ca = TestCa::new("cluster.local");
    // A second krun binary (e.g. built from main) measured in the same run, round by round.
    let mut builds = Vec::new();
    if let Ok(before) = std::env::var("KRUN_BENCH_BASELINE") {
        builds.push(pods("KRUN_BENCH_BASELINE", before.into(), &ca));
    }
    builds.push(pods("this build", binary("krun"), &ca));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "Mesh data path across a veth pair (client pod -> krun -> HBONE mTLS -> krun -> server \
         pod) against direct TCP between the same pods, {rounds} interleaved rounds, medians:"
    );
    for pods in &mut builds {
        // Idle means settled: krun unmaps its startup code a second after its app is ready
        // and says so; a build that does not (a baseline from before) is measured after
        // SETTLED.
        for krun in [&mut pods.client, &mut pods.server] {
            krun.wait_for_line_within("startup code unmapped", SETTLED);
        }
        let idle = (memory(&pods.client), memory(&pods.server));
        pods.client_ns.enter_this_thread();
        runtime.block_on(connect_round_trip_close(
            addr(SERVER_MESH_IP, ECHO_PORT),
            CONNECTIONS,
        ));
        println!(
            "  {}: idle RSS, builtin data plane: client krun {} -> {} after {CONNECTIONS} \
             connections; server krun {} -> {}",
            pods.label,
            idle.0,
            memory(&pods.client),
            idle.1,
            memory(&pods.server)
        );
    }
    let mut figures: Vec<Figures> = builds.iter().map(|_| Figures::default()).collect();
    for _ in 0..rounds {
        for (pods, f) in builds.iter().zip(&mut figures) {
            round(pods, &runtime, f);
        }
    }
    for (pods, f) in builds.iter().zip(figures) {
        report(pods, f);
    }
    for pods in builds {
        pods.client.signal(Signal::SIGTERM);
        pods.server.signal(Signal::SIGTERM);
        let _ = pods.client.finish();
        let _ = pods.server.finish();
    }
}
