//! The builtin data plane in the ambient mesh (issue #13), each figure against a baseline
//! measured in the same run:
//!
//! 1. Memory of the workload store holding 10,000 workloads and 1,000 services (each workload
//!    an endpoint of one service), as heap bytes (a counting allocator in this process) and
//!    VmRSS delta, against the same figures for an empty store; and the cost of one
//!    `resolve()` for a Service VIP and for a workload address.
//! 2. Connection setup (connect + 1-byte round trip + close) from an app whose traffic krun
//!    captures, to a workload the fake istiod lists (HBONE over mTLS to the peer's krun on
//!    15008), to an unlisted 10.x address (passthrough through krun), and directly (not
//!    captured), in two network namespaces on a veth pair; needs root, skipped otherwise.
//!
//! Run: `cargo build --profile perf -p krun --bins && cargo bench --profile perf -p krun-tests
//! --bench ambient`. `AMBIENT_BENCH_ROUNDS=N` (default 3) interleaved rounds of
//! `CONNECTIONS` connections per path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use krun_tests::bench::{connect_round_trip_close, median, serve_in};
use krun_tests::fakes::istiod::{FakeIstiod, IstiodTls};
use krun_tests::fakes::pki::TestCa;
use krun_tests::netns::Netns;
use krun_tests::{Krun, TempDir};
use mesh::xds::WorkloadStore;
use mesh::xds::proto::{NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload};
use nix::sys::signal::Signal;

/// Live heap bytes of this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes so a data structure's heap is measured exactly.
struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const WORKLOADS: u32 = 10_000;
const SERVICES: u32 = 1_000;
/// Resolutions timed per kind.
const RESOLVES: u32 = 200_000;
/// Connections per path per round.
const CONNECTIONS: usize = 300;
const LISTED_IP: &str = "10.1.2.3";
const UNLISTED_IP: &str = "10.1.2.4";
const DIRECT_IP: &str = "192.0.2.2";
const ECHO_PORT: u16 = 8080;
/// The server app's sink (unused here, served beside the echo server).
const SINK_PORT: u16 = 9000;

fn ip4(n: u32) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

fn service(i: u32) -> Service {
    Service {
        name: format!("svc-{i}"),
        namespace: format!("ns-{}", i % 50),
        hostname: format!("svc-{i}.ns-{}.svc.cluster.local", i % 50),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: ip4(0x0a60_0000 + i),
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 8080,
        }],
        waypoint: None,
    }
}

fn workload(i: u32) -> Workload {
    let svc = i % SERVICES;
    let mut w = Workload {
        name: format!("app-{i}-7d9f8c6b5-x2k4q"),
        namespace: format!("ns-{}", svc % 50),
        addresses: vec![ip4(0x0a00_0000 + i)],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        service_account: format!("sa-{}", i % 100),
        ..Default::default()
    };
    let ports = vec![Port {
        service_port: 80,
        target_port: 8080,
    }];
    w.services.insert(
        format!(
            "ns-{}/svc-{svc}.ns-{}.svc.cluster.local",
            svc % 50,
            svc % 50
        ),
        PortList { ports },
    );
    w
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Heap and RSS growth while `fill` builds a store.
fn measure(fill: impl FnOnce() -> WorkloadStore) -> (WorkloadStore, usize, i64) {
    let (heap, rss) = (LIVE.load(Ordering::Relaxed), vm_rss_kib());
    let store = fill();
    let heap = LIVE.load(Ordering::Relaxed).saturating_sub(heap);
    (store, heap, vm_rss_kib() as i64 - rss as i64)
}

fn store_memory() {
    let services: Vec<(String, Service)> = (0..SERVICES)
        .map(|i| {
            let s = service(i);
            (format!("{}/{}", s.namespace, s.hostname), s)
        })
        .collect();
    let workloads: Vec<(String, Workload)> = (0..WORKLOADS)
        .map(|i| {
            (
                format!("Kubernetes//Pod/ns-{}/app-{i}", i % 50),
                workload(i),
            )
        })
        .collect();
    let (_empty, empty_heap, empty_rss) = measure(WorkloadStore::default);
    let (store, heap, rss) = measure(|| {
        let store = WorkloadStore::default();
        for (name, s) in &services {
            store.upsert_service(name, "1", s).expect("valid service");
        }
        for (name, w) in &workloads {
            store.upsert(name, "1", w).expect("valid workload");
        }
        store
    });
    println!(
        "Workload store, {WORKLOADS} workloads + {SERVICES} services: heap {:.2} MiB ({} B per \
         entry), VmRSS +{rss} KiB; baseline empty store: heap {empty_heap} B, VmRSS \
         +{empty_rss} KiB",
        heap as f64 / (1 << 20) as f64,
        heap / (WORKLOADS + SERVICES) as usize,
    );
    let vip = |i: u32| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i)), 80);
    let pod = |i: u32| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 8080);
    let time = |target: &dyn Fn(u32) -> SocketAddr, modulo: u32| {
        let start = Instant::now();
        for i in 0..RESOLVES {
            std::hint::black_box(store.resolve(target(i % modulo)));
        }
        start.elapsed().as_nanos() as f64 / f64::from(RESOLVES)
    };
    let by_vip = time(&vip, SERVICES);
    let by_pod = time(&pod, WORKLOADS);
    println!(
        "  resolve(): Service VIP (10 endpoints, round robin) {by_vip:.0} ns, workload address \
         {by_pod:.0} ns (ratio {:.2}x)",
        by_vip / by_pod
    );
}

fn connection_setup() {
    if !nix::unistd::Uid::effective().is_root() {
        return println!("Connection setup: skipped (needs root for namespaces and iptables)");
    }
    let rounds: usize = std::env::var("AMBIENT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (client_ns, server_ns) = Netns::pair("ambient", LISTED_IP);
    server_ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{UNLISTED_IP}/32"),
        "dev",
        "lo",
    ]);
    serve_in(&server_ns, SINK_PORT, ECHO_PORT);
    let ca = TestCa::new("cluster.local");
    let server_dir = TempDir::new("bench-ambient-server");
    ca.install_workload(
        &server_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/server",
    );
    let mut server = Krun::wrapped(&server_ns.wrapper())
        .env("MESH_BASE_DIR", server_dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("PORT_http", ECHO_PORT.to_string())
        .env("KRUN_HBONE_PORT", "15008")
        .env("KRUN_TUNNEL_PORT", "15009")
        .args(["sleep", "1000000"])
        .start();
    server.wait_for_line("tunnel port open");
    let tls = IstiodTls::new(&ca);
    let istiod = client_ns.enter(move || FakeIstiod::start(tls));
    istiod.push_workload(
        "server",
        LISTED_IP.parse().expect("ip"),
        "default",
        "server",
        true,
    );
    let client_dir = TempDir::new("bench-ambient-client");
    ca.install_workload(
        &client_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let mut client = Krun::wrapped(&client_ns.wrapper())
        .env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT")
        .env("OUTBOUND_IP_RANGES_INCLUDE", "10.1.2.0/24")
        .env("MESH_BASE_DIR", client_dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("XDS_ADDR", istiod.addr.to_string())
        .args(["sleep", "1000000"])
        .start();
    client.wait_for_all(&[
        "capture listener (iptables REDIRECT target) listening",
        "xDS push applied (ACK)",
    ]);
    client_ns.enter_this_thread();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let addr = |ip: &str| SocketAddr::new(ip.parse().expect("ip"), ECHO_PORT);
    let paths = [
        ("direct", addr(DIRECT_IP)),
        ("passthrough", addr(UNLISTED_IP)),
        ("listed workload (HBONE)", addr(LISTED_IP)),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        for ((_, target), samples) in paths.iter().zip(samples.iter_mut()) {
            samples.push(runtime.block_on(connect_round_trip_close(*target, CONNECTIONS)));
        }
    }
    let p50: Vec<f64> = samples
        .into_iter()
        .map(|s| median(s).as_secs_f64() * 1e6)
        .collect();
    println!(
        "Connection setup (connect + 1-byte round trip + close), medians of {rounds} rounds × \
         {CONNECTIONS}:"
    );
    for ((name, _), us) in paths.iter().zip(&p50) {
        println!("  {name}: {us:.0} µs ({:.2}x direct)", us / p50[0]);
    }
    for krun in [&client, &server] {
        krun.signal(Signal::SIGTERM);
    }
    let done = client.finish();
    server.finish();
    assert!(
        done.has_line("route=\"hbone\""),
        "the listed workload went over HBONE"
    );
    assert!(
        done.has_line("route=\"passthrough\""),
        "the unlisted address was passed through"
    );
}

fn main() {
    store_memory();
    connection_setup();
}
