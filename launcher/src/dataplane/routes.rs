//! Where tunnels may go: only to ports the workload declared (the app port, numeric
//! `PORT_<name>` values, `PORT_<name>` targets by name, and the mesh inbound 15003). Anything
//! else is refused before a byte is dialed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hbone::server::{Refusal, Router, StreamContext, Target, Upstream};
use http::StatusCode;

use crate::config::{Config, PortTarget};

/// The mesh inbound port: Envoy's, or the builtin data plane's mTLS terminator.
pub const MESH_INBOUND_PORT: u16 = 15003;

/// Ports the workload declared, by number and by name.
#[derive(Clone, Debug, Default)]
pub struct DeclaredPorts {
    by_port: HashMap<u16, Upstream>,
    by_name: HashMap<String, Upstream>,
}

impl DeclaredPorts {
    /// The `PORT_<name>` declarations of `config`; `mesh_inbound` is where `15003` leads
    /// (Envoy's port, the builtin terminator, or nowhere with no data plane).
    pub fn new(config: &Config, mesh_inbound: Option<SocketAddr>) -> Self {
        let mut ports = DeclaredPorts::default();
        for (name, setting) in &config.launcher.ports {
            let upstream = match &setting.value {
                PortTarget::Local(port) => {
                    let upstream = Upstream::Addr(loopback(*port));
                    ports.by_port.insert(*port, upstream.clone());
                    upstream
                }
                PortTarget::Remote(addr) => Upstream::Host(addr.clone()),
                PortTarget::Disabled => continue,
            };
            ports.by_name.insert(name.clone(), upstream);
        }
        if let Some(addr) = mesh_inbound {
            ports
                .by_port
                .insert(MESH_INBOUND_PORT, Upstream::Addr(addr));
        }
        ports
    }

    fn by_number_or_name(&self, name: &str) -> Option<&Upstream> {
        match name.parse::<u16>() {
            Ok(port) => self.by_port.get(&port),
            Err(_) => self.by_name.get(name),
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn not_declared(what: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("{what} is not a declared port of this workload (PORT_http, PORT_<name>)"),
    )
}

/// The tunnel port (15009): `POST /_hbone/<port or name>` and `CONNECT <host>:<port>` into
/// this instance; the host of a CONNECT is not used (the tunnel only ever reaches this
/// instance's declared ports).
pub struct TunnelRouter(pub DeclaredPorts);

impl Router for TunnelRouter {
    fn route(&self, target: &Target, _ctx: &StreamContext) -> Result<Upstream, Refusal> {
        let found = match target {
            Target::Named(name) => self.0.by_number_or_name(name),
            Target::Authority { port, .. } => self.0.by_port.get(port),
        };
        found
            .cloned()
            .ok_or_else(|| not_declared(&describe(target)))
    }
}

/// Istio HBONE (15008), with ztunnel's checks
/// (<https://github.com/istio/ztunnel/blob/master/src/proxy/inbound.rs>): the authority must be
/// `ip:port` naming this instance (its address or loopback), never one of the mesh's own ports.
pub struct HboneRouter {
    /// Declared app ports.
    pub ports: DeclaredPorts,
    /// Ports a tunnel may never reach (mesh ports: a tunnel into them would loop).
    pub illegal: Vec<u16>,
}

impl Router for HboneRouter {
    fn route(&self, target: &Target, ctx: &StreamContext) -> Result<Upstream, Refusal> {
        let Target::Authority { host, port } = target else {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "HBONE accepts CONNECT only",
            ));
        };
        let ip: IpAddr = host.parse().map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("authority {host}:{port} is not ip:port"),
            )
        })?;
        if ip != ctx.local.ip() && !ip.is_loopback() {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "ip mismatch: {ip} is not this workload ({})",
                    ctx.local.ip()
                ),
            ));
        }
        if self.illegal.contains(port) {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("attempted recursive call to mesh port {port}"),
            ));
        }
        self.ports
            .by_port
            .get(port)
            .cloned()
            .ok_or_else(|| not_declared(&format!("port {port}")))
    }
}

fn describe(target: &Target) -> String {
    match target {
        Target::Named(name) => format!("/_hbone/{name}"),
        Target::Authority { host, port } => format!("{host}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::config::Env;

    fn ports(pairs: &[(&str, &str)], inbound: Option<SocketAddr>) -> DeclaredPorts {
        let env: Env = pairs.iter().map(|(k, v)| (*k, *v)).collect();
        DeclaredPorts::new(&Config::from_env(&env).expect("valid"), inbound)
    }

    fn ctx() -> StreamContext {
        StreamContext {
            peer: None,
            local: "10.1.2.3:15008".parse().expect("addr"),
        }
    }

    #[test]
    fn tunnel_reaches_declared_ports_by_number_and_name_only() {
        let router = TunnelRouter(ports(
            &[
                ("PORT_http", "8080"),
                ("PORT_grpc", "9090"),
                ("PORT_db", "db:5432"),
            ],
            Some(loopback(40000)),
        ));
        let route = |t: Target| router.route(&t, &ctx());
        assert_eq!(
            route(Target::Named("8080".into())),
            Ok(Upstream::Addr(loopback(8080)))
        );
        assert_eq!(
            route(Target::Named("grpc".into())),
            Ok(Upstream::Addr(loopback(9090)))
        );
        assert_eq!(
            route(Target::Named("db".into())),
            Ok(Upstream::Host("db:5432".into()))
        );
        assert_eq!(
            route(Target::Named("15003".into())),
            Ok(Upstream::Addr(loopback(40000)))
        );
        assert_eq!(
            route(Target::Authority {
                host: "x".into(),
                port: 9090
            }),
            Ok(Upstream::Addr(loopback(9090)))
        );
        assert_eq!(
            route(Target::Named("22".into())).map_err(|r| r.status),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            route(Target::Named("ssh".into())).map_err(|r| r.status),
            Err(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn hbone_checks_ip_and_illegal_ports_like_ztunnel() {
        let router = HboneRouter {
            ports: ports(&[("PORT_http", "8080")], None),
            illegal: vec![15008, 15009],
        };
        let route = |host: &str, port: u16| {
            router
                .route(
                    &Target::Authority {
                        host: host.into(),
                        port,
                    },
                    &ctx(),
                )
                .map_err(|r| r.status)
        };
        assert_eq!(route("10.1.2.3", 8080), Ok(Upstream::Addr(loopback(8080))));
        assert_eq!(route("127.0.0.1", 8080), Ok(Upstream::Addr(loopback(8080))));
        assert_eq!(route("10.9.9.9", 8080), Err(StatusCode::BAD_REQUEST));
        assert_eq!(route("example.com", 8080), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            route("10.1.2.3", 15008),
            Err(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(route("10.1.2.3", 22), Err(StatusCode::NOT_FOUND));
    }
}
