//! The capture ruleset as data: a pure function from settings to `iptables-restore` input.
//!
//! The rules follow Istio's `istio-iptables`
//! (<https://github.com/istio/istio/blob/master/tools/istio-iptables/pkg/capture/run.go>), with
//! the settings cloud-run-mesh runs it with, so that Envoy, pilot-agent and krun's builtin data
//! plane all see the traffic they expect: chains `ISTIO_OUTPUT`, `ISTIO_REDIRECT`,
//! `ISTIO_INBOUND`, `ISTIO_IN_REDIRECT` (and `ISTIO_OUTPUT_DNS` for DNS capture) in the `nat`
//! table. The Traffic Director variant, the rules of cloud-run-mesh's `scripts/iptables.sh`,
//! comes from the same generator with other settings ([`Rules::traffic_director`]).
//!
//! Applying is idempotent because the input is computed against the current `iptables-save`:
//! our jumps that exist are deleted and re-added, our chains are flushed (declared) and
//! refilled, and stale chains of ours are removed. Nothing else is touched.

use std::fmt::Write;

use mesh::istio::{DNS_PORT, INBOUND_CAPTURE_PORT, PROXY_GID, PROXY_UID};

/// Prefix of every chain krun owns (Istio's names, so a later `istio-iptables clean` works).
pub const CHAIN_PREFIX: &str = "ISTIO_";
/// The socket mark krun puts on its own outbound sockets; marked traffic is never captured.
pub const KRUN_MARK: u32 = 0x539;
/// The GCE metadata server: credentials must never go through the mesh.
pub const METADATA_CIDR: &str = "169.254.169.254/32";

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

    fn holds(self, cidr: &str) -> bool {
        cidr.contains(':') == (self == Family::V6)
    }
}

/// What to capture. Build with [`Rules::istio`] or [`Rules::traffic_director`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// REDIRECT target of captured outbound TCP (15001).
    pub proxy_port: u16,
    /// REDIRECT target of captured inbound TCP.
    pub inbound_port: u16,
    /// Inbound ports to capture (none by default).
    pub inbound_ports: Vec<u16>,
    /// CIDRs captured outbound; `*` means everything.
    pub include: Vec<String>,
    /// CIDRs never captured (the metadata server).
    pub exclude: Vec<String>,
    /// Destination ports never captured.
    pub exclude_ports: Vec<u16>,
    /// Traffic of this uid is not captured.
    pub proxy_uid: Option<u32>,
    /// Traffic of this gid is not captured (what exempts pilot-agent and Envoy).
    pub proxy_gid: Option<u32>,
    /// Sockets with this mark are not captured (krun's own).
    pub mark: u32,
    /// Istio's rule sending the proxy's loopback calls to non-127.0.0.1 back inbound.
    pub loopback_redirect: bool,
    /// DNS (udp and tcp 53) goes to this port.
    pub dns_port: Option<u16>,
}

impl Rules {
    /// The `istio-iptables -u 1337 -g 1337 -i <include> -o <exclude>` ruleset, plus the
    /// metadata exclusion and krun's mark.
    pub fn istio(include: &str, exclude_ports: &[u16], proxy_port: u16, dns: bool) -> Rules {
        let mut ports: Vec<u16> = mesh::istio::MESH_PORTS
            .iter()
            .chain(exclude_ports)
            .copied()
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Rules {
            proxy_port,
            inbound_port: INBOUND_CAPTURE_PORT,
            inbound_ports: Vec::new(),
            include: mesh::config::values::list(include),
            exclude: vec![METADATA_CIDR.to_owned()],
            exclude_ports: ports,
            proxy_uid: Some(PROXY_UID),
            proxy_gid: Some(PROXY_GID),
            mark: KRUN_MARK,
            loopback_redirect: true,
            dns_port: dns.then_some(DNS_PORT),
        }
    }

    /// The ruleset of cloud-run-mesh's Traffic Director script (`scripts/iptables.sh`, run with
    /// the proxy uid only): Envoy runs as uid 1337 (no gid rule), everything but the metadata
    /// server is captured, no loopback self-redirect, and DNS to 15053.
    pub fn traffic_director(exclude_ports: &[u16], proxy_port: u16) -> Rules {
        Rules {
            include: vec!["*".to_owned()],
            proxy_gid: None,
            loopback_redirect: false,
            ..Rules::istio("*", exclude_ports, proxy_port, true)
        }
    }

    /// The chains this ruleset fills, in declaration order.
    fn chains(&self) -> Vec<&'static str> {
        let mut chains = vec!["ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"];
        if self.dns_port.is_some() {
            chains.push("ISTIO_OUTPUT_DNS");
        }
        chains.push("ISTIO_REDIRECT");
        chains
    }

    /// The rules proper (chain contents and jumps), without the table header.
    fn body(&self, family: Family) -> Vec<String> {
        let mut rules = Vec::new();
        let mut rule = |chain: &str, spec: String| rules.push(format!("-A {chain} {spec}"));
        let owners = || {
            let mut owners = Vec::new();
            if let Some(uid) = self.proxy_uid {
                owners.push(format!("--uid-owner {uid}"));
            }
            if let Some(gid) = self.proxy_gid {
                owners.push(format!("--gid-owner {gid}"));
            }
            owners
        };
        // Inbound.
        if !self.inbound_ports.is_empty() {
            for port in &self.inbound_ports {
                rule(
                    "ISTIO_INBOUND",
                    format!("-p tcp --dport {port} -j ISTIO_IN_REDIRECT"),
                );
            }
        }
        rule(
            "ISTIO_IN_REDIRECT",
            format!("-p tcp -j REDIRECT --to-ports {}", self.inbound_port),
        );
        // Outbound.
        let mark = self.mark;
        rule(
            "ISTIO_OUTPUT",
            format!("-m mark --mark {mark:#x} -j RETURN"),
        );
        for port in &self.exclude_ports {
            rule("ISTIO_OUTPUT", format!("-p tcp --dport {port} -j RETURN"));
        }
        if family == Family::V4 {
            rule("ISTIO_OUTPUT", "-s 127.0.0.6/32 -o lo -j RETURN".to_owned());
        }
        let loopback = family.loopback();
        for owner in owners() {
            if self.loopback_redirect {
                rule(
                    "ISTIO_OUTPUT",
                    format!("! -d {loopback} -o lo -m owner {owner} -j ISTIO_IN_REDIRECT"),
                );
            }
            rule(
                "ISTIO_OUTPUT",
                format!("-o lo -m owner ! {owner} -j RETURN"),
            );
            rule("ISTIO_OUTPUT", format!("-m owner {owner} -j RETURN"));
        }
        rule("ISTIO_OUTPUT", format!("-d {loopback} -j RETURN"));
        for cidr in self.exclude.iter().filter(|c| family.holds(c)) {
            rule("ISTIO_OUTPUT", format!("-d {cidr} -j RETURN"));
        }
        if self.include.iter().any(|c| c == "*") {
            rule("ISTIO_OUTPUT", "-j ISTIO_REDIRECT".to_owned());
        } else {
            for cidr in self.include.iter().filter(|c| family.holds(c)) {
                rule("ISTIO_OUTPUT", format!("-d {cidr} -j ISTIO_REDIRECT"));
            }
            rule("ISTIO_OUTPUT", "-j RETURN".to_owned());
        }
        rule(
            "ISTIO_REDIRECT",
            format!("-p tcp -j REDIRECT --to-ports {}", self.proxy_port),
        );
        // DNS: the proxy's own queries (mark, uid, gid) go out; everyone else's to the proxy.
        if let Some(dns) = self.dns_port {
            rule(
                "ISTIO_OUTPUT_DNS",
                format!("-m mark --mark {mark:#x} -j RETURN"),
            );
            for owner in owners() {
                rule("ISTIO_OUTPUT_DNS", format!("-m owner {owner} -j RETURN"));
            }
            for proto in ["udp", "tcp"] {
                rule(
                    "ISTIO_OUTPUT_DNS",
                    format!("-p {proto} -j REDIRECT --to-ports {dns}"),
                );
            }
        }
        rules.extend(self.jumps());
        rules
    }

    /// Jumps from the built-in chains into ours.
    fn jumps(&self) -> Vec<String> {
        let mut jumps = Vec::new();
        if self.dns_port.is_some() {
            jumps.push("-A OUTPUT -p udp -m udp --dport 53 -j ISTIO_OUTPUT_DNS".to_owned());
            jumps.push("-A OUTPUT -p tcp -m tcp --dport 53 -j ISTIO_OUTPUT_DNS".to_owned());
        }
        jumps.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".to_owned());
        if !self.inbound_ports.is_empty() {
            jumps.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".to_owned());
        }
        jumps
    }

    /// `iptables-restore --noflush` input that makes the nat table hold exactly this ruleset
    /// among our chains, given `existing` (the current `iptables-save -t nat` output).
    pub fn restore_input(&self, family: Family, existing: &str) -> String {
        let ours = self.chains();
        let mut out = String::from("*nat\n");
        for chain in &ours {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        let present = Present::parse(existing);
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
        for rule in self.body(family) {
            let _ = writeln!(out, "{rule}");
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// Input that removes every chain and jump of ours from `existing`, or `None` when there is
/// nothing to remove.
pub fn cleanup_input(existing: &str) -> Option<String> {
    let present = Present::parse(existing);
    if present.chains.is_empty() && present.jumps.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
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
    Some(out)
}

/// Our chains and the jumps into them found in an `iptables-save` nat table.
struct Present {
    chains: Vec<String>,
    /// Whole `-A <builtin> ... -j ISTIO_*` lines.
    jumps: Vec<String>,
}

impl Present {
    fn parse(save: &str) -> Present {
        let mut chains = Vec::new();
        let mut jumps = Vec::new();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
                continue;
            }
            if !in_nat {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

    /// The default Istio ruleset on a fresh table, as `iptables-restore` reads it.
    #[test]
    fn istio_default_ruleset() {
        let rules = Rules::istio("10.0.0.0/8", &[5432], 15001, false);
        let text = rules.restore_input(Family::V4, EMPTY);
        let mut expected = String::from(
            "*nat\n:ISTIO_INBOUND - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n\
             -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n\
             -A ISTIO_OUTPUT -m mark --mark 0x539 -j RETURN\n",
        );
        for port in [
            5432, 15001, 15006, 15007, 15008, 15009, 15021, 15030, 15053, 15463,
        ] {
            expected.push_str(&format!(
                "-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN\n"
            ));
        }
        expected.push_str(
            "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN\n\
             -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT\n\
             -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT\n\
             -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n\
             -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n\
             -A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN\n\
             -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT\n\
             -A ISTIO_OUTPUT -j RETURN\n\
             -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
             -A OUTPUT -p tcp -j ISTIO_OUTPUT\n\
             COMMIT\n",
        );
        assert_eq!(text, expected);
    }

    /// Re-applying deletes the jumps that exist before adding them again, and drops a stale
    /// chain of ours that the new ruleset no longer uses; other chains are left alone.
    #[test]
    fn reapplying_replaces_only_ours() {
        let existing = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ISTIO_NOT_NAT\nCOMMIT\n\
                        *nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_OUTPUT_DNS - [0:0]\n:OTHER - [0:0]\n\
                        -A OUTPUT -p udp -m udp --dport 53 -j ISTIO_OUTPUT_DNS\n\
                        -A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A OUTPUT -j OTHER\nCOMMIT\n";
        let text = Rules::istio("*", &[], 15001, false).restore_input(Family::V4, existing);
        assert!(text.contains("-D OUTPUT -p udp -m udp --dport 53 -j ISTIO_OUTPUT_DNS\n"));
        assert!(text.contains("-D OUTPUT -p tcp -j ISTIO_OUTPUT\n"));
        assert!(text.contains("-F ISTIO_OUTPUT_DNS\n-X ISTIO_OUTPUT_DNS\n"));
        assert!(!text.contains("OTHER"), "{text}");
        assert!(!text.contains("ISTIO_NOT_NAT"), "{text}");
        assert!(text.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"));
        assert!(!text.contains("-A ISTIO_OUTPUT -j RETURN"));
    }

    /// DNS capture adds the DNS chain with the proxy's exemptions and both protocols.
    #[test]
    fn dns_capture() {
        let text = Rules::istio("10.0.0.0/8", &[], 15001, true).restore_input(Family::V4, EMPTY);
        for line in [
            ":ISTIO_OUTPUT_DNS - [0:0]",
            "-A ISTIO_OUTPUT_DNS -m mark --mark 0x539 -j RETURN",
            "-A ISTIO_OUTPUT_DNS -m owner --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT_DNS -m owner --gid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT_DNS -p udp -j REDIRECT --to-ports 15053",
            "-A ISTIO_OUTPUT_DNS -p tcp -j REDIRECT --to-ports 15053",
            "-A OUTPUT -p udp -m udp --dport 53 -j ISTIO_OUTPUT_DNS",
            "-A OUTPUT -p tcp -m tcp --dport 53 -j ISTIO_OUTPUT_DNS",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    /// IPv6 mirrors the rules with ::1 and only the IPv6 ranges.
    #[test]
    fn ipv6_mirror() {
        let text =
            Rules::istio("10.0.0.0/8,fd00::/8", &[], 15001, false).restore_input(Family::V6, EMPTY);
        assert!(text.contains("-A ISTIO_OUTPUT -d ::1/128 -j RETURN\n"));
        assert!(text.contains("-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT\n"));
        assert!(!text.contains("10.0.0.0/8"));
        assert!(!text.contains("169.254.169.254"));
        assert!(!text.contains("127.0.0.6"));
    }

    /// Traffic Director: uid only, everything captured but the metadata server, DNS on.
    #[test]
    fn traffic_director_variant() {
        let text = Rules::traffic_director(&[], 15001).restore_input(Family::V4, EMPTY);
        assert!(!text.contains("gid-owner"));
        assert!(
            !text.contains("ISTIO_IN_REDIRECT\n-A"),
            "no loopback redirect"
        );
        assert!(text.contains(
            "-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"
        ));
        assert!(text.contains("-A ISTIO_OUTPUT_DNS -p udp -j REDIRECT --to-ports 15053\n"));
    }

    /// Inbound capture ports redirect to 15006 from PREROUTING.
    #[test]
    fn inbound_ports() {
        let mut rules = Rules::istio("*", &[], 15001, false);
        rules.inbound_ports = vec![8080];
        let text = rules.restore_input(Family::V4, EMPTY);
        assert!(text.contains("-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT\n"));
        assert!(text.contains("-A PREROUTING -p tcp -j ISTIO_INBOUND\n"));
    }

    /// Cleanup removes jumps first, then flushes and deletes our chains, nothing else.
    #[test]
    fn cleanup_removes_exactly_ours() {
        assert_eq!(cleanup_input(EMPTY), None);
        let existing = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:OTHER - [0:0]\n\
                        -A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A OUTPUT -j OTHER\n\
                        -A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
        assert_eq!(
            cleanup_input(existing).as_deref(),
            Some(
                "*nat\n-D OUTPUT -p tcp -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-F ISTIO_REDIRECT\n-X ISTIO_OUTPUT\n-X ISTIO_REDIRECT\nCOMMIT\n"
            )
        );
    }
}
