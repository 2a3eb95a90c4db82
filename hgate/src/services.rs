//! Routes from Service annotations: every Service with a `krun.dev/tunnel-url` annotation
//! routes `<name>.<namespace>` to that URL. Kept current by a kube-runtime watcher over all
//! Services: one list, then a watch from its resourceVersion. A change is applied when its
//! watch event arrives; a dropped watch resumes from the last version seen, and an expired
//! version (HTTP 410) starts over with a fresh list that replaces the routes whole.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::mesh_env;
use crate::route::{AnnotationRoutes, TUNNEL_URL_ANNOTATION};

/// `name.namespace` of a Service, the key of its route.
fn key(service: &Service) -> Option<String> {
    let name = service.metadata.name.as_ref()?;
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    Some(format!("{name}.{namespace}"))
}

/// The Service's tunnel URL annotation.
fn tunnel_url(service: &Service) -> Option<String> {
    service
        .metadata
        .annotations
        .as_ref()?
        .get(TUNNEL_URL_ANNOTATION)
        .cloned()
}

/// Watches Services until `drain`: keeps `routes` equal to their annotations and wakes
/// `mesh_env_inputs` when one of hgate's own Services (whose LB addresses mesh-env
/// publishes) changes.
pub async fn watch(
    client: kube::Client,
    routes: AnnotationRoutes,
    mesh_env_inputs: Arc<Notify>,
    drain: CancellationToken,
) {
    let services: Api<Service> = Api::all(client);
    let events = watcher(services, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut listing: Option<HashMap<String, String>> = None;
    loop {
        let event = tokio::select! {
            () = drain.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Service watch failed; routes kept, watching again");
            }
            Some(Ok(watcher::Event::Init)) => listing = Some(HashMap::new()),
            Some(Ok(watcher::Event::InitApply(service))) => {
                if let (Some(found), Some(key), Some(url)) =
                    (listing.as_mut(), key(&service), tunnel_url(&service))
                {
                    found.insert(key, url);
                }
            }
            Some(Ok(watcher::Event::InitDone)) => {
                let found = listing.take().unwrap_or_default();
                let count = found.len();
                let mut current = routes.write().unwrap_or_else(|p| p.into_inner());
                if *current != found {
                    *current = found;
                    tracing::info!(
                        count,
                        "Service annotation routes changed (krun.dev/tunnel-url)"
                    );
                }
                mesh_env_inputs.notify_one();
            }
            Some(Ok(watcher::Event::Apply(service))) => {
                apply(&routes, &service, tunnel_url(&service));
                if mesh_env::is_input_service(&service) {
                    mesh_env_inputs.notify_one();
                }
            }
            Some(Ok(watcher::Event::Delete(service))) => {
                apply(&routes, &service, None);
                if mesh_env::is_input_service(&service) {
                    mesh_env_inputs.notify_one();
                }
            }
        }
    }
}

/// Sets (or, with `None`, removes) the route of one Service; one log line when it changed.
fn apply(routes: &AnnotationRoutes, service: &Service, url: Option<String>) {
    let Some(key) = key(service) else { return };
    let mut current = routes.write().unwrap_or_else(|p| p.into_inner());
    match url {
        Some(url) if current.get(&key) != Some(&url) => {
            tracing::info!(service = %key, url = %url, "route updated (krun.dev/tunnel-url)");
            current.insert(key, url);
        }
        None if current.remove(&key).is_some() => {
            tracing::info!(service = %key, "route removed (krun.dev/tunnel-url gone)");
        }
        _ => {}
    }
}
