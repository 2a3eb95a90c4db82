//! Routes from Service annotations: every Service with a `krun.dev/tunnel-url` annotation
//! routes `<name>.<namespace>` to that URL. Refreshed by a periodic list (not a watch: a
//! list every `HGATE_ROUTE_REFRESH` is simpler to bound and enough for routes that change
//! on deploys). The list is read in pages of [`PAGE`] Services, so no one answer nears the
//! client's size cap however large the cluster.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams};

use crate::route::{AnnotationRoutes, TUNNEL_URL_ANNOTATION};

/// Services per list call.
const PAGE: u32 = 500;

/// Lists Services once and replaces `routes` with their annotations; returns the new count
/// when the routes changed.
pub async fn refresh(
    client: &kube::Client,
    routes: &AnnotationRoutes,
) -> Result<Option<usize>, kube::Error> {
    let services: Api<Service> = Api::all(client.clone());
    let mut found = HashMap::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = services.list(&params).await?;
        found.extend(page.items.iter().filter_map(|s| {
            let url = s
                .metadata
                .annotations
                .as_ref()?
                .get(TUNNEL_URL_ANNOTATION)?;
            let name = s.metadata.name.as_ref()?;
            let namespace = s.metadata.namespace.as_deref().unwrap_or("default");
            Some((format!("{name}.{namespace}"), url.clone()))
        }));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    let count = found.len();
    let mut current = routes.write().unwrap_or_else(|p| p.into_inner());
    if *current == found {
        return Ok(None);
    }
    *current = found;
    Ok(Some(count))
}
