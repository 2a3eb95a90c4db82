//! The workload as the agent sees it: namespace, name, revision, pod name and mesh coordinates,
//! each resolved once with the environment first, then discovery, then mesh-env.

use std::collections::BTreeMap;

use crate::config::Config;
use mesh::config::{Env, Setting};

use super::AgentInputs;

/// The cluster id of an in-cluster istiod that was not given one (its `CLUSTER_ID` default).
pub const ISTIOD_CLUSTER_ID: &str = "Kubernetes";

/// A value from the environment first, then the given fallback.
fn pick(env: Option<&Setting<String>>, fallback: &Option<String>) -> Option<String> {
    env.map(|s| s.value.clone())
        .or_else(|| fallback.clone())
        .filter(|v| !v.is_empty())
}

/// The managed control plane tenant: `MESH_TENANT`, else mesh-env's (`-` means in-cluster
/// istiod).
pub fn tenant(config: &Config, mesh_env: &BTreeMap<String, String>) -> Option<String> {
    pick(
        config.mesh_tenant.as_ref(),
        &mesh_env.get("MESH_TENANT").cloned(),
    )
}

/// Whether the istio-token is for open-source istiod (audience `istio-ca`): `OSS_ISTIO` when
/// set, else true unless a managed control plane tenant is configured (managed control planes
/// accept the trust domain as audience).
pub fn oss_istio(config: &Config, mesh_env: &BTreeMap<String, String>) -> bool {
    config.oss_istio.as_ref().map_or_else(
        || !is_managed(tenant(config, mesh_env).as_deref()),
        |s| s.value,
    )
}

/// The workload as the agent sees it: every identity value resolved once, env first.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// K8s namespace.
    pub namespace: String,
    /// Canonical service name.
    pub name: String,
    /// Canonical revision (`K_REVISION`, else `v1`).
    pub revision: String,
    /// Pod name as Istio sees it.
    pub pod_name: String,
    /// KSA.
    pub service_account: String,
    /// Gateway name (`router` mode).
    pub gateway: Option<String>,
    /// MCP tenant, `-` for in-cluster istiod.
    pub tenant: Option<String>,
    /// Project id.
    pub project_id: Option<String>,
    /// Project number.
    pub project_number: Option<String>,
    /// Cluster name.
    pub cluster_name: Option<String>,
    /// Cluster location.
    pub cluster_location: Option<String>,
    /// Trust domain.
    pub trust_domain: Option<String>,
    /// The cluster id istiod knows this workload by (see [`Workload::resolve`]), for
    /// pilot-agent's `ISTIO_META_CLUSTER_ID`, the proxyless node and krun's own CA request.
    pub cluster_id: String,
}

/// The cluster id krun's own CA request carries, decided as for the agent (see
/// [`Workload::resolve`]): one decision for both, so istiod sees one cluster id per workload.
pub fn cluster_id(config: &Config, inputs: &AgentInputs, env: &Env) -> String {
    Workload::resolve(config, inputs, env, None, 0).cluster_id
}

/// True for a managed control plane tenant (not empty, not `-`, which means in-cluster istiod).
fn is_managed(tenant: Option<&str>) -> bool {
    tenant.is_some_and(|t| !t.is_empty() && t != "-")
}

impl Workload {
    /// Resolves the workload from the configuration and the discovered inputs. `hostname` is
    /// the machine's host name (POD_NAME fallback when `HOSTNAME` is unset, where
    /// cloud-run-mesh left POD_NAME empty) and `now_secs` the current Unix time (last-resort pod
    /// name suffix).
    ///
    /// The cluster id is the user's `ISTIO_META_CLUSTER_ID`, else the managed control plane's
    /// `cn-<project>-<location>-<cluster>` with a tenant, else istiod's default `Kubernetes`
    /// (istiod accepts a CSR's cluster id only if it is its own or an alias, and the GKE
    /// cluster name is neither).
    pub fn resolve(
        config: &Config,
        inputs: &AgentInputs,
        env: &Env,
        hostname: Option<String>,
        now_secs: u64,
    ) -> Workload {
        let mesh_env = |key: &str| inputs.mesh_env.get(key).cloned();
        let namespace = config.workload_namespace.value.clone();
        let name = config
            .workload_name
            .as_ref()
            .map_or_else(|| namespace.clone(), |s| s.value.clone());
        let revision = config.k_revision.as_ref().map(|s| s.value.clone());
        let pod_name = match (&revision, &inputs.instance_id) {
            (Some(rev), Some(id)) => format!("{rev}-{}", id.chars().take(8).collect::<String>()),
            (Some(rev), None) => format!("{rev}-{now_secs}"),
            (None, _) => env
                .get("HOSTNAME")
                .map(str::to_owned)
                .or(hostname)
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("{name}--{now_secs}")),
        };
        let project_id =
            pick(config.project_id.as_ref(), &inputs.project_id).or_else(|| mesh_env("PROJECT_ID"));
        let trust_domain = pick(config.trust_domain.as_ref(), &inputs.trust_domain)
            .or_else(|| project_id.as_ref().map(|p| format!("{p}.svc.id.goog")));
        let tenant = tenant(config, &inputs.mesh_env);
        let cluster_name = pick(config.cluster_name.as_ref(), &inputs.cluster_name)
            .or_else(|| mesh_env("CLUSTER_NAME"));
        let cluster_location = pick(config.cluster_location.as_ref(), &inputs.cluster_location)
            .or_else(|| mesh_env("CLUSTER_LOCATION"));
        let part = |v: &Option<String>| v.clone().unwrap_or_default();
        let cluster_id = match env.get("ISTIO_META_CLUSTER_ID").filter(|v| !v.is_empty()) {
            Some(user) => user.to_owned(),
            None if is_managed(tenant.as_deref()) => format!(
                "cn-{}-{}-{}",
                part(&project_id),
                part(&cluster_location),
                part(&cluster_name)
            ),
            None => ISTIOD_CLUSTER_ID.to_owned(),
        };
        Workload {
            revision: revision.unwrap_or_else(|| "v1".to_owned()),
            pod_name,
            service_account: config.workload_service_account.value.clone(),
            gateway: config
                .launcher
                .gateway_name
                .as_ref()
                .map(|s| s.value.clone()),
            tenant,
            project_number: pick(config.project_number.as_ref(), &inputs.project_number)
                .or_else(|| mesh_env("PROJECT_NUMBER")),
            cluster_name,
            cluster_location,
            cluster_id,
            project_id,
            trust_domain,
            namespace,
            name,
        }
    }

    /// True when a managed control plane tenant is configured (not empty, not `-`).
    pub fn has_tenant(&self) -> bool {
        is_managed(self.tenant.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn workload(pairs: &[(&str, &str)], inputs: &AgentInputs, hostname: Option<&str>) -> Workload {
        let env = env(pairs);
        let config = Config::from_env(&env).expect("valid env");
        Workload::resolve(
            &config,
            inputs,
            &env,
            hostname.map(str::to_owned),
            1700000000,
        )
    }

    #[test]
    fn pod_name_follows_the_reference_order_and_uses_the_real_hostname() {
        let with_id = AgentInputs {
            instance_id: Some("0123456789abcdef".into()),
            ..AgentInputs::default()
        };
        let rev = [("K_SERVICE", "fortio"), ("K_REVISION", "fortio-001")];
        assert_eq!(
            workload(&rev, &with_id, None).pod_name,
            "fortio-001-01234567"
        );
        let none = AgentInputs::default();
        assert_eq!(
            workload(&rev, &none, None).pod_name,
            "fortio-001-1700000000"
        );
        let svc = [("K_SERVICE", "fortio"), ("HOSTNAME", "from-env")];
        assert_eq!(workload(&svc, &none, Some("host")).pod_name, "from-env");
        // HOSTNAME unset: the machine's host name, not cloud-run-mesh's empty string.
        assert_eq!(workload(&svc[..1], &none, Some("host")).pod_name, "host");
        assert_eq!(
            workload(&svc[..1], &none, None).pod_name,
            "fortio--1700000000"
        );
        assert_eq!(workload(&svc[..1], &none, None).revision, "v1");
    }

    #[test]
    fn environment_wins_over_discovered_and_mesh_env_values() {
        let inputs = AgentInputs {
            project_number: Some("111".into()),
            project_id: Some("discovered".into()),
            mesh_env: [("MESH_TENANT".to_owned(), "t1".to_owned())].into(),
            ..AgentInputs::default()
        };
        let w = workload(&[("PROJECT_NUMBER", "222")], &inputs, None);
        assert_eq!(w.project_number.as_deref(), Some("222"));
        assert_eq!(w.project_id.as_deref(), Some("discovered"));
        assert_eq!(w.trust_domain.as_deref(), Some("discovered.svc.id.goog"));
        assert!(w.has_tenant());
        assert!(!workload(&[("MESH_TENANT", "-")], &inputs, None).has_tenant());
    }

    /// One cluster id for the agent and krun's CA request: the user's, else the managed
    /// control plane's with a tenant, else istiod's default.
    #[test]
    fn cluster_id_is_the_users_else_the_managed_one_else_istiods_default() {
        let id = |pairs: &[(&str, &str)]| {
            let env = env(pairs);
            let config = Config::from_env(&env).expect("valid env");
            cluster_id(&config, &AgentInputs::default(), &env)
        };
        let gke = [
            ("PROJECT_ID", "p"),
            ("CLUSTER_LOCATION", "us-central1"),
            ("CLUSTER_NAME", "c"),
        ];
        assert_eq!(id(&gke), ISTIOD_CLUSTER_ID);
        assert_eq!(
            id(&[gke[0], gke[1], gke[2], ("MESH_TENANT", "-")]),
            "Kubernetes"
        );
        assert_eq!(
            id(&[gke[0], gke[1], gke[2], ("MESH_TENANT", "t1")]),
            "cn-p-us-central1-c"
        );
        assert_eq!(
            id(&[
                gke[0],
                ("MESH_TENANT", "t1"),
                ("ISTIO_META_CLUSTER_ID", "east")
            ]),
            "east"
        );
        assert_eq!(id(&[("ISTIO_META_CLUSTER_ID", "")]), ISTIOD_CLUSTER_ID);
    }

    /// The istio-token audience: `istio-ca` for open-source istiod unless a managed tenant is
    /// configured; OSS_ISTIO decides when set.
    #[test]
    fn oss_istio_is_detected_from_the_tenant_unless_set() {
        let oss = |pairs: &[(&str, &str)]| {
            let config = Config::from_env(&env(pairs)).expect("valid env");
            oss_istio(&config, &BTreeMap::new())
        };
        assert!(oss(&[]));
        assert!(oss(&[("MESH_TENANT", "-")]));
        assert!(!oss(&[("MESH_TENANT", "t1")]));
        assert!(oss(&[("MESH_TENANT", "t1"), ("OSS_ISTIO", "true")]));
        assert!(!oss(&[("OSS_ISTIO", "false")]));
    }
}
