//! The mesh side of the workload: the tunnel port (15009), Istio HBONE (15008), and, with the
//! builtin data plane, the mTLS terminator behind `/_hbone/15003` and the outbound proxy.
//!
//! Listeners that serve the mesh start before the app; the tunnel port opens last, once the
//! app is ready, because Cloud Run sends traffic as soon as the container port accepts. On
//! drain every listener stops accepting and open streams get the drain budget to finish.
//!
//! Outside a mesh (no identity, nothing discovered, no mounted certificate) krun opens no
//! listener unless one is asked for: the tunnel port with `KRUN_TUNNEL_PORT`, or `PORT` (the
//! platform's container port) naming it; the outbound proxy with `KRUN_OUTBOUND_ADDR`;
//! `KRUN_FORWARD` listeners always.

mod certs;
pub mod connect_headers;
mod forward;
mod inbound;
mod outbound;
pub mod redirect;
pub mod route;
mod routes;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hbone::listen::Bounds;
use hbone::server::{Fallback, MeshTls, TunnelServer};
use hbone::tls::{ALPN_H2, WorkloadCert};
use hbone::{AllowedPeers, H2Settings, SpiffeId};
use mesh::identity::CertStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use certs::OnDemand;
pub use certs::{CertError, WORKLOAD_CERT_DIR, follow_identity, workload_certs};
pub use routes::{DeclaredPorts, HboneRouter, MESH_INBOUND_PORT, TunnelRouter};

use crate::config::{Config, DataPlane};
use crate::supervisor::{FailHandle, Phase};
use hbone::authorize::StreamAuthorizer;
use hbone::client::HboneClient;
use mesh::config::Source;
use mesh::istio::{self, Interception};
use mesh::xds::{MeshAuthorizer, Stores, WorkloadStore, XdsConfig};
use route::{MeshHop, Router};
use serde::Serialize;

/// The running mesh listeners.
pub struct MeshSide {
    tasks: JoinSet<()>,
    drain: CancellationToken,
    /// The tunnel port's routes, when the tunnel port opens.
    tunnel: Option<TunnelRouter>,
}

/// The workload identity the mesh listeners serve with.
pub struct MeshIdentity {
    /// The workload certificate feed ([`workload_certs`]), or why there is none.
    pub certs: Result<watch::Receiver<Arc<WorkloadCert>>, CertError>,
    /// The identity step's certificate store when krun mints the certificate: new
    /// connections then refresh a certificate found past its rotation time.
    pub store: Option<Arc<CertStore>>,
    /// Who the workload is in the `baggage` of its outbound CONNECTs.
    pub source: connect_headers::SourceWorkload,
}

impl MeshSide {
    /// Starts the mesh listeners that must be up before the app: HBONE, the `KRUN_FORWARD`
    /// listeners and, for the builtin data plane, the mTLS terminator, the outbound proxy and
    /// (with iptables capture) the capture listener.
    /// `identity` is the workload certificate and, when krun mints it, its store;
    /// `in_mesh` says whether the workload is in a mesh at all (otherwise only the listeners
    /// asked for explicitly open).
    pub async fn start(
        config: &Config,
        mode: DataPlane,
        interception: Interception,
        identity: MeshIdentity,
        in_mesh: bool,
        discovery: Option<(XdsConfig, Arc<WorkloadStore>)>,
        drain: CancellationToken,
    ) -> anyhow::Result<MeshSide> {
        let settings = h2_settings(config);
        let bounds = bounds(config);
        let mut tasks = JoinSet::new();
        let MeshIdentity {
            certs,
            store,
            source,
        } = identity;
        let certs = match certs {
            Ok(certs) => Some(certs),
            Err(e) if config.launcher.dataplane.value == DataPlane::Builtin => {
                return Err(e).context("KRUN_DATAPLANE=builtin needs a workload certificate");
            }
            Err(e) if in_mesh => {
                tracing::warn!(error = %e, "no workload certificate: mesh mTLS listeners (15003, 15008) are off");
                None
            }
            Err(_) => None,
        };
        let mut builtin_inbound = None;
        let mut hop = None;
        let mut workloads = None;
        let mut authorizer: Option<Arc<dyn StreamAuthorizer>> = None;
        let mut hbone_tls = None;
        if let Some(certs) = certs {
            let trust_domain = certs
                .borrow()
                .identity()
                .map(|id| id.trust_domain)
                .unwrap_or_default();
            let allowed = AllowedPeers::new(
                trust_domain.clone(),
                config.launcher.allowed_principals.value.clone(),
            );
            if mode == DataPlane::Builtin {
                let tls = || mesh_tls(&certs, &store, &trust_domain, &allowed, &[], "mesh inbound");
                let local = certs.borrow().identity();
                if let Some((xds, store)) = discovery {
                    let stores = start_discovery(xds, store, &certs, &drain, &mut tasks);
                    authorizer = Some(Arc::new(MeshAuthorizer::new(
                        stores.policies,
                        stores.workloads.clone(),
                        local.clone(),
                    )));
                    workloads = Some(stores.workloads);
                }
                builtin_inbound = start_inbound(
                    config,
                    tls,
                    authorizer.clone(),
                    local,
                    &settings,
                    &drain,
                    &mut tasks,
                )
                .await?;
                hop = Some(MeshHop::new(
                    Arc::new(HboneClient::new(settings, Some(certs.clone()))),
                    config.launcher.peer_identities.value.clone(),
                    trust_domain.clone(),
                    config.launcher.hbone_peer_port.value,
                    source.baggage(),
                ));
            }
            if config.launcher.hbone_port.value != 0 {
                hbone_tls = Some(mesh_tls(
                    &certs,
                    &store,
                    &trust_domain,
                    &allowed,
                    &[ALPN_H2],
                    "hbone",
                )?);
            }
        }
        // `/_hbone/15003` leads to the builtin terminator when it runs, so the declared ports
        // are known only now; both the HBONE listener and the tunnel port route with them.
        let ports = DeclaredPorts::new(config, mesh_inbound(mode, builtin_inbound));
        let tunnel = if tunnel_wanted(config, in_mesh) {
            Some(TunnelRouter::new(&ports, config).map_err(anyhow::Error::msg)?)
        } else {
            None
        };
        if let Some(tls) = hbone_tls {
            let listener = bind(
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.launcher.hbone_port.value)),
                "KRUN_HBONE_PORT",
            )
            .await?;
            let illegal = vec![
                istio::OUTBOUND_CAPTURE_PORT,
                istio::INBOUND_CAPTURE_PORT,
                istio::HBONE_PORT,
                config.launcher.hbone_port.value,
                config.launcher.tunnel_port.value,
                MESH_INBOUND_PORT,
            ];
            let router = HboneRouter {
                ports: ports.clone(),
                illegal,
            };
            let mut server = TunnelServer::new(Arc::new(router), settings)
                .with_bounds("hbone", bounds)
                .with_tls(tls);
            if let Some(authorizer) = &authorizer {
                server = server.with_authorizer(authorizer.clone());
            }
            tracing::info!(addr = %listener.local_addr()?, policies = authorizer.is_some(), "HBONE listener open (mesh mTLS)");
            tasks.spawn(server.serve(listener, drain.clone(), config.launcher.drain_timeout.value));
        }
        let router = Arc::new(Router::new(
            hop,
            workloads,
            config.launcher.mesh_cidrs.value.clone(),
        ));
        if mode == DataPlane::Builtin {
            let proxy_wanted = in_mesh || config.launcher.outbound_addr.source == Source::Env;
            start_outbound(
                config,
                interception,
                proxy_wanted,
                &router,
                &settings,
                &drain,
                &mut tasks,
            )
            .await?;
        }
        for fwd in &config.launcher.forwards.value {
            let listener = bind(fwd.listen, "KRUN_FORWARD").await?;
            tracing::info!(listen = %fwd.listen, target = %fwd.target, "port forward listening");
            tasks.spawn(forward::serve(
                listener,
                fwd.target.clone(),
                router.clone(),
                settings.copy_buffer,
                bounds,
                drain.clone(),
            ));
        }
        Ok(MeshSide {
            tasks,
            drain,
            tunnel,
        })
    }

    /// Opens the tunnel port once the app is ready (never, if krun drains first).
    pub fn open_tunnel_when_ready(
        &mut self,
        config: &Config,
        mut phase: watch::Receiver<Phase>,
        fail: FailHandle,
    ) {
        let port = config.launcher.tunnel_port.value;
        if port == 0 {
            return tracing::info!("tunnel port disabled (KRUN_TUNNEL_PORT=0)");
        }
        let Some(router) = self.tunnel.take() else {
            return tracing::info!(
                "tunnel port not opened: no mesh, and neither KRUN_TUNNEL_PORT nor PORT asks for it"
            );
        };
        let mut server = TunnelServer::new(Arc::new(router), h2_settings(config))
            .with_bounds("tunnel port", bounds(config));
        match (config.launcher.public_http.value, config.app_port()) {
            (true, Some(app)) => {
                server = server.with_fallback(Fallback {
                    app: SocketAddr::from((Ipv4Addr::LOCALHOST, app)),
                })
            }
            _ => tracing::info!(
                "plain HTTP on the tunnel port is answered 404 (KRUN_PUBLIC_HTTP=false or no PORT_http)"
            ),
        }
        let drain = self.drain.clone();
        let grace = config.launcher.drain_timeout.value;
        self.tasks.spawn(async move {
            if !matches!(
                phase.wait_for(|p| *p != Phase::Starting).await.map(|p| *p),
                Ok(Phase::Ready)
            ) {
                return;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    record_listener(crate::config::names::KRUN_TUNNEL_PORT, &listener);
                    tracing::info!(%addr, "tunnel port open");
                    server.serve(listener, drain, grace).await;
                }
                Err(e) => fail.fail(format!(
                    "KRUN_TUNNEL_PORT={port}: cannot listen on {addr}: {e}; pick a free port"
                )),
            }
        });
    }

    /// Stops accepting and waits up to `grace` for open tunnels to finish.
    pub async fn drain(mut self, grace: Duration) {
        self.drain.cancel();
        let _ = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// HTTP/2 settings of the tunnel port and HBONE: the defaults, with `KRUN_MAX_STREAMS`.
fn h2_settings(config: &Config) -> H2Settings {
    H2Settings {
        max_concurrent_streams: config.launcher.max_streams.value,
        ..H2Settings::default()
    }
}

/// The bounds of every listener, from `KRUN_HANDSHAKE_TIMEOUT`, `KRUN_IDLE_TIMEOUT` and
/// `KRUN_MAX_CONNECTIONS`.
pub fn bounds(config: &Config) -> Bounds {
    Bounds {
        handshake_timeout: config.launcher.handshake_timeout.value,
        idle_timeout: config.launcher.idle_timeout.value,
        max_connections: config.launcher.max_connections.value,
        cap_setting: crate::config::names::KRUN_MAX_CONNECTIONS,
    }
}

/// Where `/_hbone/15003` leads: krun's terminator (`builtin`, when it runs), Envoy's mesh
/// inbound listener (`envoy`: istiod configures it on 127.0.0.1:15003 through the workload's
/// Sidecar resource), or nowhere.
fn mesh_inbound(mode: DataPlane, builtin: Option<SocketAddr>) -> Option<SocketAddr> {
    match mode {
        DataPlane::Builtin => builtin,
        DataPlane::Envoy => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, MESH_INBOUND_PORT))),
        DataPlane::Auto | DataPlane::None => None,
    }
}

/// Whether the tunnel port opens: inside a mesh, or when asked for, by `KRUN_TUNNEL_PORT` in
/// the environment or by `PORT` (the container port Cloud Run sends traffic to) naming it.
fn tunnel_wanted(config: &Config, in_mesh: bool) -> bool {
    let tunnel = &config.launcher.tunnel_port;
    let port_names_it = config.lookup("PORT").is_some_and(|port| {
        port.source == Source::Env && port.value.trim().parse::<u16>() == Ok(tunnel.value)
    });
    tunnel.value != 0 && (in_mesh || tunnel.source == Source::Env || port_names_it)
}

/// A listener krun opened, for the admin endpoint's configuration dump.
#[derive(Clone, Debug, Serialize)]
pub struct Listening {
    /// The setting (or role) that opened it.
    pub name: &'static str,
    /// The bound address.
    pub addr: SocketAddr,
}

/// The listeners opened so far. One list per process: krun runs one mesh side.
static LISTENING: Mutex<Vec<Listening>> = Mutex::new(Vec::new());

/// Records a listener as open.
pub fn record_listener(name: &'static str, listener: &TcpListener) {
    if let (Ok(addr), Ok(mut listening)) = (listener.local_addr(), LISTENING.lock()) {
        listening.push(Listening { name, addr });
    }
}

/// The listeners opened so far.
pub fn listening() -> Vec<Listening> {
    LISTENING.lock().map(|l| l.clone()).unwrap_or_default()
}

async fn bind(addr: SocketAddr, setting: &'static str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("{setting}: cannot listen on {addr}; pick a free port or 0 to disable")
    })?;
    record_listener(setting, &listener);
    Ok(listener)
}

/// The mTLS side of a mesh listener: configs rebuilt on each rotation, checked against the wall
/// clock before each handshake when krun minted the certificate itself (`store`).
fn mesh_tls(
    certs: &watch::Receiver<Arc<WorkloadCert>>,
    store: &Option<Arc<CertStore>>,
    trust_domain: &str,
    allowed: &AllowedPeers,
    alpn: &'static [&'static [u8]],
    listener: &'static str,
) -> Result<MeshTls, hbone::tls::TlsError> {
    Ok(MeshTls {
        config: certs::server_configs(certs, trust_domain.to_owned(), alpn, listener)?,
        allowed: allowed.clone(),
        fresh: store
            .clone()
            .map(|store| OnDemand::hook(store, trust_domain.to_owned(), alpn, listener)),
    })
}

async fn start_inbound(
    config: &Config,
    tls: impl FnOnce() -> Result<MeshTls, hbone::tls::TlsError>,
    authorizer: Option<Arc<dyn StreamAuthorizer>>,
    local: Option<SpiffeId>,
    settings: &H2Settings,
    drain: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(app) = config.app_port() else {
        tracing::info!(
            "builtin mesh inbound off: PORT_http is disabled, so there is no app to forward to"
        );
        return Ok(None);
    };
    // Reached only through /_hbone/15003, so any free loopback port will do.
    let listener = bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        "builtin mesh inbound",
    )
    .await?;
    let addr = listener.local_addr()?;
    let app = SocketAddr::from((Ipv4Addr::LOCALHOST, app));
    let terminator = inbound::Terminator {
        tls: tls()?,
        authorizer,
        local,
        app,
        copy_buffer: settings.copy_buffer,
        bounds: bounds(config),
    };
    tasks.spawn(inbound::serve(listener, terminator, drain.clone()));
    tracing::info!(%addr, %app, "builtin mesh inbound: mTLS terminated by krun");
    Ok(Some(addr))
}

/// Workload discovery from istiod for the builtin data plane: the stores the router, the DNS
/// answerer and the inbound authorization ask, filled by the xDS client until `drain`.
fn start_discovery(
    xds: XdsConfig,
    store: Arc<WorkloadStore>,
    certs: &watch::Receiver<Arc<WorkloadCert>>,
    drain: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Stores {
    let stores = Stores {
        workloads: store,
        policies: Arc::default(),
    };
    tasks.spawn(mesh::xds::run(
        xds,
        certs.clone(),
        stores.clone(),
        drain.clone(),
    ));
    stores
}

async fn start_outbound(
    config: &Config,
    interception: Interception,
    proxy_wanted: bool,
    router: &Arc<Router>,
    settings: &H2Settings,
    drain: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    let addr = config.launcher.outbound_addr.value;
    if addr.port() != 0 && !proxy_wanted {
        tracing::info!(
            "outbound proxy not opened: no mesh, and KRUN_OUTBOUND_ADDR does not ask for it"
        );
    } else if addr.port() != 0 {
        let listener = bind(addr, "KRUN_OUTBOUND_ADDR").await?;
        let outbound = outbound::Outbound {
            router: router.clone(),
            copy_buffer: settings.copy_buffer,
            bounds: bounds(config),
        };
        tasks.spawn(outbound::serve(listener, outbound, drain.clone()));
        tracing::info!(%addr, hbone = router.has_mesh(), "outbound HTTP proxy (CONNECT and absolute URIs) listening");
    }
    let addr = config.launcher.capture_addr.value;
    if interception == Interception::Iptables && addr.port() != 0 {
        let listener = bind(addr, "KRUN_CAPTURE_ADDR").await?;
        tasks.spawn(redirect::serve(
            listener,
            router.clone(),
            settings.copy_buffer,
            bounds(config),
            drain.clone(),
        ));
        tracing::info!(%addr, hbone = router.has_mesh(), "capture listener (iptables REDIRECT target) listening");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::config::Env;

    #[test]
    fn the_mesh_terminator_is_envoys_or_krun_s() {
        let builtin = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)));
        assert_eq!(mesh_inbound(DataPlane::Builtin, builtin), builtin);
        assert_eq!(mesh_inbound(DataPlane::Builtin, None), None);
        assert_eq!(
            mesh_inbound(DataPlane::Envoy, None),
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 15003)))
        );
        assert_eq!(mesh_inbound(DataPlane::None, builtin), None);
    }

    #[test]
    fn the_tunnel_port_opens_in_a_mesh_or_when_asked_for() {
        let wanted = |pairs: &[(&str, &str)], in_mesh: bool| {
            let env: Env = pairs.iter().map(|(k, v)| (*k, *v)).collect();
            tunnel_wanted(&Config::from_env(&env).expect("valid"), in_mesh)
        };
        assert!(wanted(&[], true));
        assert!(!wanted(&[], false));
        assert!(wanted(&[("KRUN_TUNNEL_PORT", "15009")], false));
        assert!(wanted(&[("PORT", "15009")], false));
        assert!(
            !wanted(&[("PORT", "8080")], false),
            "Cloud Run's default port"
        );
        assert!(wanted(
            &[("PORT", "9000"), ("KRUN_TUNNEL_PORT", "9000")],
            false
        ));
        assert!(!wanted(&[("KRUN_TUNNEL_PORT", "0")], true));
    }
}
