//! Cloud Run service discovery with automatic auth (runsd, done right): the app calls
//! `http://hello` or `http://hello.us-east1:8080/x` and reaches the Cloud Run service `hello`
//! of the same project over HTTPS with a Google ID token, without code changes.
//!
//! - [`names`]: which names are services and their URLs (`KRUN_RUN_URL_TEMPLATE`).
//! - [`dns`]: the local DNS server (run zone and `metadata.google.internal` locally, the rest
//!   forwarded unchanged), with [`dns::LocalAnswerer`] for more local zones.
//! - [`resolv`]: the resolv.conf the app sees (zone searched first, `ndots:1`).
//! - [`proxy`]: the HTTP proxy that adds the ID token.
//!
//! Every run name resolves to the proxy's loopback address (`KRUN_RUN_PROXY_ADDR`). Where
//! krun may install iptables rules (root with iptables), every TCP port of that address is
//! redirected to the proxy, so `http://hello:8080` works like `http://hello`; otherwise only
//! the proxy's own port does.
//!
//! It starts only on Cloud Run (`K_SERVICE` or `CLOUD_RUN_JOB` set) where a metadata server
//! answers: project number and region come from it. Elsewhere it says once why it is off and
//! leaves DNS alone.

pub mod dns;
pub mod names;
pub mod proxy;
pub mod resolv;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh::cloud_run::{metadata_region, metadata_server, metadata_value};
use mesh::credentials::id_tokens::{IdTokenSource, ServiceAccountIdTokens};
use mesh::http::HttpClient;
use mesh::identity::token_cache::{CachePolicy, TokenCache};
use mesh::metadata::{MetadataClient, paths};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RunDiscovery, RunTokenSource};
use names::{RunZone, ZoneInputs};

/// Budget of each metadata request made at start.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// Budget of one IAM Credentials `generateIdToken` call (connect and answer).
const IAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts discovery when it is wanted and possible; one log line says what happened. The
/// listeners live until `drain` is cancelled (the app may call services while it drains, so
/// krun passes a token that ends with the process).
/// `mesh_names` answers the mesh's Service names (the builtin data plane with istiod).
pub async fn start(
    config: &Config,
    mesh_names: Option<dns::MeshAnswerer>,
    drain: CancellationToken,
) {
    if config.launcher.run_discovery.value == RunDiscovery::Off {
        tracing::info!("Cloud Run service discovery off (KRUN_RUN_DISCOVERY=off); DNS left alone");
        return;
    }
    // On GKE or GCE single-label names are the cluster's or the VPC's: claiming them would
    // break them, so `auto` means Cloud Run only.
    if config.k_service.is_none() && config.cloud_run_job.is_none() {
        tracing::info!(
            "Cloud Run service discovery off: not on Cloud Run (no K_SERVICE or CLOUD_RUN_JOB); DNS left alone"
        );
        return;
    }
    match try_start(config, mesh_names, drain).await {
        Ok(started) => tracing::info!(
            zone = %started.zone,
            dns = %started.dns,
            upstream = %started.upstream,
            proxy = %started.proxy,
            any_port = started.any_port,
            url_template = %config.launcher.run_url_template.value,
            tokens = %started.tokens,
            "Cloud Run service discovery on"
        ),
        Err(why) => {
            tracing::info!("Cloud Run service discovery off: {why}; DNS left alone")
        }
    }
}

/// What [`start`] set up, for its log line.
struct Started {
    zone: String,
    dns: SocketAddr,
    upstream: SocketAddr,
    proxy: SocketAddr,
    any_port: bool,
    /// Where the proxy's ID tokens come from.
    tokens: String,
}

async fn try_start(
    config: &Config,
    mesh_names: Option<dns::MeshAnswerer>,
    drain: CancellationToken,
) -> Result<Started, String> {
    let launcher = &config.launcher;
    let host = config.gce_metadata_host.value.clone();
    let metadata = metadata_server(
        &host,
        host == mesh::config::DEFAULT_METADATA_HOST,
        METADATA_TIMEOUT,
    )
    .await
    .map_err(|why| format!("{why}, so no project number or region"))?;
    let project_number = metadata_value(&metadata, paths::NUMERIC_PROJECT_ID).await?;
    let project = metadata_value(&metadata, paths::PROJECT_ID).await?;
    let region = metadata_region(&metadata).await?;
    let zone = Arc::new(RunZone::new(ZoneInputs {
        domain: launcher.run_domain.value.clone(),
        services: launcher.run_services.value.clone(),
        template: launcher.run_url_template.value.clone(),
        project_number,
        project,
        region,
    }));

    let resolv_path = &launcher.run_resolv_conf.value;
    let original = std::fs::read_to_string(resolv_path)
        .map_err(|e| format!("cannot read {}: {e}", resolv_path.display()))?;
    let original = resolv::ResolvConf::parse(&original);
    let dns_addr = launcher.run_dns_addr.value;
    let upstream = match &launcher.run_dns_upstream {
        Some(upstream) => upstream.value,
        None => original.upstream().ok_or_else(|| {
            format!(
                "{} has no nameserver to forward to; set KRUN_RUN_DNS_UPSTREAM",
                resolv_path.display()
            )
        })?,
    };
    if upstream == dns_addr {
        return Err(format!(
            "{} already points at {dns_addr} (krun's own resolver); set KRUN_RUN_DNS_UPSTREAM to the real one",
            resolv_path.display()
        ));
    }
    let bind_hint = "binding a port below 1024 needs root or CAP_NET_BIND_SERVICE";
    let udp = UdpSocket::bind(dns_addr)
        .await
        .map_err(|e| format!("KRUN_RUN_DNS_ADDR={dns_addr}: UDP bind failed: {e} ({bind_hint})"))?;
    let tcp = TcpListener::bind(dns_addr)
        .await
        .map_err(|e| format!("KRUN_RUN_DNS_ADDR={dns_addr}: TCP bind failed: {e} ({bind_hint})"))?;
    let proxy_addr = launcher.run_proxy_addr.value;
    let proxy_listener = TcpListener::bind(proxy_addr)
        .await
        .map_err(|e| format!("KRUN_RUN_PROXY_ADDR={proxy_addr}: bind failed: {e} ({bind_hint})"))?;

    let (tokens, token_origin) = match (
        launcher.run_token_source.value,
        &launcher.run_token_service_account,
    ) {
        (RunTokenSource::None, _) => (None, "none (KRUN_RUN_TOKEN_SOURCE=none)".to_owned()),
        (RunTokenSource::Metadata, None) => (
            Some(TokenCache::new(
                IdTokenSource::Metadata(metadata),
                CachePolicy::default(),
            )),
            "the metadata server's identity (the instance's account)".to_owned(),
        ),
        (RunTokenSource::Metadata, Some(gsa)) => (
            Some(TokenCache::new(
                iam_id_tokens(config, &gsa.value, metadata).await?,
                CachePolicy::default(),
            )),
            format!(
                "IAM generateIdToken for {} at {} (KRUN_RUN_TOKEN_SERVICE_ACCOUNT), asked with the instance's access token",
                gsa.value, config.iam_credentials_endpoint.value
            ),
        ),
    };
    let proxy = Arc::new(proxy::RunProxy::new(zone.clone(), tokens).map_err(|e| e.to_string())?);
    let mut answerers: Vec<Box<dyn dns::LocalAnswerer>> = vec![
        Box::new(dns::RunAnswerer {
            zone: zone.clone(),
            proxy_ip: proxy_addr.ip(),
        }),
        Box::new(dns::MetadataAnswerer),
    ];
    // First: a Service istiod lists wins over a run-zone name of the same spelling.
    if let Some(mesh_names) = mesh_names {
        answerers.insert(0, Box::new(mesh_names));
    }
    let server = Arc::new(dns::DnsServer::new(answerers, upstream));
    let bounds = hbone::listen::Bounds {
        max_connections: launcher.max_connections.value,
        ..hbone::listen::Bounds::default()
    };
    let dns_limit = Arc::new(bounds.limit("run-dns"));
    tokio::spawn(server.serve(udp, tcp, dns_limit, drain.clone()));
    let proxy_limit = bounds.limit("run-proxy");
    tokio::spawn(async move {
        hbone::listen::serve_each(proxy_listener, &proxy_limit, &drain, |stream, _| {
            proxy.clone().serve(stream)
        })
        .await;
    });

    // The listeners are up before the app can read the new file.
    let text = original.rewritten(dns_addr.ip(), zone.domain());
    resolv::write_in_place(resolv_path, &text).map_err(|e| {
        format!(
            "cannot rewrite {}: {e} (krun must own the file: run as root, or set KRUN_RUN_RESOLV_CONF)",
            resolv_path.display()
        )
    })?;
    let any_port = redirect::any_port(proxy_addr);
    Ok(Started {
        zone: zone.domain().to_owned(),
        dns: dns_addr,
        upstream,
        proxy: proxy_addr,
        any_port,
        tokens: token_origin,
    })
}

/// IAM `generateIdToken` for `gsa` (`KRUN_RUN_TOKEN_SERVICE_ACCOUNT`), asked with the
/// instance's access token from `metadata`.
async fn iam_id_tokens(
    config: &Config,
    gsa: &str,
    metadata: MetadataClient,
) -> Result<IdTokenSource, String> {
    // The system trust store is read from disk: off the runtime's threads.
    let http = tokio::task::spawn_blocking(|| HttpClient::new(IAM_TIMEOUT))
        .await
        .map_err(|e| format!("HTTPS client for IAM Credentials: {e}"))?
        .map_err(|e| format!("HTTPS client for IAM Credentials: {e}"))?;
    Ok(IdTokenSource::ServiceAccount(ServiceAccountIdTokens::new(
        http,
        &config.iam_credentials_endpoint.value,
        gsa,
        Arc::new(metadata),
    )))
}

mod redirect;
