//! The mesh-env publisher: keeps `istio-system/mesh-env` (the ConfigMap krun reads to find the
//! mesh, as in cloud-run-mesh (<https://github.com/GoogleCloudPlatform/cloud-run-mesh>)) current with the
//! gateway's load balancer addresses, istiod's root and the project number and tenant.
//!
//! Unlike cloud-run-mesh (set-if-empty, never updated), values hgate wrote are updated when
//! they change (a rotated root, a new LB address). Keys an operator set are never touched:
//! hgate records the keys it owns in the [`OWNED_KEYS_ANNOTATION`] annotation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// Namespace of mesh-env and of the Services it describes.
pub const NAMESPACE: &str = "istio-system";
/// The ConfigMap krun reads.
pub const MESH_ENV: &str = "mesh-env";
/// The ConfigMap holding istiod's root (`CAROOT_ISTIOD`).
pub const ISTIOD_ROOT: &str = "istio-ca-root-cert";
/// The Services whose LB addresses mesh-env publishes (`MCON_ADDR`, `IMCON_ADDR`).
pub const GATEWAY_SERVICES: [&str; 2] = ["hgate", "internal-hgate"];
/// Wait before trying again after a failed publish with no new change to trigger it.
const RETRY: Duration = Duration::from_secs(5);
/// Comma-separated keys hgate wrote and may update.
pub const OWNED_KEYS_ANNOTATION: &str = "krun.dev/hgate-owned-keys";

/// What hgate knows, before it becomes mesh-env keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// LB address of Service `hgate` (`MCON_ADDR`).
    pub hgate_addr: Option<String>,
    /// LB address of Service `internal-hgate` (`IMCON_ADDR`).
    pub internal_addr: Option<String>,
    /// `root-cert.pem` of `istio-ca-root-cert` (`CAROOT_ISTIOD`).
    pub istiod_root: Option<String>,
    /// `PROJECT_NUMBER`.
    pub project_number: Option<String>,
    /// `MESH_TENANT`.
    pub mesh_tenant: Option<String>,
}

impl Facts {
    /// The mesh-env keys these facts give.
    pub fn keys(&self) -> BTreeMap<String, String> {
        [
            ("MCON_ADDR", &self.hgate_addr),
            ("IMCON_ADDR", &self.internal_addr),
            ("CAROOT_ISTIOD", &self.istiod_root),
            ("PROJECT_NUMBER", &self.project_number),
            ("MESH_TENANT", &self.mesh_tenant),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v.clone().filter(|v| !v.is_empty())?)))
        .collect()
    }
}

/// The new data and owned keys, or `None` when nothing changes.
pub fn merge(
    data: &BTreeMap<String, String>,
    owned: &BTreeSet<String>,
    desired: &BTreeMap<String, String>,
) -> Option<(BTreeMap<String, String>, BTreeSet<String>)> {
    let mut data = data.clone();
    let mut owned = owned.clone();
    let mut changed = false;
    for (key, value) in desired {
        let operator_set =
            !owned.contains(key) && data.get(key).is_some_and(|v| !v.trim().is_empty());
        if operator_set {
            continue;
        }
        if data.get(key) != Some(value) {
            data.insert(key.clone(), value.clone());
            changed = true;
        }
        changed |= owned.insert(key.clone());
    }
    changed.then_some((data, owned))
}

/// The first ingress IP or hostname of a LoadBalancer Service.
fn lb_address(service: &Service) -> Option<String> {
    let ingress = service
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?;
    let first = ingress.first()?;
    first.ip.clone().or_else(|| first.hostname.clone())
}

/// Whether a change to `service` can change mesh-env (one of [`GATEWAY_SERVICES`]).
pub fn is_input_service(service: &Service) -> bool {
    service.metadata.namespace.as_deref() == Some(NAMESPACE)
        && service
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| GATEWAY_SERVICES.contains(&n))
}

/// Watches istiod's root and mesh-env itself (an operator's edit or delete is repaired)
/// until `drain`, waking `inputs` at each change. One watcher per name, each with a
/// `metadata.name` field selector, so RBAC can stay limited to those two ConfigMaps.
pub async fn watch_config_maps(
    client: kube::Client,
    inputs: Arc<Notify>,
    drain: CancellationToken,
) {
    let maps: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    let one = |name: &str| {
        watcher(
            maps.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
    };
    let events = one(ISTIOD_ROOT).merge(one(MESH_ENV));
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            () = drain.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ConfigMap watch (istio-system) failed; watching again")
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
            Some(Ok(_)) => inputs.notify_one(),
        }
    }
}

/// Publishes mesh-env each time `inputs` is woken (a watched input changed), until `drain`;
/// a failed publish is tried again after [`RETRY`] or at the next change.
pub async fn keep_published(
    client: kube::Client,
    project_number: Option<String>,
    mesh_tenant: Option<String>,
    inputs: Arc<Notify>,
    drain: CancellationToken,
) {
    loop {
        tokio::select! {
            () = drain.cancelled() => return,
            () = inputs.notified() => {}
        }
        let published = match gather(&client, project_number.clone(), mesh_tenant.clone()).await {
            Ok(facts) => publish(&client, &facts).await,
            Err(e) => Err(e),
        };
        match published {
            Ok(keys) if keys.is_empty() => {}
            Ok(keys) => tracing::info!(keys = keys.join(","), "mesh-env published"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?RETRY, "mesh-env publish failed");
                let again = inputs.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY).await;
                    again.notify_one();
                });
            }
        }
    }
}

/// Reads the facts from the cluster; missing objects leave their keys out.
pub async fn gather(
    client: &kube::Client,
    project_number: Option<String>,
    mesh_tenant: Option<String>,
) -> Result<Facts, kube::Error> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let root = maps
        .get_opt(ISTIOD_ROOT)
        .await?
        .and_then(|cm| cm.data?.get("root-cert.pem").cloned());
    Ok(Facts {
        hgate_addr: services
            .get_opt(GATEWAY_SERVICES[0])
            .await?
            .as_ref()
            .and_then(lb_address),
        internal_addr: services
            .get_opt(GATEWAY_SERVICES[1])
            .await?
            .as_ref()
            .and_then(lb_address),
        istiod_root: root,
        project_number,
        mesh_tenant,
    })
}

/// Creates or updates mesh-env from `facts`; returns the keys written (empty: no change).
pub async fn publish(client: &kube::Client, facts: &Facts) -> Result<Vec<String>, kube::Error> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let existing = maps.get_opt(MESH_ENV).await?;
    let (data, owned, meta) = match &existing {
        Some(cm) => {
            let owned = cm
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(OWNED_KEYS_ANNOTATION))
                .map(|s| {
                    s.split(',')
                        .filter(|k| !k.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            (
                cm.data.clone().unwrap_or_default(),
                owned,
                cm.metadata.clone(),
            )
        }
        None => (
            BTreeMap::new(),
            BTreeSet::new(),
            ObjectMeta {
                name: Some(MESH_ENV.to_owned()),
                namespace: Some(NAMESPACE.to_owned()),
                ..ObjectMeta::default()
            },
        ),
    };
    let desired = facts.keys();
    let Some((data, owned)) = merge(&data, &owned, &desired) else {
        return Ok(Vec::new());
    };
    let written: Vec<String> = owned.iter().cloned().collect();
    let mut meta = meta;
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(OWNED_KEYS_ANNOTATION.to_owned(), written.join(","));
    let cm = ConfigMap {
        metadata: meta,
        data: Some(data),
        ..ConfigMap::default()
    };
    if existing.is_some() {
        maps.replace(MESH_ENV, &PostParams::default(), &cm).await?;
    } else {
        maps.create(&PostParams::default(), &cm).await?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn owned_keys_follow_changes_and_operator_keys_stay() {
        let first = map(&[("IMCON_ADDR", "10.0.0.1"), ("CAROOT_ISTIOD", "root1")]);
        let existing = map(&[("XDS_ADDR", "istiod.example:15012"), ("MESH_TENANT", "-")]);
        let (data, owned) = merge(&existing, &BTreeSet::new(), &first).expect("changed");
        assert_eq!(data["IMCON_ADDR"], "10.0.0.1");
        assert_eq!(merge(&data, &owned, &first), None, "no change, no write");
        let second = map(&[
            ("IMCON_ADDR", "10.0.0.2"),
            ("CAROOT_ISTIOD", "root2"),
            ("MESH_TENANT", "tenant"),
        ]);
        let (data, owned) = merge(&data, &owned, &second).expect("changed");
        assert_eq!(data["IMCON_ADDR"], "10.0.0.2");
        assert_eq!(data["CAROOT_ISTIOD"], "root2");
        assert_eq!(data["MESH_TENANT"], "-", "operator-set key survives");
        assert_eq!(data["XDS_ADDR"], "istiod.example:15012");
        assert!(!owned.contains("MESH_TENANT"));
    }
}
