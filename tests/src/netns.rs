//! A throwaway network namespace (`ip netns`) for the capture tests: loopback up and a default
//! route through a veth pair, so addresses such as 10.1.2.3 are routable (not via `lo`, which
//! the capture rules leave alone) and iptables sees the app's connections. Deleted on drop.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A named network namespace.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `krun-<tag>-<pid>-<n>` with `lo` up and a default route via `v0` (whose peer
    /// `v1` stays inside, so nothing answers there).
    pub fn new(tag: &str) -> Netns {
        let netns = Netns::bare(tag);
        netns.run("ip link add v0 type veth peer name v1");
        netns.run("ip link set v1 up");
        netns.client_side();
        netns
    }

    /// Two namespaces joined by a veth pair: the first routes everything to the second, which
    /// answers as 192.0.2.2 and as `server_ip` (e.g. a mesh workload at 10.1.2.3).
    pub fn pair(tag: &str, server_ip: &str) -> (Netns, Netns) {
        let client = Netns::bare(tag);
        let server = Netns::bare(tag);
        client.exec(&[
            "ip",
            "link",
            "add",
            "v0",
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            &server.name,
        ]);
        client.client_side();
        server.run("ip link set v1 up");
        server.run("ip addr add 192.0.2.2/24 dev v1");
        server.exec(&["ip", "addr", "add", &format!("{server_ip}/32"), "dev", "lo"]);
        (client, server)
    }

    fn bare(tag: &str) -> Netns {
        crate::require_root("it creates network namespaces and installs iptables rules");
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "krun-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let netns = Netns { name };
        netns.run("ip link set lo up");
        netns
    }

    fn client_side(&self) {
        for step in [
            "ip link set v0 up",
            "ip addr add 192.0.2.1/24 dev v0",
            "ip route add default via 192.0.2.2 dev v0",
        ] {
            self.run(step);
        }
    }

    fn run(&self, command: &str) {
        self.exec(&command.split(' ').collect::<Vec<_>>());
    }

    /// The namespace's name (`/etc/netns/<name>/resolv.conf` is its resolv.conf).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The argv prefix that runs a command inside.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Moves the calling thread into the namespace (only this thread: sockets it opens from
    /// then on live there), so one benchmark process can play client and server of two
    /// namespaces from different threads.
    pub fn enter_this_thread(&self) {
        self.entry()();
    }

    /// [`Netns::enter_this_thread`] for another thread: opens the namespace now, enters it when called.
    pub fn entry(&self) -> impl FnOnce() + Send + 'static {
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        move || nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns")
    }

    /// Runs a command inside and returns its stdout; panics (with stderr) when it fails.
    pub fn exec(&self, argv: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("run ip netns exec");
        assert!(
            output.status.success(),
            "{argv:?} failed in {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `f` on a thread inside the namespace and returns its result: sockets `f` creates
    /// (fakes' listeners, a test's client) live in the namespace, while the threads that serve
    /// them may run anywhere.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).expect("open the namespace");
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("setns into the namespace");
                    f()
                })
                .join()
                .expect("the thread inside the namespace")
        })
    }

    /// Gives the namespace its own `/etc/resolv.conf`: `ip netns exec` bind-mounts
    /// `/etc/netns/<name>/resolv.conf` over it for every command run inside.
    pub fn resolv_conf(&self, text: &str) {
        let dir = format!("/etc/netns/{}", self.name);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<name>");
        std::fs::write(format!("{dir}/resolv.conf"), text).expect("write resolv.conf");
    }

    /// The tables that hold rules or chains of their own, as `iptables-save` prints them,
    /// without timestamped comments and counters (an empty table shows once it was loaded).
    pub fn save(&self) -> String {
        let mut out = String::new();
        let mut table = String::new();
        let mut used = false;
        for line in self.exec(&["iptables-save"]).lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = match line.strip_prefix(':') {
                // `:CHAIN POLICY [packets:bytes]`: keep the name and policy.
                Some(decl) => format!(":{}", decl.split(" [").next().unwrap_or(decl)),
                None => line.to_owned(),
            };
            used |= line.starts_with("-A") || line.ends_with(" -");
            table.push_str(&line);
            table.push('\n');
            if line == "COMMIT" {
                if used {
                    out.push_str(&table);
                }
                table.clear();
                used = false;
            }
        }
        out
    }

    /// The nat table as `iptables-save` prints it, without its timestamped comments.
    pub fn nat(&self) -> String {
        self.exec(&["iptables-save", "-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// How many packets matched `rule` (as `iptables-save` prints it, e.g. `-A ISTIO_REDIRECT
    /// -p tcp -j REDIRECT --to-ports 15001`). For nat rules: how many connections.
    pub fn packets(&self, rule: &str) -> u64 {
        let save = self.exec(&["iptables-save", "-c", "-t", "nat"]);
        let line = save
            .lines()
            .find(|l| l.ends_with(rule))
            .unwrap_or_else(|| panic!("no rule {rule:?} in\n{save}"));
        line.trim_start_matches('[')
            .split(':')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {line:?}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}
