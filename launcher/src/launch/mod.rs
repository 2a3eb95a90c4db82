//! The startup graph, in one place: configuration is already resolved from the environment;
//! discovery fills in what the mesh says, identity mints the certificate, the data plane is
//! chosen and set up, the supervisor starts the app, and the tunnel opens once it is ready.
//! Traffic capture is decided (and iptables installed) before the supervisor starts.

mod google_ca;

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::admin::KrunAdmin;
use crate::agent::AgentInputs;
use crate::config::{Config, DataPlane, StartupProbe};
use crate::dataplane::{MeshIdentity, MeshSide};
use crate::probe::{Check, Probe};
use crate::processes::ProcessPlan;
use crate::processes::RunAs;
use crate::run_discovery::dns::{LocalAnswerer, MeshAnswerer, MetadataAnswerer, start_captured};
use crate::startup::PhaseClock;
use crate::supervisor::{AppSpec, Phase, Supervisor, Timeouts};
use mesh::config::{Env, Source};
use mesh::discovery;
use mesh::identity::k8s_token::{self, K8sTokenSource, TokenFile, istio_token_path};
use mesh::identity::{self, Identity, IdentityInputs, RotationPolicy, Signer, SpiffeId};
use mesh::istio::Interception;
use mesh::xds::WorkloadStore;

/// Runs the workload to completion and returns krun's exit code.
pub async fn run(
    mut config: Config,
    env: &Env,
    mut plan: ProcessPlan,
    argv: Vec<String>,
    started: Instant,
) -> anyhow::Result<u8> {
    let mut clock = PhaseClock::new(started);
    clock.mark("config");
    let found = discovery::discover(&config).await?;
    discovery::apply(&mut config, &found)?;
    if found.mesh {
        let value = |s: Option<&mesh::config::Setting<String>>| {
            s.map_or("-".to_owned(), |s| format!("{} ({})", s.value, s.source))
        };
        tracing::info!(
            project = %value(config.project_id.as_ref()),
            cluster = %value(config.cluster_name.as_ref()),
            location = %value(config.cluster_location.as_ref()),
            namespace = %value(Some(&config.workload_namespace)),
            trust_domain = %value(config.trust_domain.as_ref()),
            mesh_env_keys = found.mesh_env.len(),
            "mesh discovered"
        );
    }
    clock.mark("discover");
    let value = |s: Option<&mesh::config::Setting<String>>| s.map(|s| s.value.clone());
    let mut inputs = AgentInputs {
        mesh_env: found.mesh_env.clone(),
        trust_domain: value(config.trust_domain.as_ref()),
        project_number: value(config.project_number.as_ref()),
        project_id: value(config.project_id.as_ref()),
        cluster_name: value(config.cluster_name.as_ref()),
        cluster_location: value(config.cluster_location.as_ref()),
        zone: found.instance.zone.clone(),
        instance_id: found.instance.id.clone(),
        instance_ip: found.instance.ip.clone(),
        ..AgentInputs::default()
    };
    // Held for the whole run: dropping it stops certificate rotation and token refresh.
    let identity = start_identity(&config, env, &inputs, &found).await?;
    if identity.identity.is_some() {
        clock.mark("identity");
    }
    // Outside a mesh krun is only a supervisor: no rules, no proxy for the app, unless the
    // operator asks for interception explicitly.
    let minted = identity
        .identity
        .as_ref()
        .and_then(|identity| crate::dataplane::follow_identity(identity.store()));
    let certs = crate::dataplane::workload_certs(minted, &config.mesh_base_dir.value);
    let cert_feed = certs.as_ref().ok().cloned();
    crate::telemetry::register(cert_feed.clone());
    let in_mesh =
        found.mesh || identity.identity.is_some() || config.xds_addr.is_some() || certs.is_ok();
    let capture_wanted = in_mesh || config.launcher.interception_mode.is_some();
    // Before the supervisor: installing the rules waits for iptables-restore itself.
    let capture = if capture_wanted {
        crate::capture::decide(&config)
    } else {
        crate::capture::Capture::off()
    };
    inputs.interception = capture.interception;
    let mut dataplane = crate::agent::set_up(&config, &inputs, env, &mut plan)?;
    // Envoy's whitebox proxy variables come from the agent layer; the builtin one's from here.
    let outbound = config.launcher.outbound_addr.value;
    if capture_wanted
        && capture.interception == Interception::Whitebox
        && dataplane.mode == DataPlane::Builtin
        && outbound.port() != 0
    {
        for (name, value) in crate::capture::whitebox::proxy_env(outbound) {
            if env.get(name).is_none() {
                dataplane.app_env.insert(name.to_owned(), value);
            }
        }
    }
    // Before the app starts: it must read the rewritten resolv.conf. Its listeners outlive the
    // app's drain (the app may call services while it drains) and end with the process.
    // Who this workload is, as istiod knows it: the node id of workload discovery and the
    // `baggage` of outbound CONNECTs.
    let workload = crate::agent::workload::Workload::resolve(&config, &inputs, env, None, 0);
    let xds = xds_config(&config, dataplane.mode, &inputs, &workload);
    let workloads = xds.as_ref().map(|_| Arc::new(WorkloadStore::default()));
    let mesh_names = workloads.as_ref().map(|store| MeshAnswerer {
        store: store.clone(),
        namespace: config.workload_namespace.value.clone(),
    });
    crate::run_discovery::start(&config, mesh_names.clone(), CancellationToken::new()).await;
    if dataplane.mode == DataPlane::Builtin
        && let Some(nameserver) = capture.dns_upstream
    {
        start_captured_dns(&config, nameserver, mesh_names).await?;
    }
    let app = (!argv.is_empty()).then(|| app_spec(&config, argv, dataplane.app_env));
    if app.is_none() {
        tracing::info!(
            "no app given: sidecar mode, krun runs only the mesh side and declared processes"
        );
        if plan.app_hooks != crate::processes::Hooks::default() {
            tracing::warn!(
                "KRUN_PROCESSES declares app.preStart or app.preStop but no app is given: they do not run"
            );
        }
    }
    // Before anything starts, as the app's user: processes and the app find their files.
    let run_as = app.as_ref().and_then(|a| a.run_as.clone());
    crate::processes::files::materialize(&plan.files, run_as.as_ref(), env).map_err(|why| {
        let file = config
            .launcher
            .processes
            .as_ref()
            .map(|s| s.value.display().to_string());
        anyhow::anyhow!("KRUN_PROCESSES={}: {why}", file.unwrap_or_default())
    })?;
    crate::processes::files::keep_fresh(&plan.files, run_as);
    let timeouts = Timeouts {
        drain: config.launcher.drain_timeout.value,
        ready: config.launcher.app_ready_timeout.value,
    };
    // The supervisor first: it installs the signal handlers, so a SIGTERM during the rest of
    // startup drains instead of killing krun.
    let mut supervisor = Supervisor::new(plan, app, timeouts, clock)?;
    let drain = CancellationToken::new();
    let mut mesh = MeshSide::start(
        &config,
        dataplane.mode,
        capture.interception,
        MeshIdentity {
            certs,
            store: identity.identity.as_ref().map(|i| i.store().clone()),
            source: source_workload(workload),
        },
        in_mesh,
        xds.zip(workloads),
        drain.clone(),
    )
    .await?;
    supervisor.clock().mark("dataplane");
    if let Some(addr) = config.launcher.admin_addr.value.0 {
        let admin = KrunAdmin {
            phase: supervisor.phase(),
            units: supervisor.status(),
            config: config.printable(),
            dataplane: json!({
                "mode": dataplane.mode,
                "interception": format!("{:?}", capture.interception).to_lowercase(),
            }),
            certs: cert_feed,
            token: identity.tokens.as_ref().map(TokenFile::subscribe),
        };
        admin.start(addr, crate::dataplane::bounds(&config)).await?;
    }
    mesh.open_tunnel_when_ready(&config, supervisor.phase(), supervisor.fail_handle());
    let mut phase = supervisor.phase();
    let stop_listeners = drain.clone();
    tokio::spawn(async move {
        if phase.wait_for(|p| *p == Phase::Draining).await.is_ok() {
            stop_listeners.cancel();
        }
    });
    tokio::spawn(crate::footprint::release_when_settled(supervisor.phase()));
    let reaper = supervisor.reaper();
    let code = supervisor.run().await;
    capture.cleanup(&reaper).await;
    // Open tunnels had the drain budget alongside the app; give them what is left of it.
    mesh.drain(config.launcher.drain_timeout.value).await;
    Ok(code)
}

/// The identity phase: the local CA (`CA_ADDR=file:///dir`) signs in-process; an Istio CA
/// (`CA_ADDR=host:port`, or istiod at the XDS address `agent::xds::select` picks) signs with an
/// istio-token minted through the discovered kube client. When pilot-agent requests the
/// certificate itself, krun only keeps its istio-token fresh. Nothing configured: no identity,
/// quietly.
async fn start_identity(
    config: &Config,
    env: &Env,
    inputs: &AgentInputs,
    found: &discovery::Discovery,
) -> anyhow::Result<Started> {
    let ca_addr = config.ca_addr.as_ref();
    if let Some(dir) = ca_addr.and_then(|ca| identity::local_ca_dir(&ca.value)) {
        let ca = identity::local_ca::LocalCa::load(&dir)?;
        let id = workload_identity(config);
        tracing::info!(identity = %id, ca_dir = %dir.display(), "identity: local CA signs in-process (CA_ADDR=file://)");
        let identity = Identity::start(IdentityInputs {
            identity: id,
            signer: Signer::Local(Box::new(ca)),
            base_dir: config.mesh_base_dir.value.clone(),
            policy: rotation_policy(config),
            trust_bundle: Vec::new(),
        })
        .await?;
        return Ok(Started {
            identity: Some(identity),
            tokens: None,
        });
    }
    if let Some(ca) = google_ca::select(config) {
        return google_ca::start(config, found, ca).await;
    }
    // An explicit CA_ADDR that cannot be used is a startup error; an istiod address derived
    // from XDS only means krun leaves the certificate to the agent.
    let explicit = ca_addr.is_some_and(|ca| ca.source == Source::Env);
    // With pilot-agent installed and not overridden, the agent requests Envoy's certificate
    // itself (from istiod, or the managed control plane's CA); krun minting a second one for
    // the same identity would only double the CA's load. The agent authenticates with the
    // istio-token (its default `JWT_POLICY=third-party-jwt`), which krun keeps fresh.
    let agent_mints = config.launcher.dataplane.value != DataPlane::Builtin
        && config.launcher.pilot_agent_path.value.exists();
    if !explicit
        && agent_mints
        && let Some(xds) = agent_xds(config, found)
    {
        let Some(client) = found.kube.clone() else {
            tracing::warn!(xds = %xds, "identity: pilot-agent requests the certificate itself, and discovery built no K8s client to mint its istio-token, so it cannot authenticate to the control plane; set KUBECONFIG, run in a cluster, or point MESH at a GKE cluster");
            return Ok(Started::default());
        };
        let (source, audience) = istio_token_source(config, found, client);
        tracing::info!(xds = %xds, %audience, "identity: pilot-agent requests the certificate itself with the istio-token krun keeps fresh; krun mints none");
        let tokens =
            TokenFile::start(source, istio_token_path(&config.mesh_base_dir.value)).await?;
        return Ok(Started {
            identity: None,
            tokens: Some(tokens),
        });
    }
    let Some((addr, from)) = istio_ca_addr(config, found) else {
        return Ok(Started::default());
    };
    let Some(client) = found.kube.clone() else {
        anyhow::ensure!(
            !explicit,
            "CA_ADDR={addr}: the Istio CA needs an istio-token from the config cluster, and discovery built no K8s client; set KUBECONFIG, run in a cluster, or point MESH at a GKE cluster"
        );
        tracing::info!(ca = %addr, from, "identity: no K8s client for an istio-token (MESH=file:// or Traffic Director): krun mints no certificate");
        return Ok(Started::default());
    };
    let Some(root_pem) = found
        .mesh_env
        .get("CAROOT_ISTIOD")
        .filter(|pem| !pem.trim().is_empty())
        .cloned()
    else {
        anyhow::ensure!(
            !explicit,
            "CA_ADDR={addr}: mesh-env has no CAROOT_ISTIOD to verify the Istio CA; publish istiod's root in istio-system/mesh-env (hgate does) or use CA_ADDR=file:// for a local CA"
        );
        tracing::info!(ca = %addr, from, "identity: mesh-env has no CAROOT_ISTIOD to verify istiod: krun mints no certificate");
        return Ok(Started::default());
    };
    let cluster_id = crate::agent::workload::cluster_id(config, inputs, env);
    istio_ca_identity(config, found, client, addr, root_pem, cluster_id).await
}

/// The XDS address pilot-agent will use (`agent::xds::select` with the tenant, as the agent
/// layer picks it); `None` when no agent runs (`XDS_ADDR=-` or nothing known).
fn agent_xds(config: &Config, found: &discovery::Discovery) -> Option<String> {
    let tenant = crate::agent::workload::tenant(config, &found.mesh_env);
    match crate::agent::xds::select(
        config.proxy_config.as_ref().map(|s| s.value.as_str()),
        config.xds_addr.as_ref().map(|s| s.value.as_str()),
        None,
        &found.mesh_env,
        tenant.as_deref(),
    ) {
        Ok(crate::agent::xds::Xds::Address { addr, .. }) => Some(addr),
        _ => None,
    }
}

/// The Istio CA address: `CA_ADDR` (host:port), else the XDS address `agent::xds::select` picks
/// when it is istiod's port. `None`: no Istio CA is known.
fn istio_ca_addr(config: &Config, found: &discovery::Discovery) -> Option<(String, &'static str)> {
    if let Some(ca) = &config.ca_addr {
        return Some((ca.value.clone(), "CA_ADDR"));
    }
    let xds = crate::agent::xds::select(
        None,
        config.xds_addr.as_ref().map(|s| s.value.as_str()),
        None,
        &found.mesh_env,
        None,
    )
    .ok()?;
    match xds {
        crate::agent::xds::Xds::Address { addr, from } if crate::agent::xds::is_istiod(&addr) => {
            Some((addr, from))
        }
        _ => None,
    }
}

/// The workload KSA's istio-token source, with the audience the control plane accepts
/// (`istio-ca` for open-source istiod, the trust domain for a managed one; `OSS_ISTIO`), and
/// that audience for the log line. One source for krun's CA client and for pilot-agent.
fn istio_token_source(
    config: &Config,
    found: &discovery::Discovery,
    client: kube::Client,
) -> (K8sTokenSource, String) {
    let oss_istio = crate::agent::workload::oss_istio(config, &found.mesh_env);
    let audience = k8s_token::istio_token_audience(&trust_domain(config), oss_istio);
    let source = K8sTokenSource::new(
        client,
        &config.workload_namespace.value,
        &config.workload_service_account.value,
        &audience,
        k8s_token::DEFAULT_TOKEN_LIFETIME,
    );
    (source, audience)
}

/// Istio CA wiring (docs/identity.md §"Wiring the cluster signers"): the istio-token request
/// and the CA handshake run together; then the first CSR, with the cluster id the agent would
/// use.
async fn istio_ca_identity(
    config: &Config,
    found: &discovery::Discovery,
    client: kube::Client,
    addr: String,
    root_pem: String,
    cluster_id: String,
) -> anyhow::Result<Started> {
    use identity::istio_ca::{self, ISTIOD_SERVER_NAME, IstioCaClient, IstioCaConfig};
    let id = workload_identity(config);
    let ca = IstioCaConfig {
        addr: addr.clone(),
        root_pem,
        server_name: ISTIOD_SERVER_NAME.to_owned(),
        cluster_id,
    };
    let (source, audience) = istio_token_source(config, found, client);
    let base = config.mesh_base_dir.value.clone();
    tracing::info!(identity = %id, ca = %addr, %audience, cluster_id = %ca.cluster_id, "identity: Istio CA signs with an istio-token from the config cluster");
    // The CA handshake overlaps the token request: the critical path is token, then CSR.
    let (tokens, connection) = tokio::join!(
        TokenFile::start(source, istio_token_path(&base)),
        istio_ca::connect(&ca),
    );
    let (tokens, connection) = (tokens?, connection?);
    let signer = Signer::IstioCa(IstioCaClient::new(ca, connection, tokens.subscribe()));
    mint_from_cluster_ca(config, found, id, signer, tokens).await
}

/// A cluster-authenticated CA's first certificate and its rotation (Istio CA, MeshCA, CAS):
/// peers may also chain to the mesh-env roots; `tokens` is the K8s token file the signer's
/// credential comes from, kept fresh as long as the identity runs.
async fn mint_from_cluster_ca(
    config: &Config,
    found: &discovery::Discovery,
    id: SpiffeId,
    signer: Signer,
    tokens: TokenFile,
) -> anyhow::Result<Started> {
    let identity = Identity::start(IdentityInputs {
        identity: id,
        signer,
        base_dir: config.mesh_base_dir.value.clone(),
        policy: rotation_policy(config),
        trust_bundle: identity::roots::mesh_env_roots(
            found.mesh_env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )?,
    })
    .await?;
    Ok(Started {
        identity: Some(identity),
        tokens: Some(tokens),
    })
}

/// How the builtin data plane reaches istiod for workload discovery: the address
/// `agent::xds::discovery_istiod` picks (`XDS_ADDR`, else mesh-env `IMCON_ADDR:15012`; never
/// the managed control plane), logged once with where it came from or why there is none,
/// verified as istiod, with the node id and metadata ztunnel sends
/// (`ztunnel~IP~POD.NS~NS.svc.cluster.local`; istiod knows only its proxy types) and the
/// istio-token file as the bearer when krun keeps one. Other data planes: `None`, quietly.
fn xds_config(
    config: &Config,
    mode: DataPlane,
    inputs: &AgentInputs,
    workload: &crate::agent::workload::Workload,
) -> Option<mesh::xds::XdsConfig> {
    if mode != DataPlane::Builtin {
        return None;
    }
    let tenant = crate::agent::workload::tenant(config, &inputs.mesh_env);
    let selected = crate::agent::xds::select(
        config.proxy_config.as_ref().map(|s| s.value.as_str()),
        config.xds_addr.as_ref().map(|s| s.value.as_str()),
        inputs.xds_addr.as_deref(),
        &inputs.mesh_env,
        tenant.as_deref(),
    );
    let addr = match crate::agent::xds::discovery_istiod(selected) {
        Ok((addr, from)) => {
            tracing::info!(istiod = %addr, from, "workload discovery: delta ADS to istiod");
            addr
        }
        Err(why) => {
            tracing::info!("workload discovery off: {why}; routes come from KRUN_MESH_CIDRS alone");
            return None;
        }
    };
    let ip = inputs.instance_ip.as_deref().unwrap_or("127.0.0.1");
    let ns = &workload.namespace;
    let metadata = [
        ("NAMESPACE", ns.clone()),
        ("SERVICE_ACCOUNT", workload.service_account.clone()),
        ("CLUSTER_ID", workload.cluster_id.clone()),
        ("INSTANCE_IPS", ip.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Some(mesh::xds::XdsConfig {
        addr,
        server_name: identity::istio_ca::ISTIOD_SERVER_NAME.to_owned(),
        node_id: format!(
            "ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local",
            workload.pod_name
        ),
        metadata,
        token_path: Some(istio_token_path(&config.mesh_base_dir.value)),
    })
}

/// DNS capture with the builtin data plane: krun's DNS server on 15053 answers the mesh's
/// Service names (when istiod is known) and `metadata.google.internal`, and forwards the rest
/// unchanged to `nameserver`, the one the capture rules redirect
/// ([`crate::capture::Capture::dns_upstream`]); resolv.conf itself is not touched.
async fn start_captured_dns(
    config: &Config,
    nameserver: std::net::IpAddr,
    mesh_names: Option<MeshAnswerer>,
) -> anyhow::Result<()> {
    let upstream = SocketAddr::new(nameserver, 53);
    let mut answerers: Vec<Box<dyn LocalAnswerer>> = vec![Box::new(MetadataAnswerer)];
    let mesh = mesh_names.is_some();
    if let Some(mesh_names) = mesh_names {
        answerers.insert(0, Box::new(mesh_names));
    }
    let limit = crate::dataplane::bounds(config).limit("dns");
    start_captured(answerers, upstream, limit, CancellationToken::new())
        .await
        .map_err(|why| {
            anyhow::anyhow!("KRUN_CAPTURE_DNS=true with the builtin data plane: {why}")
        })?;
    tracing::info!(listen = %SocketAddr::from((Ipv4Addr::LOCALHOST, mesh::istio::DNS_PORT)), %upstream, mesh_names = mesh, "DNS capture: krun's resolver answers mesh Service names and forwards the rest unchanged");
    Ok(())
}

/// The workload as its outbound CONNECTs' `baggage` names it, resolved as for istiod.
fn source_workload(
    workload: crate::agent::workload::Workload,
) -> crate::dataplane::connect_headers::SourceWorkload {
    crate::dataplane::connect_headers::SourceWorkload {
        cluster: workload.cluster_id,
        namespace: workload.namespace,
        service: workload.name,
        revision: workload.revision,
    }
}

/// Certificate lifetime from `SECRET_TTL`; retries paced as `RotationPolicy` defaults.
fn rotation_policy(config: &Config) -> RotationPolicy {
    RotationPolicy {
        ttl: config.launcher.secret_ttl.value,
        ..RotationPolicy::default()
    }
}

/// What the identity phase started: dropping it stops rotation and token refresh.
#[derive(Default)]
struct Started {
    /// krun's own certificate, when krun mints one.
    identity: Option<Identity>,
    /// The istio-token refresher (krun's CA client, or pilot-agent).
    tokens: Option<TokenFile>,
}

/// TRUST_DOMAIN, or Istio's default (`cluster.local`) when none is known.
fn trust_domain(config: &Config) -> String {
    config
        .trust_domain
        .as_ref()
        .map_or(identity::DEFAULT_TRUST_DOMAIN.to_owned(), |s| {
            s.value.clone()
        })
}

/// The SPIFFE identity from TRUST_DOMAIN, WORKLOAD_NAMESPACE and WORKLOAD_SERVICE_ACCOUNT.
fn workload_identity(config: &Config) -> SpiffeId {
    SpiffeId::new(
        &trust_domain(config),
        &config.workload_namespace.value,
        &config.workload_service_account.value,
    )
}

/// How the app is started and when it counts as ready.
fn app_spec(config: &Config, argv: Vec<String>, env: BTreeMap<String, String>) -> AppSpec {
    AppSpec {
        env,
        argv,
        port: config.app_port(),
        run_as: RunAs::resolve(
            config.launcher.k8s_uid.as_ref().map(|s| s.value),
            config.launcher.k8s_gid.as_ref().map(|s| s.value),
        ),
        readiness: app_readiness(config),
    }
}

/// An explicit startup probe wins; otherwise every declared app port must accept.
fn app_readiness(config: &Config) -> Vec<Probe> {
    let probes: Vec<Probe> = match &config.launcher.startup_probe {
        Some((_, probe)) => vec![Probe::new(match &probe.value {
            StartupProbe::Http(url) => Check::Http(url.clone()),
            StartupProbe::Tcp(addr) => Check::Tcp(addr.clone()),
        })],
        None => config
            .app_ready_ports()
            .into_iter()
            .map(|port| Probe::new(Check::Tcp(format!("127.0.0.1:{port}"))))
            .collect(),
    };
    let checks: Vec<String> = probes.iter().map(|p| p.check.to_string()).collect();
    tracing::info!(?checks, "app readiness: all must pass");
    probes
}
