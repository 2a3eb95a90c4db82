//! Test harness for krun's end-to-end tests: start the real `krun` binary with a scenario's
//! environment, read its merged output line by line, send it signals, collect its exit code.
//!
//! Tests wait on output lines, never on time. Every wait has a generous hang guard so a
//! broken build fails with the output so far instead of hanging CI.

pub mod bench;
pub mod fakes;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

pub mod netns;
/// How long any single wait may take before the test is declared hung.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Reads `conn` until the server closes it (EOF or a reset) and returns what it sent before;
/// panics naming `what` if it is still open after the hang guard.
pub fn read_until_closed(conn: &mut std::net::TcpStream, what: &str) -> Vec<u8> {
    conn.set_read_timeout(Some(HANG_GUARD))
        .expect("read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(conn, &mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what} still open after {HANG_GUARD:?}")
            }
            Err(_) => return got,
        }
    }
}

/// Path of a binary built by this workspace (`krun`, `hgate`, `krun-testapp`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> -> target/debug/<name>
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// The `krun-testapp` helper, as an argv prefix.
pub fn testapp(args: &[&str]) -> Vec<String> {
    std::iter::once(binary("krun-testapp").display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect()
}

/// Fails the calling test, with the reason, unless it runs as root. Tests of kernel behaviour
/// (network and PID namespaces, iptables, running the app as another user) need root; they
/// fail loudly rather than pass without having run. `make test` runs as root in CI.
pub fn require_root(why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root ({why}): run the README's test command, `make test`, as root"
    );
}

/// A loopback port where nothing listens, held for as long as the returned socket lives: the
/// socket is bound but never listens, so a connect is refused, and no other test can take the
/// port meanwhile (a port from [`free_port`] may be bound again by a test running in parallel).
pub fn refusing_port() -> (std::os::fd::OwnedFd, u16) {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, getsockname, socket,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, 0),
    )
    .expect("bind a loopback port");
    let addr: SockaddrIn = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("getsockname");
    (fd, addr.port())
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The project's Python (`.venv/bin/python3`, made by scripts/install-prereqs.sh with the
/// packages of tests/requirements.txt): tests that need a Python package run it, never the
/// system's Python.
pub fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python3");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/install-prereqs.sh (it creates the project's Python environment)",
        venv.display()
    );
    venv
}

/// Runs the Python h2 HBONE client (`tests/scripts/hbone_client.py`, needs the `h2` module)
/// to completion and returns its last output line as JSON: the one driver of the HBONE
/// interop tests.
pub fn hbone_client(args: &[&str]) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hbone_client.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run the project's python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(last).expect("JSON line")
}

/// One HTTP/1.1 request (`Connection: close`) to `addr`: the status code and the body.
pub fn http_request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(HANG_GUARD))
        .expect("read timeout");
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read answer");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    (status, body)
}

/// Parses Prometheus text with `prometheus_client`'s parser (`tests/scripts/prom_parse.py`,
/// needs the `prometheus-client` package): every sample as `{"name", "labels", "value"}`.
pub fn prometheus_samples(text: &str) -> Vec<serde_json::Value> {
    use std::io::Write;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prom_parse.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the project's python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected:\n{text}"
    );
    serde_json::from_slice(&out.stdout).expect("JSON samples")
}

/// Runs `tests/scripts/sni_client.py` (Python `ssl`): mesh mTLS to `addr` as `client` with
/// `sni`, sends `payload`, reads as many bytes back; returns its JSON line (`data` or `error`).
pub fn sni_client(
    addr: std::net::SocketAddr,
    sni: &str,
    client: &fakes::pki::ClientFiles,
    payload: &str,
) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/sni_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args([&addr.ip().to_string(), &addr.port().to_string(), sni])
        .args([&client.cert, &client.key, &client.ca])
        .arg(payload)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("JSON line")
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it under the system temp dir.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "krun-test-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A krun invocation being prepared.
pub struct Krun {
    command: Command,
}

impl Krun {
    /// `krun` with a clean, predictable environment: text logs, no default app port wait and
    /// no fixed listener ports unless the scenario sets them.
    pub fn new() -> Self {
        Self::wrapped(&[])
    }

    /// `krun` started through `wrapper` (e.g. `unshare --pid --fork --mount-proc`).
    pub fn wrapped(wrapper: &[&str]) -> Self {
        Self::wrapped_binary(wrapper, binary("krun"))
    }

    /// A krun binary other than this build's (a benchmark's baseline build), started through
    /// `wrapper` as [`Krun::wrapped`] does.
    pub fn wrapped_binary(wrapper: &[&str], krun: PathBuf) -> Self {
        if wrapper.first() == Some(&"unshare") {
            require_root("it starts krun in a new namespace with unshare");
        }
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(krun);
                c
            }
            None => Command::new(krun),
        };
        // Fixed ports are off by default so tests can run in parallel; scenarios that need a
        // listener give it a free port.
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KRUN_LOG_FORMAT", "text")
            .env("PORT_http", "-")
            .env("KRUN_TUNNEL_PORT", "0")
            .env("KRUN_HBONE_PORT", "0")
            .env("KRUN_OUTBOUND_ADDR", "127.0.0.1:0")
            .env("KRUN_ADMIN_ADDR", "off")
            // Tests run as root on the host's network namespace: no iptables capture there.
            // The capture tests turn it back on inside a namespace of their own.
            .env("ISTIO_META_INTERCEPTION_MODE", "NONE")
            // Nor Cloud Run discovery, which rewrites resolv.conf: the discovery tests turn it
            // on inside a namespace with a resolv.conf of its own.
            .env("KRUN_RUN_DISCOVERY", "off");
        Krun { command }
    }

    /// `hgate` with a clean environment: text logs, every listener on an ephemeral loopback
    /// port (read the chosen address from its "ready" log lines), no Kubernetes, no ID tokens,
    /// no istiod forwarding unless the scenario sets them.
    pub fn hgate() -> Self {
        Self::hgate_binary(binary("hgate"))
    }

    /// An hgate binary other than this build's (a benchmark's baseline build), set up as
    /// [`Krun::hgate`] does.
    pub fn hgate_binary(hgate: PathBuf) -> Self {
        let mut command = Command::new(hgate);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HGATE_LOG_FORMAT", "text")
            .env("HGATE_SNI_ADDR", "127.0.0.1:0")
            .env("HGATE_ADMIN_ADDR", "127.0.0.1:0")
            .env("HGATE_ISTIOD_ADDR", "off")
            .env("HGATE_KUBE", "off")
            .env("HGATE_ID_TOKENS", "none");
        Krun { command }
    }

    /// Any other program (a sample script), with a clean environment: only `PATH`, then what
    /// the scenario sets.
    pub fn program(path: impl AsRef<std::ffi::OsStr>) -> Self {
        let mut command = Command::new(path);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        Krun { command }
    }

    /// Sets an environment variable.
    pub fn env(mut self, name: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(name, value);
        self
    }

    /// Removes a variable the harness sets by default.
    pub fn env_remove(mut self, name: &str) -> Self {
        self.command.env_remove(name);
        self
    }

    /// Appends arguments.
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.command.args(args);
        self
    }

    /// Starts it with stdout and stderr merged into one stream, in write order.
    pub fn start(mut self) -> Running {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let writer2 = writer.try_clone().expect("pipe clone");
        self.command
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2);
        let mut child = self.command.spawn().expect("spawn krun");
        drop(self.command); // close our copies of the write end
        let (line_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = Pid::from_raw(child.id() as i32);
        let (exit_tx, exit) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = exit_tx.send(child.wait().map(|s| s.code().unwrap_or(-1)));
        });
        Running {
            pid,
            lines,
            exit,
            seen: Vec::new(),
            exited: false,
        }
    }

    /// Runs it to completion.
    pub fn run(self) -> Finished {
        self.start().finish()
    }
}

impl Default for Krun {
    fn default() -> Self {
        Self::new()
    }
}

/// A running krun.
pub struct Running {
    /// Its pid.
    pub pid: Pid,
    lines: mpsc::Receiver<String>,
    exit: mpsc::Receiver<std::io::Result<i32>>,
    seen: Vec<String>,
    exited: bool,
}

impl Running {
    /// Reads output until every needle has appeared in some line, in any order, counting
    /// lines already read: for events of two processes that race each other.
    pub fn wait_for_all(&mut self, needles: &[&str]) {
        for needle in needles {
            if !self.seen.iter().any(|l| l.contains(needle)) {
                self.wait_for_line(needle);
            }
        }
    }

    /// Its resident memory (`VmRSS` in `/proc/<pid>/status`), in KiB: for memory bounds.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// A memory figure of `/proc/PID/status` in KiB (`VmRSS`, `RssAnon`, `RssFile`, ...).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid))
    }

    /// CPU time used so far by all its threads, user plus system, in seconds: fields 14 and 15
    /// of `/proc/PID/stat`, in clock ticks of 1/100 s (Linux's `USER_HZ` on every platform
    /// krun targets).
    pub fn cpu_seconds(&self) -> f64 {
        (self.stat_field(14) + self.stat_field(15)) as f64 / 100.0
    }

    /// Minor page faults so far, all threads (field 10 of `/proc/PID/stat`): memory the
    /// allocator handed back to the kernel and touched again shows here.
    pub fn minor_faults(&self) -> u64 {
        self.stat_field(10)
    }

    /// Field `n` (numbered from 1, as proc(5) does) of `/proc/PID/stat`.
    fn stat_field(&self, n: usize) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).expect("/proc/<pid>/stat");
        // The command name (field 2) may hold spaces: count fields after its closing paren.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(n - 3))
            .and_then(|field| field.parse().ok())
            .unwrap_or_else(|| panic!("no field {n} in /proc/{}/stat", self.pid))
    }

    /// Reads output until a line contains `needle`; returns that line.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(HANG_GUARD) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Reads output until a line contains `needle` or `within` has passed without one. For
    /// benchmarks that run builds of which only some log `needle` (a baseline built before
    /// the line existed), never for a test's synchronization.
    pub fn wait_for_line_within(&mut self, needle: &str, within: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    }

    /// Reads output until a line contains `needle`; returns the address in its `addr=IP:PORT`
    /// field (listeners on port 0 log where they listen).
    pub fn wait_for_addr(&mut self, needle: &str) -> std::net::SocketAddr {
        let line = self.wait_for_line(needle);
        line.split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr= in {line:?}"))
    }

    /// Sends a signal to krun.
    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid, signal).expect("signal krun");
    }

    /// Sends a signal to krun started through a wrapper (`unshare --fork` does not forward
    /// signals): the wrapper's only child is krun.
    pub fn signal_wrapped(&self, signal: Signal) {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
            .expect("wrapper's children");
        let krun: i32 = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the wrapper has started krun");
        nix::sys::signal::kill(Pid::from_raw(krun), signal).expect("signal krun");
    }

    /// Waits for krun to exit and collects the rest of its output.
    pub fn finish(mut self) -> Finished {
        let code = match self.exit.recv_timeout(HANG_GUARD) {
            Ok(result) => result.expect("wait for krun"),
            Err(_) => {
                let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
                panic!(
                    "krun did not exit; output so far:\n{}",
                    self.seen.join("\n")
                )
            }
        };
        self.exited = true;
        while let Ok(line) = self.lines.recv_timeout(HANG_GUARD) {
            self.seen.push(line);
        }
        Finished {
            code,
            output: std::mem::take(&mut self.seen),
        }
    }
}

impl Drop for Running {
    /// A test that failed half-way must not leave krun (and its app) running: SIGTERM lets
    /// krun drain and kill what it started.
    fn drop(&mut self) {
        if !self.exited {
            let _ = nix::sys::signal::kill(self.pid, Signal::SIGTERM);
        }
    }
}

/// A krun that has exited.
#[derive(Debug)]
pub struct Finished {
    /// Its exit code.
    pub code: i32,
    /// Every line it (and its children) printed, in order.
    pub output: Vec<String>,
}

impl Finished {
    /// Index of the first line containing `needle`, or a panic showing the output.
    pub fn line_index(&self, needle: &str) -> usize {
        self.output
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line containing {needle:?} in:\n{}", self.text()))
    }

    /// True when some line contains `needle`.
    pub fn has_line(&self, needle: &str) -> bool {
        self.output.iter().any(|l| l.contains(needle))
    }

    /// The whole output.
    pub fn text(&self) -> String {
        self.output.join("\n")
    }
}
