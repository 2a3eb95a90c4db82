//! Mesh discovery on its critical path: every fake (metadata, GKE, Resource Manager, K8s
//! API) adds 20 ms to each answer, so discovery time / 20 ms is the number of round trips
//! krun waits for one after another (plus its own CPU time: TLS handshakes, JSON). Printed
//! next to the number of calls it made (what a fully sequential client such as cloud-run-mesh
//! waits for), against one metadata round trip measured in the same run, and with the
//! "waves": groups of requests sent together, counted from the fakes' arrival times (a new
//! wave starts when a request arrives at least 20 ms after the previous wave began).
//!
//! The last scenario runs off GCP: no metadata server (the probe goes to the link-local
//! address, where this machine has none) and a service-account key whose token endpoint is a
//! fake with the same added latency.
//!
//! Run: `cargo bench -p krun-tests --bench discovery` (or `make bench`). `TRACE=1` prints
//! each request's arrival time.

use std::time::{Duration, Instant};

use krun_tests::TempDir;
use krun_tests::fakes::gke::FakeCluster;
use krun_tests::fakes::oauth::FakeOAuth;
use krun_tests::fakes::{TestWorld, server};
use mesh::config::{Env, MeshConfig};
use mesh::metadata::MetadataClient;

const LATENCY: Duration = Duration::from_millis(20);
const RUNS: usize = 11;

fn world() -> TestWorld {
    TestWorld::builder()
        .instance(|i| i.email = "runner@wl-project.iam.gserviceaccount.com".into())
        .cluster(FakeCluster::new("cfg-project", "us-central1", "istio-main").mesh())
        .cluster(FakeCluster::new("wl-project", "us-central1", "istio-local").mesh())
        .project("cfg-project", "42", &[("mesh-namespace", "payments")])
        .project("wl-project", "1234567890", &[("mesh-namespace", "fortio")])
        .mesh_env(&[("XDS_ADDR", "meshcon.example:15012")])
        .latency(LATENCY)
        .start()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One scenario's figures: median time, calls and waves of the last run.
struct Figures {
    time: Duration,
    calls: usize,
    waves: usize,
}

/// Off GCP: the token endpoint the key names, which `measure` counts with the world's fakes.
struct KeyFile {
    oauth: FakeOAuth,
    dir: TempDir,
}

/// Runs one scenario; with `key` there is no metadata server and `extra` names the key.
fn measure(world: &TestWorld, extra: &[(&str, &str)], key: Option<&KeyFile>) -> Figures {
    let env: Env = world
        .env()
        .into_iter()
        .filter(|(k, _)| key.is_none() || *k != "GCE_METADATA_HOST")
        .map(|(k, v)| (k.to_owned(), v))
        .chain(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .collect();
    let config = MeshConfig::from_env(&env).expect("valid env");
    let mut times = Vec::with_capacity(RUNS);
    let (mut calls, mut waves) = (0, 0);
    for _ in 0..RUNS {
        let start = Instant::now();
        let found = server::runtime()
            .block_on(mesh::discovery::discover(&config))
            .expect("discovery");
        times.push(start.elapsed());
        assert!(found.mesh, "a mesh is found");
        let token_endpoint = key.map(|k| k.oauth.seen()).unwrap_or_default();
        let mut arrivals: Vec<(Instant, String)> = world
            .servers()
            .iter()
            .flat_map(|s| s.seen())
            .chain(token_endpoint)
            .filter(|s| s.arrived >= start)
            .map(|s| (s.arrived, s.path))
            .collect();
        arrivals.sort();
        calls = arrivals.len();
        let mut wave_start: Option<Instant> = None;
        waves = 0;
        for (at, path) in &arrivals {
            if wave_start.is_none_or(|w| *at - w >= LATENCY) {
                waves += 1;
                wave_start = Some(*at);
            }
            if std::env::var_os("TRACE").is_some() {
                println!("    +{:6.1} ms {path}", ms(*at - start));
            }
        }
    }
    times.sort();
    Figures {
        time: times[RUNS / 2],
        calls,
        waves,
    }
}

fn main() {
    let world = world();
    let mut baseline: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let client =
                MetadataClient::new(&world.metadata.addr().to_string(), Duration::from_secs(2));
            let start = Instant::now();
            server::runtime()
                .block_on(client.get("project/project-id"))
                .expect("metadata");
            start.elapsed()
        })
        .collect();
    baseline.sort();
    let baseline = baseline[RUNS / 2];
    println!(
        "discovery with {} ms added per request, median of {RUNS} runs; baseline: one metadata round trip = {:.1} ms",
        ms(LATENCY),
        ms(baseline)
    );
    println!(
        "  {:<50} {:>7} {:>8} {:>10} {:>6} {:>6}",
        "scenario", "ms", "/ 20 ms", "/ baseline", "waves", "calls"
    );
    let scenarios: [(&str, &[(&str, &str)]); 4] = [
        ("MESH unset: metadata, list labelled, mesh-env", &[]),
        (
            "MESH=gke://P: + Resource Manager, multi-project",
            &[("MESH", "gke://cfg-project")],
        ),
        (
            "MESH=//container.googleapis.com/...: get, mesh-env",
            &[(
                "MESH",
                "//container.googleapis.com/projects/cfg-project/locations/us-central1/clusters/istio-main",
            )],
        ),
        (
            "MESH=gke://P/L/C, namespace and number in env",
            &[
                ("MESH", "gke://cfg-project/us-central1/istio-main"),
                ("WORKLOAD_NAMESPACE", "fortio"),
                ("PROJECT_NUMBER", "42"),
            ],
        ),
    ];
    let print = |name: &str, f: Figures| {
        println!(
            "  {:<50} {:>7.1} {:>8.2} {:>10.2} {:>6} {:>6}",
            name,
            ms(f.time),
            ms(f.time) / ms(LATENCY),
            ms(f.time) / ms(baseline),
            f.waves,
            f.calls
        );
    };
    for (name, extra) in scenarios {
        print(name, measure(&world, extra, None));
    }
    let key = KeyFile {
        oauth: FakeOAuth::start(),
        dir: TempDir::new("bench-key"),
    };
    key.oauth.set_latency(LATENCY);
    let path = key.dir.join("key.json");
    let json = key.oauth.service_account_key(
        "k8s-fortio@wl-project.iam.gserviceaccount.com",
        "wl-project",
    );
    std::fs::write(&path, json.to_string()).expect("write key");
    let path = path.display().to_string();
    print(
        "off GCP, SA key, MESH=gke://P/L/C: token, get, mesh-env",
        measure(
            &world,
            &[
                ("MESH", "gke://cfg-project/us-central1/istio-main"),
                ("GOOGLE_APPLICATION_CREDENTIALS", &path),
            ],
            Some(&key),
        ),
    );
    println!(
        "goal: <= 4 round trips on the critical path (the reference waits for ~9 in sequence)"
    );
}
