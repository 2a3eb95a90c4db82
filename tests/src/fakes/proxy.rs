//! Stand-in `pilot-agent` and `envoy` executables (`tests/src/bin/{pilot-agent,envoy}.rs`).
//!
//! They record what krun gave them (argv, environment, uid/gid/groups, working directory, and
//! the files named in `STANDIN_FILES` with their modes and contents) into
//! `$STANDIN_RECORD_DIR/<name>.json`, written atomically, then print `standin <name> recorded`.
//! They serve the endpoints krun uses: pilot-agent's `/healthz/ready` (port
//! `STANDIN_READY_PORT`, default 15021) and Envoy's admin `/config_dump`, `/stats`, `/ready`
//! (port `STANDIN_ADMIN_PORT`, default 15000), and `POST /drain_listeners` (appends
//! `<name> drain_listeners` to the events). Unknown paths are 404, other methods 405, like the
//! real servers.
//!
//! The stand-in pilot-agent first checks what the real one needs before it starts its servers
//! and exits 1 with a line naming what is missing, as pilot-agent does
//! (<https://github.com/istio/istio/tree/master/pilot/cmd/pilot-agent>): `POD_NAME` and
//! `POD_NAMESPACE` (its node id), a `PROXY_CONFIG` that parses (YAML or JSON) with a `discoveryAddress`, the
//! istiod root at `./var/run/secrets/istio/root-cert.pem` for XDS and CA unless system roots
//! are chosen (`XDS_ROOT_CA`/`CA_ROOT_CA=SYSTEM`, `PILOT_CERT_PROVIDER=system`), a readable
//! istio-token at `./var/run/secrets/tokens/istio-token` when `JWT_POLICY` is unset or
//! `third-party-jwt` (its default), and writable
//! `./etc/istio/proxy` and `OUTPUT_CERTS`. With `ISTIO_META_DNS_CAPTURE=true` it relays DNS on
//! udp 127.0.0.1:15053 to the first `/etc/resolv.conf` nameserver, printing `standin
//! pilot-agent relayed a DNS query` per query.
//!
//! The stand-in Envoy becomes ready only once it has parsed its bootstrap (`--config-path` or
//! `-c`, YAML or JSON, with a `node`), as Envoy does; otherwise it prints why and stays not
//! ready.
//!
//! `STANDIN_MODE` says how they behave (no timers: tests drive them with signals):
//! - `ready` (default): ready at once;
//! - `slow`: ready once it receives SIGUSR1 (prints `standin <name> answered 503 to a
//!   readiness probe` the first time it is probed before that);
//! - `never`: never ready (`/healthz/ready` 503, `server.state: 2`);
//! - `crash`: ready; exits with code 3 on SIGUSR2.
//!
//! Life events (`<name> start`, `<name> ready`, `<name> stop`) are appended to `STANDIN_EVENTS`
//! when set, the same log `krun-testapp serve` writes, so a test can assert the order of the
//! agent's and the app's events. SIGTERM: append `stop`, exit 0.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SigSet, Signal};
use serde_json::{Value, json};

/// Which program the stand-in plays.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `pilot-agent`: readiness on 15021 and Envoy's admin on 15000.
    PilotAgent,
    /// `envoy`: admin on 15000 only.
    Envoy,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::PilotAgent => "pilot-agent",
            Role::Envoy => "envoy",
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn append(line: &str) {
    if let Some(path) = var("STANDIN_EVENTS") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        if let Ok(mut file) = file {
            let _ = writeln!(file, "{line}");
        }
    }
}

fn file_entry(path: &str) -> Value {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = format!("{:04o}", meta.permissions().mode() & 0o7777);
            let content = meta
                .is_file()
                .then(|| std::fs::read_to_string(path).unwrap_or_default());
            json!({ "mode": mode, "dir": meta.is_dir(), "content": content })
        }
        Err(_) => Value::Null,
    }
}

fn record(role: Role) {
    let Some(dir) = var("STANDIN_RECORD_DIR") else {
        return;
    };
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let files: BTreeMap<String, Value> = var("STANDIN_FILES")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| (p.to_owned(), file_entry(p)))
        .collect();
    let groups: Vec<u32> = nix::unistd::getgroups()
        .unwrap_or_default()
        .iter()
        .map(|g| g.as_raw())
        .collect();
    let doc = json!({
        "argv": std::env::args().collect::<Vec<_>>(),
        "env": env,
        "uid": nix::unistd::getuid().as_raw(),
        "gid": nix::unistd::getgid().as_raw(),
        "groups": groups,
        "cwd": std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
        "pid": std::process::id(),
        "files": files,
    });
    let path = format!("{dir}/{}.json", role.name());
    let tmp = format!("{path}.tmp");
    let written = std::fs::write(&tmp, doc.to_string()).and_then(|()| std::fs::rename(&tmp, &path));
    match written {
        Ok(()) => println!("standin {} recorded", role.name()),
        Err(e) => eprintln!("standin {}: cannot write {path}: {e}", role.name()),
    }
}

/// Whether the stand-in has told a prober it is not ready (printed once, for tests to wait on).
static ANSWERED_NOT_READY: AtomicBool = AtomicBool::new(false);

fn respond(mut stream: TcpStream, role: Role, ready: &AtomicBool) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Read the headers to the blank line; requests krun sends have no body.
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let is_ready = ready.load(Ordering::SeqCst);
    let (status, body) = match (method, path) {
        ("GET", "/healthz/ready") if role == Role::PilotAgent => {
            if is_ready {
                (200, String::new())
            } else {
                if !ANSWERED_NOT_READY.swap(true, Ordering::SeqCst) {
                    println!("standin {} answered 503 to a readiness probe", role.name());
                }
                (503, "not ready\n".to_owned())
            }
        }
        ("GET", "/config_dump") => (
            200,
            json!({ "configs": [{ "standin": role.name(), "ready": is_ready }] }).to_string(),
        ),
        ("GET", "/stats") => (
            200,
            if is_ready {
                "server.state: 0\nlistener_manager.workers_started: 1\nserver.total_connections: 0\n".to_owned()
            } else {
                "server.state: 2\nlistener_manager.workers_started: 0\nserver.total_connections: 0\n".to_owned()
            },
        ),
        ("GET", "/ready") => {
            if is_ready {
                (200, "LIVE\n".to_owned())
            } else {
                (503, "PRE_INITIALIZING\n".to_owned())
            }
        }
        ("POST", "/drain_listeners") => {
            append(&format!("{} drain_listeners", role.name()));
            (200, "OK\n".to_owned())
        }
        ("GET", _) | ("POST", _) => (404, "not found\n".to_owned()),
        _ => (405, "method not allowed\n".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn serve(port: u16, role: Role, ready: Arc<AtomicBool>) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            respond(stream, role, &ready);
        }
    });
    Ok(())
}

fn port(name: &str, default: u16) -> u16 {
    var(name).and_then(|p| p.parse().ok()).unwrap_or(default)
}

/// What the real pilot-agent checks at startup; `Err` names the first missing input.
fn agent_preflight() -> Result<(), String> {
    for name in ["POD_NAME", "POD_NAMESPACE"] {
        if var(name).is_none() {
            return Err(format!("{name} is not set; the node id needs it"));
        }
    }
    // ProxyConfig is YAML (JSON is YAML too).
    let proxy_config: Value = serde_saphyr::from_str(&var("PROXY_CONFIG").unwrap_or_default())
        .map_err(|e| format!("failed to unmarshal PROXY_CONFIG: {e}"))?;
    let discovery = proxy_config["discoveryAddress"]
        .as_str()
        .unwrap_or_default();
    if discovery.is_empty() {
        return Err("PROXY_CONFIG has no discoveryAddress".to_owned());
    }
    let system = |name: &str| var(name).is_some_and(|v| v.eq_ignore_ascii_case("SYSTEM"));
    let istiod_roots = !system("XDS_ROOT_CA")
        && !system("CA_ROOT_CA")
        && var("PILOT_CERT_PROVIDER").as_deref() != Some("system");
    let root = "./var/run/secrets/istio/root-cert.pem";
    if istiod_roots && std::fs::metadata(root).is_err() {
        return Err(format!(
            "failed to read the root certificate for XDS and CA: open {root}: no such file or directory"
        ));
    }
    // Its default JWT policy: the CA and XDS clients authenticate with the istio-token.
    let jwt_policy = var("JWT_POLICY");
    if jwt_policy.as_deref().is_none_or(|p| p == "third-party-jwt") {
        let token = "./var/run/secrets/tokens/istio-token";
        std::fs::read(token)
            .map_err(|e| format!("failed to get credential token: open {token}: {e}"))?;
    }
    let mut dirs = vec!["./etc/istio/proxy".to_owned()];
    dirs.extend(var("OUTPUT_CERTS"));
    for dir in dirs {
        let probe = std::path::Path::new(&dir).join(".standin-write-check");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| format!("cannot write {dir}: {e}"))?;
    }
    Ok(())
}

/// Envoy's bootstrap check: the file named by `--config-path`/`-c` parses and has a `node`.
fn envoy_bootstrap() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .windows(2)
        .find(|w| w[0] == "--config-path" || w[0] == "-c")
        .map(|w| w[1].clone())
        .ok_or("no --config-path")?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let bootstrap: Value =
        serde_saphyr::from_str(&text).map_err(|e| format!("{path}: unable to parse: {e}"))?;
    if bootstrap["node"].is_object() {
        Ok(())
    } else {
        Err(format!("{path}: the bootstrap has no node"))
    }
}

/// pilot-agent's DNS proxy: relays udp 127.0.0.1:15053 to the resolv.conf nameserver.
fn relay_dns() -> std::io::Result<()> {
    let resolv = std::fs::read_to_string("/etc/resolv.conf")?;
    let nameserver = resolv
        .lines()
        .find_map(|l| l.trim().strip_prefix("nameserver"))
        .and_then(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .ok_or_else(|| std::io::Error::other("no nameserver in /etc/resolv.conf"))?;
    let server = std::net::UdpSocket::bind(("127.0.0.1", mesh::istio::DNS_PORT))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, client)) = server.recv_from(&mut buf) {
            let upstream = std::net::UdpSocket::bind(("0.0.0.0", 0));
            let mut reply = [0u8; 1500];
            let answered = upstream.and_then(|u| {
                u.send_to(&buf[..n], (nameserver, 53))?;
                let (m, _) = u.recv_from(&mut reply)?;
                server.send_to(&reply[..m], client)
            });
            if answered.is_ok() {
                println!("standin pilot-agent relayed a DNS query");
            }
        }
    });
    Ok(())
}

/// Runs the stand-in; see the module docs.
pub fn run(role: Role) -> ExitCode {
    let name = role.name();
    // Block the signals before any thread starts, so only `wait` below receives them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGUSR1, Signal::SIGUSR2] {
        signals.add(s);
    }
    if signals.thread_block().is_err() {
        return ExitCode::from(2);
    }
    append(&format!("{name} start"));
    record(role);
    if role == Role::PilotAgent {
        if let Err(why) = agent_preflight() {
            eprintln!("standin pilot-agent: error: {why}");
            return ExitCode::from(1);
        }
        if var("ISTIO_META_DNS_CAPTURE").as_deref() == Some("true")
            && let Err(e) = relay_dns()
        {
            eprintln!("standin pilot-agent: DNS proxy on 15053: {e}");
            return ExitCode::from(1);
        }
    }
    let mode = var("STANDIN_MODE").unwrap_or_else(|| "ready".to_owned());
    let ready = Arc::new(AtomicBool::new(false));
    let mut ports = vec![port("STANDIN_ADMIN_PORT", 15000)];
    if role == Role::PilotAgent {
        ports.push(port("STANDIN_READY_PORT", 15021));
    }
    for p in ports {
        if let Err(e) = serve(p, role, ready.clone()) {
            eprintln!("standin {name}: cannot listen on 127.0.0.1:{p}: {e}");
            return ExitCode::from(2);
        }
    }
    let become_ready = || {
        append(&format!("{name} ready"));
        ready.store(true, Ordering::SeqCst);
        println!("standin {name} ready");
    };
    let bootstrap = match role {
        Role::Envoy => envoy_bootstrap(),
        Role::PilotAgent => Ok(()),
    };
    match &bootstrap {
        Err(why) => eprintln!("standin envoy: not ready: {why}"),
        Ok(()) if mode == "ready" || mode == "crash" => become_ready(),
        Ok(()) => {}
    }
    loop {
        match signals.wait() {
            Ok(Signal::SIGTERM) => {
                append(&format!("{name} stop"));
                println!("standin {name} got SIGTERM");
                return ExitCode::SUCCESS;
            }
            Ok(Signal::SIGUSR1) if mode == "slow" && bootstrap.is_ok() => become_ready(),
            Ok(Signal::SIGUSR2) if mode == "crash" => {
                append(&format!("{name} crash"));
                println!("standin {name} crashing with exit code 3");
                return ExitCode::from(3);
            }
            _ => {}
        }
    }
}
