//! Istio authorization: the time from istiod pushing a DENY policy to krun enforcing it on an
//! open HBONE stream (the stream closed), against a baseline measured in the same run: the
//! time from istiod pushing an unrelated workload to krun's ACK arriving at istiod (one xDS
//! round trip, push to apply to answer).
//!
//! client (hbone crate, mTLS) -> krun HBONE :15008 -> echo on loopback; fake istiod over
//! delta ADS, in process.
//!
//! Run: `cargo bench --profile perf -p krun-tests --bench authz` (or `make bench`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::client::HboneClient;
use hbone::tls::ExpectedPeer;
use krun_tests::bench::{echo, median};
use krun_tests::fakes::istiod::{FakeIstiod, IstiodTls, deny_principals};
use krun_tests::fakes::pki::TestCa;
use krun_tests::{Krun, TempDir, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

const RUNS: usize = 21;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runtime = krun_tests::bench::runtime();
    let ca = TestCa::new("cluster.local");
    let dir = TempDir::new("bench-authz");
    ca.install_workload(&dir.join(""), "spiffe://cluster.local/ns/default/sa/server");
    let files = ca.install_client(
        &dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let client_cert = files.workload_cert();
    let echo_addr = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("echo");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(echo(listener));
        addr
    });
    let istiod = FakeIstiod::start(IstiodTls::new(&ca));
    let hbone_port = free_port();
    let mut krun = Krun::new()
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("XDS_ADDR", istiod.addr.to_string())
        .env("KRUN_HBONE_PORT", hbone_port.to_string())
        .env("PORT_http", echo_addr.port().to_string())
        .env("KRUN_LOG_FORMAT", "text")
        .args(["sleep", "1000000"])
        .start();
    krun.wait_for_line("subscribed to workload addresses and authorization policies");
    let peer = SocketAddr::from(([127, 0, 0, 1], hbone_port));
    let client = HboneClient::new(
        hbone::H2Settings::default(),
        Some(watch::channel(Arc::new(client_cert)).1),
    );
    let expected = ExpectedPeer::TrustDomain("cluster.local".into());

    // Every push is answered by exactly one ACK: counting requests tells which ACK arrived.
    // Two subscriptions and the ACKs of istiod's two initial answers come first.
    let mut requests = 4;
    istiod.wait_for_requests(requests);
    let (mut acked, mut enforced) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        // Baseline: an unrelated push, until its ACK reaches istiod.
        let start = Instant::now();
        let ip = std::net::IpAddr::from([10, 9, (run / 250) as u8, (run % 250) as u8 + 1]);
        istiod.push_workload(&format!("unrelated-{run}"), ip, "other", "sa", true);
        requests += 1;
        istiod.wait_for_requests(requests);
        acked.push(start.elapsed());

        // Measured: a DENY for the client while its stream is open, until the stream ends.
        let elapsed = runtime.block_on(async {
            let (mut tunnel, _guard) = client
                .connect(peer, Some(&expected), &echo_addr.to_string())
                .await
                .expect("tunnel");
            let mut byte = [0u8; 1];
            tunnel.write_all(b"x").await.expect("ping");
            tunnel
                .read_exact(&mut byte)
                .await
                .expect("pong: the stream is open");
            let start = Instant::now();
            istiod.push_policy(&deny_principals(
                "default",
                "deny-client",
                &["cluster.local/ns/default/sa/client"],
            ));
            // Ends with EOF or a reset: either way, closed by krun.
            let _ = tunnel.read(&mut byte).await;
            start.elapsed()
        });
        enforced.push(elapsed);
        requests += 1;
        istiod.wait_for_requests(requests);
        istiod.remove("default/deny-client");
        requests += 1;
        istiod.wait_for_requests(requests);
    }
    let (acked, enforced) = (median(acked), median(enforced));
    println!("Authorization policy push to enforcement, median of {RUNS}:");
    println!(
        "  baseline, unrelated workload push -> its ACK at istiod: {:.2} ms",
        ms(acked)
    );
    println!(
        "  DENY push -> open stream closed by krun: {:.2} ms, ratio {:.2}",
        ms(enforced),
        enforced.as_secs_f64() / acked.as_secs_f64()
    );
    krun.signal(nix::sys::signal::Signal::SIGTERM);
    krun.finish();
}
