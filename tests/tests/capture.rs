//! Traffic capture with real iptables in network namespaces (CI runs as root): what is
//! captured and what is not, idempotent apply and exact cleanup, DNS capture, and the
//! whitebox fallback with its HTTP proxy and port forwards.

use std::path::Path;

use krun_tests::fakes::pki::TestCa;
use krun_tests::netns::Netns;
use krun_tests::{Krun, TempDir, testapp};
use nix::sys::signal::Signal;

/// krun inside `ns` with capture allowed (the harness turns it off for the host's namespace).
fn krun_in(ns: &Netns) -> Krun {
    Krun::wrapped(&ns.wrapper()).env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT")
}

/// `python3 capture_app.py <args>` as the app's argv.
fn app(args: &[&str]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/capture_app.py");
    ["--", "python3", &script.display().to_string()]
        .into_iter()
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

/// An app connection to a 10.x address lands on 15001 with its original destination; excluded
/// ports, other ranges, the metadata server and loopback are not captured, and neither are
/// krun's own (marked) passthrough connections.
#[test]
fn app_connections_in_range_land_on_15001_and_the_rest_do_not() {
    let ns = Netns::new("cap");
    let mut krun = krun_in(&ns)
        .env("OUTBOUND_PORTS_EXCLUDE", "5432")
        .env("OUTBOUND_IP_RANGES_INCLUDE", "10.0.0.0/8,169.254.0.0/16")
        .args(app(&[
            "connect",
            "10.9.9.9:5432",
            "11.0.0.1:80",
            "169.254.169.254:80",
            "127.0.0.1:9",
            "10.7.7.7:443",
            "10.1.2.3:80",
        ]))
        .start();
    krun.wait_for_line("traffic capture: iptables, because krun is root with CAP_NET_ADMIN");
    // The app and krun race, so in any order: the app got through, krun logged the
    // original destinations, and krun's own passthrough connections went out marked (and
    // failed at ARP: there is no peer on v1).
    krun.wait_for_all(&[
        "connected 10.1.2.3:80",
        "captured connection peer=192.0.2.1",
        "original_dst=10.7.7.7:443",
        "original_dst=10.1.2.3:80",
        "upstream failed original_dst=10.7.7.7:443",
        "upstream failed original_dst=10.1.2.3:80",
    ]);
    assert_eq!(
        ns.packets("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        2,
        "only the two app connections in range are redirected"
    );
    assert_eq!(
        ns.packets("-A ISTIO_OUTPUT -m mark --mark 0x539 -j RETURN"),
        2
    );
    assert_eq!(
        ns.packets("-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN"),
        1
    );
    assert_eq!(
        ns.packets("-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN"),
        1
    );
    assert_eq!(ns.packets("-A ISTIO_OUTPUT -j RETURN"), 1, "11.0.0.1");
    assert!(ns.packets("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN") >= 1);
    krun.signal(Signal::SIGTERM);
    krun.finish();
}

/// Applying twice leaves the same ruleset (IPv4 and IPv6); cleanup removes exactly krun's
/// chains and jumps and leaves someone else's rule alone.
#[test]
fn applying_twice_is_idempotent_and_cleanup_removes_exactly_ours() {
    let ns = Netns::new("idem");
    ns.exec(&["iptables", "-t", "nat", "-N", "OTHER"]);
    ns.exec(&[
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "OTHER",
    ]);
    let before = ns.nat();
    let run = |cleanup: &str| {
        let done = krun_in(&ns)
            .env("KRUN_CAPTURE_DNS", "true")
            .env("KRUN_CAPTURE_CLEANUP", cleanup)
            .args(["--", "true"])
            .run();
        assert_eq!(done.code, 0, "{}", done.text());
        done
    };
    run("false");
    let first = ns.nat();
    assert!(
        first.contains("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n"),
        "{first}"
    );
    assert!(first.contains("-A OUTPUT -p tcp -m tcp --dport 9999 -j OTHER\n"));
    assert!(
        ns.exec(&["ip6tables-save", "-t", "nat"])
            .contains("-A ISTIO_OUTPUT -d ::1/128 -j RETURN")
    );
    run("false");
    assert_eq!(ns.nat(), first, "the second apply changed the ruleset");
    let done = run("true");
    assert!(done.has_line("capture rules removed"));
    assert_eq!(ns.nat(), before);
    assert!(!ns.exec(&["ip6tables-save", "-t", "nat"]).contains("ISTIO"));
}

/// With KRUN_CAPTURE_DNS the app's DNS query reaches a listener on 15053.
#[test]
fn dns_queries_reach_15053_when_dns_capture_is_on() {
    let ns = Netns::new("dns");
    let done = krun_in(&ns)
        .env("KRUN_CAPTURE_DNS", "true")
        .args(app(&["dns"]))
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("dns query reached 15053"), "{}", done.text());
}

/// Without CAP_NET_ADMIN krun chooses whitebox, says why, installs nothing, and the app gets
/// the proxy variables.
#[test]
fn without_net_admin_krun_chooses_whitebox_and_the_app_gets_the_proxy() {
    let ns = Netns::new("wb");
    let mut wrapper = ns.wrapper().to_vec();
    wrapper.extend([
        "setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
    ]);
    let done = Krun::wrapped(&wrapper)
        .env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT")
        .env("KRUN_OUTBOUND_ADDR", "127.0.0.1:15007")
        .args(app(&["env", "HTTP_PROXY", "http_proxy", "NO_PROXY"]))
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("traffic capture: whitebox (HTTP_PROXY and KRUN_FORWARD), because krun lacks CAP_NET_ADMIN"),
        "{}",
        done.text()
    );
    assert!(done.has_line("HTTP_PROXY=http://127.0.0.1:15007"));
    assert!(done.has_line("http_proxy=http://127.0.0.1:15007"));
    assert!(done.has_line("NO_PROXY=localhost,127.0.0.1,::1,169.254.169.254"));
    assert!(!ns.nat().contains("ISTIO"));
}

/// A declared port forward carries a TCP session to its upstream.
#[test]
fn a_port_forward_carries_a_tcp_session() {
    let ns = Netns::new("fwd");
    let done = krun_in(&ns)
        .env("ISTIO_META_INTERCEPTION_MODE", "NONE")
        .env("KRUN_FORWARD", "127.0.0.1:6000=127.0.0.1:7000")
        .args(app(&["forward", "127.0.0.1:6000", "127.0.0.1:7000"]))
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("because ISTIO_META_INTERCEPTION_MODE=NONE"));
    assert!(done.has_line("forward got ping"), "{}", done.text());
}

/// The 15007 proxy carries an absolute-URI HTTP request and a CONNECT tunnel.
#[test]
fn the_http_proxy_carries_a_request_and_a_connect_tunnel() {
    let ns = Netns::new("proxy");
    let done = krun_in(&ns)
        .env("ISTIO_META_INTERCEPTION_MODE", "NONE")
        .env("KRUN_OUTBOUND_ADDR", "127.0.0.1:15007")
        .args(app(&["proxy", "127.0.0.1:15007", "127.0.0.1:7001"]))
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("proxy absolute upstream saw GET /hello HTTP/1.1"),
        "{}",
        done.text()
    );
    assert!(
        done.has_line("proxy connect upstream saw GET /tunnelled HTTP/1.1"),
        "{}",
        done.text()
    );
}

/// A captured connection to a mesh destination (inside OUTBOUND_IP_RANGES_INCLUDE) goes over
/// HBONE to the peer's 15008: the peer's app listens on loopback only, so nothing but the
/// peer's krun could have delivered the bytes.
#[test]
fn a_captured_mesh_destination_goes_over_hbone() {
    let (client_ns, server_ns) = Netns::pair("mesh", "10.1.2.3");
    let ca = TestCa::new("cluster.local");
    let server_dir = TempDir::new("mesh-server");
    ca.install_workload(
        &server_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/echo",
    );
    let mut server = Krun::wrapped(&server_ns.wrapper())
        .env("MESH_BASE_DIR", server_dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("PORT_http", "8080")
        .env("KRUN_HBONE_PORT", "15008")
        .env("KRUN_TUNNEL_PORT", "15009")
        .args(testapp(&["echo", "8080"]))
        .start();
    server.wait_for_line("tunnel port open");
    let client_dir = TempDir::new("mesh-client");
    ca.install_workload(
        &client_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/caller",
    );
    let done = krun_in(&client_ns)
        .env("MESH_BASE_DIR", client_dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .args(app(&["echo", "10.1.2.3:8080", "over the mesh"]))
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("original_dst=10.1.2.3:8080 route=\"hbone\""),
        "{}",
        done.text()
    );
    assert!(done.has_line("echoed over the mesh"), "{}", done.text());
    server.signal(Signal::SIGTERM);
    server.finish();
}

/// A plain `krun -- app` (no mesh, no interception asked for) is only a supervisor, even as
/// root: no rules, no proxy variables for the app. Run in a private network namespace so a
/// regression cannot touch the host's rules.
#[test]
fn without_a_mesh_krun_captures_nothing_and_sets_no_proxy() {
    let done = Krun::wrapped(&["unshare", "--net"])
        .env_remove("ISTIO_META_INTERCEPTION_MODE")
        .args(testapp(&["env", "HTTP_PROXY"]))
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("traffic capture: off, because no mesh is configured"),
        "{}",
        done.text()
    );
    assert!(
        done.has_line("<unset>"),
        "the app must not get a proxy: {}",
        done.text()
    );
}
