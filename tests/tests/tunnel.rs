//! The tunnel port, Istio HBONE and the builtin data plane, each checked against a client krun
//! did not write: curl (nghttp2) for h2c, Python `h2` for CONNECT over mTLS and for mesh mTLS
//! inside a tunnel stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;

use krun_tests::fakes::pki::{ClientFiles, TestCa};
use krun_tests::{Finished, Krun, Running, TempDir, free_port, hbone_client, testapp};
use nix::sys::signal::Signal;

const TD: &str = "cluster.local";

/// krun with an echo app on a free port and the tunnel on another, plaintext tunnels to the
/// app opted in by its port number (`extra` may override that); returns (krun, app port, tunnel port) once the
/// tunnel is open.
fn echo_behind_tunnel(extra: &[(&str, &str)]) -> (Running, u16, u16) {
    let (app, tunnel) = (free_port(), free_port());
    let mut krun = Krun::new()
        .env("PORT_http", app.to_string())
        .env("KRUN_TUNNEL_PORT", tunnel.to_string())
        .env("KRUN_TUNNEL_PLAINTEXT", app.to_string());
    for (k, v) in extra {
        krun = krun.env(k, v);
    }
    let mut running = krun.args(testapp(&["echo", &app.to_string()])).start();
    running.wait_for_line("tunnel port open");
    (running, app, tunnel)
}

fn curl_post(tunnel: u16, path: &str, data: &str) -> (String, String) {
    curl_post_over(tunnel, path, data, "--http2-prior-knowledge")
}

/// `curl_post` with the HTTP version chosen by curl's `protocol` flag.
fn curl_post_over(tunnel: u16, path: &str, data: &str, protocol: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            protocol,
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--data-binary",
            data,
        ])
        .arg(format!("http://127.0.0.1:{tunnel}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let errors = String::from_utf8_lossy(&out.stderr);
    (format!("{body}{errors}"), status.to_owned())
}

/// Asserts that the echo app behind `done` served exactly `served` connections (krun's
/// readiness probe is one): a refused tunnel never reached the app.
fn assert_echo_served(done: &Finished, served: usize) {
    let line = format!("echo served {served} connections");
    assert!(done.has_line(&line), "expected {line:?}: {}", done.text());
}

/// A CONNECT over h2c from Python `h2`: the JSON the client printed.
fn python_connect(tunnel: u16, authority: &str, payload: &str) -> serde_json::Value {
    hbone_client(&[
        "connect-h2c",
        "127.0.0.1",
        &tunnel.to_string(),
        authority,
        payload,
    ])
}

#[test]
fn with_the_opt_in_curl_and_python_reach_the_app_and_other_ports_are_refused() {
    let (_held, closed) = krun_tests::refusing_port();
    // host:port declarations are not waited for (nothing listens there); listed by name, they
    // are tunnel targets. The app is listed by name here, so its number works too.
    let (krun, app, tunnel) = echo_behind_tunnel(&[
        ("PORT_spare", &format!("127.0.0.1:{closed}")),
        ("KRUN_TUNNEL_PLAINTEXT", "http,spare"),
    ]);
    let connected = python_connect(tunnel, &format!("127.0.0.1:{app}"), "connect to the app");
    assert_eq!(connected["status"], 200, "{connected}");
    assert_eq!(connected["data"], "connect to the app");
    assert_eq!(
        curl_post(
            tunnel,
            &format!("/_hbone/{app}"),
            "hello through the tunnel"
        ),
        ("hello through the tunnel".into(), "200".into())
    );
    assert_eq!(
        curl_post(tunnel, "/_hbone/http", "by name"),
        ("by name".into(), "200".into())
    );
    let (body, status) = curl_post(tunnel, "/_hbone/22", "x");
    assert_eq!(status, "403", "{body}");
    let (body, status) = curl_post(tunnel, "/_hbone/spare", "x");
    assert_eq!(status, "503", "{body}");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line(
            "KRUN_TUNNEL_PLAINTEXT: the tunnel port carries unauthenticated plaintext tunnels"
        ),
        "the opt-in is warned about: {}",
        done.text()
    );
    // Three tunnels plus krun's own readiness probe: the refused tunnels never dialed the app.
    assert_echo_served(&done, 4);
}

/// What the server sent on `conn` before closing it, as text.
fn answer_then_close(conn: &mut TcpStream) -> String {
    String::from_utf8_lossy(&krun_tests::read_until_closed(conn, "HTTP/1.1 connection"))
        .into_owned()
}

#[test]
fn http1_on_the_tunnel_port_is_bounded_as_http2_is() {
    let (app, tunnel) = (free_port(), free_port());
    let mut krun = Krun::new()
        .env("PORT_http", app.to_string())
        .env("KRUN_TUNNEL_PORT", tunnel.to_string())
        .env("KRUN_PUBLIC_HTTP", "true")
        .env("KRUN_HANDSHAKE_TIMEOUT", "1s")
        .env("KRUN_IDLE_TIMEOUT", "1s")
        .args(["python3", "-m", "http.server", &app.to_string()])
        .args(["--bind", "127.0.0.1"])
        .start();
    krun.wait_for_line("tunnel port open");
    let connect = || TcpStream::connect(("127.0.0.1", tunnel)).expect("connect");
    // A request head that never ends is closed at the handshake timeout, unanswered.
    let mut slow = connect();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    assert_eq!(answer_then_close(&mut slow), "");
    // A head beyond 64 KiB is refused.
    let mut large = connect();
    let filler = "a".repeat(70 << 10);
    write!(
        large,
        "GET / HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n"
    )
    .expect("write");
    let answer = answer_then_close(&mut large);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A kept-alive connection is answered, then closed once it idled for the idle timeout.
    let mut kept = connect();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let answer = answer_then_close(&mut kept);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains("onnection: close"), "{answer}");
    krun.signal(Signal::SIGTERM);
    krun.finish();
}

#[test]
fn tunnels_over_http1_are_refused_naming_http2_before_any_dial() {
    let (krun, app, tunnel) = echo_behind_tunnel(&[]);
    let (body, status) = curl_post_over(tunnel, &format!("/_hbone/{app}"), "x", "--http1.1");
    assert_eq!(status, "400", "{body}");
    assert!(
        body.contains("HBONE tunnels need HTTP/2") && body.contains("HTTP/1.1"),
        "{body}"
    );
    // curl as an HTTP/1.1 proxy client: `CONNECT host:port HTTP/1.1`.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_connect}", "-p", "-x"])
        .arg(format!("http://127.0.0.1:{tunnel}"))
        .arg(format!("http://127.0.0.1:{app}/"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    // The same tunnel over HTTP/2 is allowed: the refusals were about the protocol.
    assert_eq!(
        curl_post(tunnel, &format!("/_hbone/{app}"), "over h2c"),
        ("over h2c".into(), "200".into())
    );
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("HBONE tunnels need HTTP/2"),
        "{}",
        done.text()
    );
    // krun's readiness probe and the HTTP/2 tunnel: the refused ones never dialed the app.
    assert_echo_served(&done, 2);
}

#[test]
fn half_close_and_256_mib_arrive_byte_exact() {
    let dir = TempDir::new("large");
    let input = dir.join("in.bin");
    let output = dir.join("out.bin");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&input).expect("create"));
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..256 {
            for chunk in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes());
            }
            file.write_all(&block).expect("write");
        }
    }
    let (krun, app, tunnel) = echo_behind_tunnel(&[]);
    // curl sends the whole file and ends its stream (half-close); the echo app answers until
    // it sees EOF, so everything must come back after the upload finished.
    let status = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "--data-binary"])
        .arg(format!("@{}", input.display()))
        .arg("-o")
        .arg(&output)
        .arg(format!("http://127.0.0.1:{tunnel}/_hbone/{app}"))
        .status()
        .expect("curl");
    assert!(status.success());
    let hash = |path: &Path| {
        let out = Command::new("sha256sum")
            .arg(path)
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(std::fs::metadata(&output).expect("output").len(), 256 << 20);
    assert_eq!(hash(&input), hash(&output));
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
}

#[test]
fn plain_http_on_the_tunnel_port_reaches_the_app_unless_turned_off() {
    let dir = TempDir::new("public");
    std::fs::write(dir.join("index.html"), "hello from the app").expect("write");
    let (app, tunnel) = (free_port(), free_port());
    let start = |public: &str| {
        let mut krun = Krun::new()
            .env("PORT_http", app.to_string())
            .env("KRUN_TUNNEL_PORT", tunnel.to_string())
            .env("KRUN_PUBLIC_HTTP", public)
            .args([
                "python3",
                "-m",
                "http.server",
                &app.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .args([&dir.join("")])
            .start();
        krun.wait_for_line("tunnel port open");
        krun
    };
    let get = |protocol: &str, urls: usize| {
        let url = format!("http://127.0.0.1:{tunnel}/index.html");
        let out = Command::new("curl")
            .args(["-s", protocol, "-w", " %{http_code} %{num_connects}\n"])
            .args(std::iter::repeat_n(&url, urls))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let krun = start("true");
    assert_eq!(
        get("--http2-prior-knowledge", 1),
        "hello from the app 200 1\n"
    );
    // Two requests, one connection: the HTTP/1.0 app's answer does not end the client's
    // kept-alive HTTP/1.1 connection.
    assert_eq!(
        get("--http1.1", 2),
        "hello from the app 200 1\nhello from the app 200 0\n"
    );
    krun.signal(Signal::SIGTERM);
    krun.finish();
    let krun = start("false");
    for protocol in ["--http2-prior-knowledge", "--http1.1"] {
        assert!(get(protocol, 1).contains(" 404 "), "{protocol}");
    }
    krun.signal(Signal::SIGTERM);
    krun.finish();
}

/// A krun with a workload identity and the builtin data plane, HBONE on a free port.
struct MeshWorkload {
    krun: Running,
    app: u16,
    hbone: u16,
    tunnel: u16,
    _dir: TempDir,
}

fn mesh_workload(ca: &TestCa, id: &str, extra: &[(&str, &str)]) -> MeshWorkload {
    let dir = TempDir::new("mesh");
    ca.install_workload(&dir.join(""), id);
    let (app, hbone, tunnel) = (free_port(), free_port(), free_port());
    let mut krun = Krun::new()
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("PORT_http", app.to_string())
        .env("KRUN_HBONE_PORT", hbone.to_string())
        .env("KRUN_TUNNEL_PORT", tunnel.to_string());
    for (k, v) in extra {
        krun = krun.env(k, v);
    }
    let mut krun = krun.args(testapp(&["echo", &app.to_string()])).start();
    krun.wait_for_line("tunnel port open");
    MeshWorkload {
        krun,
        app,
        hbone,
        tunnel,
        _dir: dir,
    }
}

#[test]
fn python_h2_connects_over_mtls_to_hbone_and_policy_is_enforced() {
    let ca = TestCa::new(TD);
    let server = mesh_workload(&ca, "spiffe://cluster.local/ns/default/sa/echo", &[]);
    let dir = TempDir::new("clients");
    let good = ca.install_client(
        &dir.join(""),
        "good",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let foreign = ca.install_client(
        &dir.join(""),
        "foreign",
        "spiffe://other.domain/ns/default/sa/client",
    );
    let (hbone, app) = (server.hbone.to_string(), server.app);
    let connect = |files: &ClientFiles, authority: &str| {
        hbone_client(&[
            "connect-mtls",
            "127.0.0.1",
            &hbone,
            authority,
            &files.cert.to_string_lossy(),
            &files.key.to_string_lossy(),
            &files.ca.to_string_lossy(),
            "ping over hbone",
        ])
    };
    let ok = connect(&good, &format!("127.0.0.1:{app}"));
    assert_eq!(ok["status"], 200, "{ok}");
    assert_eq!(ok["data"], "ping over hbone");
    assert_eq!(
        connect(&good, "127.0.0.1:15008")["status"],
        503,
        "illegal port"
    );
    assert_eq!(
        connect(&good, "127.0.0.1")["status"],
        400,
        "malformed authority"
    );
    assert_eq!(
        connect(&good, &format!("10.99.99.99:{app}"))["status"],
        400,
        "not this workload"
    );
    let refused = connect(&foreign, &format!("127.0.0.1:{app}"));
    assert!(
        refused.get("error").is_some(),
        "another trust domain must fail the handshake: {refused}"
    );
    server.krun.signal(Signal::SIGTERM);
    let served = server.krun.finish();
    let rejected = served
        .output
        .iter()
        .find(|l| l.contains("peer certificate rejected"))
        .unwrap_or_else(|| panic!("no rejection line: {}", served.text()));
    assert!(
        rejected.contains("spiffe://other.domain/ns/default/sa/client")
            && rejected.contains("other trust domain"),
        "the log names the SPIFFE ID and the reason: {rejected}"
    );

    let strict = mesh_workload(
        &ca,
        "spiffe://cluster.local/ns/default/sa/echo",
        &[(
            "KRUN_ALLOWED_PRINCIPALS",
            "spiffe://cluster.local/ns/prod/*",
        )],
    );
    let denied = hbone_client(&[
        "connect-mtls",
        "127.0.0.1",
        &strict.hbone.to_string(),
        &format!("127.0.0.1:{}", strict.app),
        &good.cert.to_string_lossy(),
        &good.key.to_string_lossy(),
        &good.ca.to_string_lossy(),
        "must not arrive",
    ]);
    assert!(
        denied.get("data").is_none(),
        "a principal not allowed gets no bytes through: {denied}"
    );
    assert_eq!(
        denied["status"], 401,
        "and learns why from the status, as from ztunnel: {denied}"
    );
    strict.krun.signal(Signal::SIGTERM);
    let done = strict.krun.finish();
    assert!(done.has_line("peer not allowed"), "{}", done.text());
    assert!(
        done.has_line("denied_total=1"),
        "the denial is counted: {}",
        done.text()
    );
    // Only krun's readiness probe reached the app.
    assert_echo_served(&done, 1);
}

/// Python `h2` posts `/_hbone/15003` on the tunnel port and speaks mesh mTLS inside the
/// stream with `files`, trusting `ca`: the JSON the client printed.
fn through_terminator(
    tunnel: u16,
    files: &ClientFiles,
    ca: &Path,
    payload: &str,
) -> serde_json::Value {
    hbone_client(&[
        "post-tls",
        "127.0.0.1",
        &tunnel.to_string(),
        "/_hbone/15003",
        &files.cert.to_string_lossy(),
        &files.key.to_string_lossy(),
        &ca.to_string_lossy(),
        payload,
    ])
}

#[test]
fn builtin_plane_terminates_mesh_mtls_inside_the_tunnel() {
    let ca = TestCa::new(TD);
    let server = mesh_workload(&ca, "spiffe://cluster.local/ns/default/sa/echo", &[]);
    let dir = TempDir::new("mesh-client");
    let client = ca.install_client(
        &dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let outsider_ca = TestCa::new("not the mesh");
    let outsider = outsider_ca.install_client(
        &dir.join(""),
        "outsider",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let through =
        |files: &ClientFiles, ca: &Path| through_terminator(server.tunnel, files, ca, "mesh hello");
    let ok = through(&client, &client.ca);
    assert_eq!(ok["data"], "mesh hello", "{ok}");
    // A certificate from outside the mesh does not get through (the client trusts the mesh
    // root, so only krun can refuse it).
    let refused = through(&outsider, &client.ca);
    assert!(
        refused.get("data").is_none() || refused["data"] == "",
        "{refused}"
    );
    server.krun.signal(Signal::SIGTERM);
    let done = server.krun.finish();
    // The mesh client plus krun's readiness probe; the outsider never reached the app.
    assert_echo_served(&done, 2);
}

/// A caller krun (builtin data plane, identity `sa/caller`) whose outbound proxy treats
/// loopback as the mesh and tunnels to `server`'s HBONE port; `extra` adds settings.
fn caller_of(
    ca: &TestCa,
    server: &MeshWorkload,
    extra: &[(&str, &str)],
) -> (Running, u16, TempDir) {
    let dir = TempDir::new("outbound");
    ca.install_workload(&dir.join(""), "spiffe://cluster.local/ns/default/sa/caller");
    let outbound = free_port();
    let mut caller = Krun::new()
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("KRUN_OUTBOUND_ADDR", format!("127.0.0.1:{outbound}"))
        .env("KRUN_HBONE_PEER_PORT", server.hbone.to_string())
        // The peer is on loopback here: make that a mesh range, so the proxy uses HBONE.
        .env("KRUN_MESH_CIDRS", "127.0.0.0/8");
    for (k, v) in extra {
        caller = caller.env(k, v);
    }
    let mut caller = caller.args(testapp(&["wait-term"])).start();
    let listening =
        caller.wait_for_line("outbound HTTP proxy (CONNECT and absolute URIs) listening");
    assert!(listening.contains("hbone=true"), "{listening}");
    caller.wait_for_line("READY");
    (caller, outbound, dir)
}

/// Sends `CONNECT 127.0.0.1:<app>` to the proxy at `outbound`; the status line and the
/// connection, positioned after the response headers.
fn proxy_connect(outbound: u16, app: u16) -> (String, BufReader<TcpStream>, TcpStream) {
    let mut conn =
        TcpStream::connect(("127.0.0.1", outbound)).expect("connect to the outbound proxy");
    write!(
        conn,
        "CONNECT 127.0.0.1:{app} HTTP/1.1\r\nHost: 127.0.0.1:{app}\r\n\r\n"
    )
    .expect("send CONNECT");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).expect("header");
        if header == "\r\n" || header.is_empty() {
            break;
        }
    }
    (status, reader, conn)
}

/// The CONNECT carries ztunnel's `forwarded` (the app's address), `baggage` (the caller's
/// namespace and service) and a W3C `traceparent`; the server logs them with the stream.
#[test]
fn krun_reaches_another_krun_over_hbone_through_the_outbound_proxy() {
    let ca = TestCa::new(TD);
    let server = mesh_workload(
        &ca,
        "spiffe://cluster.local/ns/default/sa/echo",
        &[("RUST_LOG", "hbone::server=debug,info")],
    );
    let (caller, outbound, _dir) = caller_of(&ca, &server, &[("K_SERVICE", "caller-svc")]);
    let (status, mut reader, mut conn) = proxy_connect(outbound, server.app);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    conn.write_all(b"krun to krun").expect("send");
    conn.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut echoed = String::new();
    reader.read_to_string(&mut echoed).expect("read echo");
    assert_eq!(echoed, "krun to krun");
    caller.signal(Signal::SIGTERM);
    let done = caller.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("outbound HBONE verifies only the peer's trust domain"),
        "no identity was configured for the peer, and the log says so: {}",
        done.text()
    );
    server.krun.signal(Signal::SIGTERM);
    let served = server.krun.finish();
    assert_eq!(served.code, 0);
    let open = served
        .output
        .iter()
        .find(|l| l.contains("tunnel open"))
        .unwrap_or_else(|| panic!("no tunnel open line: {}", served.text()));
    assert!(
        open.contains(r#"forwarded=Some("for=\"127.0.0.1:"#),
        "{open}"
    );
    assert!(
        open.contains("k8s.namespace.name=default") && open.contains("service.name=caller-svc"),
        "{open}"
    );
    assert!(open.contains(r#"traceparent=Some("00-"#), "{open}");
}

/// A caller that expects `id` of the peer at 127.0.0.1 sends one CONNECT through its proxy
/// and exits: the proxy's status line and the caller's output.
fn connect_expecting(ca: &TestCa, server: &MeshWorkload, id: &str) -> (String, Finished) {
    let expected = format!("127.0.0.1={id}");
    let (caller, outbound, _dir) = caller_of(ca, server, &[("KRUN_PEER_IDENTITIES", &expected)]);
    let (status, _reader, _conn) = proxy_connect(outbound, server.app);
    caller.signal(Signal::SIGTERM);
    (status, caller.finish())
}

#[test]
fn an_outbound_peer_must_present_the_configured_spiffe_id() {
    let ca = TestCa::new(TD);
    let server = mesh_workload(&ca, "spiffe://cluster.local/ns/default/sa/echo", &[]);
    let (status, done) =
        connect_expecting(&ca, &server, "spiffe://cluster.local/ns/default/sa/echo");
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "the right identity: {status}"
    );
    assert!(
        !done.has_line("verifies only the peer's trust domain"),
        "{}",
        done.text()
    );
    let (status, done) =
        connect_expecting(&ca, &server, "spiffe://cluster.local/ns/default/sa/other");
    assert!(
        status.starts_with("HTTP/1.1 502"),
        "another identity: {status}"
    );
    let mismatch = done
        .output
        .iter()
        .find(|l| l.contains("peer identity mismatch"))
        .unwrap_or_else(|| panic!("no mismatch line: {}", done.text()));
    assert!(
        mismatch.contains("expected=spiffe://cluster.local/ns/default/sa/other")
            && mismatch.contains("spiffe://cluster.local/ns/default/sa/echo"),
        "the line names both identities: {mismatch}"
    );
    server.krun.signal(Signal::SIGTERM);
    let done = server.krun.finish();
    // The accepted caller's tunnel plus krun's readiness probe; the refused one never arrived.
    assert_echo_served(&done, 2);
}

#[test]
fn an_in_flight_stream_completes_during_drain_and_new_ones_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut krun, app, tunnel) = echo_behind_tunnel(&[("KRUN_DRAIN_TIMEOUT", "1m")]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = hbone::client::HboneClient::new(hbone::H2Settings::default(), None);
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], tunnel));
    let authority = format!("127.0.0.1:{app}");
    let (mut stream, _guard) = runtime.block_on(async {
        let (mut stream, guard) = client
            .connect(peer, None, &authority)
            .await
            .expect("CONNECT through the tunnel port");
        stream.write_all(b"first;").await.expect("send");
        let mut echoed = [0u8; 6];
        stream
            .read_exact(&mut echoed)
            .await
            .expect("the stream is open end to end");
        assert_eq!(&echoed, b"first;");
        (stream, guard)
    });

    krun.signal(Signal::SIGTERM);
    krun.wait_for_line("tunnel listener closed");
    assert!(
        TcpStream::connect(("127.0.0.1", tunnel)).is_err(),
        "new connections must be refused while draining"
    );

    let rest = runtime.block_on(async {
        stream
            .write_all(b"second")
            .await
            .expect("the open stream still carries data");
        stream.shutdown().await.expect("half-close");
        let mut rest = String::new();
        stream
            .read_to_string(&mut rest)
            .await
            .expect("read the rest");
        // The same connection takes no new stream once the server sent GOAWAY.
        let refused = client.connect(peer, None, &authority).await;
        (rest, refused.is_err())
    });
    assert_eq!(rest, ("second".to_owned(), true));
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
}

/// No connection is waiting on `listener`: nothing dialed it.
fn never_dialed(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).expect("nonblocking");
    matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn without_the_opt_in_plaintext_tunnels_are_refused_before_any_dial_and_logged_once() {
    // A declared remote target on loopback: it must not be reachable by number or by name.
    let db = TcpListener::bind("127.0.0.1:0").expect("bind db");
    let db_port = db.local_addr().expect("db addr").port();
    let (krun, app, tunnel) = echo_behind_tunnel(&[
        ("KRUN_TUNNEL_PLAINTEXT", ""),
        ("PORT_db", &format!("127.0.0.1:{db_port}")),
    ]);
    for path in [
        format!("/_hbone/{app}"),
        "/_hbone/http".into(),
        "/_hbone/db".into(),
        format!("/_hbone/{db_port}"),
    ] {
        let (body, status) = curl_post(tunnel, &path, "must not arrive");
        assert_eq!(status, "403", "{path}: {body}");
        assert!(body.contains("KRUN_TUNNEL_PLAINTEXT"), "{path}: {body}");
    }
    for authority in [format!("127.0.0.1:{app}"), format!("127.0.0.1:{db_port}")] {
        let refused = python_connect(tunnel, &authority, "must not arrive");
        assert_eq!(refused["status"], 403, "{authority}: {refused}");
    }
    // A flood from one address: counted, logged once.
    for _ in 0..10 {
        assert_eq!(curl_post(tunnel, "/_hbone/http", "x").1, "403");
    }
    // Another kind of refusal from the same address is logged too, with the running count.
    // No mesh here, so nothing serves 15003.
    assert_eq!(curl_post(tunnel, "/_hbone/15003", "x").1, "404");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    let refusals: Vec<&String> = done
        .output
        .iter()
        .filter(|l| l.contains("tunnel refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:#?}");
    assert!(refusals[0].contains("status=403"), "{}", refusals[0]);
    assert!(
        refusals[1].contains("status=404") && refusals[1].contains("refused_total=17"),
        "{}",
        refusals[1]
    );
    assert!(!done.has_line("KRUN_TUNNEL_PLAINTEXT: the tunnel port carries"));
    // Only krun's readiness probe reached the app; nothing reached the db.
    assert_echo_served(&done, 1);
    assert!(never_dialed(&db), "the declared remote target was dialed");
}

#[test]
fn with_public_http_off_only_the_mtls_terminator_reaches_the_app() {
    let ca = TestCa::new(TD);
    let server = mesh_workload(
        &ca,
        "spiffe://cluster.local/ns/default/sa/echo",
        &[("KRUN_PUBLIC_HTTP", "off")],
    );
    let tunnel = server.tunnel;
    let plain = Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{tunnel}/"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "404");
    assert_eq!(
        curl_post(tunnel, &format!("/_hbone/{}", server.app), "x").1,
        "403"
    );
    let connect = python_connect(tunnel, &format!("127.0.0.1:{}", server.app), "x");
    assert_eq!(connect["status"], 403, "{connect}");
    let dir = TempDir::new("public-off");
    let client = ca.install_client(
        &dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let mesh = through_terminator(tunnel, &client, &client.ca, "through the terminator");
    assert_eq!(mesh["data"], "through the terminator", "{mesh}");
    server.krun.signal(Signal::SIGTERM);
    let done = server.krun.finish();
    // The mesh client plus krun's readiness probe.
    assert_echo_served(&done, 2);

    // Opting the app in while KRUN_PUBLIC_HTTP=off closes it is a contradiction: krun stops.
    let contradiction = Krun::new()
        .env("PORT_http", free_port().to_string())
        .env("KRUN_TUNNEL_PORT", free_port().to_string())
        .env("KRUN_PUBLIC_HTTP", "off")
        .env("KRUN_TUNNEL_PLAINTEXT", "http")
        .args(testapp(&["wait-term"]))
        .run();
    assert_ne!(contradiction.code, 0, "{}", contradiction.text());
    assert!(
        contradiction.has_line("KRUN_PUBLIC_HTTP=off closes the app to the tunnel port"),
        "{}",
        contradiction.text()
    );
}

#[test]
fn a_mesh_client_whose_principal_is_not_allowed_gets_nothing_through_hbone_15003() {
    let ca = TestCa::new(TD);
    let server = mesh_workload(
        &ca,
        "spiffe://cluster.local/ns/default/sa/echo",
        &[(
            "KRUN_ALLOWED_PRINCIPALS",
            "spiffe://cluster.local/ns/prod/*",
        )],
    );
    let dir = TempDir::new("not-allowed");
    let client = ca.install_client(
        &dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let denied = through_terminator(server.tunnel, &client, &client.ca, "must not arrive");
    assert!(
        denied.get("data").is_none() || denied["data"] == "",
        "{denied}"
    );
    server.krun.signal(Signal::SIGTERM);
    let done = server.krun.finish();
    assert!(
        done.has_line("peer not allowed by KRUN_ALLOWED_PRINCIPALS"),
        "{}",
        done.text()
    );
    // Only krun's readiness probe reached the app.
    assert_echo_served(&done, 1);
}

/// The listening TCP ports (IPv4 and IPv6) of the network namespace `pid` lives in.
fn listening_ports(pid: i32) -> Vec<u16> {
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|table| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // local_address is ADDR:PORT in hex; state 0A is LISTEN.
                    let port = fields.get(1)?.rsplit_once(':')?.1;
                    (fields.get(3) == Some(&"0A")).then(|| u16::from_str_radix(port, 16).ok())?
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A plain `krun -- app` outside a mesh, with the default ports, in a network namespace of
/// its own (so the namespace's socket table is krun's alone).
fn plain_krun(extra: &[(&str, &str)]) -> Running {
    let mut krun = Krun::wrapped(&["unshare", "--net"])
        .env_remove("KRUN_TUNNEL_PORT")
        .env_remove("KRUN_HBONE_PORT")
        .env_remove("KRUN_OUTBOUND_ADDR")
        .env_remove("KRUN_ADMIN_ADDR")
        .env_remove("ISTIO_META_INTERCEPTION_MODE");
    for (k, v) in extra {
        krun = krun.env(k, v);
    }
    krun.args(testapp(&["wait-term"])).start()
}

#[test]
fn a_plain_krun_outside_a_mesh_opens_no_listener_unless_asked() {
    // The admin endpoint is the one listener krun always opens, on loopback.
    let mut krun = plain_krun(&[]);
    krun.wait_for_all(&[
        "tunnel port not opened",
        "outbound proxy not opened",
        "admin endpoint listening addr=127.0.0.1:15030",
        "READY",
    ]);
    assert_eq!(listening_ports(krun.pid.as_raw()), vec![15030]);
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(!done.has_line("no workload certificate"), "{}", done.text());

    // KRUN_ADMIN_ADDR=off opens nothing at all.
    let mut krun = plain_krun(&[("KRUN_ADMIN_ADDR", "off")]);
    krun.wait_for_all(&["tunnel port not opened", "READY"]);
    assert_eq!(listening_ports(krun.pid.as_raw()), Vec::<u16>::new());
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);

    // On Cloud Run PORT is the container port: naming the tunnel port, it opens it.
    let mut krun = plain_krun(&[("PORT", "15009"), ("KRUN_ADMIN_ADDR", "off")]);
    krun.wait_for_line("tunnel port open");
    assert_eq!(listening_ports(krun.pid.as_raw()), vec![15009]);
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
}

/// Issue #13 acceptance: a DENY policy from istiod for a principal answers its new streams
/// at 15008 with 401 (to Python h2, and to krun as client, whose proxy reports the 401);
/// pushing it while connections are open closes them, one log line each naming the policy
/// and the peer; behind `/_hbone/15003` the denied connection is closed; removing it lets new
/// streams through.
#[test]
fn an_istiod_deny_policy_answers_401_closes_open_streams_and_its_removal_lets_them_through() {
    use krun_tests::fakes::istiod::{FakeIstiod, IstiodTls, deny_principals};
    let ca = TestCa::new(TD);
    let istiod = FakeIstiod::start(IstiodTls::new(&ca));
    let xds = istiod.addr.to_string();
    let mut server = mesh_workload(
        &ca,
        "spiffe://cluster.local/ns/default/sa/echo",
        &[("XDS_ADDR", &xds)],
    );
    // No wait for the subscription: pushes made before it arrive with istiod's initial answer.
    let dir = TempDir::new("clients");
    let client = ca.install_client(
        &dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let authority = format!("127.0.0.1:{}", server.app);
    let (hbone, app) = (server.hbone.to_string(), server.app);
    let files = [
        client.cert.to_string_lossy().into_owned(),
        client.key.to_string_lossy().into_owned(),
        client.ca.to_string_lossy().into_owned(),
    ];
    let python = |mode: &str, payload: &str| -> Vec<String> {
        let mut args = vec![mode.to_owned(), "127.0.0.1".into(), hbone.clone()];
        args.push(authority.clone());
        args.extend(files.iter().cloned());
        args.push(payload.into());
        args
    };
    let connect = |payload: &str| {
        let args = python("connect-mtls", payload);
        hbone_client(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert_eq!(connect("before")["status"], 200, "no policy: allowed");

    // Open connections: Python h2 holding a CONNECT stream, and krun's outbound proxy.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hbone_client.py");
    let mut held = Command::new(krun_tests::python())
        .arg(script)
        .args(python("hold-mtls", "held open"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the python client");
    let mut held_lines = BufReader::new(held.stdout.take().expect("stdout")).lines();
    let mut next_held = || -> serde_json::Value {
        let line = held_lines.next().expect("a line").expect("read");
        serde_json::from_str(&line).expect("JSON line")
    };
    let opened = next_held();
    assert_eq!(
        (opened["status"].as_u64(), opened["data"].as_str()),
        (Some(200), Some("held open"))
    );
    let (caller, outbound, _caller_dir) = caller_of(&ca, &server, &[]);
    let (status, mut caller_reader, mut caller_conn) = proxy_connect(outbound, app);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    caller_conn.write_all(b"krun held\n").expect("send");
    let mut echoed = String::new();
    caller_reader.read_line(&mut echoed).expect("echo");
    assert_eq!(echoed, "krun held\n");

    // The Python client and the krun caller, by principal, in the server's namespace.
    istiod.push_policy(&deny_principals(
        "default",
        "deny-clients",
        &[
            "cluster.local/ns/default/sa/client",
            "cluster.local/ns/default/sa/caller",
        ],
    ));
    server.krun.wait_for_line("policies=1");
    let ended = next_held();
    assert_eq!(ended["ended"], true, "{ended}");
    assert!(ended.get("error").is_none(), "closed cleanly: {ended}");
    let mut rest = String::new();
    caller_reader
        .read_to_string(&mut rest)
        .expect("krun's held connection ends");
    assert_eq!(rest, "", "nothing more after the policy push");
    drop((caller_reader, caller_conn));
    let _ = held.wait();

    let denied = connect("after the push");
    assert_eq!(denied["status"], 401, "{denied}");
    let body = denied["body"].as_str().unwrap_or_default();
    assert!(
        body.contains("denied by DENY policy default/deny-clients"),
        "{denied}"
    );
    let (status, mut reader, conn) = proxy_connect(outbound, app);
    assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    // The 502 is kept alive: half-close so the proxy ends the connection after its body.
    conn.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut why = String::new();
    reader.read_to_string(&mut why).expect("the proxy's reason");
    assert!(
        why.contains("HTTP 401"),
        "krun as client sees the 401: {why}"
    );
    drop((reader, conn));
    // Behind /_hbone/15003 the stream is raw TCP: the denied connection is closed.
    let inside = through_terminator(server.tunnel, &client, &client.ca, "inside");
    assert!(
        inside.get("data").is_none() || inside["data"] == "",
        "{inside}"
    );

    istiod.remove("default/deny-clients");
    server.krun.wait_for_line("policies=0");
    let allowed = connect("after the removal");
    assert_eq!(allowed["data"], "after the removal", "{allowed}");
    let inside = through_terminator(server.tunnel, &client, &client.ca, "inside again");
    assert_eq!(inside["data"], "inside again", "{inside}");
    let (status, reader, conn) = proxy_connect(outbound, app);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    drop((reader, conn));

    caller.signal(Signal::SIGTERM);
    caller.finish();
    server.krun.signal(Signal::SIGTERM);
    let done = server.krun.finish();
    let text = done.text();
    let closed: Vec<&String> = done
        .output
        .iter()
        .filter(|l| l.contains("open stream closed: a policy change denies it"))
        .collect();
    assert_eq!(closed.len(), 2, "one line per closed connection: {text}");
    for peer in ["sa/client", "sa/caller"] {
        assert!(
            closed
                .iter()
                .any(|l| l.contains(peer) && l.contains("default/deny-clients")),
            "{peer}: {text}"
        );
    }
    assert!(done.has_line("stream denied (401)"), "{text}");
    assert!(
        done.has_line("mesh connection denied by policy; closed"),
        "{text}"
    );
    assert!(done.has_line("HBONE listener open"), "{text}");
}
