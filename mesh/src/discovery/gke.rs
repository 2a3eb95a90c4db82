//! GKE config-cluster discovery through the Container API v1 REST: an explicit cluster is
//! fetched (`projects/P/locations/L/clusters/C`; cloud-run-mesh wrote the singular
//! `cluster/`, which the API rejects), anything
//! less is listed and chosen by [`ClusterSelector`].

use std::collections::BTreeMap;

use serde::Deserialize;

use super::google_api::{ApiError, GoogleApi};

/// Clusters carrying this resource label (any value) form the mesh when `MESH` is unset.
pub const MESH_LABEL: &str = "mesh_id";

/// A cluster as the Container API describes it (the fields krun uses).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    /// Cluster name.
    pub name: String,
    /// Region or zone.
    pub location: String,
    /// API server address (IP or host, no scheme).
    #[serde(default)]
    pub endpoint: String,
    /// The API server's CA.
    #[serde(default)]
    pub master_auth: MasterAuth,
    /// Resource labels.
    #[serde(default)]
    pub resource_labels: BTreeMap<String, String>,
}

/// `masterAuth` of a cluster.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MasterAuth {
    /// Base64 of the PEM CA certificate.
    #[serde(default)]
    pub cluster_ca_certificate: String,
}

#[derive(Deserialize)]
struct ListResponse {
    #[serde(default)]
    clusters: Vec<Cluster>,
}

/// Which cluster was chosen and why, for the one log line of the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The cluster.
    pub cluster: Cluster,
    /// Why it won.
    pub reason: String,
}

/// Picks the config cluster from a list, in cloud-run-mesh's order with its bug fixed (its
/// loop had no `break`, so the last `istio*` cluster won; here the first does):
/// 1. the cluster named `CLUSTER_NAME`, preferring one in my region;
/// 2. the first `istio*` cluster in my region;
/// 3. the first cluster in my region;
/// 4. the first `istio*` cluster anywhere;
/// 5. the first cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterSelector {
    /// `CLUSTER_NAME`, when known.
    pub name: Option<String>,
    /// My region (metadata `instance/region`, else the configured location); a zonal cluster
    /// is in a region when its location starts with it.
    pub region: Option<String>,
}

impl ClusterSelector {
    /// The chosen cluster, or `None` when no candidate fits (empty list, or no cluster has
    /// the required name).
    pub fn select(&self, clusters: &[Cluster]) -> Option<Selection> {
        let in_region = |c: &&Cluster| {
            self.region
                .as_deref()
                .is_some_and(|r| c.location.starts_with(r))
        };
        let istio = |c: &&Cluster| c.name.starts_with("istio");
        let pick = |cluster: Option<&Cluster>, reason: String| {
            cluster.map(|c| Selection {
                cluster: c.clone(),
                reason,
            })
        };
        let region = self.region.as_deref().unwrap_or("-");
        if let Some(name) = &self.name {
            let named = |c: &&Cluster| &c.name == name;
            return pick(
                clusters.iter().filter(named).find(in_region),
                format!("CLUSTER_NAME={name} in my region {region}"),
            )
            .or_else(|| {
                pick(
                    clusters.iter().find(named),
                    format!("CLUSTER_NAME={name}, outside my region {region}"),
                )
            });
        }
        pick(
            clusters.iter().filter(in_region).find(istio),
            format!("first istio* cluster in my region {region}"),
        )
        .or_else(|| {
            pick(
                clusters.iter().find(in_region),
                format!("first cluster in my region {region}"),
            )
        })
        .or_else(|| {
            pick(
                clusters.iter().find(istio),
                "first istio* cluster in any region".to_owned(),
            )
        })
        .or_else(|| pick(clusters.first(), "first cluster listed".to_owned()))
    }
}

/// The Container API of one endpoint.
pub struct ContainerApi<'a> {
    /// The REST client.
    pub api: &'a GoogleApi,
    /// `CONTAINER_API_ENDPOINT`.
    pub endpoint: &'a str,
    /// `x-goog-user-project`, when the config project is not the workload's.
    pub quota_project: Option<&'a str>,
}

impl ContainerApi<'_> {
    /// `GET v1/projects/P/locations/L/clusters/C`, retried on 5xx and connection errors.
    pub async fn get(
        &self,
        project: &str,
        location: &str,
        name: &str,
    ) -> Result<Cluster, ApiError> {
        let url = format!(
            "{}/v1/projects/{project}/locations/{location}/clusters/{name}",
            self.endpoint
        );
        self.api.get_json(&url, self.quota_project).await
    }

    /// `GET v1/projects/P/locations/L/clusters` (`-` = every location); with `labelled`, only
    /// clusters whose `mesh_id` label has a value.
    pub async fn list(
        &self,
        project: &str,
        location: Option<&str>,
        labelled: bool,
    ) -> Result<Vec<Cluster>, ApiError> {
        let url = format!(
            "{}/v1/projects/{project}/locations/{}/clusters",
            self.endpoint,
            location.unwrap_or("-")
        );
        let list: ListResponse = self.api.get_json(&url, self.quota_project).await?;
        Ok(list
            .clusters
            .into_iter()
            .filter(|c| {
                !labelled
                    || c.resource_labels
                        .get(MESH_LABEL)
                        .is_some_and(|v| !v.is_empty())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, location: &str) -> Cluster {
        Cluster {
            name: name.into(),
            location: location.into(),
            endpoint: String::new(),
            master_auth: MasterAuth::default(),
            resource_labels: BTreeMap::new(),
        }
    }

    fn chosen(selector: &ClusterSelector, clusters: &[Cluster]) -> Option<(String, String)> {
        selector
            .select(clusters)
            .map(|s| (s.cluster.name, s.cluster.location))
    }

    fn selector(name: Option<&str>, region: Option<&str>) -> ClusterSelector {
        ClusterSelector {
            name: name.map(Into::into),
            region: region.map(Into::into),
        }
    }

    fn pair(name: &str, location: &str) -> Option<(String, String)> {
        Some((name.into(), location.into()))
    }

    #[test]
    fn a_named_cluster_prefers_my_region() {
        let clusters = [
            cluster("mesh", "europe-west1"),
            cluster("mesh", "us-central1-a"),
            cluster("istio", "us-central1"),
        ];
        let s = selector(Some("mesh"), Some("us-central1"));
        assert_eq!(chosen(&s, &clusters), pair("mesh", "us-central1-a"));
        let s = selector(Some("mesh"), Some("asia-east1"));
        assert_eq!(chosen(&s, &clusters), pair("mesh", "europe-west1"));
        let s = selector(Some("absent"), Some("us-central1"));
        assert_eq!(chosen(&s, &clusters), None);
    }

    #[test]
    fn istio_clusters_in_my_region_come_first() {
        let clusters = [
            cluster("apps", "us-central1"),
            cluster("istio-a", "europe-west1"),
            cluster("istio-b", "us-central1-c"),
            cluster("istio-c", "us-central1"),
        ];
        let s = selector(None, Some("us-central1"));
        assert_eq!(chosen(&s, &clusters), pair("istio-b", "us-central1-c"));
    }

    #[test]
    fn then_any_cluster_in_my_region() {
        let clusters = [
            cluster("istio-far", "europe-west1"),
            cluster("apps", "us-central1"),
        ];
        let s = selector(None, Some("us-central1"));
        assert_eq!(chosen(&s, &clusters), pair("apps", "us-central1"));
    }

    #[test]
    fn then_the_first_istio_cluster_anywhere_not_the_last() {
        let clusters = [
            cluster("apps", "europe-west1"),
            cluster("istio-1", "europe-west1"),
            cluster("istio-2", "asia-east1"),
        ];
        let s = selector(None, Some("us-central1"));
        assert_eq!(chosen(&s, &clusters), pair("istio-1", "europe-west1"));
        assert_eq!(
            chosen(&selector(None, None), &clusters),
            pair("istio-1", "europe-west1")
        );
    }

    #[test]
    fn then_the_first_cluster_and_none_from_an_empty_list() {
        let clusters = [cluster("b", "europe-west1"), cluster("a", "asia-east1")];
        let s = selector(None, Some("us-central1"));
        assert_eq!(chosen(&s, &clusters), pair("b", "europe-west1"));
        assert_eq!(chosen(&s, &[]), None);
    }
}
