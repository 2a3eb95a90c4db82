//! Identity benchmark: time from "config known" to "certificate written" against the fakes
//! (K8s TokenRequest + Istio CA over TLS) with 0 ms and 20 ms per round trip, the count of
//! round trips on the critical path, and the in-process local CA as the same-run baseline.
//!
//! Run: `cargo bench -p krun-tests --bench identity`

use std::time::{Duration, Instant};

use krun_tests::TempDir;
use krun_tests::bench::median;
use krun_tests::fakes::ca::FakeCa;
use krun_tests::fakes::kube;
use krun_tests::fakes::pki::TestCa;
use mesh::identity::istio_ca::{self, ISTIOD_SERVER_NAME, IstioCaClient, IstioCaConfig};
use mesh::identity::k8s_token::{K8sTokenSource, TokenFile, istio_token_path};
use mesh::identity::local_ca::LocalCa;
use mesh::identity::{Identity, IdentityInputs, RotationPolicy, Signer, SpiffeId};

const RUNS: usize = 20;
const TRUST_DOMAIN: &str = "proj.svc.id.goog";

fn me() -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "prod", "reviews")
}

/// One cold mint through K8s and the Istio CA; returns (elapsed, round trips).
async fn cold_mint(rtt: Duration) -> (Duration, usize) {
    let k8s = kube::start(None);
    k8s.server.set_latency(rtt);
    let ca = FakeCa::start(TestCa::new("root"), TRUST_DOMAIN, rtt).await;
    let base = TempDir::new("bench");
    let client = k8s.client();
    let config = IstioCaConfig {
        addr: ca.addr.to_string(),
        root_pem: ca.root_pem(),
        server_name: ISTIOD_SERVER_NAME.to_owned(),
        cluster_id: "cluster-1".to_owned(),
    };
    let started = Instant::now();
    let source = K8sTokenSource::new(
        client,
        "prod",
        "reviews",
        TRUST_DOMAIN,
        Duration::from_secs(3600),
    );
    // The CA handshake runs while the token is requested, as the launcher should wire it.
    let (tokens, connection) = tokio::try_join!(
        async {
            TokenFile::start(source, istio_token_path(&base.join("")))
                .await
                .map_err(anyhow::Error::from)
        },
        async {
            istio_ca::connect(&config)
                .await
                .map_err(anyhow::Error::from)
        },
    )
    .expect("token and CA connection");
    let signer = Signer::IstioCa(IstioCaClient::new(config, connection, tokens.subscribe()));
    let _identity = Identity::start(IdentityInputs {
        identity: me(),
        signer,
        base_dir: base.join(""),
        policy: RotationPolicy::default(),
        trust_bundle: Vec::new(),
    })
    .await
    .expect("identity");
    (started.elapsed(), k8s.token_requests() + ca.signed())
}

async fn local_mint() -> Duration {
    let dir = TempDir::new("bench-local");
    TestCa::new("root").write_cacerts(&dir.join("cacerts"));
    let started = Instant::now();
    let ca = LocalCa::load(&dir.join("cacerts")).expect("local CA");
    let _identity = Identity::start(IdentityInputs {
        identity: me(),
        signer: Signer::Local(Box::new(ca)),
        base_dir: dir.join("base"),
        policy: RotationPolicy::default(),
        trust_bundle: Vec::new(),
    })
    .await
    .expect("identity");
    started.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut local = Vec::new();
        for _ in 0..RUNS {
            local.push(local_mint().await);
        }
        let local = median(local);
        println!("local CA (baseline, no network): median {:.2} ms over {RUNS} runs", ms(local));
        for rtt in [Duration::ZERO, Duration::from_millis(20)] {
            let mut times = Vec::new();
            let mut trips = 0;
            for _ in 0..RUNS {
                let (t, n) = cold_mint(rtt).await;
                times.push(t);
                trips = n;
            }
            let m = median(times);
            let ideal = rtt * 2;
            println!(
                "K8s token + Istio CA, {} ms per round trip: median {:.2} ms, {trips} round trips on the critical path, {:.2}x the local CA, {:.2} ms above 2 x RTT",
                rtt.as_millis(),
                ms(m),
                m.as_secs_f64() / local.as_secs_f64(),
                ms(m.saturating_sub(ideal)),
            );
        }
    });
}
