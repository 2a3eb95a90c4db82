//! "Any port works": every run name resolves to the proxy's loopback address, and one nat
//! rule sends every TCP port of that address to the proxy (`http://hello:8080` like
//! `http://hello`). DNAT, not REDIRECT: REDIRECT of local traffic rewrites the destination to
//! 127.0.0.1, where the proxy does not listen. Needs root and iptables; without them only the
//! proxy's own port reaches it, and the log line says so.

use std::net::{IpAddr, SocketAddr};

use crate::capture::apply::{Tools, detect_backend, restore_noflush};
use crate::capture::rules::Family;

/// Installs the redirect; `false` (logged) when it cannot.
pub fn any_port(proxy: SocketAddr) -> bool {
    let IpAddr::V4(_) = proxy.ip() else {
        tracing::info!(%proxy, "run proxy: only its own port is reachable (the any-port redirect is IPv4 only)");
        return false;
    };
    if !nix::unistd::geteuid().is_root() {
        tracing::info!(%proxy, "run proxy: only its own port is reachable (not root, so no iptables redirect of the other ports)");
        return false;
    }
    let installed = detect_backend()
        .and_then(|backend| restore_noflush(&Tools::new(backend, Family::V4), &rule(proxy)));
    match installed {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(%proxy, error = %e, "run proxy: only its own port is reachable (iptables redirect failed)");
            false
        }
    }
}

/// The `iptables-restore` input: first in OUTPUT, so capture rules do not see it first.
fn rule(proxy: SocketAddr) -> String {
    format!(
        "*nat\n-I OUTPUT 1 -d {ip}/32 -p tcp -m comment --comment krun-run-proxy -j DNAT --to-destination {proxy}\nCOMMIT\n",
        ip = proxy.ip()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_port_of_the_proxy_address_goes_to_the_proxy() {
        assert_eq!(
            super::rule("127.0.0.80:80".parse().expect("addr")),
            "*nat\n-I OUTPUT 1 -d 127.0.0.80/32 -p tcp -m comment --comment krun-run-proxy -j DNAT --to-destination 127.0.0.80:80\nCOMMIT\n"
        );
    }
}
