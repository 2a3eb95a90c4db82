//! Where tunnels may go. Istio HBONE (15008, mTLS): to ports the workload declared (the app
//! port, numeric `PORT_<name>` values). The tunnel port (15009, public on Cloud Run, no
//! authentication of its own): only to the mesh mTLS terminator behind `/_hbone/15003`, where
//! the peer proves its mesh identity, plus the declared ports opted in with
//! `KRUN_TUNNEL_PLAINTEXT`. Anything else is refused before a byte is dialed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hbone::server::{Refusal, Router, StreamContext, Target, Upstream};
use http::StatusCode;

use crate::config::{Config, PortTarget};

/// The mesh inbound port: Envoy's, or the builtin data plane's mTLS terminator.
pub const MESH_INBOUND_PORT: u16 = 15003;

/// Ports the workload declared, by number and by name, and where `15003` leads.
#[derive(Clone, Debug, Default)]
pub struct DeclaredPorts {
    by_port: HashMap<u16, Upstream>,
    by_name: HashMap<String, Upstream>,
    mesh_inbound: Option<Upstream>,
}

impl DeclaredPorts {
    /// The `PORT_<name>` declarations of `config`; `mesh_inbound` is where `15003` leads
    /// (Envoy's port, the builtin terminator, or nowhere with no data plane).
    pub fn new(config: &Config, mesh_inbound: Option<SocketAddr>) -> Self {
        let mut ports = DeclaredPorts {
            mesh_inbound: mesh_inbound.map(Upstream::Addr),
            ..DeclaredPorts::default()
        };
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
        ports
    }

    fn by_number_or_name(&self, name: &str) -> Option<&Upstream> {
        match name.parse::<u16>() {
            Ok(port) => self.by_port.get(&port),
            Err(_) => self.by_name.get(name),
        }
    }

    /// The declarations `listed` selects (`KRUN_TUNNEL_PLAINTEXT`): a name selects that
    /// `PORT_<name>`, a number the local port it names; a local port is selected under its
    /// number and every name that declares it. `public_http` false (`KRUN_PUBLIC_HTTP=off`)
    /// closes the app to the tunnel port, so listing a local port then is a contradiction.
    fn select(&self, listed: &[String], public_http: bool) -> Result<DeclaredPorts, String> {
        let mut selected = DeclaredPorts::default();
        for entry in listed {
            let upstream = match entry.parse::<u16>() {
                Ok(port) => self.by_port.get(&port).ok_or_else(|| {
                    format!("KRUN_TUNNEL_PLAINTEXT lists {entry}, but no PORT_<name> declares local port {entry}; list remote host:port targets by name")
                })?,
                Err(_) => self.by_name.get(entry).ok_or_else(|| {
                    format!("KRUN_TUNNEL_PLAINTEXT lists {entry}, but PORT_{entry} is not declared")
                })?,
            };
            match local_port(upstream) {
                Some(_) if !public_http => {
                    return Err(format!(
                        "KRUN_TUNNEL_PLAINTEXT lists {entry} ({upstream}, a port of the app), but KRUN_PUBLIC_HTTP=off closes the app to the tunnel port; remove one of the two"
                    ));
                }
                Some(port) => {
                    selected.by_port.insert(port, upstream.clone());
                    for (name, declared) in &self.by_name {
                        if declared == upstream {
                            selected.by_name.insert(name.clone(), upstream.clone());
                        }
                    }
                }
                None => {
                    selected.by_name.insert(entry.clone(), upstream.clone());
                }
            }
        }
        Ok(selected)
    }

    /// `/_hbone/<name or port> -> upstream` for each declaration, sorted, for the log.
    fn describe(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .by_port
            .iter()
            .map(|(port, up)| format!("{port} -> {up}"))
            .chain(
                self.by_name
                    .iter()
                    .map(|(name, up)| format!("{name} -> {up}")),
            )
            .collect();
        lines.sort();
        lines
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The port of an upstream on loopback: a port of the app.
fn local_port(upstream: &Upstream) -> Option<u16> {
    match upstream {
        Upstream::Addr(addr) if addr.ip() == IpAddr::from(Ipv4Addr::LOCALHOST) => Some(addr.port()),
        _ => None,
    }
}

fn not_declared(what: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("{what} is not a declared port of this workload (PORT_http, PORT_<name>)"),
    )
}

/// The tunnel port (15009): `POST /_hbone/<port or name>` and `CONNECT <host>:<port>` into
/// this instance (the host of a CONNECT is not used). It authenticates nobody itself (on
/// Cloud Run, anyone who may invoke the service reaches it), so by default it leads only to
/// `15003`, the mesh mTLS terminator, which checks the peer's certificate and
/// `KRUN_ALLOWED_PRINCIPALS`. Plaintext tunnels to declared ports are opt-in. Every other
/// target gets the same 403, so the answer does not tell which ports are declared.
pub struct TunnelRouter {
    mesh_inbound: Option<Upstream>,
    plaintext: DeclaredPorts,
}

impl TunnelRouter {
    /// The router for `config`'s `KRUN_TUNNEL_PLAINTEXT` over `ports`; an entry that names
    /// no declaration, or contradicts `KRUN_PUBLIC_HTTP=off`, is an error naming it. Logs one
    /// warning listing what the opt-in exposes.
    pub fn new(ports: &DeclaredPorts, config: &Config) -> Result<TunnelRouter, String> {
        let plaintext = ports.select(
            &config.launcher.tunnel_plaintext.value,
            config.launcher.public_http.value,
        )?;
        let exposed = plaintext.describe();
        if !exposed.is_empty() {
            tracing::warn!(
                ?exposed,
                "KRUN_TUNNEL_PLAINTEXT: the tunnel port carries unauthenticated plaintext tunnels to these targets; anyone who reaches the port reaches them"
            );
        }
        Ok(TunnelRouter {
            mesh_inbound: ports.mesh_inbound.clone(),
            plaintext,
        })
    }
}

impl Router for TunnelRouter {
    fn route(&self, target: &Target, _ctx: &StreamContext) -> Result<Upstream, Refusal> {
        let port = match target {
            Target::Named(name) => name.parse::<u16>().ok(),
            Target::Authority { port, .. } => Some(*port),
        };
        if port == Some(MESH_INBOUND_PORT) {
            return self.mesh_inbound.clone().ok_or_else(|| {
                Refusal::new(
                    StatusCode::NOT_FOUND,
                    "no mesh mTLS terminator runs here (15003 needs the envoy or builtin data plane and a workload certificate)",
                )
            });
        }
        let found = match target {
            Target::Named(name) => self.plaintext.by_number_or_name(name),
            Target::Authority { port, .. } => self.plaintext.by_port.get(port),
        };
        found.cloned().ok_or_else(|| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{}: the tunnel port leads only to the mesh mTLS terminator (/_hbone/{MESH_INBOUND_PORT}); plaintext tunnels are opt-in (KRUN_TUNNEL_PLAINTEXT)",
                    describe(target)
                ),
            )
        })
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
            remote: "10.9.8.7:40000".parse().expect("addr"),
        }
    }

    const DECLARED: &[(&str, &str)] = &[
        ("PORT_http", "8080"),
        ("PORT_web", "8080"),
        ("PORT_grpc", "9090"),
        ("PORT_db", "db:5432"),
    ];

    fn tunnel(extra: &[(&str, &str)]) -> Result<TunnelRouter, String> {
        let pairs: Vec<(&str, &str)> = DECLARED.iter().chain(extra).copied().collect();
        let env: Env = pairs.iter().map(|(k, v)| (*k, *v)).collect();
        let config = Config::from_env(&env).expect("valid");
        TunnelRouter::new(&DeclaredPorts::new(&config, Some(loopback(40000))), &config)
    }

    fn named(router: &TunnelRouter, name: &str) -> Result<Upstream, StatusCode> {
        router
            .route(&Target::Named(name.into()), &ctx())
            .map_err(|r| r.status)
    }

    fn connect(router: &TunnelRouter, port: u16) -> Result<Upstream, StatusCode> {
        let target = Target::Authority {
            host: "x".into(),
            port,
        };
        router.route(&target, &ctx()).map_err(|r| r.status)
    }

    fn error_of(extra: &[(&str, &str)]) -> String {
        match tunnel(extra) {
            Ok(_) => "no error".into(),
            Err(e) => e,
        }
    }

    #[test]
    fn tunnel_reaches_only_the_mesh_terminator_by_default() {
        let router = tunnel(&[]).expect("router");
        assert_eq!(named(&router, "15003"), Ok(Upstream::Addr(loopback(40000))));
        assert_eq!(connect(&router, 15003), Ok(Upstream::Addr(loopback(40000))));
        // Declared or not, every plaintext target gets the same answer.
        for name in ["8080", "http", "grpc", "9090", "db", "5432", "22", "ssh"] {
            assert_eq!(named(&router, name), Err(StatusCode::FORBIDDEN), "{name}");
        }
        assert_eq!(connect(&router, 8080), Err(StatusCode::FORBIDDEN));
        let config = Config::from_env(&Env::default()).expect("valid");
        let no_terminator =
            TunnelRouter::new(&DeclaredPorts::new(&config, None), &config).expect("router");
        assert_eq!(named(&no_terminator, "15003"), Err(StatusCode::NOT_FOUND));
    }

    #[test]
    fn plaintext_opt_in_selects_a_port_under_its_number_and_every_name() {
        let by_name = tunnel(&[("KRUN_TUNNEL_PLAINTEXT", "http")]).expect("router");
        let by_number = tunnel(&[("KRUN_TUNNEL_PLAINTEXT", "8080")]).expect("router");
        for router in [&by_name, &by_number] {
            for name in ["8080", "http", "web"] {
                assert_eq!(named(router, name), Ok(Upstream::Addr(loopback(8080))));
            }
            assert_eq!(connect(router, 8080), Ok(Upstream::Addr(loopback(8080))));
            assert_eq!(named(router, "grpc"), Err(StatusCode::FORBIDDEN));
            assert_eq!(named(router, "db"), Err(StatusCode::FORBIDDEN));
        }
    }

    #[test]
    fn a_remote_target_is_reachable_only_listed_by_name() {
        let router = tunnel(&[("KRUN_TUNNEL_PLAINTEXT", "db")]).expect("router");
        assert_eq!(named(&router, "db"), Ok(Upstream::Host("db:5432".into())));
        assert_eq!(named(&router, "5432"), Err(StatusCode::FORBIDDEN));
        assert_eq!(connect(&router, 5432), Err(StatusCode::FORBIDDEN));
        assert_eq!(named(&router, "http"), Err(StatusCode::FORBIDDEN));
        let err = error_of(&[("KRUN_TUNNEL_PLAINTEXT", "5432")]);
        assert!(
            err.contains("list remote host:port targets by name"),
            "{err}"
        );
    }

    #[test]
    fn plaintext_entries_must_name_a_declaration_and_agree_with_public_http() {
        let err = error_of(&[("KRUN_TUNNEL_PLAINTEXT", "admin")]);
        assert!(err.contains("PORT_admin is not declared"), "{err}");
        let err = error_of(&[
            ("KRUN_TUNNEL_PLAINTEXT", "grpc"),
            ("KRUN_PUBLIC_HTTP", "off"),
        ]);
        assert!(err.contains("KRUN_PUBLIC_HTTP=off closes the app"), "{err}");
        // A remote target is not the app: KRUN_PUBLIC_HTTP does not decide about it.
        let router = tunnel(&[("KRUN_TUNNEL_PLAINTEXT", "db"), ("KRUN_PUBLIC_HTTP", "off")])
            .expect("router");
        assert_eq!(named(&router, "db"), Ok(Upstream::Host("db:5432".into())));
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
