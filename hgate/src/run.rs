//! Wires hgate's parts: listeners, routes, tokens, the Kubernetes loops, and drain on SIGTERM.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hbone::H2Settings;
use hbone::listen::ConnectionLimit;
use hbone::post::PostClient;
use mesh::cloud_run::metadata_server;
use mesh::config::DEFAULT_METADATA_PROBE_TIMEOUT;
use mesh::credentials::AccessTokens;
use mesh::credentials::file_tokens::FileTokens;
use mesh::credentials::id_tokens::{IdTokenSource, ServiceAccountIdTokens};
use mesh::credentials::key_file;
use mesh::http::HttpClient;
use mesh::identity::token_cache::{CachePolicy, MintBudget, TokenCache};
use mesh::metadata::MetadataClient;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{HgateConfig, IdTokens, KubeMode};
use crate::gate::Gate;
use crate::route::{AnnotationRoutes, Routes, load_routes};
use crate::{admin, default_route, istiod, mesh_env, register, services};

/// Deadline of one token request to the metadata server or IAM (connect and answer).
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs hgate until SIGTERM/SIGINT, then drains.
pub async fn run(mut config: HgateConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    match default_route::resolve(&mut config).await {
        Ok(()) => {
            tracing::info!(template = %config.route_template.value, source = %config.route_template.source, "default route")
        }
        Err(e) => {
            tracing::warn!(error = %e, "default route unresolved: services without a route are refused")
        }
    }
    let static_routes = match &config.routes {
        Some(path) => load_routes(&path.value)?,
        None => HashMap::new(),
    };
    tracing::info!(count = static_routes.len(), template = %config.route_template.value, "routes loaded");
    let annotations = AnnotationRoutes::default();
    let file = file_credentials(&config).await?;
    let own_tokens = own_access_tokens(&config, file.as_ref());
    let tokens = match config.id_tokens.value {
        IdTokens::None => None,
        IdTokens::Metadata => Some(TokenCache::new(
            id_token_source(&config, file, own_tokens.clone()).await?,
            id_token_policy(&config),
        )),
    };
    let settings = H2Settings::default();
    let gate = Arc::new(Gate {
        routes: Routes::new(
            static_routes,
            annotations.clone(),
            config.route_template.value.clone(),
        ),
        client: PostClient::new(settings, &web_tls()?),
        tokens,
        hello_timeout: config.hello_timeout.value,
        idle_timeout: config.idle_timeout.value,
        buffer: settings.copy_buffer,
    });
    let drain = CancellationToken::new();
    let (ready_tx, ready_rx) = watch::channel(false);
    let max = config.max_connections.value;
    let sni_limit = Arc::new(ConnectionLimit::new("SNI", "HGATE_MAX_CONNECTIONS", max));
    let istiod_limit = Arc::new(ConnectionLimit::new("istiod", "HGATE_MAX_CONNECTIONS", max));

    let admin_listener = bind(config.admin_addr.value, "HGATE_ADMIN_ADDR").await?;
    tracing::info!(addr = %local(&admin_listener), "admin endpoint ready");
    let admin_limit = ConnectionLimit::new("admin", "HGATE_MAX_CONNECTIONS", max);
    let sni_listener = bind(config.sni_addr.value, "HGATE_SNI_ADDR").await?;
    let istiod_listener = match &config.istiod_addr {
        Some(addr) => Some(bind(addr.value, "HGATE_ISTIOD_ADDR").await?),
        None => None,
    };
    let mut listeners = BTreeMap::from([
        ("admin", local(&admin_listener)),
        ("sni", local(&sni_listener)),
    ]);
    if let Some(listener) = &istiod_listener {
        listeners.insert("istiod", local(listener));
    }
    let gate_metrics = admin::GateMetrics(sni_limit.clone());
    mesh::metrics::register("hgate", |registry| {
        registry.register_collector(Box::new(gate_metrics))
    });
    let paths = admin::HgatePaths {
        ready: ready_rx,
        sni: sni_limit.clone(),
        config: config.printable(),
        listeners,
    };
    tokio::spawn(mesh::admin::serve(
        admin_listener,
        admin_limit,
        Arc::new(paths),
    ));
    let mut tasks = Vec::new();
    tracing::info!(addr = %local(&sni_listener), "SNI listener ready");
    tasks.push(tokio::spawn(gate.serve(
        sni_listener,
        sni_limit.clone(),
        drain.clone(),
    )));
    if let Some(listener) = istiod_listener {
        tracing::info!(addr = %local(&listener), upstream = %config.istiod_upstream.value, "istiod forwarding ready");
        tasks.push(tokio::spawn(istiod::serve(
            listener,
            config.istiod_upstream.value.clone(),
            istiod_limit.clone(),
            config.idle_timeout.value,
            settings.connect_timeout,
            drain.clone(),
        )));
    }
    if let Some(client) = kube_client(&config).await {
        start_kube(&client, &config, annotations, &drain);
        if config.register_label.is_some() {
            match register::Registrar::from_config(&config, &client, own_tokens.0.clone()).await {
                Ok(registrar) => {
                    tokio::spawn(registrar.run(drain.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "Cloud Run auto-registration off"),
            }
        }
    } else if config.register_label.is_some() {
        tracing::warn!(
            "Cloud Run auto-registration off: HGATE_REGISTER_LABEL is set but hgate has no Kubernetes client"
        );
    }
    let _ = ready_tx.send(true);
    tracing::info!("hgate ready");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
    let _ = ready_tx.send(false);
    drain.cancel();
    for task in tasks {
        let _ = task.await;
    }
    tracing::info!(
        open_sni = sni_limit.open(),
        open_istiod = istiod_limit.open(),
        "listeners closed; waiting for open connections"
    );
    let timeout = config.drain_timeout.value;
    let (sni_left, istiod_left) =
        tokio::join!(sni_limit.drained(timeout), istiod_limit.drained(timeout));
    tracing::info!(
        open_sni = sni_left,
        open_istiod = istiod_left,
        "drained; exiting"
    );
    Ok(())
}

/// Where hgate's ID tokens come from: IAM `generateIdToken` for
/// `HGATE_ID_TOKEN_SERVICE_ACCOUNT`, called with hgate's own access token (`caller`,
/// [`own_access_tokens`]); else hgate's own
/// identity, from the metadata server's `identity`, or off GCP from a service-account key's
/// token endpoint ([`file_credentials`]).
async fn id_token_source(
    config: &HgateConfig,
    file: Option<(Arc<FileTokens>, String)>,
    (caller, caller_source): (Arc<dyn AccessTokens>, String),
) -> anyhow::Result<IdTokenSource> {
    let Some(gsa) = &config.id_token_service_account else {
        let Some((tokens, source)) = file else {
            tracing::info!(metadata = %config.metadata_host.value, "ID tokens: the metadata server's identity (hgate's own account)");
            return Ok(IdTokenSource::Metadata(MetadataClient::new(
                &config.metadata_host.value,
                TOKEN_TIMEOUT,
            )));
        };
        tokens
            .can_mint_id_tokens()
            .context("ID tokens off GCP: hgate's credentials file")?;
        tracing::info!(credentials = %source, "ID tokens: the service-account key's own, from its token endpoint (target_audience)");
        return Ok(IdTokenSource::KeyFile(tokens));
    };
    // The system trust store is read from disk: off the runtime's threads.
    let http = tokio::task::spawn_blocking(|| HttpClient::new(TOKEN_TIMEOUT))
        .await
        .context("HTTPS client for IAM Credentials")?
        .context("HTTPS client for IAM Credentials")?;
    tracing::info!(
        service_account = %gsa.value,
        iam = %config.iam_credentials_endpoint.value,
        caller = %caller_source,
        "ID tokens: IAM generateIdToken for HGATE_ID_TOKEN_SERVICE_ACCOUNT, asked with hgate's own access token"
    );
    Ok(IdTokenSource::ServiceAccount(ServiceAccountIdTokens::new(
        http,
        &config.iam_credentials_endpoint.value,
        &gsa.value,
        caller,
    )))
}

/// hgate's own access token for Google APIs (IAM for `HGATE_ID_TOKEN_SERVICE_ACCOUNT`, the
/// Cloud Run Admin API for registration), with what the log says of it: the credentials file
/// off GCP ([`file_credentials`]), else the metadata server.
fn own_access_tokens(
    config: &HgateConfig,
    file: Option<&(Arc<FileTokens>, String)>,
) -> (Arc<dyn AccessTokens>, String) {
    match file {
        Some((tokens, source)) => (tokens.clone(), source.clone()),
        None => (
            Arc::new(MetadataClient::new(
                &config.metadata_host.value,
                TOKEN_TIMEOUT,
            )),
            "the metadata server".to_owned(),
        ),
    }
}

/// hgate's own Google credentials off GCP, with what the log says of them: a credentials file
/// (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's file) when one is configured and no metadata
/// server answers the probe (hgate in a cluster outside GCP). `None`: the metadata server;
/// without a file nothing is probed, as before.
async fn file_credentials(
    config: &HgateConfig,
) -> anyhow::Result<Option<(Arc<FileTokens>, String)>> {
    let path =
        |s: &Option<mesh::config::Setting<std::path::PathBuf>>| s.as_ref().map(|s| s.value.clone());
    let (gac, cloudsdk, home) = (
        path(&config.google_application_credentials),
        path(&config.cloudsdk_config),
        path(&config.home),
    );
    let Some(located) = key_file::locate(gac.as_deref(), cloudsdk.as_deref(), home.as_deref())
    else {
        return Ok(None);
    };
    let host = &config.metadata_host.value;
    let probe = metadata_server(
        host,
        host == crate::config::DEFAULT_METADATA_HOST,
        DEFAULT_METADATA_PROBE_TIMEOUT,
    )
    .await;
    let why = match probe {
        Ok(_) => {
            tracing::info!(path = %located.path.display(), metadata = %host, "Google credentials file not used: the metadata server answered, and it comes first on GCP");
            return Ok(None);
        }
        Err(why) => why,
    };
    let tokens = FileTokens::load(&located).await?;
    let source = format!(
        "{} in {} ({}), as {why}",
        tokens.credentials().describe(),
        located.path.display(),
        located.origin
    );
    Ok(Some((Arc::new(tokens), source)))
}

/// The audiences follow the client's SNI (the route template makes every well-formed SNI
/// routable), so the cache is bounded: `HGATE_ID_TOKEN_CACHE` audiences, and mints within
/// `HGATE_ID_TOKEN_BURST` + `HGATE_ID_TOKEN_RATE` per second; beyond it a new audience's
/// connection is closed, while cached audiences keep working.
fn id_token_policy(config: &HgateConfig) -> CachePolicy {
    let burst = u32::try_from(config.id_token_burst.value).unwrap_or(u32::MAX);
    CachePolicy {
        capacity: config.id_token_cache.value,
        budget: Some(MintBudget {
            burst,
            per_second: config.id_token_rate.value as f64,
        }),
        ..CachePolicy::default()
    }
}

async fn bind(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{name}={addr}: bind failed"))
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}

/// TLS for `https://` tunnels: a normal web server identity (Cloud Run's front end) checked
/// against the system roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` override them).
fn web_tls() -> anyhow::Result<rustls::ClientConfig> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        tracing::warn!(errors = ?loaded.errors, "no system root certificates: https:// tunnels will fail");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The Kubernetes client, when hgate runs in a cluster or has a kubeconfig.
async fn kube_client(config: &HgateConfig) -> Option<kube::Client> {
    if config.kube.value == KubeMode::Off {
        return None;
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return match mesh::discovery::kube_client::in_cluster() {
            Ok(client) => Some(client),
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes client: Service annotations and mesh-env are off");
                None
            }
        };
    }
    let path = config.kubeconfig.as_ref()?;
    match mesh::discovery::kube_client::from_kubeconfig(&path.value).await {
        Ok((client, _)) => Some(client),
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes client: Service annotations and mesh-env are off");
            None
        }
    }
}

/// Starts the Kubernetes side: the Service watcher (annotation routes), the ConfigMap
/// watchers, and the mesh-env publisher they wake.
fn start_kube(
    client: &kube::Client,
    config: &HgateConfig,
    annotations: AnnotationRoutes,
    drain: &CancellationToken,
) {
    let inputs = Arc::new(Notify::new());
    tokio::spawn(services::watch(
        client.clone(),
        annotations,
        inputs.clone(),
        drain.clone(),
    ));
    tokio::spawn(mesh_env::watch_config_maps(
        client.clone(),
        inputs.clone(),
        drain.clone(),
    ));
    tokio::spawn(mesh_env::keep_published(
        client.clone(),
        config.project_number.as_ref().map(|s| s.value.clone()),
        config.mesh_tenant.as_ref().map(|s| s.value.clone()),
        inputs,
        drain.clone(),
    ));
}
