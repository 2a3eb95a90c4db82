//! The decision ladder: capture with iptables when krun can, whitebox otherwise. A pure
//! function of what was found about the host, so every rung is unit-tested; [`HostFacts::probe`]
//! gathers the facts cheaply (files under `/proc`, no process).

use crate::config::DataPlane;

/// What decides whether iptables capture is possible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// krun's effective uid is 0.
    pub root: bool,
    /// CAP_NET_ADMIN is in krun's effective capabilities.
    pub net_admin: bool,
    /// The kernel is gVisor's (Cloud Run gen1): no iptables.
    pub gvisor: bool,
}

/// CAP_NET_ADMIN's bit in the capability sets.
const CAP_NET_ADMIN: u32 = 12;
/// gVisor's fixed `/proc/version`.
const GVISOR_VERSION: &str = "#1 SMP Sun Jan 10 15:06:54 PST 2016";

impl HostFacts {
    /// Reads the facts from `/proc/self/status` and `/proc/version`.
    pub fn probe() -> HostFacts {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let version = std::fs::read_to_string("/proc/version").unwrap_or_default();
        HostFacts::parse(nix::unistd::geteuid().is_root(), &status, &version)
    }

    /// The facts from the texts of `/proc/self/status` and `/proc/version`.
    pub fn parse(root: bool, status: &str, version: &str) -> HostFacts {
        let net_admin = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0);
        HostFacts {
            root,
            net_admin,
            gvisor: version.contains(GVISOR_VERSION) || version.contains("gVisor"),
        }
    }
}

/// The rung chosen before trying iptables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rung {
    /// Try iptables.
    Capture,
    /// No capture, for the reason given.
    Whitebox(&'static str),
}

/// Picks the rung: the first reason not to capture wins.
pub fn choose(
    facts: &HostFacts,
    interception_none: bool,
    gateway: bool,
    dataplane: DataPlane,
) -> Rung {
    if interception_none {
        Rung::Whitebox("ISTIO_META_INTERCEPTION_MODE=NONE")
    } else if dataplane == DataPlane::None {
        Rung::Whitebox("there is no data plane to capture to (KRUN_DATAPLANE=none)")
    } else if gateway {
        Rung::Whitebox("a gateway (GATEWAY_NAME) receives traffic, it does not capture it")
    } else if facts.gvisor {
        Rung::Whitebox("the kernel is gVisor (Cloud Run gen1), which has no iptables")
    } else if !facts.root {
        Rung::Whitebox("krun does not run as root")
    } else if !facts.net_admin {
        Rung::Whitebox("krun lacks CAP_NET_ADMIN")
    } else {
        Rung::Capture
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_CAPS: &str = "Name:\tkrun\nCapEff:\t000001ffffffffff\n";
    const NO_NET_ADMIN: &str = "CapEff:\t00000000a80425fb\n";
    const LINUX: &str = "Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)";
    const GVISOR: &str = "Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016";

    /// Each reason not to capture, in ladder order, and capture when none applies.
    #[test]
    fn ladder() {
        let root = HostFacts::parse(true, ROOT_CAPS, LINUX);
        assert!(root.net_admin);
        assert_eq!(
            choose(&root, false, false, DataPlane::Builtin),
            Rung::Capture
        );
        assert_eq!(
            choose(&root, true, false, DataPlane::Builtin),
            Rung::Whitebox("ISTIO_META_INTERCEPTION_MODE=NONE")
        );
        assert!(
            matches!(choose(&root, false, false, DataPlane::None), Rung::Whitebox(w) if w.contains("KRUN_DATAPLANE=none"))
        );
        assert!(
            matches!(choose(&root, false, true, DataPlane::Envoy), Rung::Whitebox(w) if w.contains("gateway"))
        );
        let gvisor = HostFacts::parse(true, ROOT_CAPS, GVISOR);
        assert!(
            matches!(choose(&gvisor, false, false, DataPlane::Envoy), Rung::Whitebox(w) if w.contains("gVisor"))
        );
        let user = HostFacts::parse(false, ROOT_CAPS, LINUX);
        assert_eq!(
            choose(&user, false, false, DataPlane::Envoy),
            Rung::Whitebox("krun does not run as root")
        );
        let dropped = HostFacts::parse(true, NO_NET_ADMIN, LINUX);
        assert!(!dropped.net_admin);
        assert_eq!(
            choose(&dropped, false, false, DataPlane::Envoy),
            Rung::Whitebox("krun lacks CAP_NET_ADMIN")
        );
    }
}
