//! Traffic capture: how the app's outbound traffic reaches the data plane without the app
//! knowing about the mesh.
//!
//! [`decide`] walks the ladder ([`ladder`]): with root, CAP_NET_ADMIN and working iptables it
//! installs Istio-compatible rules ([`rules`], [`apply`]) once, atomically; otherwise the app
//! runs in whitebox mode with `HTTP_PROXY` and port forwards ([`whitebox`]). It logs one line
//! saying what was chosen and why. `/etc/resolv.conf` is never touched: with DNS capture the
//! rules redirect port 53 to the DNS proxy.

pub mod apply;
pub mod ladder;
pub mod rules;
pub mod whitebox;

use crate::config::Config;
use crate::reaper::Reaper;
use apply::{Backend, Tools};
use ladder::{HostFacts, Rung};
use mesh::istio::{Interception, OUTBOUND_CAPTURE_PORT};
use rules::{DnsScope, Family, Rules};
use std::net::IpAddr;

/// What [`decide`] chose, and what to undo on exit.
#[derive(Debug)]
pub struct Capture {
    /// Feeds `AgentInputs::interception`.
    pub interception: Interception,
    /// Where captured DNS is forwarded: the first nameserver of the resolv.conf the rules were
    /// built from. `None` when DNS is not captured (or resolv.conf names none).
    pub dns_upstream: Option<IpAddr>,
    /// Rulesets installed, removed by [`Capture::cleanup`] when asked.
    installed: Vec<Tools>,
    cleanup: bool,
}

impl Capture {
    /// No capture at all, for a krun that is not in a mesh: a plain `krun -- app` as root must
    /// not touch the host's iptables or route the app's traffic through a proxy.
    pub fn off() -> Capture {
        tracing::info!(
            interception = "off",
            "traffic capture: off, because no mesh is configured (no MESH, mesh-env, XDS address or workload certificate); set ISTIO_META_INTERCEPTION_MODE to capture anyway"
        );
        Capture {
            interception: Interception::Whitebox,
            dns_upstream: None,
            installed: Vec::new(),
            cleanup: false,
        }
    }

    /// Removes the installed rules when `KRUN_CAPTURE_CLEANUP` asked for it.
    pub async fn cleanup(self, reaper: &Reaper) {
        if !self.cleanup || self.installed.is_empty() {
            return;
        }
        for tools in &self.installed {
            match apply::cleanup(reaper, tools).await {
                Ok(()) => {
                    tracing::info!(family = ?tools.family(), "capture rules removed (KRUN_CAPTURE_CLEANUP=true)")
                }
                Err(e) => tracing::warn!(error = %e, "capture rules could not be removed"),
            }
        }
    }
}

/// The rules for this configuration: Traffic Director's script semantics with `MESH=td:`,
/// istio-iptables' otherwise; REDIRECT to the capture listener's port. `resolv_conf` is the
/// text of `/etc/resolv.conf`: its nameservers are the DNS capture's scope, as upstream.
pub fn rules_for(config: &Config, resolv_conf: &str) -> Rules {
    let port = match config.launcher.capture_addr.value.port() {
        0 => OUTBOUND_CAPTURE_PORT,
        port => port,
    };
    let excluded = &config.launcher.outbound_ports_exclude.value;
    let td = config
        .mesh
        .as_ref()
        .is_some_and(|m| m.value.starts_with("td:"));
    let mut rules = if td {
        Rules::traffic_director(excluded, port)
    } else {
        Rules::istio(
            &config.launcher.outbound_ip_ranges_include.value,
            excluded,
            port,
            config
                .launcher
                .capture_dns
                .value
                .then(|| nameservers(resolv_conf)),
        )
    };
    // krun dials these itself without its mark (tunnels and HBONE): never capture them.
    rules.exclude_ports.extend([
        config.launcher.tunnel_port.value,
        config.launcher.hbone_port.value,
        config.launcher.hbone_peer_port.value,
    ]);
    rules.exclude_ports.retain(|p| *p != 0);
    rules.exclude_ports.sort_unstable();
    rules.exclude_ports.dedup();
    rules.inbound_ports = config.launcher.capture_inbound_ports.value.clone();
    rules
}

/// The `nameserver` addresses of a resolv.conf text (zone suffixes such as `%eth0` dropped).
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|addr| addr.split('%').next()?.parse().ok())
        .collect()
}

/// The capture ladder's answer for this host and configuration, read from `/proc` without
/// touching iptables: what [`decide`] starts from, and what `--print-config` reports.
pub fn rung(config: &Config) -> Rung {
    let none = config
        .launcher
        .interception_mode
        .as_ref()
        .is_some_and(|m| m.value.eq_ignore_ascii_case("NONE"));
    let gateway = config.launcher.gateway_name.is_some();
    ladder::choose(
        &HostFacts::probe(),
        none,
        gateway,
        config.launcher.dataplane.value,
    )
}

/// Walks the ladder, installs the rules when capture is possible, and logs the choice.
/// Runs before the supervisor starts (see [`apply`] on why that matters).
pub fn decide(config: &Config) -> Capture {
    let whitebox = |why: &str| {
        tracing::info!(
            interception = "whitebox",
            "traffic capture: whitebox (HTTP_PROXY and KRUN_FORWARD), because {why}"
        );
        Capture {
            interception: Interception::Whitebox,
            dns_upstream: None,
            installed: Vec::new(),
            cleanup: false,
        }
    };
    if let Rung::Whitebox(why) = rung(config) {
        return whitebox(why);
    }
    let backend = match apply::detect_backend() {
        Ok(backend) => backend,
        Err(e) => return whitebox(&format!("iptables is not usable: {e}")),
    };
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut rules = rules_for(config, &resolv_conf);
    if rules
        .dns
        .as_ref()
        .is_some_and(|dns| dns.scope == DnsScope::Servers(Vec::new()))
    {
        tracing::warn!(
            "KRUN_CAPTURE_DNS=true but /etc/resolv.conf names no nameserver: DNS is not captured"
        );
        rules.dns = None;
    }
    let v4 = Tools::new(backend, Family::V4);
    if let Err(e) = apply::apply(&v4, &rules) {
        return whitebox(&format!("the iptables rules could not be installed: {e}"));
    }
    let mut installed = vec![v4];
    let ipv6 = apply::has_ipv6();
    if ipv6 {
        let v6 = Tools::new(backend, Family::V6);
        match apply::apply(&v6, &rules) {
            Ok(()) => installed.push(v6),
            Err(e) => {
                tracing::warn!(error = %e, "IPv6 capture rules could not be installed; IPv6 traffic is not captured")
            }
        }
    }
    tracing::info!(
        interception = "iptables",
        backend = match backend {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        },
        ipv6 = installed.len() > 1,
        redirect_port = rules.proxy_port,
        include = %config.launcher.outbound_ip_ranges_include.value,
        dns = rules.dns.is_some(),
        "traffic capture: iptables, because krun is root with CAP_NET_ADMIN and iptables-restore worked"
    );
    Capture {
        interception: Interception::Iptables,
        dns_upstream: rules
            .dns
            .is_some()
            .then(|| nameservers(&resolv_conf).first().copied())
            .flatten(),
        installed,
        cleanup: config.launcher.capture_cleanup.value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::config::Env;

    fn config(pairs: &[(&str, &str)]) -> Config {
        let env: Env = pairs.iter().map(|(k, v)| (*k, *v)).collect();
        Config::from_env(&env).expect("valid config")
    }

    /// The configured tunnel and HBONE ports are never captured, the REDIRECT goes to the
    /// capture listener's port, the inbound ports and DNS switch come from the config, and the
    /// DNS scope is resolv.conf's nameservers.
    #[test]
    fn rules_follow_the_config() {
        let rules = rules_for(
            &config(&[
                ("KRUN_TUNNEL_PORT", "8443"),
                ("KRUN_HBONE_PORT", "0"),
                ("KRUN_CAPTURE_ADDR", "127.0.0.1:16001"),
                ("KRUN_CAPTURE_DNS", "true"),
                ("KRUN_CAPTURE_INBOUND_PORTS", "8080"),
                ("OUTBOUND_PORTS_EXCLUDE", "5432"),
                ("OUTBOUND_IP_RANGES_INCLUDE", "10.0.0.0/8,172.16.0.0/12"),
            ]),
            "search x.svc\nnameserver 10.0.0.10\nnameserver fe80::1%eth0\n",
        );
        assert_eq!(rules.proxy_port, 16001);
        assert!(rules.exclude_ports.contains(&8443) && rules.exclude_ports.contains(&5432));
        assert!(!rules.exclude_ports.contains(&0));
        assert!(
            !rules.exclude_ports.contains(&15021),
            "mesh ports are not excluded for every destination"
        );
        assert_eq!(rules.include, ["10.0.0.0/8", "172.16.0.0/12"]);
        assert_eq!(rules.inbound_ports, [8080]);
        let servers = ["10.0.0.10", "fe80::1"].map(|ip| ip.parse().expect("ip"));
        assert_eq!(
            rules.dns.map(|dns| (dns.port, dns.scope)),
            Some((mesh::istio::DNS_PORT, DnsScope::Servers(servers.to_vec())))
        );
        assert_eq!(rules.proxy_gids, [mesh::istio::PROXY_GID]);
    }

    /// MESH=td: selects the Traffic Director script's semantics.
    #[test]
    fn traffic_director_mesh_uses_the_td_rules() {
        let rules = rules_for(&config(&[("MESH", "td:projects/p/networks/default")]), "");
        assert!(rules.proxy_gids.is_empty());
        assert_eq!(rules.include, ["*"]);
        assert_eq!(rules.dns.map(|dns| dns.scope), Some(DnsScope::All));
    }
}
