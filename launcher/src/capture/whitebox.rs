//! Whitebox mode: without capture the app reaches the mesh through the data plane's HTTP
//! proxy (`HTTP_PROXY`) and, for other TCP clients, through declared localhost port forwards
//! (`KRUN_FORWARD`, served by the data plane).

use std::net::{Ipv4Addr, SocketAddr};

/// Never proxied: loopback and the metadata server (its tokens must not leave the host).
pub const NO_PROXY: &str = "localhost,127.0.0.1,::1,169.254.169.254,metadata.google.internal";

/// The proxy variables the app gets, as proper URLs (cloud-run-mesh left out the scheme).
/// An unspecified listen address is reached on loopback.
pub fn proxy_env(proxy: SocketAddr) -> [(&'static str, String); 4] {
    let host = if proxy.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, proxy.port()))
    } else {
        proxy
    };
    let url = format!("http://{host}");
    [
        ("HTTP_PROXY", url.clone()),
        ("http_proxy", url),
        ("NO_PROXY", NO_PROXY.to_owned()),
        ("no_proxy", NO_PROXY.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// URLs with a scheme, loopback for a wildcard listener, and NO_PROXY for the metadata server.
    #[test]
    fn proxy_urls() {
        let env = proxy_env("0.0.0.0:15007".parse().expect("addr"));
        assert_eq!(env[0], ("HTTP_PROXY", "http://127.0.0.1:15007".to_owned()));
        assert_eq!(env[1].1, "http://127.0.0.1:15007");
        assert!(env[2].1.contains("169.254.169.254"));
        assert!(env[3].1.contains("127.0.0.1"));
    }
}
