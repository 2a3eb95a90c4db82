//! The tunnel port, Istio HBONE and the builtin data plane, each checked against a client krun
//! did not write: curl (nghttp2) for h2c, Python `h2` for CONNECT over mTLS and for mesh mTLS
//! inside a tunnel stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use krun_tests::fakes::pki::{ClientFiles, TestCa};
use krun_tests::{Krun, Running, TempDir, free_port, hbone_client, testapp};
use nix::sys::signal::Signal;

const TD: &str = "cluster.local";

/// krun with an echo app on a free port and the tunnel on another; returns (krun, app port,
/// tunnel port) once the tunnel is open.
fn echo_behind_tunnel(extra: &[(&str, &str)]) -> (Running, u16, u16) {
    let (app, tunnel) = (free_port(), free_port());
    let mut krun = Krun::new()
        .env("PORT_http", app.to_string())
        .env("KRUN_TUNNEL_PORT", tunnel.to_string());
    for (k, v) in extra {
        krun = krun.env(k, v);
    }
    let mut running = krun.args(testapp(&["echo", &app.to_string()])).start();
    running.wait_for_line("tunnel port open");
    (running, app, tunnel)
}

fn curl_post(tunnel: u16, path: &str, data: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
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

#[test]
fn curl_reaches_the_app_through_hbone_post_and_undeclared_or_closed_ports_are_refused() {
    let closed = free_port();
    // host:port declarations are tunnel targets but not waited for (nothing listens there).
    let (krun, app, tunnel) = echo_behind_tunnel(&[("PORT_spare", &format!("127.0.0.1:{closed}"))]);
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
    assert_eq!(status, "404", "{body}");
    let (body, status) = curl_post(tunnel, "/_hbone/spare", "x");
    assert_eq!(status, "503", "{body}");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    // Two tunnels plus krun's own readiness probe: the refused tunnels never dialed the app.
    assert!(
        done.has_line("echo served 3 connections"),
        "{}",
        done.text()
    );
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
    let get = || {
        let out = Command::new("curl")
            .args(["-s", "--http2-prior-knowledge", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{tunnel}/index.html"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let krun = start("true");
    assert_eq!(get(), "hello from the app\n200");
    krun.signal(Signal::SIGTERM);
    krun.finish();
    let krun = start("false");
    assert!(get().ends_with("404"));
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
    server.krun.finish();

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
    strict.krun.signal(Signal::SIGTERM);
    let done = strict.krun.finish();
    assert!(done.has_line("peer not allowed"), "{}", done.text());
    assert!(
        done.has_line("denied_total=1"),
        "the denial is counted: {}",
        done.text()
    );
    // Only krun's readiness probe reached the app.
    assert!(
        done.has_line("echo served 1 connections"),
        "{}",
        done.text()
    );
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
    let tunnel = server.tunnel.to_string();
    let through = |files: &ClientFiles, ca: &Path| {
        hbone_client(&[
            "post-tls",
            "127.0.0.1",
            &tunnel,
            "/_hbone/15003",
            &files.cert.to_string_lossy(),
            &files.key.to_string_lossy(),
            &ca.to_string_lossy(),
            "mesh hello",
        ])
    };
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
    assert!(
        done.has_line("echo served 2 connections"),
        "{}",
        done.text()
    );
}

#[test]
fn krun_reaches_another_krun_over_hbone_through_the_outbound_proxy() {
    let ca = TestCa::new(TD);
    let server = mesh_workload(&ca, "spiffe://cluster.local/ns/default/sa/echo", &[]);
    let dir = TempDir::new("outbound");
    ca.install_workload(&dir.join(""), "spiffe://cluster.local/ns/default/sa/caller");
    let outbound = free_port();
    let mut caller = Krun::new()
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("KRUN_OUTBOUND_ADDR", format!("127.0.0.1:{outbound}"))
        .env("KRUN_HBONE_PEER_PORT", server.hbone.to_string())
        // The peer is on loopback here: make that a mesh range, so the proxy uses HBONE.
        .env("OUTBOUND_IP_RANGES_INCLUDE", "127.0.0.0/8")
        .args(testapp(&["wait-term"]))
        .start();
    let listening =
        caller.wait_for_line("outbound HTTP proxy (CONNECT and absolute URIs) listening");
    assert!(listening.contains("hbone=true"), "{listening}");
    caller.wait_for_line("READY");
    let mut conn =
        TcpStream::connect(("127.0.0.1", outbound)).expect("connect to the outbound proxy");
    write!(
        conn,
        "CONNECT 127.0.0.1:{app} HTTP/1.1\r\nHost: 127.0.0.1:{app}\r\n\r\n",
        app = server.app
    )
    .expect("send CONNECT");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).expect("header");
        if header == "\r\n" {
            break;
        }
    }
    conn.write_all(b"krun to krun").expect("send");
    conn.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut echoed = String::new();
    reader.read_to_string(&mut echoed).expect("read echo");
    assert_eq!(echoed, "krun to krun");
    caller.signal(Signal::SIGTERM);
    assert_eq!(caller.finish().code, 0);
    server.krun.signal(Signal::SIGTERM);
    assert_eq!(server.krun.finish().code, 0);
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
