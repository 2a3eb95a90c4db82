//! Whether anything on this machine suggests GCP, decided before any network call: a plain
//! `krun -- app` on a laptop or in docker should not wait for the metadata probe (a connect to
//! 169.254.169.254 raced against a DNS lookup) on its way to starting the app.
//!
//! The hints are the ones Google's own client libraries and runtimes leave: Cloud Run's
//! `K_SERVICE` / `CLOUD_RUN_JOB`, an explicit `GCE_METADATA_HOST`, a GKE or Traffic Director
//! `MESH`, a Kubernetes pod (`KUBERNETES_SERVICE_HOST`: GKE Sandbox pods have no DMI), and the
//! DMI product name GCE gives every VM and GKE node ("Google Compute Engine", which
//! google-auth checks the same way).

use crate::config::MeshConfig;
use crate::config::names;
use crate::discovery::mesh_url::MeshUrl;

/// Where Linux exposes the machine's DMI product name (readable by any user).
pub const DMI_PRODUCT_NAME: &str = "/sys/class/dmi/id/product_name";

/// What suggested GCP; printed in the log line that says the probe runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcpHint {
    /// An environment variable GCP (or the operator, for `GCE_METADATA_HOST`) sets.
    Env(&'static str),
    /// `MESH` names a GKE cluster or Traffic Director.
    Mesh,
    /// The DMI product name starts with "Google".
    Dmi,
}

impl std::fmt::Display for GcpHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GcpHint::Env(name) => write!(f, "{name} is set"),
            GcpHint::Mesh => f.write_str("MESH names GKE or Traffic Director"),
            GcpHint::Dmi => write!(f, "{DMI_PRODUCT_NAME} names Google"),
        }
    }
}

/// The first hint of GCP in `config`, `mesh` and the DMI product name (`None` when the file
/// is absent, as in most containers off GCP). Pure, so every hint is unit-tested.
pub fn gcp_hint(
    config: &MeshConfig,
    mesh: Option<&MeshUrl>,
    dmi_product_name: Option<&str>,
) -> Option<GcpHint> {
    let env_hints = [
        (names::K_SERVICE, config.k_service.is_some()),
        (names::CLOUD_RUN_JOB, config.cloud_run_job.is_some()),
        (
            names::GCE_METADATA_HOST,
            config.gce_metadata_host.source == crate::config::Source::Env,
        ),
        (
            names::KUBERNETES_SERVICE_HOST,
            config.kubernetes_service_host.is_some(),
        ),
    ];
    if let Some((name, _)) = env_hints.iter().find(|(_, set)| *set) {
        return Some(GcpHint::Env(name));
    }
    if matches!(mesh, Some(MeshUrl::Gke(_) | MeshUrl::TrafficDirector(_))) {
        return Some(GcpHint::Mesh);
    }
    dmi_product_name
        .is_some_and(|name| name.trim_start().starts_with("Google"))
        .then_some(GcpHint::Dmi)
}

/// This machine's DMI product name, `None` when it cannot be read.
pub fn dmi_product_name() -> Option<String> {
    std::fs::read_to_string(DMI_PRODUCT_NAME).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    fn config(vars: &[(&str, &str)]) -> MeshConfig {
        let env: Env = vars.iter().copied().collect();
        MeshConfig::from_env(&env).expect("config")
    }

    #[test]
    fn a_laptop_or_plain_docker_has_no_hint() {
        assert_eq!(gcp_hint(&config(&[]), None, None), None);
        assert_eq!(
            gcp_hint(&config(&[]), None, Some("Standard PC (Q35 + ICH9, 2009)\n")),
            None
        );
    }

    #[test]
    fn cloud_run_an_explicit_metadata_host_and_pods_are_hints() {
        for name in [
            "K_SERVICE",
            "CLOUD_RUN_JOB",
            "GCE_METADATA_HOST",
            "KUBERNETES_SERVICE_HOST",
        ] {
            assert_eq!(
                gcp_hint(&config(&[(name, "x")]), None, None),
                Some(GcpHint::Env(name)),
                "{name}"
            );
        }
    }

    #[test]
    fn a_gke_or_td_mesh_is_a_hint_a_file_mesh_is_not() {
        for (mesh, hint) in [
            ("gke://p", Some(GcpHint::Mesh)),
            ("td:p", Some(GcpHint::Mesh)),
            ("file:///etc/mesh-env.yaml", None),
        ] {
            let url = MeshUrl::parse(mesh).expect("mesh url");
            assert_eq!(gcp_hint(&config(&[]), Some(&url), None), hint, "{mesh}");
        }
    }

    #[test]
    fn a_gce_vm_or_gke_node_is_found_by_its_dmi_product_name() {
        assert_eq!(
            gcp_hint(&config(&[]), None, Some("Google Compute Engine\n")),
            Some(GcpHint::Dmi)
        );
    }
}
