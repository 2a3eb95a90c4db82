//! krun's admin endpoint (`KRUN_ADMIN_ADDR`): each path, Istio's TCP metrics read with
//! `prometheus_client`'s parser after a tunnel with a known number of bytes, and
//! `/quitquitquit` draining as SIGTERM does.

use std::net::SocketAddr;

use krun_tests::fakes::pki::TestCa;
use krun_tests::{
    Krun, Running, TempDir, free_port, hbone_client, http_request, prometheus_samples, testapp,
};
use serde_json::Value;

/// A test secret: `--print-config` redacts it (a JWT), and so must `/config_dump`.
const SECRET_JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZG1pbi10ZXN0In0.c2VjcmV0LXNpZw";

/// krun on an ephemeral admin port; returns it and the admin address.
fn with_admin(krun: Krun) -> (Running, SocketAddr) {
    let mut krun = krun.env("KRUN_ADMIN_ADDR", "127.0.0.1:0").start();
    let admin = krun.wait_for_addr("admin endpoint listening");
    (krun, admin)
}

/// The value of the sample `name` whose labels include every pair of `labels`.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

/// `CONNECT 127.0.0.1:target` through the HTTP proxy at `proxy`, then `payload` out and the
/// same number of bytes back (the echo app).
fn connect_and_echo(proxy: u16, target: u16, payload: &str) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", proxy)).expect("outbound proxy");
    write!(
        conn,
        "CONNECT 127.0.0.1:{target} HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\n\r\n"
    )
    .expect("CONNECT");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).expect("CONNECT answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    conn.write_all(payload.as_bytes()).expect("payload");
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back).expect("echo");
    assert_eq!(back, payload.as_bytes());
}

#[test]
fn metrics_count_a_tunnels_bytes_exactly_under_istio_names() {
    let ca = TestCa::new("cluster.local");
    let dir = TempDir::new("admin-mesh");
    let server_id = "spiffe://cluster.local/ns/default/sa/echo";
    let client_id = "spiffe://cluster.local/ns/default/sa/client";
    ca.install_workload(&dir.join(""), server_id);
    let client = ca.install_client(&dir.join(""), "client", client_id);
    let (app, tunnel, outbound) = (free_port(), free_port(), free_port());
    let (mut krun, admin) = with_admin(
        Krun::new()
            .env("MESH_BASE_DIR", dir.join(""))
            .env("KRUN_DATAPLANE", "builtin")
            .env("PORT_http", app.to_string())
            .env("KRUN_TUNNEL_PORT", tunnel.to_string())
            .env("KRUN_OUTBOUND_ADDR", format!("127.0.0.1:{outbound}"))
            .args(testapp(&["echo", &app.to_string()])),
    );
    krun.wait_for_line("tunnel port open");
    // Through the tunnel port to the builtin mTLS terminator (`/_hbone/15003`), to the echo
    // app: PAYLOAD bytes each way.
    let payload = "m".repeat(1234);
    let echoed = hbone_client(&[
        "post-tls",
        "127.0.0.1",
        &tunnel.to_string(),
        "/_hbone/15003",
        &client.cert.to_string_lossy(),
        &client.key.to_string_lossy(),
        &client.ca.to_string_lossy(),
        &payload,
    ]);
    assert_eq!(echoed["data"], payload.as_str(), "{echoed}");
    // Out through the outbound proxy to a destination outside the mesh (passthrough): 321
    // bytes each way, reported by the source.
    connect_and_echo(outbound, app, &"o".repeat(321));

    let (status, text) = http_request(admin, "GET", "/metrics");
    assert_eq!(status, 200, "{text}");
    let samples = prometheus_samples(&text);
    let labels = [
        ("reporter", "destination"),
        ("source_principal", client_id),
        ("destination_principal", server_id),
    ];
    let get = |name| sample(&samples, name, &labels);
    assert_eq!(
        get("istio_tcp_connections_opened_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        get("istio_tcp_received_bytes_total"),
        Some(1234.0),
        "{text}"
    );
    assert_eq!(get("istio_tcp_sent_bytes_total"), Some(1234.0), "{text}");
    let outbound_labels = [
        ("reporter", "source"),
        ("source_principal", server_id),
        ("destination_principal", "unknown"),
    ];
    let get = |name| sample(&samples, name, &outbound_labels);
    assert_eq!(
        get("istio_tcp_connections_opened_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(get("istio_tcp_received_bytes_total"), Some(321.0), "{text}");
    assert_eq!(get("istio_tcp_sent_bytes_total"), Some(321.0), "{text}");
    // krun's own metrics are there too.
    assert!(
        sample(
            &samples,
            "krun_startup_phase_duration_seconds",
            &[("phase", "config")]
        )
        .is_some(),
        "{text}"
    );
    assert!(
        sample(&samples, "krun_certificate_expiry_timestamp_seconds", &[]).is_some_and(|t| t > 0.0),
        "{text}"
    );
    assert!(
        sample(
            &samples,
            "krun_connections_denied_total",
            &[("reason", "peer_not_allowed")]
        )
        .is_some(),
        "{text}"
    );

    let (status, dump) = http_request(admin, "GET", "/config_dump");
    assert_eq!(status, 200, "{dump}");
    let dump: Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert_eq!(dump["live"]["certificate"]["san"], server_id, "{dump}");
    assert_eq!(dump["live"]["dataplane"]["mode"], "builtin", "{dump}");
    let listeners = dump["live"]["listeners"].to_string();
    assert!(listeners.contains(&format!(":{tunnel}")), "{listeners}");
    assert!(listeners.contains("KRUN_ADMIN_ADDR"), "{listeners}");
    krun.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
}

#[test]
fn each_admin_path_answers_and_quitquitquit_drains_as_sigterm() {
    // The app never serves PORT_http, so krun stays starting and readiness says why.
    let app_port = free_port();
    let (mut krun, admin) = with_admin(
        Krun::new()
            .env("PORT_http", app_port.to_string())
            .env("XDS_AGENT_DEBUG", SECRET_JWT)
            .args(testapp(&["wait-term"])),
    );
    krun.wait_for_line("process=app");
    let (status, body) = http_request(admin, "GET", "/healthz/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not ready: starting"), "{body}");
    assert!(
        body.contains("app: running (pid "),
        "names what is not ready and why: {body}"
    );

    let (status, dump) = http_request(admin, "GET", "/config_dump");
    assert_eq!(status, 200, "{dump}");
    assert!(!dump.contains(SECRET_JWT), "the secret leaked: {dump}");
    let dump: Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert_eq!(
        dump["config"]["KRUN_ADMIN_ADDR"]["value"], "127.0.0.1:0",
        "the --print-config rendering: {dump}"
    );
    assert_eq!(dump["config"]["KRUN_ADMIN_ADDR"]["source"], "env");
    assert_eq!(dump["live"]["phase"], "starting");
    assert_eq!(dump["live"]["processes"][0]["name"], "app", "{dump}");
    assert_eq!(
        dump["live"]["certificate"],
        Value::Null,
        "no mesh, no certificate"
    );

    let (status, text) = http_request(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(!prometheus_samples(&text).is_empty(), "{text}");

    let (status, level) = http_request(admin, "GET", "/logging");
    assert_eq!((status, level.trim()), (200, "info"));
    let (status, level) = http_request(admin, "POST", "/logging?level=debug");
    assert_eq!((status, level.trim()), (200, "debug"));
    let (status, level) = http_request(admin, "GET", "/logging");
    assert_eq!((status, level.trim()), (200, "debug"));
    let (status, error) = http_request(admin, "POST", "/logging?level=hbone=loud");
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("not a log filter"), "{error}");

    assert_eq!(http_request(admin, "GET", "/nothing-here").0, 404);
    assert_eq!(
        http_request(admin, "GET", "/quitquitquit").0,
        405,
        "a GET (a crawler, a mistyped probe) must not drain krun"
    );
    let (status, body) = http_request(admin, "POST", "/quitquitquit");
    assert_eq!((status, body.trim()), (200, "draining"));
    let done = krun.finish();
    // The same path as SIGTERM: the supervisor's drain, the app SIGTERMed and exiting 0, krun
    // passing on its status.
    assert!(
        done.has_line("cause=\"SIGTERM received\""),
        "{}",
        done.text()
    );
    assert!(done.has_line("app exited"), "{}", done.text());
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        !done.text().contains(SECRET_JWT),
        "the secret leaked into the log"
    );
}
