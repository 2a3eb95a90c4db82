//! hgate's data path, against a baseline measured in the same run:
//! - throughput of one connection client → hgate (SNI) → HBONE POST (h2c) → krun tunnel port →
//!   sink, divided by client → sink directly;
//! - hgate's RSS per idle tunnelled connection (baseline: hgate with none open).
//!
//! Run: `make bench BENCH=hgate` (builds hgate and krun with the `perf` profile, then runs this
//! bench against them). `HGATE_BENCH_IDLE` sets the number of idle connections (default 5000);
//! `HGATE_BENCH_BASELINE=/path/to/hgate` measures another hgate's idle figures first, in the
//! same run and against the same krun (a before/after).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use krun_tests::bench::median;
use krun_tests::{Krun, Running, TempDir, free_port};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const PAYLOAD_MIB: usize = 128;
const RUNS: usize = 3;

fn client_hello() -> Vec<u8> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../hbone/tests/corpus/openssl-s_client.bin");
    std::fs::read(path).expect("corpus ClientHello")
}

/// Counts bytes per connection until EOF, answers the count (8 bytes) and closes.
struct Sink {
    addr: SocketAddr,
    /// Connections that have delivered at least the ClientHello.
    primed: Arc<AtomicUsize>,
    changed: Arc<Notify>,
}

async fn sink(hello_len: usize) -> Sink {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("sink addr");
    let primed = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(Notify::new());
    let (p, c) = (primed.clone(), changed.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (p, c) = (p.clone(), c.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                let mut total = 0usize;
                let mut counted = false;
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n;
                    if !counted && total >= hello_len {
                        counted = true;
                        p.fetch_add(1, Ordering::Relaxed);
                        c.notify_waiters();
                    }
                }
                let _ = conn.write_all(&(total as u64).to_be_bytes()).await;
            });
        }
    });
    Sink {
        addr,
        primed,
        changed,
    }
}

/// Sends `hello` then `mib` MiB, half-closes, waits for the sink's count; returns MiB/s.
async fn transfer(addr: SocketAddr, hello: &[u8], mib: usize) -> f64 {
    let start = Instant::now();
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    conn.write_all(hello).await.expect("hello");
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        conn.write_all(&block).await.expect("write");
    }
    conn.shutdown().await.expect("half-close");
    let mut count = [0u8; 8];
    conn.read_exact(&mut count).await.expect("sink count");
    assert_eq!(
        u64::from_be_bytes(count) as usize,
        hello.len() + mib * (1 << 20),
        "every byte arrived"
    );
    mib as f64 / start.elapsed().as_secs_f64()
}

fn ready_addr(gate: &mut Running, what: &str) -> SocketAddr {
    let line = gate.wait_for_line(what);
    line.split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("addr in ready line")
}

/// Starts `gate` routing by `routes` with room for the idle connections.
fn start_gate(gate: Krun, routes: &Path) -> Running {
    gate.env("HGATE_ROUTES", routes)
        .env("HGATE_MAX_CONNECTIONS", "20000")
        .start()
}

/// hgate's VmRSS (KiB) before and with `idle` tunnelled connections held open (each has sent
/// its ClientHello and the sink has seen it); the connections are closed on return.
fn idle_rss(
    rt: &tokio::runtime::Runtime,
    gate: &Running,
    gate_addr: SocketAddr,
    sink: &Sink,
    hello: &[u8],
    idle: usize,
) -> (u64, u64) {
    // On a fresh hgate, so transfer buffers do not blur the figure.
    let baseline = gate.rss_kib();
    let held = rt.block_on(async {
        let mut held = Vec::with_capacity(idle);
        let start = sink.primed.load(Ordering::Relaxed);
        for batch in 0..idle.div_ceil(100) {
            let n = 100.min(idle - batch * 100);
            for _ in 0..n {
                let mut conn = TcpStream::connect(gate_addr).await.expect("connect idle");
                conn.write_all(hello).await.expect("hello");
                held.push(conn);
            }
            let want = start + held.len();
            while sink.primed.load(Ordering::Relaxed) < want {
                let notified = sink.changed.notified();
                if sink.primed.load(Ordering::Relaxed) >= want {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
        }
        held
    });
    let loaded = gate.rss_kib();
    drop(held);
    (baseline, loaded)
}

fn main() {
    let idle: usize = std::env::var("HGATE_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let hello = client_hello();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sink = rt.block_on(sink(hello.len()));

    // krun fronts the sink through its tunnel port (`/_hbone/sink` → PORT_sink).
    let tunnel = free_port();
    let mut krun = Krun::new()
        .env("PORT_sink", sink.addr.to_string())
        // hgate reaches the upstream over plaintext h2c, not through the mesh terminator.
        .env("KRUN_TUNNEL_PLAINTEXT", "sink")
        .env("KRUN_TUNNEL_PORT", tunnel.to_string())
        .args(["sleep", "100000"])
        .start();
    krun.wait_for_line("tunnel port open");
    let dir = TempDir::new("hgate-bench");
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &routes,
        format!("echo.default: http://127.0.0.1:{tunnel}/_hbone/sink\n"),
    )
    .expect("routes");
    // The baseline build first (`HGATE_BENCH_BASELINE`), then this one, against the same krun.
    let mut idle_figures = Vec::new();
    if let Ok(before) = std::env::var("HGATE_BENCH_BASELINE") {
        let mut gate = start_gate(Krun::hgate_binary(before.into()), &routes);
        let addr = ready_addr(&mut gate, "SNI listener ready");
        let figures = idle_rss(&rt, &gate, addr, &sink, &hello, idle);
        gate.signal(Signal::SIGTERM);
        let _ = gate.finish();
        idle_figures.push(("HGATE_BENCH_BASELINE", figures));
    }
    let mut gate = start_gate(Krun::hgate(), &routes);
    let gate_addr = ready_addr(&mut gate, "SNI listener ready");
    let figures = idle_rss(&rt, &gate, gate_addr, &sink, &hello, idle);
    idle_figures.push(("this build", figures));

    let (direct, through) = rt.block_on(async {
        let mut direct = Vec::new();
        let mut through = Vec::new();
        for _ in 0..RUNS {
            direct.push(transfer(sink.addr, &hello, PAYLOAD_MIB).await);
            through.push(transfer(gate_addr, &hello, PAYLOAD_MIB).await);
        }
        (median(direct), median(through))
    });

    println!("hgate benchmark ({PAYLOAD_MIB} MiB per transfer, median of {RUNS})");
    println!("  direct TCP           {direct:>8.0} MiB/s");
    println!("  through hgate → krun {through:>8.0} MiB/s");
    println!(
        "  ratio                {:>8.2}  (goal >= 0.45)",
        through / direct
    );
    for (build, (baseline, loaded)) in idle_figures {
        let per_conn = (loaded.saturating_sub(baseline)) as f64 / idle as f64;
        println!("  {build}:");
        println!("    hgate RSS idle        {baseline:>8} KiB");
        println!("    hgate RSS {idle} conns {loaded:>8} KiB");
        println!("    per idle connection  {per_conn:>8.1} KiB  (goal <= 10 KiB)");
    }

    gate.signal(Signal::SIGTERM);
    let _ = gate.finish();
    krun.signal(Signal::SIGTERM);
    let _ = krun.finish();
}
