//! Traffic capture with real iptables in network namespaces (CI runs as root): what is
//! captured and what is not, idempotent apply and exact cleanup, DNS capture, and the
//! whitebox fallback with its HTTP proxy and port forwards.

use std::collections::BTreeMap;
use std::path::Path;

use krun::capture::rules::{Family, Rules};

use krun_tests::fakes::dns;
use krun_tests::fakes::istiod::{FakeIstiod, IstiodTls};
use krun_tests::fakes::kube::{self, FakeKube};
use krun_tests::fakes::pki::TestCa;
use krun_tests::netns::Netns;
use krun_tests::{Krun, TempDir, binary, testapp};
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
    assert!(ns.packets("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN") >= 1);
    krun.signal(Signal::SIGTERM);
    krun.finish();
}

/// Applying twice leaves the same ruleset (IPv4 and IPv6, nat and raw); cleanup removes
/// exactly krun's chains and jumps and leaves someone else's rule alone.
#[test]
fn applying_twice_is_idempotent_and_cleanup_removes_exactly_ours() {
    let ns = Netns::new("idem");
    ns.resolv_conf("nameserver 192.0.2.53\n");
    ns.exec(&["iptables", "-t", "nat", "-N", "OTHER"]);
    ns.exec(&[
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "OTHER",
    ]);
    let before = ns.save();
    let agent = TempDir::new("idem-agent");
    let run = |cleanup: &str| {
        let (krun, _kube) = with_agent(krun_in(&ns), &ns, &agent);
        let done = krun
            .env("KRUN_CAPTURE_DNS", "true")
            .env("KRUN_CAPTURE_CLEANUP", cleanup)
            .args(["--", "true"])
            .run();
        assert_eq!(done.code, 0, "{}", done.text());
        done
    };
    run("false");
    let first = ns.save();
    assert!(first.contains("-A OUTPUT -j ISTIO_OUTPUT\n"), "{first}");
    assert!(first.contains("-A OUTPUT -p tcp -m tcp --dport 9999 -j OTHER\n"));
    assert!(first.contains("*raw\n"), "{first}");
    assert!(
        first.contains(
            "-A ISTIO_INBOUND -s 192.0.2.53/32 -p udp -m udp --sport 53 -j CT --zone 1\n"
        ),
        "{first}"
    );
    assert!(
        ns.exec(&["ip6tables-save", "-t", "nat"])
            .contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN")
    );
    // Envoy's IPv6 inbound passthrough source, on lo as istio-iptables puts it.
    let lo = ns.exec(&["ip", "-6", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("inet6 ::6/128"), "{lo}");
    run("false");
    assert_eq!(ns.save(), first, "the second apply changed the ruleset");
    assert_eq!(
        ns.exec(&["ip", "-6", "addr", "show", "dev", "lo"]),
        lo,
        "the second apply changed lo's addresses"
    );
    let done = run("true");
    assert!(done.has_line("capture rules removed"));
    assert_eq!(ns.save(), before);
    assert!(!ns.exec(&["ip6tables-save"]).contains("ISTIO"));
}

/// pilot-agent (the stand-in, which relays DNS on 15053 like the real one) with an XDS
/// address verified by system roots, so DNS capture has a DNS server, and a fake K8s API in
/// `ns` (KUBECONFIG) for the istio-token it authenticates with; keep the API while krun runs.
fn with_agent(krun: Krun, ns: &Netns, dir: &TempDir) -> (Krun, FakeKube) {
    let kube = in_netns(ns, || kube::start(Some(BTreeMap::new())));
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig()).expect("kubeconfig");
    let krun = krun
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_PILOT_AGENT_PATH", binary("pilot-agent"))
        .env("KRUN_ENVOY_PATH", binary("envoy"))
        .env("XDS_ADDR", "istiod.example:443")
        .env("KUBECONFIG", &kubeconfig);
    (krun, kube)
}

/// DNS capture answers through the resolver: the app's query to the resolv.conf nameserver (a
/// local forwarder on 127.0.0.53) is redirected to pilot-agent's DNS proxy on 15053, which
/// asks the forwarder, which asks its upstream. Only resolv.conf's nameservers are captured,
/// so the forwarder's own query to its upstream is not sent back to the proxy (no loop): each
/// query passes the proxy once and the upstream once.
#[test]
fn dns_capture_answers_through_the_resolver_without_a_loop() {
    let ns = Netns::new("dns");
    ns.resolv_conf("nameserver 127.0.0.53\n");
    ns.exec(&["ip", "addr", "add", "10.53.0.1/32", "dev", "lo"]);
    let agent = TempDir::new("dns-agent");
    let (krun, _kube) = with_agent(krun_in(&ns), &ns, &agent);
    let done = krun
        .env("KRUN_CAPTURE_DNS", "true")
        .args(app(&["dnsloop", "svc.example", "10.9.8.7"]))
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    let answered = done
        .text()
        .lines()
        .find_map(|l| {
            l.split("resolved svc.example to 10.9.8.7; upstream answered ")
                .nth(1)
        })
        .map(|n| n.trim().parse::<usize>().expect("count"))
        .unwrap_or_else(|| panic!("not resolved: {}", done.text()));
    let relayed = done
        .text()
        .lines()
        .filter(|l| l.contains("standin pilot-agent relayed a DNS query"))
        .count();
    assert!(answered >= 1);
    assert_eq!(relayed, answered, "{}", done.text());
    assert!(
        ns.packets("-A ISTIO_OUTPUT_DNS -d 127.0.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053") >= 1
    );
}

/// KRUN_CAPTURE_DNS with the builtin data plane: krun's own resolver on 15053 gets the
/// captured queries. The DNS name of a Service istiod lists resolves to its VIP (the FQDN and
/// the short forms, checked with dig); `example.com` is forwarded to resolv.conf's nameserver
/// and its answer comes back byte-identical to a direct query of an identical upstream that
/// capture does not cover, over UDP and TCP. resolv.conf is left as it was.
#[test]
fn dns_capture_with_the_builtin_plane_answers_mesh_services_and_forwards_the_rest() {
    let ns = Netns::new("mdns");
    let original = "nameserver 127.0.0.2\n";
    ns.resolv_conf(original);
    let (upstream, twin) = ns.enter(|| {
        (
            dns::start("127.0.0.2:53".parse().expect("addr")),
            dns::start("127.0.0.3:53".parse().expect("addr")),
        )
    });
    let ca = TestCa::new("cluster.local");
    let tls = IstiodTls::new(&ca);
    let istiod = in_netns(&ns, move || FakeIstiod::start(tls));
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    istiod.push_service("echo", "default", ip("10.96.0.10"), &[(80, 8080)]);
    let dir = TempDir::new("mdns");
    ca.install_workload(&dir.join(""), "spiffe://cluster.local/ns/default/sa/caller");
    let mut krun = krun_in(&ns)
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("KRUN_CAPTURE_DNS", "true")
        .env("WORKLOAD_NAMESPACE", "default")
        .env("XDS_ADDR", istiod.addr.to_string())
        .args(app(&["echoes", "127.0.0.1:9"]))
        .start();
    krun.wait_for_line("DNS capture: krun's resolver answers mesh Service names");
    krun.wait_for_line("services=1");
    let dig = |args: &[&str]| {
        let mut argv = vec!["dig", "@127.0.0.2", "+short", "+time=30", "+tries=1"];
        argv.extend_from_slice(args);
        ns.exec(&argv)
    };
    for name in [
        "echo.default.svc.cluster.local",
        "echo.default.svc",
        "echo.default",
        "echo",
    ] {
        assert_eq!(dig(&[name, "A"]), "10.96.0.10\n", "{name}");
    }
    assert_eq!(dig(&["+tcp", "echo", "A"]), "10.96.0.10\n");
    assert!(
        upstream.seen().iter().all(|q| !q.contains("echo")),
        "mesh names never reach the upstream: {:?}",
        upstream.seen()
    );
    let (udp_same, tcp_same) = ns.enter(|| {
        let query = dns::edns_query("example.com.");
        (
            dns::udp(&query, "127.0.0.2:53") == dns::udp(&query, "127.0.0.3:53"),
            dns::tcp(&query, "127.0.0.2:53") == dns::tcp(&query, "127.0.0.3:53"),
        )
    });
    assert!(udp_same, "UDP answer relayed byte for byte");
    assert!(tcp_same, "TCP answer relayed byte for byte");
    let forwarded: Vec<String> = upstream
        .seen()
        .into_iter()
        .filter(|q| q.contains("example.com"))
        .collect();
    assert_eq!(
        forwarded,
        ["udp example.com. A", "tcp example.com. A"],
        "forwarded once each, over the app's transport"
    );
    assert_eq!(twin.seen().len(), 2, "the twin is reached directly");
    assert!(
        ns.packets("-A ISTIO_OUTPUT_DNS -d 127.0.0.2/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053") >= 1
    );
    krun.signal(Signal::SIGTERM);
    krun.finish();
    let after = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", ns.name()))
        .expect("resolv.conf");
    assert_eq!(after, original, "resolv.conf untouched");
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

/// The peer of the netns-pair tests, in `ns`: krun (builtin plane, `sa/echo`, HBONE on 15008)
/// in front of an echo app on loopback 8080, and a plain TCP echo server (no krun in front)
/// on every address's port 7000; HBONE streams are logged at debug with the caller's ID.
fn mesh_server(ns: &Netns, ca: &TestCa, dir: &TempDir) -> krun_tests::Running {
    ca.install_workload(&dir.join(""), "spiffe://cluster.local/ns/default/sa/echo");
    let mut server = Krun::wrapped(&ns.wrapper())
        .env("MESH_BASE_DIR", dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("PORT_http", "8080")
        .env("KRUN_HBONE_PORT", "15008")
        .env("KRUN_TUNNEL_PORT", "15009")
        .env("RUST_LOG", "info,hbone=debug")
        .args(app(&["echoes", "127.0.0.1:8080", "0.0.0.0:7000"]))
        .start();
    server.wait_for_line("tunnel port open");
    server
}

/// Without a control plane a captured 10.x destination is not assumed to be in the mesh: the
/// app reaches a plain TCP server there directly (passthrough), as it would without krun.
/// With `KRUN_MESH_CIDRS` naming the peer, the same capture goes over HBONE to the peer's
/// 15008: the peer's app listens on loopback only, so nothing but the peer's krun could have
/// delivered the bytes, and the peer's krun logs the app's SPIFFE ID.
#[test]
fn a_10x_server_is_passthrough_and_mesh_cidrs_go_over_hbone() {
    let (client_ns, server_ns) = Netns::pair("mesh", "10.1.2.3");
    let ca = TestCa::new("cluster.local");
    let server_dir = TempDir::new("mesh-server");
    let mut server = mesh_server(&server_ns, &ca, &server_dir);
    let client_dir = TempDir::new("mesh-client");
    ca.install_workload(
        &client_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/caller",
    );
    let client = || {
        krun_in(&client_ns)
            .env("MESH_BASE_DIR", client_dir.join(""))
            .env("KRUN_DATAPLANE", "builtin")
    };

    // One app connection, and the lines krun logs for it: route, decision, and the echo.
    let routed = |krun: Krun, dst: &str, route: &str, decision: &str| {
        let done = krun.args(app(&["echo", dst, "ping"])).run();
        for line in [
            format!("original_dst={dst} route=\"{route}\""),
            decision.to_owned(),
            "echoed ping".to_owned(),
        ] {
            assert!(done.has_line(&line), "{line}: {}", done.text());
        }
        assert_eq!(done.code, 0, "{}", done.text());
    };
    routed(
        client(),
        "10.1.2.3:7000",
        "passthrough",
        "outbound passthrough: the destination is neither a workload istiod lists as HBONE-capable nor inside KRUN_MESH_CIDRS",
    );
    routed(
        client().env("KRUN_MESH_CIDRS", "10.1.2.3/32"),
        "10.1.2.3:8080",
        "hbone",
        "outbound HBONE: the destination is inside KRUN_MESH_CIDRS",
    );
    let opened = server.wait_for_line("tunnel open");
    assert!(
        opened.contains("spiffe://cluster.local/ns/default/sa/caller"),
        "{opened}"
    );
    server.signal(Signal::SIGTERM);
    server.finish();
}

/// In `ns`: runs `start` on a thread that entered the namespace, so the servers it binds
/// listen on the namespace's loopback (where krun inside reaches them).
fn in_netns<T: Send + 'static>(ns: &Netns, start: impl FnOnce() -> T + Send + 'static) -> T {
    let _ = krun_tests::fakes::server::runtime();
    let netns = format!("/var/run/netns/{}", ns.wrapper()[3]);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).expect("open the named netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        start()
    })
    .join()
    .expect("netns thread")
}

/// The builtin plane learns the mesh from istiod (the fake, over delta ADS with mTLS): a
/// workload istiod lists as HBONE goes over HBONE with its identity pinned, a listed workload
/// whose peer presents another identity fails naming both, an unlisted 10.x server is
/// passthrough. istiod going away and coming back drops no open connection and changes no
/// decision.
#[test]
fn workloads_from_istiod_decide_the_route_and_survive_its_outage() {
    let (client_ns, server_ns) = Netns::pair("xds", "10.1.2.3");
    for extra in ["10.1.2.4/32", "10.1.2.5/32"] {
        server_ns.exec(&["ip", "addr", "add", extra, "dev", "lo"]);
    }
    let ca = TestCa::new("cluster.local");
    let server_dir = TempDir::new("xds-server");
    let server = mesh_server(&server_ns, &ca, &server_dir);

    let tls = IstiodTls::new(&ca);
    let mut istiod = in_netns(&client_ns, move || FakeIstiod::start(tls));
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    istiod.push_workload("echo", ip("10.1.2.3"), "default", "echo", true);
    // 10.1.2.5 is served by the same krun (sa/echo), but istiod says it is sa/other.
    istiod.push_workload("imposter", ip("10.1.2.5"), "default", "other", true);

    let client_dir = TempDir::new("xds-client");
    ca.install_workload(
        &client_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/caller",
    );
    let fifo = client_dir.join("steps");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let mut client = krun_in(&client_ns)
        .env("MESH_BASE_DIR", client_dir.join(""))
        .env("KRUN_DATAPLANE", "builtin")
        .env("XDS_ADDR", istiod.addr.to_string())
        .args(app(&["script", &fifo.display().to_string()]))
        .start();
    client.wait_for_line("xDS push applied (ACK)");
    let mut steps = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open the app's step FIFO");
    let mut step = |line: &str| {
        use std::io::Write;
        writeln!(steps, "{line}").expect("write a step");
    };

    step("echo 10.1.2.3:8080 listed");
    client.wait_for_line("echoed listed");
    step("echo 10.1.2.4:7000 unlisted");
    client.wait_for_line("echoed unlisted");
    step("echo 10.1.2.5:8080 imposter");
    let mismatch = client.wait_for_line("peer identity mismatch");
    assert!(
        mismatch.contains("spiffe://cluster.local/ns/default/sa/other")
            && mismatch.contains("spiffe://cluster.local/ns/default/sa/echo"),
        "{mismatch}"
    );

    step("open held 10.1.2.3:8080");
    client.wait_for_line("opened held");
    istiod.down();
    client.wait_for_line("reconnecting, serving the last known state meanwhile");
    step("send held during the outage");
    client.wait_for_line("held got during the outage");
    step("echo 10.1.2.3:8080 still listed");
    client.wait_for_line("echoed still listed");
    istiod.up();
    client.wait_for_line("xDS stream to istiod open");
    step("send held after the outage");
    client.wait_for_line("held got after the outage");
    drop(steps);
    let done = client.finish();
    let text = done.text();
    assert!(
        done.has_line("original_dst=10.1.2.3:8080 route=\"hbone\""),
        "{text}"
    );
    assert!(
        done.has_line("outbound HBONE: istiod lists the destination as an HBONE workload"),
        "{text}"
    );
    assert!(
        done.has_line("original_dst=10.1.2.4:7000 route=\"passthrough\""),
        "{text}"
    );
    assert!(!done.has_line("echoed imposter"), "{text}");
    let first = &istiod.requests()[0];
    let node = first.node.as_ref().expect("node");
    assert!(node.id.starts_with("ztunnel~"), "{}", node.id);
    assert!(
        istiod
            .requests()
            .iter()
            .any(|r| !r.response_nonce.is_empty() && r.error_detail.is_none()),
        "no ACK"
    );
    server.signal(Signal::SIGTERM);
    server.finish();
}

/// A Service VIP istiod lists reaches one of its healthy endpoints over HBONE, pinned to the
/// endpoint's identity, with the service port mapped to the endpoint's target port (80 ->
/// 8080: the peer's app listens only on 127.0.0.1:8080, so only a mapped HBONE stream reaches
/// it). The unhealthy endpoint (which would fail its identity check) is never picked; a VIP
/// whose endpoints are gone is refused with a log line naming the service. istiod is found
/// through mesh-env's `IMCON_ADDR` on 15012, not `XDS_ADDR`.
#[test]
fn a_service_vip_reaches_one_of_its_endpoints_with_the_port_mapped() {
    use mesh::xds::proto::{AddressType, Port, PortList, WorkloadStatus};
    let (client_ns, server_ns) = Netns::pair("svc", "10.1.2.3");
    server_ns.exec(&["ip", "addr", "add", "10.1.2.5/32", "dev", "lo"]);
    let ca = TestCa::new("cluster.local");
    let server_dir = TempDir::new("svc-server");
    let server = mesh_server(&server_ns, &ca, &server_dir);

    // istiod where mesh-env's IMCON_ADDR says, on istiod's port.
    let tls = IstiodTls::new(&ca);
    let istiod = in_netns(&client_ns, move || {
        FakeIstiod::start_at(tls, "127.0.0.1:15012")
    });
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    // A named targetPort: istiod leaves the service's target port 0 and each endpoint says.
    istiod.push_service("echo", "default", ip("10.96.0.10"), &[(80, 0)]);
    let endpoint = |at: &str, sa: &str, status: WorkloadStatus| {
        let mut w = krun_tests::fakes::istiod::workload(ip(at), "default", sa, true);
        let ports = vec![Port {
            service_port: 80,
            target_port: 8080,
        }];
        w.services.insert(
            "default/echo.default.svc.cluster.local".into(),
            PortList { ports },
        );
        w.status = status as i32;
        AddressType::Workload(w)
    };
    istiod.push_address(
        "echo-pod",
        endpoint("10.1.2.3", "echo", WorkloadStatus::Healthy),
    );
    istiod.push_address(
        "sick-pod",
        endpoint("10.1.2.5", "other", WorkloadStatus::Unhealthy),
    );

    let client_dir = TempDir::new("svc-client");
    ca.install_workload(
        &client_dir.join(""),
        "spiffe://cluster.local/ns/default/sa/caller",
    );
    let mesh_env = client_dir.join("mesh-env.yaml");
    std::fs::write(&mesh_env, "IMCON_ADDR: 127.0.0.1\n").expect("write mesh-env");
    let fifo = client_dir.join("steps");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let mut client = krun_in(&client_ns)
        .env("MESH_BASE_DIR", client_dir.join(""))
        .env("MESH", format!("file://{}", mesh_env.display()))
        .env("KRUN_DATAPLANE", "builtin")
        .args(app(&["script", &fifo.display().to_string()]))
        .start();
    let chosen = client.wait_for_line("workload discovery: delta ADS to istiod");
    assert!(
        chosen.contains("istiod=127.0.0.1:15012") && chosen.contains("IMCON_ADDR"),
        "{chosen}"
    );
    client.wait_for_line("services=1");
    let mut steps = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open the app's step FIFO");
    let mut step = |line: &str| {
        use std::io::Write;
        writeln!(steps, "{line}").expect("write a step");
    };

    for round in ["one", "two", "three"] {
        step(&format!("echo 10.96.0.10:80 {round}"));
        client.wait_for_line(&format!("echoed {round}"));
    }
    istiod.remove("echo-pod");
    client.wait_for_line("removed=1");
    step("echo 10.96.0.10:80 gone");
    let refused = client.wait_for_line("outbound refused");
    assert!(
        refused.contains("echo.default.svc.cluster.local"),
        "{refused}"
    );
    client.wait_for_line("failed 10.96.0.10:80");
    drop(steps);
    let done = client.finish();
    let text = done.text();
    assert!(
        done.has_line("original_dst=10.96.0.10:80 route=\"service\""),
        "{text}"
    );
    assert!(
        done.has_line("via=echo.default.svc.cluster.local upstream=10.1.2.3:8080"),
        "{text}"
    );
    assert!(!done.has_line("peer identity mismatch"), "{text}");
    assert!(!done.has_line("echoed gone"), "{text}");
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

// Parity with istio-iptables. The expected rulesets below are written out from the golden
// outputs of Istio's capture tests
// (<https://github.com/istio/istio/tree/master/tools/istio-iptables/pkg/capture/testdata>)
// and the rule order of `run.go`, for the same inputs: one `table chain rule` per line. krun's
// deliberate additions (its socket mark, the metadata server exclusion) are switched off here;
// docs/capture.md lists them.

/// One rule as compared: its match options sorted (their order does not change what a rule
/// matches), addresses in canonical form, and its target.
fn canonical(spec: &str) -> (Vec<String>, String) {
    let (matches, target) = spec.split_once("-j ").unwrap_or((spec, ""));
    let address = |token: &str| match token.split_once('/') {
        Some((ip, len)) => ip
            .parse::<std::net::IpAddr>()
            .map_or(token.to_owned(), |ip| format!("{ip}/{len}")),
        None => token.to_owned(),
    };
    let mut groups: Vec<String> = Vec::new();
    let mut negate = false;
    for token in matches.split_whitespace() {
        if token == "!" {
            negate = true;
        } else if token.starts_with('-') {
            groups.push(format!("{}{token}", if negate { "!" } else { "" }));
            negate = false;
        } else if let Some(last) = groups.last_mut() {
            last.push(' ');
            last.push_str(&address(token));
        }
    }
    groups.sort();
    (groups, target.trim().replace("--to-port ", "--to-ports "))
}

/// `table chain rule` lines grouped by table and chain, in order within each chain.
type Chains = BTreeMap<(String, String), Vec<(Vec<String>, String)>>;

fn upstream(text: &str) -> Chains {
    let mut chains = Chains::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut parts = line.splitn(3, ' ');
        let (table, chain, spec) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        chains
            .entry((table.to_owned(), chain.to_owned()))
            .or_default()
            .push(canonical(spec));
    }
    chains
}

fn krun_rules(rules: &Rules, family: Family) -> Chains {
    let mut chains = Chains::new();
    for (table, chain, spec) in rules.rules(family) {
        chains
            .entry((table.to_owned(), chain.to_owned()))
            .or_default()
            .push(canonical(&spec));
    }
    chains
}

/// Istio's inputs on krun's generator: no mark, no metadata exclusion, the given owners.
fn istio_inputs(include: &str, uids: &[u32], gids: &[u32], dns: &[&str]) -> Rules {
    let servers = dns.iter().map(|ip| ip.parse().expect("ip")).collect();
    Rules {
        mark: None,
        exclude: Vec::new(),
        proxy_uids: uids.to_vec(),
        proxy_gids: gids.to_vec(),
        ..Rules::istio(include, &[], 15001, (!dns.is_empty()).then_some(servers))
    }
}

/// Also loads the ruleset into real iptables in a fresh namespace, so it is valid input.
fn assert_parity(rules: &Rules, family: Family, expected: &str) {
    assert_eq!(krun_rules(rules, family), upstream(expected));
    let ns = Netns::new("parity");
    let dir = TempDir::new("parity");
    let input = dir.join("rules");
    std::fs::write(&input, rules.restore_input(family, "")).expect("write rules");
    let restore = match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    };
    ns.exec(&[restore, "--noflush", &input.display().to_string()]);
}

/// The common head of every case: tunnel port, both redirects, the output jump.
const HEAD: &str = "
    nat ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
    nat ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
    nat ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
    nat OUTPUT -j ISTIO_OUTPUT
";

/// uid and gid 1337 without DNS capture, for IPv4.
const OWNERS_1337: &str = "
    nat ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
    nat ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
    nat ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
    nat ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
    nat ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
    nat ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
    nat ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
    nat ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
";

/// Istio's `ipnets` case: include CIDRs, uid and gid 1337.
#[test]
fn parity_include_cidrs_with_uid_and_gid_1337() {
    let rules = istio_inputs("10.0.0.0/8", &[1337], &[1337], &[]);
    let expected =
        format!("{HEAD}{OWNERS_1337}\n nat ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT");
    assert_parity(&rules, Family::V4, &expected);
}

/// Istio's `inbound-ports-include` case.
#[test]
fn parity_inbound_ports_include() {
    let mut rules = istio_inputs("", &[1337], &[1337], &[]);
    rules.inbound_ports = vec![32000, 31000];
    let expected = format!(
        "{HEAD}{OWNERS_1337}
        nat PREROUTING -p tcp -j ISTIO_INBOUND
        nat ISTIO_INBOUND -p tcp --dport 32000 -j ISTIO_IN_REDIRECT
        nat ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_IN_REDIRECT"
    );
    assert_parity(&rules, Family::V4, &expected);
}

/// The owner and DNS part of Istio's `dns-uid-gid` and `ip-range` cases (uids 3 and 4, gids
/// 1 and 2, nameserver `dns`) for a family whose loopback is `lo` and passthrough source
/// `six`: the proxy's TCP DNS on loopback is not sent inbound, DNS is reached from
/// `ISTIO_OUTPUT` after the owners returned, only to the nameserver, and UDP DNS is split
/// into conntrack zones in `raw`.
fn dns_uid_gid(lo: &str, six: &str, dns: &str) -> String {
    let mut text = format!("nat ISTIO_OUTPUT -o lo -s {six} -j RETURN\n");
    for uid in [3, 4] {
        text += &format!(
            "nat ISTIO_OUTPUT -o lo ! -d {lo} -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT
             nat ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner {uid} -j RETURN
             nat ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN\n"
        );
    }
    for gid in [1, 2] {
        text += &format!(
            "nat ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport 15008 -m owner --gid-owner {gid} -j ISTIO_IN_REDIRECT
             nat ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --gid-owner {gid} -j RETURN
             nat ISTIO_OUTPUT -m owner --gid-owner {gid} -j RETURN\n"
        );
    }
    text += &format!(
        "raw OUTPUT -j ISTIO_OUTPUT_DNS
         nat ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS
         nat ISTIO_OUTPUT_DNS -p tcp --dport 53 -d {dns} -j REDIRECT --to-ports 15053
         nat ISTIO_OUTPUT_DNS -p udp --dport 53 -d {dns} -j REDIRECT --to-port 15053\n"
    );
    for owner in [
        "--uid-owner 3",
        "--uid-owner 4",
        "--gid-owner 1",
        "--gid-owner 2",
    ] {
        text += &format!(
            "raw ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner {owner} -j CT --zone 1
             raw ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner {owner} -j CT --zone 2\n"
        );
    }
    text += &format!(
        "raw PREROUTING -j ISTIO_INBOUND
         raw ISTIO_OUTPUT_DNS -p udp --dport 53 -d {dns} -j CT --zone 2
         raw ISTIO_INBOUND -p udp --sport 53 -s {dns} -j CT --zone 1
         nat ISTIO_OUTPUT -d {lo} -j RETURN\n"
    );
    text
}

/// Istio's `dns-uid-gid` case, IPv4 and IPv6 (with the `::6` inbound passthrough source).
#[test]
fn parity_dns_capture_with_uids_and_gids() {
    let rules = istio_inputs("", &[3, 4], &[1, 2], &["127.0.0.53", "::127.0.0.53"]);
    let v4 = format!(
        "{HEAD}{}",
        dns_uid_gid("127.0.0.1/32", "127.0.0.6/32", "127.0.0.53/32")
    );
    assert_parity(&rules, Family::V4, &v4);
    let v6 = format!(
        "{HEAD}{}",
        dns_uid_gid("::1/128", "::6/128", "::127.0.0.53/128")
    );
    assert_parity(&rules, Family::V6, &v6);
}

/// Istio's `ip-range` case: DNS with uids and gids, an excluded and an included range.
#[test]
fn parity_ip_range() {
    let mut rules = istio_inputs("9.9.0.0/16", &[3, 4], &[1, 2], &["127.0.0.53"]);
    rules.exclude = vec!["1.1.0.0/16".to_owned()];
    let expected = format!(
        "{HEAD}{}
        nat ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN
        nat ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT",
        dns_uid_gid("127.0.0.1/32", "127.0.0.6/32", "127.0.0.53/32")
    );
    assert_parity(&rules, Family::V4, &expected);
}
