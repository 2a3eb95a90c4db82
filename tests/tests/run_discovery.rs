//! Cloud Run service discovery (issue #15) end to end, as root in a network namespace with a
//! resolv.conf of its own (the host's is never touched): the metadata fake, a stand-in for
//! `*.run.app` (HTTPS, h2) and a stand-in upstream DNS server run inside the namespace;
//! krun, curl, dig and getent run there too.

use std::time::Duration;

use krun_tests::fakes::TestWorld;
use krun_tests::fakes::dns::{self, FakeDns};
use krun_tests::fakes::google::FakeGoogle;
use krun_tests::fakes::metadata::{ACCESS_TOKEN, id_token_audience, id_token_email};
use krun_tests::fakes::run_app::{self, FakeRunApp};
use krun_tests::netns::Netns;
use krun_tests::{Krun, Running, TempDir};
use nix::sys::signal::Signal;

const IDENTITY: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";

struct World {
    ns: Netns,
    /// The metadata server and empty GKE / Resource Manager (no mesh).
    google: TestWorld,
    run_app: FakeRunApp,
    upstream: FakeDns,
    dir: TempDir,
}

impl World {
    fn start() -> World {
        let ns = Netns::new("run");
        let (google, run_app, upstream) = ns.enter(|| {
            (
                TestWorld::builder()
                    .instance(|i| i.project_number = "123456789".into())
                    .start(),
                run_app::start(&["us-central1", "us-east1"]),
                dns::start("127.0.0.2:53".parse().expect("addr")),
            )
        });
        ns.resolv_conf("nameserver 127.0.0.2\nsearch corp.example\n");
        let dir = TempDir::new("run");
        std::fs::write(dir.join("ca.pem"), &run_app.ca_pem).expect("write CA");
        World {
            ns,
            google,
            run_app,
            upstream,
            dir,
        }
    }

    /// krun on Cloud Run (K_SERVICE) inside the namespace, discovery on, the URL template
    /// pointing at the stand-in's port, its CA trusted through SSL_CERT_FILE.
    fn krun(&self, app: &[&str]) -> Krun {
        let krun = self
            .google
            .env()
            .into_iter()
            .fold(Krun::wrapped(&self.ns.wrapper()), |krun, (name, value)| {
                krun.env(name, value)
            });
        krun.env("KRUN_RUN_DISCOVERY", "auto")
            .env("K_SERVICE", "caller")
            .env("SSL_CERT_FILE", self.dir.join("ca.pem"))
            .env(
                "KRUN_RUN_URL_TEMPLATE",
                format!(
                    "https://{{service}}-{{project_number}}.{{region}}.run.app:{}",
                    self.run_app.addr.port()
                ),
            )
            .args(["--"].iter().chain(app))
    }

    /// krun with an app that waits, once discovery is up.
    fn running(&self) -> Running {
        self.running_with(&[]).0
    }

    /// [`World::running`] with more settings; also the line saying discovery is on.
    fn running_with(&self, settings: &[(&str, String)]) -> (Running, String) {
        let krun = settings
            .iter()
            .fold(self.krun(&["sleep", "600"]), |krun, (name, value)| {
                krun.env(name, value)
            });
        let mut krun = krun.start();
        let line = krun.wait_for_line("Cloud Run service discovery on");
        (krun, line)
    }

    /// A fake IAM Credentials in the namespace, and the settings that make the proxy's tokens
    /// IAM-minted for `gsa`.
    fn iam_for(&self, gsa: &str) -> (FakeGoogle, Vec<(&'static str, String)>) {
        let google = self.ns.enter(|| FakeGoogle::start(Duration::ZERO));
        let settings = vec![
            ("KRUN_RUN_TOKEN_SERVICE_ACCOUNT", gsa.to_owned()),
            ("IAM_CREDENTIALS_ENDPOINT", google.url()),
        ];
        (google, settings)
    }

    fn audience(&self, host: &str) -> String {
        format!("https://{host}:{}", self.run_app.addr.port())
    }

    fn identity_calls(&self) -> usize {
        self.google
            .metadata
            .seen()
            .iter()
            .filter(|s| s.path.starts_with(IDENTITY))
            .count()
    }
}

/// `curl http://hello/` and `curl http://hello.us-east1:8080/x` reach the deterministic URLs
/// over HTTP/2 with an ID token for that URL; a request with its own Authorization keeps it;
/// h2c with prior knowledge works; 1,000 requests cost one identity call; SIGTERM ends krun
/// as it does without discovery (143).
#[test]
fn run_names_reach_the_service_with_an_id_token_on_any_port() {
    let world = World::start();
    let krun = world.running();
    let curl = |args: &[&str]| {
        let mut argv = vec!["curl", "-sS", "--fail-with-body", "--max-time", "60"];
        argv.extend_from_slice(args);
        world.ns.exec(&argv)
    };
    let central = "hello-123456789.us-central1.run.app";
    let east = "hello-123456789.us-east1.run.app";
    assert_eq!(curl(&["http://hello/"]), format!("host={central} path=/\n"));
    assert_eq!(
        curl(&["http://hello.us-east1:8080/x"]),
        format!("host={east} path=/x\n")
    );
    assert_eq!(
        curl(&["http://hello.us-east1.run.internal:9/y?z=1"]),
        format!("host={east} path=/y?z=1\n")
    );
    assert_eq!(
        curl(&["-H", "Authorization: Bearer mine", "http://hello/own"]),
        format!("host={central} path=/own\n")
    );
    assert_eq!(
        curl(&["--http2-prior-knowledge", "http://hello/h2c"]),
        format!("host={central} path=/h2c\n")
    );
    let seen = world.run_app.seen();
    for request in &seen {
        assert_eq!(request.version, "HTTP/2.0", "{request:?}");
        let token = request.authorization.as_deref().expect("authorization");
        if request.path == "/own" {
            assert_eq!(token, "Bearer mine");
            continue;
        }
        let token = token.strip_prefix("Bearer ").expect("bearer");
        assert_eq!(
            id_token_audience(token).as_deref(),
            Some(world.audience(&request.host).as_str()),
            "{request:?}"
        );
    }
    assert_eq!(seen.len(), 5);
    // Two audiences so far, one identity call each.
    assert_eq!(world.identity_calls(), 2);
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        "http://hello/n[1-1000]",
    ]);
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 1000, "{out}");
    assert_eq!(world.run_app.seen().len(), 1005);
    assert_eq!(world.identity_calls(), 2, "the cache served 1,000 requests");

    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 143);
}

/// With `KRUN_RUN_TOKEN_SERVICE_ACCOUNT` the token is IAM's for that account (asked with the
/// instance's access token), audience the service URL; the metadata `identity` is not used.
#[test]
fn with_a_configured_service_account_the_token_is_iam_minted_for_it() {
    let world = World::start();
    let gsa = "run-caller@proj.iam.gserviceaccount.com";
    let (google, settings) = world.iam_for(gsa);
    google.grant_id_token_creator(ACCESS_TOKEN, gsa);
    let (krun, on) = world.running_with(&settings);
    assert!(
        on.contains(&format!("IAM generateIdToken for {gsa}")),
        "{on}"
    );
    let central = "hello-123456789.us-central1.run.app";
    for path in ["a", "b"] {
        assert_eq!(
            world.ns.exec(&[
                "curl",
                "-sS",
                "--fail-with-body",
                &format!("http://hello/{path}")
            ]),
            format!("host={central} path=/{path}\n")
        );
    }
    let seen = world.run_app.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        let token = request
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .expect("a bearer token");
        assert_eq!(id_token_email(token).as_deref(), Some(gsa));
        assert_eq!(
            id_token_audience(token).as_deref(),
            Some(world.audience(central).as_str())
        );
    }
    assert_eq!(google.iam_calls(), 1, "the cache served the second request");
    assert_eq!(
        world.identity_calls(),
        0,
        "the instance's own identity is not used"
    );
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 143);
}

/// Without the token-creator grant the app gets a 502 naming the cause, and krun logs the
/// role to grant.
#[test]
fn without_the_token_creator_grant_the_app_gets_502_and_the_log_names_the_role() {
    let world = World::start();
    let (_google, settings) = world.iam_for("other@proj.iam.gserviceaccount.com");
    let (mut krun, _) = world.running_with(&settings);
    let out = world
        .ns
        .exec(&["curl", "-sS", "-w", "\n%{http_code}", "http://hello/"]);
    assert!(out.ends_with("\n502"), "{out}");
    assert!(
        out.contains("roles/iam.serviceAccountOpenIdTokenCreator"),
        "{out}"
    );
    let line = krun.wait_for_line("run proxy: no ID token");
    assert!(
        line.contains("roles/iam.serviceAccountOpenIdTokenCreator"),
        "{line}"
    );
    assert!(
        world.run_app.seen().is_empty(),
        "nothing reached the service"
    );
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 143);
}

/// Server-sent events arrive while the stream is still open (no buffering), and an HTTP/1.1
/// Upgrade becomes a byte pipe (the WebSocket path); the app's exit code is krun's.
#[test]
fn streams_and_upgrades_pass_through_unbuffered() {
    let world = World::start();
    // The SSE stream never ends: the app reads its first event through a FIFO and then ends
    // curl by its pid.
    let fifo = world.dir.join("sse");
    let upgrade = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/upgrade_echo.py");
    let script = format!(
        "mkfifo {fifo}; curl -sN --max-time 60 http://hello/sse > {fifo} & c=$!; head -n 1 {fifo}; kill $c; \
         python3 {upgrade} hello 80 ping-through-the-pipe; exit 7",
        fifo = fifo.display(),
        upgrade = upgrade.display(),
    );
    let done = world.krun(&["sh", "-c", &script]).run();
    assert_eq!(done.code, 7, "{}", done.text());
    assert!(done.has_line("data: first"), "{}", done.text());
    assert!(
        done.has_line("HTTP/1.1 101 Switching Protocols"),
        "{}",
        done.text()
    );
    assert!(
        done.has_line("echoed ping-through-the-pipe"),
        "{}",
        done.text()
    );
    let ws = world
        .run_app
        .seen()
        .into_iter()
        .find(|r| r.path == "/ws")
        .expect("/ws seen");
    assert_eq!(ws.version, "HTTP/1.1");
    assert!(ws.authorization.is_some_and(|a| a.starts_with("Bearer ")));
}

/// `dig` against the local resolver: run names answer loopback (the proxy's address),
/// `metadata.google.internal` the metadata IP; `example.com` comes back byte-identical to a
/// direct query of the upstream, over UDP and over TCP; and an external multi-label name
/// costs exactly one upstream query, as it does without krun.
#[test]
fn dns_answers_run_names_and_forwards_the_rest_unchanged() {
    let world = World::start();
    let lookup = |ns: &Netns| ns.exec(&["getent", "ahostsv4", "www.example.com"]);
    // Without krun: how many upstream queries an external lookup costs.
    assert!(lookup(&world.ns).contains("93.184.216.34"));
    let without = world.upstream.seen().len();
    assert_eq!(without, 1, "{:?}", world.upstream.seen());

    let krun = world.running();
    let dig = |args: &[&str]| {
        let mut argv = vec!["dig", "@127.0.0.1", "+short", "+time=30", "+tries=1"];
        argv.extend_from_slice(args);
        world.ns.exec(&argv)
    };
    assert_eq!(dig(&["hello.run.internal", "A"]), "127.0.0.80\n");
    assert_eq!(dig(&["hello.us-east1", "A"]), "127.0.0.80\n");
    assert_eq!(
        dig(&["+tcp", "hello.us-east1.run.internal", "A"]),
        "127.0.0.80\n"
    );
    assert_eq!(dig(&["metadata.google.internal", "A"]), "169.254.169.254\n");
    let status = world.ns.exec(&["dig", "@127.0.0.1", "a.b.c.run.internal"]);
    assert!(status.contains("status: NXDOMAIN"), "{status}");
    assert!(
        world.upstream.seen().len() == without,
        "run names never reach the upstream: {:?}",
        world.upstream.seen()
    );

    let resolv = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", world.ns.name()))
        .expect("resolv.conf");
    assert!(resolv.contains("nameserver 127.0.0.1"), "{resolv}");
    assert!(
        resolv.contains("search run.internal corp.example"),
        "{resolv}"
    );
    assert!(resolv.contains("options ndots:1"), "{resolv}");
    let before = world.upstream.seen().len();
    assert!(lookup(&world.ns).contains("93.184.216.34"));
    let with: Vec<String> = world.upstream.seen()[before..].to_vec();
    assert_eq!(
        with,
        ["udp www.example.com. A"],
        "exactly one upstream query"
    );

    let (udp_same, tcp_same) = world.ns.enter(|| {
        let query = dns::edns_query("example.com.");
        (
            dns::udp(&query, "127.0.0.1:53") == dns::udp(&query, "127.0.0.2:53"),
            dns::tcp(&query, "127.0.0.1:53") == dns::tcp(&query, "127.0.0.2:53"),
        )
    });
    assert!(udp_same, "UDP answer relayed byte for byte");
    assert!(tcp_same, "TCP answer relayed byte for byte");
    let transports: Vec<String> = world.upstream.seen()[before..]
        .iter()
        .map(|s| s.split(' ').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        transports,
        ["udp", "udp", "udp", "tcp", "tcp"],
        "UDP stays UDP, TCP stays TCP"
    );
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 143);
}

/// With the builtin data plane and istiod, the run discovery resolver (the one resolv.conf
/// names on Cloud Run) also answers the Service names istiod lists, before the run zone: `echo`
/// is the mesh Service's VIP, `hello` still the run proxy.
#[test]
fn the_run_resolver_answers_mesh_service_names_first() {
    use krun_tests::fakes::istiod::{FakeIstiod, IstiodTls};
    use krun_tests::fakes::pki::TestCa;
    let world = World::start();
    let ca = TestCa::new("cluster.local");
    let tls = IstiodTls::new(&ca);
    let istiod = world.ns.enter(move || FakeIstiod::start(tls));
    let vip = "10.96.0.10".parse().expect("ip");
    istiod.push_service("echo", "default", vip, &[(80, 8080)]);
    let certs = TempDir::new("run-mesh");
    ca.install_workload(
        &certs.join(""),
        "spiffe://cluster.local/ns/default/sa/caller",
    );
    let settings = [
        ("MESH_BASE_DIR", certs.join("").display().to_string()),
        ("KRUN_DATAPLANE", "builtin".to_owned()),
        ("WORKLOAD_NAMESPACE", "default".to_owned()),
        ("XDS_ADDR", istiod.addr.to_string()),
    ];
    let (mut krun, _) = world.running_with(&settings);
    krun.wait_for_line("services=1");
    let dig = |name: &str| {
        world.ns.exec(&[
            "dig",
            "@127.0.0.1",
            "+short",
            "+time=30",
            "+tries=1",
            name,
            "A",
        ])
    };
    assert_eq!(dig("echo"), "10.96.0.10\n");
    assert_eq!(dig("echo.default.svc.cluster.local"), "10.96.0.10\n");
    assert_eq!(dig("hello.run.internal"), "127.0.0.80\n");
    krun.signal(Signal::SIGTERM);
    krun.finish();
}

/// Without a metadata server discovery says once why it is off and leaves resolv.conf alone.
#[test]
fn without_a_metadata_server_dns_is_left_alone() {
    let ns = Netns::new("run-off");
    let original = "nameserver 127.0.0.2\nsearch corp.example\n";
    ns.resolv_conf(original);
    // GCE_METADATA_HOST at its default: the link-local address has no peer in the
    // namespace and metadata.google.internal does not resolve.
    let done = Krun::wrapped(&ns.wrapper())
        .env("KRUN_RUN_DISCOVERY", "auto")
        .env("K_SERVICE", "caller")
        .args(["--", "true"])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("Cloud Run service discovery off: no metadata server"),
        "{}",
        done.text()
    );
    let after = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", ns.name()))
        .expect("resolv.conf");
    assert_eq!(after, original);
}

/// Benchmark (docs/performance.md), not a check: `cargo test -p krun-tests --release --test
/// run_discovery -- --ignored --nocapture bench`. Serial requests over one keep-alive
/// connection through the proxy (`http://hello/`) and straight to the stand-in (HTTPS, h2),
/// and DNS answers for a run name and a forwarded name, in the same run.
#[test]
#[ignore = "benchmark: prints figures"]
fn bench_proxy_and_dns() {
    const REQUESTS: u32 = 2000;
    const QUERIES: u32 = 2000;
    let world = World::start();
    let krun = world.running();
    let port = world.run_app.addr.port();
    let host = "hello-123456789.us-central1.run.app";
    let ca = world.dir.join("ca.pem").display().to_string();
    let time = |argv: &[&str]| {
        let started = std::time::Instant::now();
        world.ns.exec(argv);
        started.elapsed()
    };
    let range = format!("[1-{REQUESTS}]");
    // Warm: the token is cached and both connections exist before timing.
    world
        .ns
        .exec(&["curl", "-sf", "-o", "/dev/null", "http://hello/warm"]);
    let proxied = time(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        &format!("http://hello/n{range}"),
    ]);
    let resolve = format!("{host}:{port}:127.0.0.1");
    let direct = time(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        &format!("https://{host}:{port}/n{range}"),
    ]);
    let per = |d: std::time::Duration, n: u32| d.as_secs_f64() * 1e6 / f64::from(n);
    println!(
        "HTTP, {REQUESTS} serial requests, one connection: proxy {:.1} us/req ({:.0} req/s), direct {:.1} us/req ({:.0} req/s), added {:.1} us/req, ratio {:.2}",
        per(proxied, REQUESTS),
        f64::from(REQUESTS) / proxied.as_secs_f64(),
        per(direct, REQUESTS),
        f64::from(REQUESTS) / direct.as_secs_f64(),
        per(proxied, REQUESTS) - per(direct, REQUESTS),
        proxied.as_secs_f64() / direct.as_secs_f64()
    );
    let (local, forwarded) = world.ns.enter(|| {
        let time = |name: &str| {
            let query = dns::edns_query(name);
            let started = std::time::Instant::now();
            for _ in 0..QUERIES {
                dns::udp(&query, "127.0.0.1:53");
            }
            started.elapsed()
        };
        (time("hello.run.internal."), time("example.com."))
    });
    println!(
        "DNS, {QUERIES} serial UDP queries: run name {:.1} us/query, forwarded {:.1} us/query, ratio {:.2}",
        per(local, QUERIES),
        per(forwarded, QUERIES),
        forwarded.as_secs_f64() / local.as_secs_f64()
    );
    krun.signal(Signal::SIGTERM);
    krun.finish();
}

/// A gRPC server-streaming call (Python grpcio, h2c from the app) goes through the proxy to a
/// gRPC server over TLS and HTTP/2, with the ID token, and every message arrives.
#[test]
fn a_grpc_server_stream_passes_through() {
    let world = World::start();
    let ca = krun_tests::fakes::pki::TestCa::new("grpc-run-app-ca");
    let (cert, key) = ca.server_cert(&["*.us-central1.run.app"]);
    let (cert_path, key_path) = (world.dir.join("grpc.crt"), world.dir.join("grpc.key"));
    std::fs::write(&cert_path, cert).expect("cert");
    std::fs::write(&key_path, key).expect("key");
    std::fs::write(world.dir.join("grpc-ca.pem"), &ca.root_pem).expect("ca");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/grpc_stream.py");
    let python = krun_tests::python();
    let mut server = Krun::program("ip")
        .args(["netns", "exec", world.ns.name()])
        .args([python.as_os_str(), script.as_os_str()])
        .args([
            "serve".as_ref(),
            cert_path.as_os_str(),
            key_path.as_os_str(),
        ])
        .start();
    let port = server.wait_for_line("port ");
    let port = port.trim().rsplit(' ').next().expect("port").to_owned();
    let call = format!(
        "GRPC_DNS_RESOLVER=native {} {} call hello:80",
        python.display(),
        script.display()
    );
    let done = world
        .krun(&["sh", "-c", &call])
        .env("SSL_CERT_FILE", world.dir.join("grpc-ca.pem"))
        .env(
            "KRUN_RUN_URL_TEMPLATE",
            format!("https://{{service}}-{{project_number}}.{{region}}.run.app:{port}"),
        )
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    for part in [
        "part-1 bearer=True",
        "part-2 bearer=True",
        "part-3 bearer=True",
    ] {
        assert!(done.has_line(part), "{}", done.text());
    }
    server.signal(Signal::SIGKILL);
}
