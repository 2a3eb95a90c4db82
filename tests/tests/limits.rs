//! Every listener is bounded. 1,000 connections that send nothing are closed at the handshake
//! timeout on the tunnel port (15009), Istio HBONE (15008), the mTLS terminator behind
//! `/_hbone/15003`, the outbound proxy (15007) and hgate's SNI listener, while a normal
//! request from a client krun did not write (Python `ssl` and `h2`) succeeds meanwhile; beyond
//! the connection cap a new connection is closed at once and counted; the capture listener
//! (15001), which has no handshake to wait for, is bounded by its idle timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use krun_tests::fakes::pki::{ClientFiles, TestCa};
use krun_tests::netns::Netns;
use krun_tests::{
    HANG_GUARD, Krun, Running, TempDir, free_port, hbone_client, read_until_closed, sni_client,
    testapp,
};
use nix::sys::signal::Signal;

/// Connections that send nothing, per listener.
const IDLE_CONNECTIONS: usize = 1000;
/// The handshake timeout the tests set: short, so they finish quickly; nothing is timed.
const HANDSHAKE_TIMEOUT: &str = "2s";
const MESH_SNI: &str = "outbound_.8080_._.echo.default.svc.cluster.local";

/// These tests run one at a time. Each holds 1,000 client sockets, whose local ports come from
/// the same ephemeral range as the ports `free_port` hands out; run side by side, one test's
/// idle connections could take the port another test's app is about to listen on.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A krun with a mesh identity and the builtin data plane: tunnel port, HBONE, the mTLS
/// terminator and the outbound proxy, all on free ports, in front of an echo app.
struct Workload {
    krun: Running,
    app: u16,
    tunnel: u16,
    hbone: u16,
    outbound: u16,
    terminator: SocketAddr,
    client: ClientFiles,
    _dirs: (TempDir, TempDir),
}

fn workload(extra: &[(&str, &str)]) -> Workload {
    let ca = TestCa::new("cluster.local");
    let dir = TempDir::new("limits");
    ca.install_workload(&dir.join(""), "spiffe://cluster.local/ns/default/sa/echo");
    let client_dir = TempDir::new("limits-client");
    let client = ca.install_client(
        &client_dir.join(""),
        "client",
        "spiffe://cluster.local/ns/default/sa/client",
    );
    let (app, tunnel, hbone, outbound) = (free_port(), free_port(), free_port(), free_port());
    let mut krun = Krun::new()
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("PORT_http", app.to_string())
        .env("KRUN_TUNNEL_PORT", tunnel.to_string())
        .env("KRUN_HBONE_PORT", hbone.to_string())
        .env("KRUN_OUTBOUND_ADDR", format!("127.0.0.1:{outbound}"))
        .env("KRUN_HANDSHAKE_TIMEOUT", HANDSHAKE_TIMEOUT);
    for (k, v) in extra {
        krun = krun.env(k, v);
    }
    let mut krun = krun.args(testapp(&["echo", &app.to_string()])).start();
    let terminator = krun.wait_for_addr("builtin mesh inbound: mTLS terminated by krun");
    krun.wait_for_line("tunnel port open");
    Workload {
        krun,
        app,
        tunnel,
        hbone,
        outbound,
        terminator,
        client,
        _dirs: (dir, client_dir),
    }
}

/// Raises this process's open-file limit (the sockets of several tests at once) and checks
/// there is room for them.
fn room_for_idle_connections() {
    let limit = mesh::rlimit::raise_open_files();
    let needed = u64::try_from(6 * (IDLE_CONNECTIONS + 100)).unwrap_or(u64::MAX);
    assert!(
        limit >= needed,
        "RLIMIT_NOFILE hard limit {limit} is below the {needed} sockets these tests hold; raise it (ulimit -Hn)"
    );
}

/// Opens the idle connections: connected, and sending nothing.
fn idle_connections(addr: SocketAddr) -> Vec<TcpStream> {
    room_for_idle_connections();
    (0..IDLE_CONNECTIONS)
        .map(|i| {
            TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("idle connection {i} to {addr}: {e}"))
        })
        .collect()
}

/// Waits for the server to close every connection (EOF or a reset; whatever the server sent
/// first, such as HTTP/2's SETTINGS, is read and dropped).
fn assert_all_closed(connections: Vec<TcpStream>, listener: &str) {
    for (i, mut conn) in connections.into_iter().enumerate() {
        read_until_closed(&mut conn, &format!("{listener}: idle connection {i}"));
    }
}

/// mTLS to `addr` with `sni`, sends `payload` and returns what came back (Python `ssl`).
fn mtls_echo(addr: SocketAddr, sni: &str, client: &ClientFiles, payload: &str) -> String {
    let line = sni_client(addr, sni, client, payload);
    line["data"]
        .as_str()
        .map_or_else(|| panic!("no data from {addr}: {line}"), str::to_owned)
}

fn stop(krun: Running) {
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn idle_connections_to_the_tunnel_port_are_closed_and_a_mesh_tunnel_works_meanwhile() {
    let _serial = one_at_a_time();
    let w = workload(&[]);
    let idle = idle_connections(local(w.tunnel));
    let through = hbone_client(&[
        "post-tls",
        "127.0.0.1",
        &w.tunnel.to_string(),
        "/_hbone/15003",
        &w.client.cert.to_string_lossy(),
        &w.client.key.to_string_lossy(),
        &w.client.ca.to_string_lossy(),
        "through the tunnel port",
    ]);
    assert_eq!(through["data"], "through the tunnel port", "{through}");
    assert_all_closed(idle, "tunnel port");
    stop(w.krun);
}

#[test]
fn idle_connections_to_hbone_are_closed_and_a_connect_works_meanwhile() {
    let _serial = one_at_a_time();
    let w = workload(&[]);
    let idle = idle_connections(local(w.hbone));
    let connected = hbone_client(&[
        "connect-mtls",
        "127.0.0.1",
        &w.hbone.to_string(),
        &format!("127.0.0.1:{}", w.app),
        &w.client.cert.to_string_lossy(),
        &w.client.key.to_string_lossy(),
        &w.client.ca.to_string_lossy(),
        "over hbone",
    ]);
    assert_eq!(connected["data"], "over hbone", "{connected}");
    assert_all_closed(idle, "HBONE");
    stop(w.krun);
}

#[test]
fn idle_connections_to_the_mtls_terminator_are_closed_and_a_mesh_client_gets_through_meanwhile() {
    let _serial = one_at_a_time();
    let w = workload(&[]);
    let idle = idle_connections(w.terminator);
    assert_eq!(
        mtls_echo(w.terminator, "echo", &w.client, "terminated"),
        "terminated"
    );
    assert_all_closed(idle, "mTLS terminator");
    stop(w.krun);
}

#[test]
fn idle_connections_to_the_outbound_proxy_are_closed_and_a_connect_tunnel_works_meanwhile() {
    let _serial = one_at_a_time();
    let w = workload(&[]);
    let idle = idle_connections(local(w.outbound));
    let mut conn = TcpStream::connect(local(w.outbound)).expect("connect to the proxy");
    write!(
        conn,
        "CONNECT 127.0.0.1:{app} HTTP/1.1\r\nHost: 127.0.0.1:{app}\r\n\r\n",
        app = w.app
    )
    .expect("send CONNECT");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    conn.write_all(b"via the proxy").expect("send");
    conn.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut echoed = String::new();
    conn.read_to_string(&mut echoed).expect("echo");
    assert_eq!(echoed, "via the proxy");
    assert_all_closed(idle, "outbound proxy");
    stop(w.krun);
}

#[test]
fn idle_connections_to_hgate_are_closed_and_a_mesh_client_gets_through_meanwhile() {
    let _serial = one_at_a_time();
    let w = workload(&[]);
    let dir = TempDir::new("limits-hgate");
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &routes,
        format!("echo.default: http://127.0.0.1:{}/_hbone/15003\n", w.tunnel),
    )
    .expect("write routes");
    let mut gate = Krun::hgate()
        .env("HGATE_ROUTES", &routes)
        .env("HGATE_HELLO_TIMEOUT", HANDSHAKE_TIMEOUT)
        .start();
    let sni = gate.wait_for_addr("SNI listener ready");
    gate.wait_for_line("hgate ready");
    let idle = idle_connections(sni);
    assert_eq!(
        mtls_echo(sni, MESH_SNI, &w.client, "through hgate"),
        "through hgate"
    );
    assert_all_closed(idle, "hgate SNI");
    stop(gate);
    stop(w.krun);
}

#[test]
fn beyond_the_cap_a_new_connection_is_closed_at_once_and_counted() {
    let _serial = one_at_a_time();
    // The handshake timeout is far beyond the hang guard: only the cap can close a connection.
    let mut w = workload(&[
        ("KRUN_MAX_CONNECTIONS", "2"),
        ("KRUN_HANDSHAKE_TIMEOUT", "1h"),
    ]);
    let held = [
        TcpStream::connect(local(w.tunnel)).expect("first"),
        TcpStream::connect(local(w.tunnel)).expect("second"),
    ];
    let mut extra = TcpStream::connect(local(w.tunnel)).expect("third");
    extra
        .set_read_timeout(Some(HANG_GUARD))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match extra.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection beyond the cap must be closed unanswered: {other:?}"),
    }
    let line = w
        .krun
        .wait_for_line("connection limit reached (KRUN_MAX_CONNECTIONS)");
    assert!(
        line.contains("refused_total=1") && line.contains("max=2"),
        "{line}"
    );
    assert!(line.contains("tunnel port"), "{line}");
    drop(held);
    stop(w.krun);
}

/// The capture listener carries arbitrary TCP where the server may speak first, so it has no
/// handshake timeout; a captured connection that carries nothing is closed at the idle
/// timeout. The upstream (in a second namespace) accepts and stays silent, and never closes.
#[test]
fn a_captured_connection_that_carries_nothing_is_closed_at_the_idle_timeout() {
    let _serial = one_at_a_time();
    let (client_ns, server_ns) = Netns::pair("idle", "10.1.2.3");
    let mut silent = Krun::wrapped(&server_ns.wrapper())
        .args([
            "python3",
            "-c",
            "import socket, threading\n\
             s = socket.create_server(('0.0.0.0', 7000))\n\
             print('silent upstream listening', flush=True)\n\
             held = []\n\
             while True:\n    held.append(s.accept())\n",
        ])
        .start();
    silent.wait_for_line("silent upstream listening");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/capture_app.py");
    let done = Krun::wrapped(&client_ns.wrapper())
        .env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT")
        .env("KRUN_IDLE_TIMEOUT", "1s")
        .args(["--", "python3", &script.display().to_string()])
        .args(["silent", "10.1.2.3:7000"])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("original_dst=10.1.2.3:7000 route=\"passthrough\""),
        "{}",
        done.text()
    );
    assert!(done.has_line("closed after 0 bytes"), "{}", done.text());
    assert!(!done.has_line("upstream failed"), "{}", done.text());
    silent.signal(Signal::SIGTERM);
    silent.finish();
}
