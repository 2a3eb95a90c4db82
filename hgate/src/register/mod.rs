//! Auto-registration: Cloud Run services labelled `HGATE_REGISTER_LABEL=<namespace>` become
//! mesh services `NAME.<namespace>.svc` routed through hgate, with no manifest per service.
//! Every `HGATE_REGISTER_INTERVAL` hgate lists the services of its project in each region
//! (Cloud Run Admin API v2) and reconciles the cluster: it creates or updates the
//! [`objects`] of each labelled service and deletes the ones it created for services that
//! are gone or no longer labelled. An object it did not create (no
//! `app.kubernetes.io/managed-by=hgate` label) is never changed: its Cloud Run service is not
//! registered, and this is reported once (a warning line) and counted
//! (`hgate_registration_conflicts`).

pub mod objects;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use mesh::backoff::Backoff;
use mesh::credentials::AccessTokens;
use mesh::discovery::google_api::GoogleApi;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::HgateConfig;
use crate::mesh_env;
use crate::run_admin::{self, RunService};
use objects::{Gateway, Kind, MANAGED_BY, MANAGED_BY_LABEL, Registration, TUNNEL_PATH};

/// Same-named objects hgate did not create, blocking a registration, at the last pass.
pub static CONFLICTS: AtomicU64 = AtomicU64::new(0);

/// The Service (in [`mesh_env::NAMESPACE`]) whose cluster IP mesh clients reach hgate's SNI
/// listener on, and the name of its SNI port.
const GATEWAY_SERVICE: (&str, &str) = ("internal-hgate", "tls-sni");

/// What to register and where from.
pub struct Registrar {
    /// The cluster.
    client: kube::Client,
    /// The Cloud Run Admin API client.
    api: GoogleApi,
    /// `CLOUD_RUN_API_ENDPOINT`.
    endpoint: String,
    /// The project (number or id).
    project: String,
    /// The regions listed.
    regions: Vec<String>,
    /// `HGATE_REGISTER_LABEL`.
    label: String,
    /// `HGATE_REGISTER_INTERVAL`.
    interval: Duration,
}

/// Problems of one pass, reported once each until they go away.
#[derive(Default)]
struct Problems {
    /// Same-named objects not created by hgate.
    conflicts: BTreeSet<String>,
    /// Anything else that keeps a labelled service out (a bad namespace, no URL yet).
    other: BTreeSet<String>,
}

impl Registrar {
    /// Registration as `config` sets it: the project and regions resolved at start
    /// ([`crate::default_route::resolve`]), the Admin API called with `tokens`. An error says
    /// which setting is missing.
    pub async fn from_config(
        config: &HgateConfig,
        client: &kube::Client,
        tokens: Arc<dyn AccessTokens>,
    ) -> Result<Registrar, String> {
        let label = config
            .register_label
            .as_ref()
            .map(|s| s.value.clone())
            .ok_or("HGATE_REGISTER_LABEL is unset")?;
        let project = config
            .cloud_run_project_number
            .as_ref()
            .map(|s| s.value.clone())
            .ok_or("no project number: set HGATE_CLOUD_RUN_PROJECT_NUMBER")?;
        let regions = match (&config.register_regions, &config.cloud_run_region) {
            (Some(list), _) => list.value.clone(),
            (None, Some(region)) => vec![region.value.clone()],
            (None, None) => {
                return Err(
                    "no region: set HGATE_REGISTER_REGIONS or HGATE_CLOUD_RUN_REGION".into(),
                );
            }
        };
        // The system trust store is read from disk: off the runtime's threads.
        let api = tokio::task::spawn_blocking(move || GoogleApi::new(tokens, Backoff::DISCOVERY))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(Registrar {
            client: client.clone(),
            api,
            endpoint: config.cloud_run_api_endpoint.value.clone(),
            project,
            regions,
            label,
            interval: config.register_interval.value,
        })
    }

    /// Reconciles now and every interval until `drain`.
    pub async fn run(self, drain: CancellationToken) {
        tracing::info!(
            label = %self.label,
            project = %self.project,
            regions = %self.regions.join(","),
            interval = ?self.interval,
            "Cloud Run auto-registration on"
        );
        let mut reported = Problems::default();
        loop {
            match self.pass().await {
                Ok(problems) => {
                    // The count first: whoever reads a warning line finds it counted.
                    CONFLICTS.store(problems.conflicts.len() as u64, Ordering::Relaxed);
                    report(&reported, &problems);
                    reported = problems;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?self.interval, "registration pass failed; nothing deleted")
                }
            }
            tokio::select! {
                () = drain.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One reconcile: list, apply, prune. An error before the prune (the list or hgate's
    /// address failed) deletes nothing.
    async fn pass(&self) -> Result<Problems, String> {
        let gateway = self.gateway().await?;
        let mut problems = Problems::default();
        let mut wanted: BTreeMap<(String, String), Registration> = BTreeMap::new();
        for region in &self.regions {
            let services =
                run_admin::list_services(&self.api, &self.endpoint, &self.project, region)
                    .await
                    .map_err(|e| format!("list the Cloud Run services of {region}: {e}"))?;
            for service in &services {
                match self.registration(service, region) {
                    None => {}
                    Some(Err(problem)) => {
                        problems.other.insert(problem);
                    }
                    Some(Ok(reg)) => {
                        let key = (reg.namespace.clone(), reg.name.clone());
                        if let Some(first) = wanted.get(&key) {
                            problems.other.insert(format!(
                                "Cloud Run service {} is labelled for {}/{} like {}: not registered, the first one listed is",
                                reg.source, reg.namespace, reg.name, first.source
                            ));
                        } else {
                            wanted.insert(key, reg);
                        }
                    }
                }
            }
        }
        tracing::debug!(
            labelled = wanted.len(),
            "Cloud Run services listed for registration"
        );
        let mut kept = BTreeSet::new();
        for (key, reg) in &wanted {
            match self.apply(reg, &gateway).await {
                Ok(None) => {
                    kept.insert(key.clone());
                }
                Ok(Some(conflict)) => {
                    problems.conflicts.insert(conflict);
                }
                Err(e) => {
                    // Keep what exists; the next pass tries again.
                    kept.insert(key.clone());
                    tracing::warn!(service = %reg.source, error = %e, "registration not applied; trying again next pass");
                }
            }
        }
        self.prune(&kept).await?;
        Ok(problems)
    }

    /// The registration `service` asks for, if it carries the label; an error names why it
    /// cannot be registered.
    fn registration(
        &self,
        service: &RunService,
        region: &str,
    ) -> Option<Result<Registration, String>> {
        let namespace = service.labels.get(&self.label)?;
        let name = service.short_name();
        let source = format!("{region}/{name}");
        if !is_dns_label(namespace) {
            return Some(Err(format!(
                "Cloud Run service {source}: label {}={namespace} is not a Kubernetes namespace name (lower-case letters, digits and -, at most 63); not registered",
                self.label
            )));
        }
        if service.uri.is_empty() {
            return Some(Err(format!(
                "Cloud Run service {source} has no URL yet (not ready); registered once it has"
            )));
        }
        Some(Ok(Registration {
            namespace: namespace.clone(),
            name: name.to_owned(),
            tunnel_url: format!("{}{TUNNEL_PATH}", service.uri.trim_end_matches('/')),
            source,
            port: service.port(),
        }))
    }

    /// hgate's address inside the cluster: the cluster IP and SNI port of
    /// `istio-system/internal-hgate`.
    async fn gateway(&self) -> Result<Gateway, String> {
        let (name, port_name) = GATEWAY_SERVICE;
        let services: Api<Service> = Api::namespaced(self.client.clone(), mesh_env::NAMESPACE);
        let missing = |what: &str| {
            format!(
                "Service {}/{name} {what}: registered services point at it (apply manifests/services.yaml)",
                mesh_env::NAMESPACE
            )
        };
        let service = services
            .get_opt(name)
            .await
            .map_err(|e| missing(&format!("could not be read ({e})")))?
            .ok_or_else(|| missing("does not exist"))?;
        let spec = service.spec.unwrap_or_default();
        let ip = spec
            .cluster_ip
            .filter(|ip| !ip.is_empty() && ip != "None")
            .ok_or_else(|| missing("has no cluster IP"))?;
        let port = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name.as_deref() == Some(port_name))
            .ok_or_else(|| missing(&format!("has no port named {port_name}")))?
            .port;
        let port = u16::try_from(port).map_err(|_| missing("has a port out of range"))?;
        Ok(Gateway { ip, port })
    }

    fn api(&self, kind: Kind, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &kind.resource())
    }

    /// Creates or updates the objects of `reg`; `Some(conflict)` when one of them exists and
    /// is not hgate's (then nothing is written).
    async fn apply(
        &self,
        reg: &Registration,
        gateway: &Gateway,
    ) -> Result<Option<String>, kube::Error> {
        let mut current = Vec::new();
        for kind in Kind::ALL {
            let name = kind.object_name(&reg.name);
            let found = self.api(kind, &reg.namespace).get_opt(&name).await?;
            let found = found.map(to_json).transpose()?;
            if let Some(object) = &found
                && objects::owner(object) != Some(reg.name.as_str())
            {
                return Ok(Some(format!(
                    "{kind} {}/{name} exists and is not managed by hgate (no label {MANAGED_BY_LABEL}={MANAGED_BY}): left alone, Cloud Run service {} not registered",
                    reg.namespace, reg.source
                )));
            }
            current.push((kind, name, found));
        }
        for (kind, name, found) in current {
            let desired = objects::desired(kind, reg, gateway);
            let api = self.api(kind, &reg.namespace);
            match found {
                None => {
                    api.create(&PostParams::default(), &from_json(desired)?)
                        .await?;
                    tracing::info!(kind = %kind, namespace = %reg.namespace, name = %name, service = %reg.source, "registration object created");
                }
                Some(object) if objects::holds(&object, &desired) => {}
                Some(mut object) => {
                    objects::overlay(&mut object, &desired);
                    api.replace(&name, &PostParams::default(), &from_json(object)?)
                        .await?;
                    tracing::info!(kind = %kind, namespace = %reg.namespace, name = %name, service = %reg.source, "registration object updated");
                }
            }
        }
        Ok(None)
    }

    /// Deletes every object hgate created whose `(namespace, service)` is not in `kept`.
    async fn prune(&self, kept: &BTreeSet<(String, String)>) -> Result<(), String> {
        let owned = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        for kind in Kind::ALL {
            let all: Api<DynamicObject> = Api::all_with(self.client.clone(), &kind.resource());
            let list = all
                .list(&owned)
                .await
                .map_err(|e| format!("list the {kind}s hgate manages: {e}"))?;
            for object in list {
                let (Some(namespace), Some(name)) = (
                    object.metadata.namespace.clone(),
                    object.metadata.name.clone(),
                ) else {
                    continue;
                };
                let json = to_json(object).map_err(|e| e.to_string())?;
                let Some(service) = objects::owner(&json) else {
                    continue;
                };
                if kept.contains(&(namespace.clone(), service.to_owned())) {
                    continue;
                }
                match self
                    .api(kind, &namespace)
                    .delete(&name, &DeleteParams::default())
                    .await
                {
                    Ok(_) => {
                        tracing::info!(kind = %kind, namespace = %namespace, name = %name, "registration object deleted: its Cloud Run service is gone or no longer labelled")
                    }
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => {
                        tracing::warn!(kind = %kind, namespace = %namespace, name = %name, error = %e, "registration object not deleted; trying again next pass")
                    }
                }
            }
        }
        Ok(())
    }
}

/// One warning line per problem that is new since the last pass.
fn report(before: &Problems, now: &Problems) {
    for conflict in now.conflicts.difference(&before.conflicts) {
        tracing::warn!(conflicts = now.conflicts.len(), "{conflict}");
    }
    for problem in now.other.difference(&before.other) {
        tracing::warn!("{problem}");
    }
}

/// A Kubernetes namespace name (RFC 1123 label).
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn to_json(object: DynamicObject) -> Result<Value, kube::Error> {
    serde_json::to_value(object).map_err(kube::Error::SerdeError)
}

fn from_json(object: Value) -> Result<DynamicObject, kube::Error> {
    serde_json::from_value(object).map_err(kube::Error::SerdeError)
}

#[cfg(test)]
mod tests {
    use super::is_dns_label;

    #[test]
    fn namespaces_must_be_dns_labels() {
        for good in ["shop", "a", "team-1"] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "Shop", "-a", "a-", "a.b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
