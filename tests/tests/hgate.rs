//! hgate end to end: a mesh client's mTLS, routed by SNI, through a pooled HBONE POST tunnel
//! to krun's builtin data plane behind a Cloud Run-like TLS front; istiod forwarding; the
//! ClientHello timeout and the connection limit.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;

use krun_tests::fakes::pki::TestCa;
use krun_tests::fakes::server::FakeServer;
use krun_tests::fakes::{front, metadata};
use krun_tests::{
    Krun, Running, TempDir, free_port, http_request, prometheus_samples, sni_client, testapp,
};
use nix::sys::signal::Signal;
use serde_json::Value;

const MESH_SNI: &str = "outbound_.8080_._.echo.default.svc.cluster.local";

/// The address in a "... ready addr=IP:PORT" log line.
fn ready_addr(gate: &mut Running, what: &str) -> SocketAddr {
    gate.wait_for_addr(what)
}

/// A real ClientHello (openssl s_client) from the SNI parser's corpus.
fn client_hello() -> Vec<u8> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../hbone/tests/corpus/openssl-s_client.bin");
    std::fs::read(path).expect("corpus ClientHello")
}

/// The Cloud Run side: krun with a mesh identity, builtin data plane, echo app; returns it
/// and its tunnel port.
fn echo_on_cloud_run(ca: &TestCa, dir: &TempDir) -> (Running, u16) {
    ca.install_workload(&dir.join(""), "spiffe://cluster.local/ns/default/sa/echo");
    let (app, tunnel) = (free_port(), free_port());
    let mut krun = Krun::new()
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("PORT_http", app.to_string())
        .env("KRUN_TUNNEL_PORT", tunnel.to_string())
        .args(testapp(&["echo", &app.to_string()]))
        .start();
    krun.wait_for_line("tunnel port open");
    (krun, tunnel)
}

/// Cloud Run's front end for the instance listening on `tunnel`: TLS h2 in, h2c to the
/// instance, headers recorded. Returns it, the path of its CA (for `SSL_CERT_FILE`) and the
/// service URL.
fn cloud_run_front(dir: &TempDir, tunnel: u16) -> (front::FakeFront, std::path::PathBuf, String) {
    let front = front::start(SocketAddr::from(([127, 0, 0, 1], tunnel)));
    let front_ca = dir.join("front-ca.pem");
    std::fs::write(&front_ca, &front.ca_pem).expect("write front CA");
    let url = format!("https://localhost:{}", front.addr.port());
    (front, front_ca, url)
}

#[test]
fn a_mesh_client_reaches_the_echo_app_through_hgate_the_front_and_krun() {
    let ca = TestCa::new("cluster.local");
    let dir = TempDir::new("hgate-e2e");
    let (krun, tunnel) = echo_on_cloud_run(&ca, &dir);
    let (front, front_ca, service_url) = cloud_run_front(&dir, tunnel);
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &routes,
        format!("echo.default: {service_url}/_hbone/15003\n"),
    )
    .expect("write routes");
    let md = metadata::start(metadata::Instance::default());

    let mut gate = Krun::hgate()
        .env("HGATE_ROUTES", &routes)
        .env("HGATE_ID_TOKENS", "metadata")
        .env("GCE_METADATA_HOST", md.addr().to_string())
        .env("SSL_CERT_FILE", &front_ca)
        .start();
    let admin = ready_addr(&mut gate, "admin endpoint ready");
    let sni_addr = ready_addr(&mut gate, "SNI listener ready");

    let client_dir = TempDir::new("hgate-client");
    let client = ca.install_client(
        &client_dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let run_client = |payload: &str| sni_client(sni_addr, MESH_SNI, &client, payload);
    assert_eq!(run_client("hello mesh")["data"], "hello mesh");
    assert_eq!(
        run_client("second, same pooled connection")["data"],
        "second, same pooled connection"
    );

    let seen = front.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        front.connections(),
        1,
        "both tunnels share one pooled TLS connection"
    );
    for request in &seen {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("POST", "/_hbone/15003")
        );
        let token = request
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .expect("a bearer token");
        assert_eq!(
            metadata::id_token_audience(token).as_deref(),
            Some(service_url.as_str())
        );
    }
    let line = gate.wait_for_line("connection finished");
    assert!(
        line.contains(MESH_SNI) && line.contains("outcome=\"ok\""),
        "{line}"
    );
    assert!(line.contains("(Static)"), "{line}");
    // Istio's TCP metrics agree with the totals the tunnel reported for both connections:
    // what came back from upstream is what hgate sent to the client (its log's `received`),
    // and what it received from the client is at least what went upstream after the hello.
    let second = gate.wait_for_line("connection finished");
    let field = |line: &str, name: &str| -> f64 {
        line.split(&format!(" {name}="))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {line}"))
    };
    let (status, text) = http_request(admin, "GET", "/metrics");
    assert_eq!(status, 200, "{text}");
    let samples = prometheus_samples(&text);
    let metric = |name: &str| {
        samples
            .iter()
            .find(|s| s["name"] == name && s["labels"]["reporter"] == "source")
            .and_then(|s| s["value"].as_f64())
            .unwrap_or_else(|| panic!("no {name}: {text}"))
    };
    assert_eq!(metric("istio_tcp_connections_opened_total"), 2.0, "{text}");
    assert_eq!(
        metric("istio_tcp_sent_bytes_total"),
        field(&line, "received") + field(&second, "received"),
        "{text}"
    );
    assert!(
        metric("istio_tcp_received_bytes_total") > field(&line, "sent") + field(&second, "sent"),
        "the ClientHellos count too: {text}"
    );

    gate.signal(Signal::SIGTERM);
    let done = gate.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    krun.signal(Signal::SIGTERM);
    let krun_done = krun.finish();
    assert_eq!(krun_done.code, 0, "{}", krun_done.text());
}

#[test]
fn an_unknown_sni_is_closed_logged_and_counted() {
    let mut gate = Krun::hgate()
        .env("HGATE_ROUTE_TEMPLATE", "http://127.0.0.1:1/{service}")
        .start();
    let addr = ready_addr(&mut gate, "SNI listener ready");
    // Same ClientHello, but as if its SNI were a public name: reuse the corpus sample with
    // echo.default.svc.cluster.local replaced by a name of equal length that is no mesh name.
    let (line, mut conn) = connection_with_sni(
        &mut gate,
        addr,
        b"outbound_.8080_._.echo.default.svc.cluster.local",
        b"www.example.com.not-a-mesh-name.example.invalid.",
    );
    assert!(line.contains("no route"), "{line}");
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "hgate answered a connection it could not route"
    );
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

#[test]
fn a_client_that_never_finishes_its_client_hello_is_dropped_at_the_timeout() {
    let mut gate = Krun::hgate().env("HGATE_HELLO_TIMEOUT", "300ms").start();
    let addr = ready_addr(&mut gate, "SNI listener ready");
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.write_all(&client_hello()[..20])
        .expect("send part of a hello");
    let line = gate.wait_for_line("connection finished");
    assert!(
        line.contains("ClientHello not complete within 300ms"),
        "{line}"
    );
    let mut buf = [0u8; 16];
    assert_eq!(
        slow.read(&mut buf).expect("read"),
        0,
        "hgate closed the connection"
    );
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

#[test]
fn the_connection_limit_refuses_the_extra_connection_with_a_log_line() {
    let mut gate = Krun::hgate()
        .env("HGATE_MAX_CONNECTIONS", "1")
        .env("HGATE_HELLO_TIMEOUT", "60s")
        .start();
    let addr = ready_addr(&mut gate, "SNI listener ready");
    let mut first = TcpStream::connect(addr).expect("connect first");
    first
        .write_all(&client_hello()[..20])
        .expect("partial hello");
    let mut second = TcpStream::connect(addr).expect("connect second");
    let line = gate.wait_for_line("connection limit reached");
    assert!(line.contains("max=1"), "{line}");
    let mut buf = [0u8; 16];
    assert_eq!(
        second.read(&mut buf).expect("read"),
        0,
        "the extra connection is closed"
    );
    drop(first);
    gate.wait_for_line("client closed before its ClientHello was complete");
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

/// An upstream that echoes each connection until EOF, then closes it.
fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn istiod_forwarding_carries_bytes_both_ways_and_drains() {
    let upstream = echo_upstream();
    let mut gate = Krun::hgate()
        .env("HGATE_ISTIOD_ADDR", "127.0.0.1:0")
        .env("HGATE_ISTIOD_UPSTREAM", upstream.to_string())
        .start();
    let admin = ready_addr(&mut gate, "admin endpoint ready");
    let addr = ready_addr(&mut gate, "istiod forwarding ready");
    gate.wait_for_line("hgate ready");
    let mut conn = TcpStream::connect(addr).expect("connect");
    let mut round_trip = |msg: &[u8]| {
        conn.write_all(msg).expect("write");
        let mut back = vec![0u8; msg.len()];
        conn.read_exact(&mut back).expect("read");
        assert_eq!(back, msg);
    };
    round_trip(b"xds request 1");

    gate.signal(Signal::SIGTERM);
    gate.wait_for_line("listeners closed");
    assert!(
        TcpStream::connect(addr).is_err(),
        "no new connections while draining"
    );
    assert_eq!(
        http_request(admin, "GET", "/healthz/ready").0,
        503,
        "the load balancer is told to stop sending"
    );
    round_trip(b"xds request 2 while draining");
    conn.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty());

    let done = gate.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    let finished = &done.output[done.line_index("istiod connection finished")];
    assert!(
        finished.contains("sent=41") && finished.contains("received=41"),
        "{finished}"
    );
    assert!(done.has_line("open_istiod=0"), "{}", done.text());
}

#[test]
fn mesh_env_is_published_kept_current_and_operator_keys_survive() {
    use krun_tests::fakes::kube::{self, SharedCluster};
    let state = SharedCluster::default();
    {
        let mut s = state.lock().expect("state");
        s.put_service(
            "istio-system",
            "hgate",
            Some(serde_json::json!({"ip": "34.1.1.1"})),
            &[],
        );
        s.put_service(
            "istio-system",
            "internal-hgate",
            Some(serde_json::json!({"hostname": "ilb.example.internal"})),
            &[],
        );
        s.put_configmap(
            "istio-system",
            "istio-ca-root-cert",
            &[("root-cert.pem", "ROOT-1")],
        );
        // An operator pinned the tenant before hgate ever ran.
        s.put_configmap("istio-system", "mesh-env", &[("MESH_TENANT", "-")]);
        s.put_service(
            "shop",
            "echo",
            None,
            &[("krun.dev/tunnel-url", "http://127.0.0.1:1/_hbone/15003")],
        );
    }
    let api = kube::start_cluster(state.clone());
    let dir = TempDir::new("hgate-kube");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    let mut gate = Krun::hgate()
        .env("HGATE_KUBE", "auto")
        .env("KUBECONFIG", &kubeconfig)
        .env("PROJECT_NUMBER", "1234567890")
        .env("MESH_TENANT", "tenant-from-hgate")
        .start();
    let addr = ready_addr(&mut gate, "SNI listener ready");
    gate.wait_for_all(&["mesh-env published", "Service annotation routes changed"]);
    let data = |s: &SharedCluster| {
        s.lock()
            .expect("state")
            .configmap_data("istio-system", "mesh-env")
    };
    let first = data(&state).expect("mesh-env");
    assert_eq!(first["MCON_ADDR"], "34.1.1.1");
    assert_eq!(first["IMCON_ADDR"], "ilb.example.internal");
    assert_eq!(first["CAROOT_ISTIOD"], "ROOT-1");
    assert_eq!(first["PROJECT_NUMBER"], "1234567890");
    assert_eq!(first["MESH_TENANT"], "-", "operator-set key survives");
    let owned = state
        .lock()
        .expect("state")
        .configmap_annotation("istio-system", "mesh-env", "krun.dev/hgate-owned-keys")
        .expect("owned keys annotation");
    assert_eq!(owned, "CAROOT_ISTIOD,IMCON_ADDR,MCON_ADDR,PROJECT_NUMBER");

    // The LB gets a new address and istiod's root rotates: hgate's keys follow.
    {
        let mut s = state.lock().expect("state");
        s.put_service(
            "istio-system",
            "hgate",
            Some(serde_json::json!({"ip": "34.2.2.2"})),
            &[],
        );
        s.put_configmap(
            "istio-system",
            "istio-ca-root-cert",
            &[("root-cert.pem", "ROOT-2")],
        );
    }
    gate.wait_for_line("mesh-env published");
    let second = data(&state).expect("mesh-env");
    assert_eq!(second["MCON_ADDR"], "34.2.2.2");
    assert_eq!(second["CAROOT_ISTIOD"], "ROOT-2");
    assert_eq!(second["MESH_TENANT"], "-");

    // The annotated Service is routed by its annotation (the URL leads nowhere: the log line
    // shows the choice).
    let line = route_of_echo_shop(&mut gate, addr);
    assert!(
        line.contains("http://127.0.0.1:1/_hbone/15003 (Annotation)"),
        "{line}"
    );

    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

#[test]
fn admin_reports_readiness_liveness_and_counters() {
    let mut gate = Krun::hgate().start();
    let admin = ready_addr(&mut gate, "admin endpoint ready");
    gate.wait_for_line("hgate ready");
    assert_eq!(http_request(admin, "GET", "/healthz/ready").0, 200);
    assert_eq!(http_request(admin, "GET", "/healthz/live").0, 200);
    let mut conn = TcpStream::connect(admin).expect("connect");
    conn.write_all(b"GET /stats HTTP/1.1\r\nHost: hgate\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut stats = String::new();
    conn.read_to_string(&mut stats).expect("read");
    assert!(stats.contains("hgate_no_route_total 0"), "{stats}");
    let (status, text) = http_request(admin, "GET", "/metrics");
    assert_eq!(status, 200, "{text}");
    let names: Vec<String> = prometheus_samples(&text)
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    for name in [
        "hgate_no_route_total",
        "hgate_open_connections",
        "hgate_connections_denied_total",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} missing: {text}");
    }
    let (status, dump) = http_request(admin, "GET", "/config_dump");
    assert_eq!(status, 200, "{dump}");
    let dump: Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert_eq!(
        dump["config"]["HGATE_ADMIN_ADDR"]["source"], "env",
        "{dump}"
    );
    assert_eq!(dump["live"]["ready"], true, "{dump}");
    assert!(dump["live"]["listeners"]["sni"].is_string(), "{dump}");
    assert_eq!(
        http_request(admin, "POST", "/logging?level=trace").0,
        403,
        "the pod network may not change hgate's log level"
    );
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

#[test]
fn an_idle_forwarded_connection_is_closed_at_the_idle_timeout() {
    let upstream = echo_upstream();
    let mut gate = Krun::hgate()
        .env("HGATE_ISTIOD_ADDR", "127.0.0.1:0")
        .env("HGATE_ISTIOD_UPSTREAM", upstream.to_string())
        .env("HGATE_IDLE_TIMEOUT", "300ms")
        .start();
    let addr = ready_addr(&mut gate, "istiod forwarding ready");
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.write_all(b"one").expect("write");
    let line = gate.wait_for_line("istiod connection finished");
    assert!(line.contains("idle (HGATE_IDLE_TIMEOUT)"), "{line}");
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert_eq!(
        rest, b"one",
        "bytes before the timeout were delivered, then EOF"
    );
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

#[test]
fn print_config_shows_values_and_sources_and_bad_values_name_the_variable() {
    let done = Krun::hgate()
        .env("HGATE_HELLO_TIMEOUT", "2s")
        .args(["--print-config", "--offline"])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    let config: Value = serde_json::from_str(&done.text()).expect("JSON");
    assert_eq!(config["HGATE_HELLO_TIMEOUT"]["value"], "2s");
    assert_eq!(config["HGATE_HELLO_TIMEOUT"]["source"], "env");
    assert_eq!(
        config["HGATE_ROUTE_TEMPLATE"]["value"],
        "https://{service}-{project_number}.{region}.run.app/_hbone/15003"
    );
    assert_eq!(config["HGATE_ROUTE_TEMPLATE"]["source"], "default");

    let bad = Krun::hgate().env("HGATE_MAX_CONNECTIONS", "lots").run();
    assert_eq!(bad.code, 2);
    assert!(
        bad.has_line("HGATE_MAX_CONNECTIONS=lots: expected"),
        "{}",
        bad.text()
    );
    let version = Krun::hgate().args(["--version"]).run();
    assert!(version.has_line("hgate "), "{}", version.text());
}

/// Sends the sample mesh ClientHello (`echo.default`, no route configured) to hgate's SNI
/// listener and returns hgate's `connection finished` line for it.
fn one_mesh_connection(gate: &mut Running) -> String {
    let addr = ready_addr(gate, "SNI listener ready");
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.write_all(&client_hello()).expect("send hello");
    gate.wait_for_line("connection finished")
}

/// The percent-encoded `audience` of a metadata `identity` request path.
fn audience_of(path: &str) -> Option<String> {
    let encoded = path.split("audience=").nth(1)?.split('&').next()?;
    Some(encoded.replace("%3A", ":").replace("%2F", "/"))
}

#[test]
fn without_a_route_hgate_tunnels_to_the_cloud_run_url_of_the_metadata_project_and_region() {
    let md = metadata::start(metadata::Instance {
        project_number: "987654321".into(),
        region: "europe-west4".into(),
        ..metadata::Instance::default()
    });
    let expected = "https://echo-987654321.europe-west4.run.app";

    // What hgate resolved, before it starts anything.
    let printed = Krun::hgate()
        .env("GCE_METADATA_HOST", md.addr().to_string())
        .args(["--print-config"])
        .run();
    assert_eq!(printed.code, 0, "{}", printed.text());
    let config: Value = serde_json::from_str(&printed.text()).expect("JSON");
    assert_eq!(
        config["HGATE_ROUTE_TEMPLATE"]["value"],
        "https://{service}-987654321.europe-west4.run.app/_hbone/15003"
    );
    assert_eq!(config["HGATE_ROUTE_TEMPLATE"]["source"], "derived");
    assert_eq!(
        config["HGATE_CLOUD_RUN_PROJECT_NUMBER"]["source"],
        "metadata"
    );
    assert_eq!(config["HGATE_CLOUD_RUN_REGION"]["value"], "europe-west4");

    // A mesh connection with no static or annotation route: hgate mints the ID token for the
    // deterministic URL and opens the tunnel there. (The name does not resolve on a machine
    // without Cloud Run, so the tunnel itself fails after the decision; the log says where.)
    let mut gate = Krun::hgate()
        .env("GCE_METADATA_HOST", md.addr().to_string())
        .env("HGATE_ID_TOKENS", "metadata")
        .start();
    let line = gate.wait_for_line("default route");
    assert!(line.contains("source=derived"), "{line}");
    let line = one_mesh_connection(&mut gate);
    assert!(
        line.contains(&format!("{expected}/_hbone/15003 (Template)")),
        "{line}"
    );
    let audiences: Vec<String> = md
        .seen()
        .iter()
        .filter(|r| r.path.contains("/identity?"))
        .filter_map(|r| audience_of(&r.path))
        .collect();
    assert_eq!(audiences, [expected], "ID token audience");
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

#[test]
fn without_metadata_or_settings_the_default_route_is_refused_with_the_fix() {
    let mut gate = Krun::hgate()
        .env("GCE_METADATA_HOST", "127.0.0.1:1")
        .start();
    let line = gate.wait_for_line("default route unresolved");
    assert!(line.contains("HGATE_CLOUD_RUN_REGION"), "{line}");
    let line = one_mesh_connection(&mut gate);
    assert!(line.contains("HGATE_CLOUD_RUN_PROJECT_NUMBER"), "{line}");
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

#[test]
fn an_open_tunnel_keeps_flowing_while_hgate_drains_and_the_client_hello_is_replayed_first() {
    // krun's tunnel port leads to an echo upstream (`/_hbone/echo` → PORT_echo), so whatever
    // hgate sends upstream comes back: first the replayed ClientHello, then the data.
    let upstream = echo_upstream();
    let tunnel = free_port();
    let mut krun = Krun::new()
        .env("PORT_echo", upstream.to_string())
        // hgate reaches the upstream over plaintext h2c, not through the mesh terminator.
        .env("KRUN_TUNNEL_PLAINTEXT", "echo")
        .env("KRUN_TUNNEL_PORT", tunnel.to_string())
        .args(testapp(&["wait-term"]))
        .start();
    krun.wait_for_line("tunnel port open");
    let dir = TempDir::new("hgate-drain");
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &routes,
        format!("echo: http://127.0.0.1:{tunnel}/_hbone/echo\n"),
    )
    .expect("write routes");
    let mut gate = Krun::hgate().env("HGATE_ROUTES", &routes).start();
    let addr = ready_addr(&mut gate, "SNI listener ready");
    gate.wait_for_line("hgate ready");

    let hello = client_hello();
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.write_all(&hello).expect("hello");
    let mut back = vec![0u8; hello.len()];
    conn.read_exact(&mut back).expect("replayed hello");
    assert_eq!(
        back, hello,
        "the peeked ClientHello went upstream first, byte for byte"
    );

    gate.signal(Signal::SIGTERM);
    gate.wait_for_line("listeners closed");
    conn.write_all(b"after SIGTERM")
        .expect("write while draining");
    let mut more = [0u8; 13];
    conn.read_exact(&mut more).expect("read while draining");
    assert_eq!(&more, b"after SIGTERM");
    conn.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)
        .expect("EOF follows the half-close");
    assert!(rest.is_empty());

    let done = gate.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("open_sni=0"), "{}", done.text());
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
}

/// The corpus ClientHello with `echo` in its SNI replaced by four letters spelling `i`:
/// `outbound_.8080_._.XXXX.default.svc.cluster.local`, a distinct service per `i` < 10,000.
fn hello_naming_service(template: &[u8], i: usize) -> Vec<u8> {
    let mut hello = template.to_vec();
    let from = b"outbound_.8080_._.echo.default";
    let at = hello
        .windows(from.len())
        .position(|w| w == from)
        .expect("SNI in sample");
    let name: Vec<u8> = format!("{i:04}").bytes().map(|d| d - b'0' + b'a').collect();
    let service = at + "outbound_.8080_._.".len();
    hello[service..service + 4].copy_from_slice(&name);
    hello
}

#[test]
fn ten_thousand_distinct_sni_names_cost_bounded_memory_and_bounded_token_mints() {
    // Every SNI names a service of its own, and the template makes each a distinct audience
    // (`http://SVC.invalid`: a name that never resolves, so a minted route fails at once).
    const NAMES: usize = 10_000;
    const CACHE: usize = 50;
    const BURST: u64 = 20;
    const RATE: u64 = 5;
    // hgate's own growth while it serves the flood (measured: a few MiB); the cache, the
    // pool and the route table are bounded, so it does not scale with NAMES.
    const RSS_BOUND_KIB: u64 = 32 << 10;
    let md = metadata::start(metadata::Instance::default());
    let started = std::time::Instant::now();
    let mut gate = Krun::hgate()
        .env(
            "HGATE_ROUTE_TEMPLATE",
            "http://{service}.invalid/_hbone/15003",
        )
        .env("HGATE_ID_TOKENS", "metadata")
        .env("GCE_METADATA_HOST", md.addr().to_string())
        .env("HGATE_ID_TOKEN_CACHE", CACHE.to_string())
        .env("HGATE_ID_TOKEN_BURST", BURST.to_string())
        .env("HGATE_ID_TOKEN_RATE", RATE.to_string())
        .start();
    let addr = ready_addr(&mut gate, "SNI listener ready");
    gate.wait_for_line("hgate ready");
    let before = gate.rss_kib();

    let template = client_hello();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for batch in (0..NAMES).collect::<Vec<_>>().chunks(200) {
            let mut clients = tokio::task::JoinSet::new();
            for &i in batch {
                let hello = hello_naming_service(&template, i);
                clients.spawn(async move {
                    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
                    conn.write_all(&hello).await.expect("send hello");
                    // hgate closes each one: no token (budget spent) or no route to .invalid.
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(60),
                        conn.read_to_end(&mut rest),
                    )
                    .await
                    .expect("hgate closes the connection");
                });
            }
            while let Some(done) = clients.join_next().await {
                done.expect("client task");
            }
        }
    });
    let elapsed = started.elapsed();
    let after = gate.rss_kib();

    let mints = md
        .seen()
        .iter()
        .filter(|r| r.path.contains("service-accounts/default/identity"))
        .count() as u64;
    // The budget's guarantee over the test's whole run (hgate started after `started`).
    let allowed = BURST + (RATE as f64 * elapsed.as_secs_f64()).ceil() as u64;
    assert!(
        (BURST..=allowed).contains(&mints),
        "{mints} ID tokens minted for {NAMES} names in {elapsed:?}; the budget allows {allowed}"
    );
    let grew = after.saturating_sub(before);
    assert!(
        grew <= RSS_BOUND_KIB,
        "hgate's RSS grew {grew} KiB ({before} → {after}) over {NAMES} names"
    );
    let line = gate.wait_for_line("mint budget");
    assert!(line.contains("connection finished"), "{line}");
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

/// hgate's tunnel to a Cloud Run-like front through a static route, with `HGATE_ID_TOKENS=metadata`
/// and `extra` settings; hgate's own Google credentials are the metadata fake's, or with
/// `key_file` (and no metadata server) a service-account key's. Returns the gate, the front and
/// the metadata fake.
fn gate_with_id_tokens(
    dir: &TempDir,
    tunnel: u16,
    extra: &[(&str, String)],
    key_file: Option<&Path>,
) -> (Running, front::FakeFront, FakeServer) {
    let (front, front_ca, url) = cloud_run_front(dir, tunnel);
    let routes = dir.join("routes.yaml");
    std::fs::write(&routes, format!("echo.default: {url}/_hbone/15003\n")).expect("routes");
    let md = metadata::start(metadata::Instance::default());
    let gate = extra.iter().fold(
        Krun::hgate()
            .env("HGATE_ROUTES", &routes)
            .env("HGATE_ID_TOKENS", "metadata")
            .env("SSL_CERT_FILE", &front_ca),
        |gate, (name, value)| gate.env(name, value),
    );
    let gate = match key_file {
        // No GCE_METADATA_HOST: the default name, which does not resolve here.
        Some(key) => gate.env("GOOGLE_APPLICATION_CREDENTIALS", key),
        None => gate.env("GCE_METADATA_HOST", md.addr().to_string()),
    };
    (gate.start(), front, md)
}

/// The settings that make hgate ask `google`'s IAM for `gsa`'s ID tokens.
fn iam_settings(
    google: &krun_tests::fakes::google::FakeGoogle,
    gsa: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("HGATE_ID_TOKEN_SERVICE_ACCOUNT", gsa.to_owned()),
        ("IAM_CREDENTIALS_ENDPOINT", google.url()),
    ]
}

/// One mesh connection through hgate set up by [`gate_with_id_tokens`]; checks the front got
/// an ID token of `email` for its URL, and not the metadata server's own identity. Returns
/// hgate's log line starting with `source` (which ID tokens) and the metadata fake.
fn id_token_reaches_the_front(
    extra: &[(&str, String)],
    key_file: Option<&Path>,
    email: &str,
    source: &str,
) -> (String, FakeServer) {
    let (ca, dir) = (
        TestCa::new("cluster.local"),
        TempDir::new("hgate-id-tokens"),
    );
    let (krun, tunnel) = echo_on_cloud_run(&ca, &dir);
    let (mut gate, front, md) = gate_with_id_tokens(&dir, tunnel, extra, key_file);
    let line = gate.wait_for_line(source);
    let sni_addr = ready_addr(&mut gate, "SNI listener ready");
    let client_dir = TempDir::new("hgate-id-tokens-client");
    let client = ca.install_client(
        &client_dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    assert_eq!(
        sni_client(sni_addr, MESH_SNI, &client, "with a token")["data"],
        "with a token"
    );

    let seen = front.seen();
    let token = seen
        .first()
        .and_then(|r| r.authorization.as_deref())
        .and_then(|a| a.strip_prefix("Bearer "))
        .expect("a bearer token at the front");
    assert_eq!(metadata::id_token_email(token).as_deref(), Some(email));
    assert_eq!(
        metadata::id_token_audience(token),
        Some(format!("https://localhost:{}", front.addr.port()))
    );
    assert!(
        !md.seen().iter().any(|r| r.path.contains("/identity")),
        "the metadata server's own identity is not used"
    );
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
    (line, md)
}

#[test]
fn with_a_configured_service_account_hgate_sends_iam_minted_id_tokens() {
    use krun_tests::fakes::google::FakeGoogle;
    let gsa = "gate-caller@proj.iam.gserviceaccount.com";
    let google = FakeGoogle::start(std::time::Duration::ZERO);
    google.grant_id_token_creator(metadata::ACCESS_TOKEN, gsa);
    let (line, _) = id_token_reaches_the_front(
        &iam_settings(&google, gsa),
        None,
        gsa,
        "ID tokens: IAM generateIdToken",
    );
    assert!(line.contains("caller=the metadata server"), "{line}");
    assert_eq!(google.iam_calls(), 1);
}

/// A service-account key for `email` issued by a fresh fake token endpoint, written in `dir`.
fn key_file(
    email: &str,
    dir: &TempDir,
) -> (krun_tests::fakes::oauth::FakeOAuth, std::path::PathBuf) {
    let oauth = krun_tests::fakes::oauth::FakeOAuth::start();
    let key = dir.join("key.json");
    std::fs::write(&key, oauth.service_account_key(email, "proj").to_string()).expect("key");
    (oauth, key)
}

#[test]
fn off_gcp_hgate_asks_iam_with_the_access_token_of_a_service_account_key() {
    use krun_tests::fakes::google::FakeGoogle;
    let gsa = "gate-caller@proj.iam.gserviceaccount.com";
    let caller = "hgate@proj.iam.gserviceaccount.com";
    let google = FakeGoogle::start(std::time::Duration::ZERO);
    let dir = TempDir::new("hgate-key");
    let (oauth, key) = key_file(caller, &dir);
    // The token endpoint hands out the token IAM knows as holding the binding on `gsa`.
    google.grant_id_token_creator(metadata::ACCESS_TOKEN, gsa);
    let (line, md) = id_token_reaches_the_front(
        &iam_settings(&google, gsa),
        Some(&key),
        gsa,
        "ID tokens: IAM generateIdToken",
    );
    assert!(
        line.contains(&format!("caller=service-account key for {caller}")),
        "{line}"
    );
    assert!(md.seen().is_empty(), "no metadata server was used");
    let grants: Vec<String> = oauth.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(grants, ["/token"]);
    assert_eq!(oauth.verified_signatures(), 1);
    assert_eq!(google.iam_calls(), 1);
}

#[test]
fn off_gcp_hgate_sends_the_service_account_keys_own_id_tokens() {
    let account = "hgate@proj.iam.gserviceaccount.com";
    let dir = TempDir::new("hgate-key-id");
    let (oauth, key) = key_file(account, &dir);
    let (line, md) = id_token_reaches_the_front(
        &[],
        Some(&key),
        account,
        "ID tokens: the service-account key's own",
    );
    assert!(
        line.contains(&format!("service-account key for {account}")),
        "{line}"
    );
    assert!(md.seen().is_empty(), "no metadata server was used");
    let grants: Vec<String> = oauth.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        grants,
        ["/token"],
        "one target_audience grant for the one audience"
    );
    assert_eq!(oauth.verified_signatures(), 1);
}

#[test]
fn without_the_token_creator_binding_the_connection_is_refused_naming_the_role() {
    use krun_tests::fakes::google::FakeGoogle;
    let google = FakeGoogle::start(std::time::Duration::ZERO);
    let dir = TempDir::new("hgate-iam-denied");
    let (mut gate, front, _md) = gate_with_id_tokens(
        &dir,
        free_port(),
        &iam_settings(&google, "other@proj.iam.gserviceaccount.com"),
        None,
    );
    let line = one_mesh_connection(&mut gate);
    assert!(
        line.contains("PERMISSION_DENIED") || line.contains("403"),
        "{line}"
    );
    assert!(
        line.contains("roles/iam.serviceAccountOpenIdTokenCreator"),
        "{line}"
    );
    assert!(front.seen().is_empty(), "no tunnel without a token");
    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

/// Sends the sample ClientHello with `from` in its SNI replaced by `to` (same length) and
/// returns hgate's `connection finished` line for it and the client's connection.
fn connection_with_sni(
    gate: &mut Running,
    addr: SocketAddr,
    from: &[u8],
    to: &[u8],
) -> (String, TcpStream) {
    let mut hello = client_hello();
    let at = hello
        .windows(from.len())
        .position(|w| w == from)
        .expect("SNI in sample");
    hello[at..at + to.len()].copy_from_slice(to);
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.write_all(&hello).expect("send hello");
    (gate.wait_for_line("connection finished"), conn)
}

/// The route hgate logs for one mesh connection to `echo.shop`.
fn route_of_echo_shop(gate: &mut Running, addr: SocketAddr) -> String {
    connection_with_sni(
        gate,
        addr,
        b"outbound_.8080_._.echo.default.svc",
        b"outbound_.8080_._.echo.shop.svc.xx",
    )
    .0
}

#[test]
fn a_service_annotation_change_is_routed_at_its_watch_event_and_a_dropped_watch_resumes() {
    use krun_tests::fakes::kube::{self, SharedCluster};
    let annotated = |url: &str| [("krun.dev/tunnel-url", url.to_owned())];
    let put = |state: &SharedCluster, url: &str| {
        let annotations = annotated(url);
        let pairs: Vec<(&str, &str)> = annotations.iter().map(|(k, v)| (*k, v.as_str())).collect();
        state
            .lock()
            .expect("state")
            .put_service("shop", "echo", None, &pairs);
    };
    let state = SharedCluster::default();
    put(&state, "http://127.0.0.1:1/first");
    let api = kube::start_cluster(state.clone());
    let dir = TempDir::new("hgate-watch");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    let mut gate = Krun::hgate()
        .env("HGATE_KUBE", "auto")
        .env("KUBECONFIG", &kubeconfig)
        .start();
    let addr = ready_addr(&mut gate, "SNI listener ready");
    gate.wait_for_line("Service annotation routes changed");

    // One edit, one watch event, one route change.
    put(&state, "http://127.0.0.1:1/second");
    let line = gate.wait_for_line("route updated");
    assert!(
        line.contains("echo.shop") && line.contains("/second"),
        "{line}"
    );
    let line = route_of_echo_shop(&mut gate, addr);
    assert!(
        line.contains("http://127.0.0.1:1/second (Annotation)"),
        "{line}"
    );

    // The API server drops every watch; the edit made meanwhile still arrives, through a
    // watch resumed from the last resourceVersion (no second list).
    state.lock().expect("state").drop_watches();
    put(&state, "http://127.0.0.1:1/third");
    let line = gate.wait_for_line("route updated");
    assert!(line.contains("/third"), "{line}");
    let service_requests: Vec<String> = api
        .server
        .seen()
        .into_iter()
        .map(|s| s.path)
        .filter(|p| p.starts_with("/api/v1/services?"))
        .collect();
    let lists = service_requests
        .iter()
        .filter(|p| !p.contains("watch=true"));
    assert_eq!(lists.count(), 1, "{service_requests:?}");
    let watches: Vec<&String> = service_requests
        .iter()
        .filter(|p| p.contains("watch=true"))
        .collect();
    assert_eq!(watches.len(), 2, "{service_requests:?}");
    assert!(
        watches[1].contains("resourceVersion=") && !watches[1].contains("resourceVersion=0&"),
        "{watches:?}"
    );

    // Removing the annotation removes the route.
    state
        .lock()
        .expect("state")
        .put_service("shop", "echo", None, &[]);
    let line = gate.wait_for_line("route removed");
    assert!(line.contains("echo.shop"), "{line}");

    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
}

#[test]
fn off_gcp_a_user_login_without_a_service_account_stops_hgate_naming_the_fix() {
    let dir = TempDir::new("hgate-user");
    let oauth = krun_tests::fakes::oauth::FakeOAuth::start();
    let user = dir.join("user.json");
    std::fs::write(&user, oauth.authorized_user("proj").to_string()).expect("user file");
    let done = Krun::hgate()
        .env("HGATE_ID_TOKENS", "metadata")
        .env("GOOGLE_APPLICATION_CREDENTIALS", &user)
        .run();
    assert_eq!(done.code, 1, "{}", done.text());
    let last = done.output.last().expect("an error line");
    assert!(last.contains("cannot mint ID tokens"), "{last}");
    assert!(last.contains("HGATE_ID_TOKEN_SERVICE_ACCOUNT"), "{last}");
    assert!(oauth.seen().is_empty(), "refused before any grant");
}

/// Reads hgate's output line by line until `done` holds for the lines read so far (events
/// of two tasks that race each other: the registrar and the Service watch).
fn read_until(gate: &mut Running, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    while !done(&lines) {
        lines.push(gate.wait_for_line(""));
    }
    lines
}

/// Lines containing every needle.
fn count(lines: &[String], needles: &[&str]) -> usize {
    lines
        .iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

#[test]
fn a_labelled_cloud_run_service_is_registered_reached_through_hgate_and_unregistered() {
    use krun_tests::fakes::cloud_run_admin::FakeRunAdmin;
    use krun_tests::fakes::kube::{self, SharedCluster};
    use serde_json::json;
    let ca = TestCa::new("cluster.local");
    let dir = TempDir::new("hgate-register");
    let (krun, tunnel) = echo_on_cloud_run(&ca, &dir);
    let (_front, front_ca, echo_url) = cloud_run_front(&dir, tunnel);

    // The project (hgate's own, from the metadata server) in two regions; us-central1 spans
    // two pages.
    let run = FakeRunAdmin::start("1234567890");
    let label = |ns| [("krun-mesh", ns), ("team", "a")];
    run.put_service(
        "us-central1",
        "echo",
        &echo_url,
        &label("default"),
        Some(("http1", 8080)),
    );
    run.put_service(
        "us-central1",
        "blocked",
        "https://blocked-x.a.run.app",
        &label("default"),
        None,
    );
    run.put_service(
        "us-central1",
        "plain",
        "https://plain-x.a.run.app",
        &[],
        None,
    );
    run.put_service(
        "europe-west1",
        "api",
        "https://api-x-ew.a.run.app",
        &label("shop"),
        Some(("h2c", 9090)),
    );

    let state = SharedCluster::default();
    {
        let mut s = state.lock().expect("state");
        s.put(
            "services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "internal-hgate", "namespace": "istio-system"},
                   "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.42",
                            "ports": [{"name": "tls-sni", "port": 15442},
                                      {"name": "tcp-istiod", "port": 15012}]}}),
        );
        // An operator's own Service named like a labelled Cloud Run service.
        s.put_service(
            "default",
            "blocked",
            None,
            &[("krun.dev/tunnel-url", "http://127.0.0.1:1/operator")],
        );
    }
    let blocked_before = state
        .lock()
        .expect("state")
        .get("services", "default", "blocked");
    let api = kube::start_cluster(state.clone());
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    let md = metadata::start(metadata::Instance::default());

    let mut gate = Krun::hgate()
        .env("HGATE_KUBE", "auto")
        .env("KUBECONFIG", &kubeconfig)
        .env("GCE_METADATA_HOST", md.addr().to_string())
        .env("HGATE_ID_TOKENS", "metadata")
        .env("SSL_CERT_FILE", &front_ca)
        .env("HGATE_REGISTER_LABEL", "krun-mesh")
        .env("HGATE_REGISTER_REGIONS", "us-central1,europe-west1")
        .env("HGATE_REGISTER_INTERVAL", "100ms")
        .env("CLOUD_RUN_API_ENDPOINT", run.server.url("http"))
        .start();
    let admin = ready_addr(&mut gate, "admin endpoint ready");
    let sni_addr = ready_addr(&mut gate, "SNI listener ready");

    // Three objects each for echo and api, one report for blocked, and echo routed: by the
    // watch's first list (blocked's route and echo's, created before api's, maybe api's) or
    // by its event, whichever saw the Service first.
    let lines = read_until(&mut gate, |lines| {
        count(lines, &["registration object created"]) >= 6
            && count(lines, &["not managed by hgate"]) >= 1
            && (count(lines, &["route updated", "echo.default"]) >= 1
                || count(lines, &["Service annotation routes changed", "count=2"]) >= 1
                || count(lines, &["Service annotation routes changed", "count=3"]) >= 1)
    });
    assert_eq!(
        count(&lines, &["registration object created"]),
        6,
        "{lines:?}"
    );
    assert_eq!(count(&lines, &["not managed by hgate"]), 1, "{lines:?}");
    let conflict = lines
        .iter()
        .find(|l| l.contains("not managed by hgate"))
        .expect("conflict line");
    assert!(
        conflict.contains("Service default/blocked") && conflict.contains("us-central1/blocked"),
        "{conflict}"
    );
    let pages: Vec<String> = run
        .list_requests()
        .into_iter()
        .filter(|p| p.contains("/us-central1/"))
        .take(2)
        .collect();
    assert!(
        pages.len() == 2 && pages[1].contains("pageToken=") && pages[1].contains("%3D"),
        "the second page asked with the encoded token: {pages:?}"
    );

    let get =
        |plural: &str, ns: &str, name: &str| state.lock().expect("state").get(plural, ns, name);
    let echo = get("services", "default", "echo").expect("Service default/echo");
    assert_eq!(
        echo["metadata"]["annotations"]["krun.dev/tunnel-url"],
        format!("{echo_url}/_hbone/15003")
    );
    assert_eq!(
        echo["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "hgate"
    );
    assert!(echo["spec"].get("selector").is_none(), "{echo}");
    assert_eq!(echo["spec"]["ports"][0]["port"], 8080);
    let slice = get("endpointslices", "default", "echo-hgate").expect("EndpointSlice");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "echo"
    );
    assert_eq!(slice["endpoints"][0]["addresses"][0], "10.96.0.42");
    assert_eq!(slice["ports"][0]["port"], 15442);
    let rule = get("destinationrules", "default", "echo").expect("DestinationRule");
    assert_eq!(rule["spec"]["trafficPolicy"]["tls"]["mode"], "ISTIO_MUTUAL");
    let api_service = get("services", "shop", "api").expect("Service shop/api");
    assert_eq!(api_service["spec"]["ports"][0]["port"], 9090);
    assert_eq!(api_service["spec"]["ports"][0]["name"], "http2");
    assert_eq!(
        get("services", "default", "blocked"),
        blocked_before,
        "the operator's Service is untouched"
    );
    assert!(get("endpointslices", "default", "blocked-hgate").is_none());
    assert!(get("destinationrules", "default", "blocked").is_none());
    assert!(get("services", "default", "plain").is_none(), "unlabelled");
    let (status, text) = http_request(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(text.contains("hgate_registration_conflicts 1"), "{text}");

    // A mesh client's call to echo.default.svc.cluster.local reaches the Cloud Run service.
    let client_dir = TempDir::new("hgate-register-client");
    let client = ca.install_client(
        &client_dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    assert_eq!(
        sni_client(sni_addr, MESH_SNI, &client, "registered")["data"],
        "registered"
    );
    let line = gate.wait_for_line("connection finished");
    assert!(
        line.contains(&format!("{echo_url}/_hbone/15003 (Annotation)")),
        "{line}"
    );

    // A new revision listens on another port: the Service is updated in place (its cluster
    // IP, set by the API server, kept), the other objects already hold what they should.
    let mut edited = get("services", "default", "echo").expect("echo");
    edited["spec"]["clusterIP"] = json!("10.96.7.7");
    state.lock().expect("state").put("services", edited);
    run.put_service(
        "us-central1",
        "echo",
        &echo_url,
        &label("default"),
        Some(("http1", 8081)),
    );
    let line = gate.wait_for_line("registration object updated");
    assert!(
        line.contains("kind=Service") && line.contains("name=echo"),
        "{line}"
    );
    let echo = get("services", "default", "echo").expect("echo");
    assert_eq!(echo["spec"]["ports"][0]["port"], 8081);
    assert_eq!(echo["spec"]["clusterIP"], "10.96.7.7");

    // The Admin API refuses to list us-central1 (a revoked role) while api is deleted: the
    // failed passes delete nothing (waited for: a refusal after the deletion).
    run.server
        .fail("/locations/us-central1/", u32::MAX, 403, &[]);
    run.delete_service("europe-west1", "api");
    let deleted_at = std::time::Instant::now();
    loop {
        let line = gate.wait_for_line("registration pass failed");
        assert!(
            line.contains("nothing deleted") && line.contains("403"),
            "{line}"
        );
        let refused_since = run
            .server
            .seen()
            .iter()
            .any(|s| s.status == 403 && s.arrived > deleted_at);
        if refused_since {
            break;
        }
    }
    assert!(
        get("services", "shop", "api").is_some(),
        "a failed list deletes nothing"
    );
    run.server.fail("/locations/us-central1/", 0, 403, &[]);

    // echo loses its label, api is gone: exactly their objects go.
    run.set_labels("us-central1", "echo", &[("team", "a")]);
    let lines = read_until(&mut gate, |lines| {
        count(lines, &["registration object deleted"]) >= 6
            && count(lines, &["route removed", "echo.default"]) >= 1
    });
    assert_eq!(
        count(&lines, &["registration object deleted"]),
        6,
        "{lines:?}"
    );
    for (ns, name) in [("default", "echo"), ("shop", "api")] {
        assert!(get("services", ns, name).is_none(), "{ns}/{name}");
        assert!(get("endpointslices", ns, &format!("{name}-hgate")).is_none());
        assert!(get("destinationrules", ns, name).is_none());
    }
    assert_eq!(get("services", "default", "blocked"), blocked_before);
    assert!(get("services", "istio-system", "internal-hgate").is_some());
    assert_eq!(
        count(&lines, &["not managed by hgate"]),
        0,
        "the conflict is reported once, not every pass"
    );
    assert_eq!(
        count(&lines, &["registration object updated"]),
        0,
        "{lines:?}"
    );

    gate.signal(Signal::SIGTERM);
    assert_eq!(gate.finish().code, 0);
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
}
