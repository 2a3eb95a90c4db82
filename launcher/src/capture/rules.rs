//! The capture ruleset as data: a pure function from settings to `iptables-restore` input.
//!
//! The rules follow Istio's `istio-iptables`
//! (<https://github.com/istio/istio/blob/master/tools/istio-iptables/pkg/capture/run.go>): the
//! same chains, jumps, order, owner and loopback rules, DNS scope and conntrack zones, so that
//! Envoy, pilot-agent and krun's builtin data plane all see the traffic they expect. In the
//! `nat` table: `ISTIO_INBOUND`, `ISTIO_REDIRECT`, `ISTIO_IN_REDIRECT`, `ISTIO_OUTPUT` (and
//! `ISTIO_OUTPUT_DNS` with DNS capture); in the `raw` table with DNS capture:
//! `ISTIO_OUTPUT_DNS` and `ISTIO_INBOUND`, which split DNS into two conntrack zones (the
//! proxy's upstream queries in zone 1, the app's queries to the proxy in zone 2) so UDP
//! conntrack entries of the two legs cannot collide. The deliberate differences (krun's socket
//! mark, the metadata server exclusion) are listed in docs/capture.md. The Traffic Director
//! variant, the rules of cloud-run-mesh's `scripts/iptables.sh`, comes from the same generator
//! with other settings ([`Rules::traffic_director`]).
//!
//! Applying is idempotent because the input is computed against the current `iptables-save`:
//! our jumps that exist are deleted and re-added, our chains are flushed (declared) and
//! refilled, and stale chains of ours are removed. Nothing else is touched.

use std::fmt::Write;
use std::net::IpAddr;

use mesh::istio::{DNS_PORT, HBONE_PORT, INBOUND_CAPTURE_PORT, PROXY_GID, PROXY_UID};

/// Prefix of every chain krun owns (Istio's names, so a later `istio-iptables clean` works).
pub const CHAIN_PREFIX: &str = "ISTIO_";
/// The socket mark krun puts on its own outbound sockets; marked traffic is never captured.
pub const KRUN_MARK: u32 = 0x539;

/// Puts [`KRUN_MARK`] on a socket krun opens itself (passthrough, DNS forwarding), so the
/// capture rules never send it back to krun. Without CAP_NET_ADMIN the mark cannot be set, but
/// then there is no capture either.
pub fn mark_socket(socket: &impl std::os::fd::AsFd) {
    let _ = nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Mark, &KRUN_MARK);
}

/// A plain TCP connection carrying krun's mark, so capture leaves it alone.
pub async fn connect_marked(
    target: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match target {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    mark_socket(&socket);
    socket.connect(target).await
}
/// The GCE metadata server: credentials must never go through the mesh.
pub const METADATA_CIDR: &str = "169.254.169.254/32";
/// The tables the rules live in, in the order they are restored.
const TABLES: [&str; 2] = ["nat", "raw"];

/// Address family of one ruleset: `iptables-restore` or `ip6tables-restore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The source address Envoy's inbound passthrough binds (`127.0.0.6`, `::6`).
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn holds(self, cidr: &str) -> bool {
        cidr.contains(':') == (self == Family::V6)
    }

    fn holds_ip(self, ip: &IpAddr) -> bool {
        ip.is_ipv6() == (self == Family::V6)
    }
}

/// Which DNS traffic is sent to the DNS proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsScope {
    /// Every port-53 packet (Istio's capture-all, the Traffic Director script's behaviour).
    All,
    /// Only packets to these nameservers (those in `/etc/resolv.conf`), so a local forwarder's
    /// own upstream queries are not sent back to the proxy in a loop.
    Servers(Vec<IpAddr>),
}

/// DNS capture: where to and which packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dns {
    /// The DNS proxy's port (15053).
    pub port: u16,
    /// Which packets are redirected.
    pub scope: DnsScope,
}

impl Dns {
    /// Redirect targets for `family`: `None` for all, else the host CIDRs of its servers.
    fn targets(&self, family: Family) -> Option<Vec<String>> {
        match &self.scope {
            DnsScope::All => None,
            DnsScope::Servers(servers) => Some(
                servers
                    .iter()
                    .filter(|ip| family.holds_ip(ip))
                    .map(|ip| format!("{ip}/{}", family.host_prefix()))
                    .collect(),
            ),
        }
    }
}

/// What to capture. Build with [`Rules::istio`] or [`Rules::traffic_director`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// REDIRECT target of captured outbound TCP (15001).
    pub proxy_port: u16,
    /// REDIRECT target of captured inbound TCP (15006).
    pub inbound_port: u16,
    /// The HBONE tunnel port (15008): never sent back inbound on loopback, never captured
    /// inbound.
    pub tunnel_port: u16,
    /// Inbound ports to capture (none by default).
    pub inbound_ports: Vec<u16>,
    /// CIDRs captured outbound; `*` means everything.
    pub include: Vec<String>,
    /// CIDRs never captured (the metadata server).
    pub exclude: Vec<String>,
    /// Destination ports never captured (TCP and UDP).
    pub exclude_ports: Vec<u16>,
    /// Traffic of these uids is not captured (Envoy's, 1337).
    pub proxy_uids: Vec<u32>,
    /// Traffic of these gids is not captured (Envoy's and pilot-agent's, 1337).
    pub proxy_gids: Vec<u32>,
    /// Sockets with this mark are not captured (krun's own); `None` for Istio's exact rules.
    pub mark: Option<u32>,
    /// Istio's rule sending the proxy's loopback calls to non-127.0.0.1 back inbound.
    pub loopback_redirect: bool,
    /// DNS capture.
    pub dns: Option<Dns>,
}

/// One rule: table, chain and the rest of the `-A` line.
type Rule = (&'static str, &'static str, String);

impl Rules {
    /// The `istio-iptables -u 1337 -g 1337 -i <include> -o <exclude>` ruleset (with
    /// `--redirect-dns` and the given nameservers when `dns_servers` is `Some`), plus the
    /// metadata exclusion and krun's mark.
    pub fn istio(
        include: &str,
        exclude_ports: &[u16],
        proxy_port: u16,
        dns_servers: Option<Vec<IpAddr>>,
    ) -> Rules {
        let mut ports = exclude_ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        Rules {
            proxy_port,
            inbound_port: INBOUND_CAPTURE_PORT,
            tunnel_port: HBONE_PORT,
            inbound_ports: Vec::new(),
            include: mesh::config::values::list(include),
            exclude: vec![METADATA_CIDR.to_owned()],
            exclude_ports: ports,
            proxy_uids: vec![PROXY_UID],
            proxy_gids: vec![PROXY_GID],
            mark: Some(KRUN_MARK),
            loopback_redirect: true,
            dns: dns_servers.map(|servers| Dns {
                port: DNS_PORT,
                scope: DnsScope::Servers(servers),
            }),
        }
    }

    /// The ruleset of cloud-run-mesh's Traffic Director script (`scripts/iptables.sh`, run with
    /// the proxy uid only): Envoy runs as uid 1337 (no gid rule), everything but the metadata
    /// server is captured, no loopback self-redirect, and all DNS to 15053.
    pub fn traffic_director(exclude_ports: &[u16], proxy_port: u16) -> Rules {
        Rules {
            include: vec!["*".to_owned()],
            proxy_gids: Vec::new(),
            loopback_redirect: false,
            dns: Some(Dns {
                port: DNS_PORT,
                scope: DnsScope::All,
            }),
            ..Rules::istio("*", exclude_ports, proxy_port, None)
        }
    }

    /// The chains this ruleset fills in `table`, in declaration order.
    fn chains(&self, table: &str) -> Vec<&'static str> {
        match (table, self.dns.is_some()) {
            ("nat", dns) => {
                let mut chains = vec![
                    "ISTIO_INBOUND",
                    "ISTIO_REDIRECT",
                    "ISTIO_IN_REDIRECT",
                    "ISTIO_OUTPUT",
                ];
                if dns {
                    chains.push("ISTIO_OUTPUT_DNS");
                }
                chains
            }
            ("raw", true) => vec!["ISTIO_OUTPUT_DNS", "ISTIO_INBOUND"],
            _ => Vec::new(),
        }
    }

    /// Whether an included range is a loopback one: then the app's loopback traffic is
    /// captured too (no "loopback but not the proxy" return).
    fn includes_loopback(&self) -> bool {
        self.include.iter().any(|cidr| {
            cidr.split('/')
                .next()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback())
        })
    }

    /// The proxy's owner matches, uids first: (`--uid-owner`|`--gid-owner`, id).
    fn owners(&self) -> impl Iterator<Item = (&'static str, &u32)> {
        self.proxy_uids
            .iter()
            .map(|uid| ("--uid-owner", uid))
            .chain(self.proxy_gids.iter().map(|gid| ("--gid-owner", gid)))
    }

    /// Every rule for `family`, in Istio's order.
    pub fn rules(&self, family: Family) -> Vec<Rule> {
        let mut rules: Vec<Rule> = Vec::new();
        let mut nat = |chain: &'static str, spec: String| rules.push(("nat", chain, spec));
        let tunnel = self.tunnel_port;
        nat(
            "ISTIO_INBOUND",
            format!("-p tcp --dport {tunnel} -j RETURN"),
        );
        nat(
            "ISTIO_REDIRECT",
            format!("-p tcp -j REDIRECT --to-ports {}", self.proxy_port),
        );
        nat(
            "ISTIO_IN_REDIRECT",
            format!("-p tcp -j REDIRECT --to-ports {}", self.inbound_port),
        );
        if !self.inbound_ports.is_empty() {
            nat("PREROUTING", "-p tcp -j ISTIO_INBOUND".to_owned());
            for port in &self.inbound_ports {
                nat(
                    "ISTIO_INBOUND",
                    format!("-p tcp --dport {port} -j ISTIO_IN_REDIRECT"),
                );
            }
        }
        nat("OUTPUT", "-j ISTIO_OUTPUT".to_owned());
        if let Some(mark) = self.mark {
            nat(
                "ISTIO_OUTPUT",
                format!("-m mark --mark {mark:#x} -j RETURN"),
            );
        }
        for port in &self.exclude_ports {
            for proto in ["tcp", "udp"] {
                nat(
                    "ISTIO_OUTPUT",
                    format!("-p {proto} --dport {port} -j RETURN"),
                );
            }
        }
        nat(
            "ISTIO_OUTPUT",
            format!("-o lo -s {} -j RETURN", family.passthrough_source()),
        );
        let loopback = family.loopback();
        let dns = self.dns.is_some();
        for (kind, id) in self.owners() {
            if self.loopback_redirect {
                // With DNS capture the proxy's TCP DNS on loopback is not sent inbound (uid
                // only, as upstream).
                let ports = if dns && kind == "--uid-owner" {
                    format!("-m multiport ! --dports 53,{tunnel}")
                } else {
                    format!("! --dport {tunnel}")
                };
                nat(
                    "ISTIO_OUTPUT",
                    format!(
                        "-o lo ! -d {loopback} -p tcp {ports} -m owner {kind} {id} -j ISTIO_IN_REDIRECT"
                    ),
                );
            }
            if !self.includes_loopback() {
                let tcp_not_dns = if dns { "-p tcp ! --dport 53 " } else { "" };
                nat(
                    "ISTIO_OUTPUT",
                    format!("-o lo {tcp_not_dns}-m owner ! {kind} {id} -j RETURN"),
                );
            }
            nat("ISTIO_OUTPUT", format!("-m owner {kind} {id} -j RETURN"));
        }
        if let Some(dns) = &self.dns {
            self.dns_rules(dns, family, &mut rules);
        }
        let mut nat = |chain: &'static str, spec: String| rules.push(("nat", chain, spec));
        nat("ISTIO_OUTPUT", format!("-d {loopback} -j RETURN"));
        for cidr in self.exclude.iter().filter(|c| family.holds(c)) {
            nat("ISTIO_OUTPUT", format!("-d {cidr} -j RETURN"));
        }
        if self.include.iter().any(|c| c == "*") {
            nat("ISTIO_OUTPUT", "-j ISTIO_REDIRECT".to_owned());
        } else {
            for cidr in self.include.iter().filter(|c| family.holds(c)) {
                nat("ISTIO_OUTPUT", format!("-d {cidr} -j ISTIO_REDIRECT"));
            }
        }
        rules
    }

    /// DNS: reached from `ISTIO_OUTPUT` after the proxy's own traffic has returned; redirects
    /// port 53 to the proxy (only to the listed nameservers unless capturing all) and splits
    /// the two UDP legs into conntrack zones in `raw`.
    fn dns_rules(&self, dns: &Dns, family: Family, rules: &mut Vec<Rule>) {
        let port = dns.port;
        let targets = dns.targets(family);
        let captured = targets.as_ref().is_none_or(|t| !t.is_empty());
        rules.push(("raw", "OUTPUT", "-j ISTIO_OUTPUT_DNS".to_owned()));
        if captured {
            rules.push(("nat", "ISTIO_OUTPUT", "-j ISTIO_OUTPUT_DNS".to_owned()));
        }
        let to = |target: Option<&String>| target.map_or(String::new(), |t| format!(" -d {t}"));
        for (proto, flag) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
            let redirect = |target| {
                (
                    "nat",
                    "ISTIO_OUTPUT_DNS",
                    format!(
                        "-p {proto} --dport 53{} -j REDIRECT {flag} {port}",
                        to(target)
                    ),
                )
            };
            match &targets {
                None => rules.push(redirect(None)),
                Some(targets) => rules.extend(targets.iter().map(|t| redirect(Some(t)))),
            }
        }
        for (kind, id) in self.owners() {
            rules.push((
                "raw",
                "ISTIO_OUTPUT_DNS",
                format!("-p udp --dport 53 -m owner {kind} {id} -j CT --zone 1"),
            ));
            rules.push((
                "raw",
                "ISTIO_OUTPUT_DNS",
                format!("-p udp --sport {port} -m owner {kind} {id} -j CT --zone 2"),
            ));
        }
        // (krun) krun's own DNS server (the builtin data plane's, on the DNS port) and its
        // forwarding are marked instead of running as 1337: the same zones by mark.
        if let Some(mark) = self.mark {
            rules.push((
                "raw",
                "ISTIO_OUTPUT_DNS",
                format!("-p udp --dport 53 -m mark --mark {mark:#x} -j CT --zone 1"),
            ));
            rules.push((
                "raw",
                "ISTIO_OUTPUT_DNS",
                format!("-p udp --sport {port} -m mark --mark {mark:#x} -j CT --zone 2"),
            ));
        }
        if captured {
            rules.push(("raw", "PREROUTING", "-j ISTIO_INBOUND".to_owned()));
        }
        let zones = |target: Option<&String>| {
            let from = target.map_or(String::new(), |t| format!(" -s {t}"));
            [
                (
                    "raw",
                    "ISTIO_OUTPUT_DNS",
                    format!("-p udp --dport 53{} -j CT --zone 2", to(target)),
                ),
                (
                    "raw",
                    "ISTIO_INBOUND",
                    format!("-p udp --sport 53{from} -j CT --zone 1"),
                ),
            ]
        };
        match &targets {
            None => rules.extend(zones(None)),
            Some(targets) => rules.extend(targets.iter().flat_map(|t| zones(Some(t)))),
        }
    }

    /// `iptables-restore --noflush` input that makes the nat and raw tables hold exactly this
    /// ruleset among our chains, given `existing` (the current `iptables-save` output).
    pub fn restore_input(&self, family: Family, existing: &str) -> String {
        let rules = self.rules(family);
        let mut out = String::new();
        for table in TABLES {
            let ours = self.chains(table);
            let present = Present::parse(existing, table);
            let mine: Vec<&Rule> = rules.iter().filter(|r| r.0 == table).collect();
            if ours.is_empty() && mine.is_empty() && present.is_empty() {
                continue;
            }
            let _ = writeln!(out, "*{table}");
            for chain in &ours {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            for jump in &present.jumps {
                let _ = writeln!(out, "-D{}", &jump[2..]);
            }
            for chain in present
                .chains
                .iter()
                .filter(|c| !ours.contains(&c.as_str()))
            {
                let _ = writeln!(out, "-F {chain}\n-X {chain}");
            }
            for (_, chain, spec) in mine {
                let _ = writeln!(out, "-A {chain} {spec}");
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// Input that removes every chain and jump of ours from `existing` (nat and raw), or `None`
/// when there is nothing to remove.
pub fn cleanup_input(existing: &str) -> Option<String> {
    let mut out = String::new();
    for table in TABLES {
        let present = Present::parse(existing, table);
        if present.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for jump in &present.jumps {
            let _ = writeln!(out, "-D{}", &jump[2..]);
        }
        for chain in &present.chains {
            let _ = writeln!(out, "-F {chain}");
        }
        for chain in &present.chains {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }
    (!out.is_empty()).then_some(out)
}

/// Our chains and the jumps into them found in one table of an `iptables-save` output.
struct Present {
    chains: Vec<String>,
    /// Whole `-A <builtin> ... -j ISTIO_*` lines.
    jumps: Vec<String>,
}

impl Present {
    fn parse(save: &str, wanted: &str) -> Present {
        let mut chains = Vec::new();
        let mut jumps = Vec::new();
        let mut in_table = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_table = table == wanted;
                continue;
            }
            if !in_table {
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if name.starts_with(CHAIN_PREFIX) {
                    chains.push(name.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                let target = rule.split(" -j ").nth(1).unwrap_or_default();
                if !chain.starts_with(CHAIN_PREFIX) && target.starts_with(CHAIN_PREFIX) {
                    jumps.push(line.to_owned());
                }
            }
        }
        Present { chains, jumps }
    }

    fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

    /// The default ruleset on a fresh table, as `iptables-restore` reads it: Istio's rules
    /// plus krun's mark and the metadata server (exact parity is in tests/tests/capture.rs).
    #[test]
    fn istio_default_ruleset() {
        let rules = Rules::istio("10.0.0.0/8", &[5432], 15001, None);
        let text = rules.restore_input(Family::V4, EMPTY);
        let expected = "*nat\n\
             :ISTIO_INBOUND - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
             -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN\n\
             -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
             -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n\
             -A OUTPUT -j ISTIO_OUTPUT\n\
             -A ISTIO_OUTPUT -m mark --mark 0x539 -j RETURN\n\
             -A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN\n\
             -A ISTIO_OUTPUT -p udp --dport 5432 -j RETURN\n\
             -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN\n\
             -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT\n\
             -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT\n\
             -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n\
             -A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN\n\
             -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT\n\
             COMMIT\n";
        assert_eq!(text, expected);
    }

    /// Re-applying deletes the jumps that exist before adding them again, and drops stale
    /// chains of ours (in nat and raw) that the new ruleset no longer uses; other chains are
    /// left alone.
    #[test]
    fn reapplying_replaces_only_ours() {
        let existing = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ISTIO_NOT_NAT\nCOMMIT\n\
                        *nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_OUTPUT_DNS - [0:0]\n:OTHER - [0:0]\n\
                        -A OUTPUT -p udp -m udp --dport 53 -j ISTIO_OUTPUT_DNS\n\
                        -A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j OTHER\nCOMMIT\n\
                        *raw\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT_DNS - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT_DNS\nCOMMIT\n";
        let text = Rules::istio("*", &[], 15001, None).restore_input(Family::V4, existing);
        assert!(text.contains("-D OUTPUT -p udp -m udp --dport 53 -j ISTIO_OUTPUT_DNS\n"));
        assert!(text.contains("-D OUTPUT -j ISTIO_OUTPUT\n"));
        assert!(text.contains("-F ISTIO_OUTPUT_DNS\n-X ISTIO_OUTPUT_DNS\n"));
        assert!(
            text.contains("*raw\n-D OUTPUT -j ISTIO_OUTPUT_DNS\n-F ISTIO_OUTPUT_DNS\n-X ISTIO_OUTPUT_DNS\nCOMMIT\n"),
            "{text}"
        );
        assert!(!text.contains("OTHER"), "{text}");
        assert!(!text.contains("ISTIO_NOT_NAT"), "{text}");
        assert!(text.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"));
    }

    /// Traffic Director: uid only, everything captured but the metadata server, all DNS.
    #[test]
    fn traffic_director_variant() {
        let text = Rules::traffic_director(&[], 15001).restore_input(Family::V4, EMPTY);
        assert!(!text.contains("gid-owner"));
        assert!(
            !text.contains("-j ISTIO_IN_REDIRECT\n"),
            "no loopback redirect"
        );
        assert!(text.contains(
            "-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"
        ));
        assert!(
            text.contains("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053\n")
        );
        assert!(text.contains("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2\n"));
    }

    /// krun's marked DNS legs (the builtin plane's resolver and its forwarding) get the zones
    /// the owner rules give pilot-agent's, before the nameserver rule claims zone 2 (the first
    /// CT a packet meets wins).
    #[test]
    fn marked_dns_legs_get_the_owner_zones_first() {
        let ns: std::net::IpAddr = "127.0.0.2".parse().expect("ip");
        let text =
            Rules::istio("10.0.0.0/8", &[], 15001, Some(vec![ns])).restore_input(Family::V4, EMPTY);
        let at = |rule: &str| {
            text.find(rule)
                .unwrap_or_else(|| panic!("missing {rule} in {text}"))
        };
        let upstream =
            at("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m mark --mark 0x539 -j CT --zone 1\n");
        let answers =
            at("-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m mark --mark 0x539 -j CT --zone 2\n");
        let app = at("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 127.0.0.2/32 -j CT --zone 2\n");
        assert!(upstream < app && answers < app, "{text}");
    }

    /// Cleanup removes jumps first, then flushes and deletes our chains, nothing else.
    #[test]
    fn cleanup_removes_exactly_ours() {
        assert_eq!(cleanup_input(EMPTY), None);
        let existing = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:OTHER - [0:0]\n\
                        -A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j OTHER\n\
                        -A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n\
                        *raw\n:PREROUTING ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n-A PREROUTING -j ISTIO_INBOUND\nCOMMIT\n";
        assert_eq!(
            cleanup_input(existing).as_deref(),
            Some(
                "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-F ISTIO_REDIRECT\n-X ISTIO_OUTPUT\n-X ISTIO_REDIRECT\nCOMMIT\n\
                 *raw\n-D PREROUTING -j ISTIO_INBOUND\n-F ISTIO_INBOUND\n-X ISTIO_INBOUND\nCOMMIT\n"
            )
        );
    }
}
