//! Fake GKE Container API v1: `GET v1/projects/P/locations/L/clusters[/C]`, bearer token
//! required, `-` lists every location, the singular `cluster/` path cloud-run-mesh used is a 404,
//! a project without clusters is a 403 (what a caller without permission sees).
//! Every cluster's endpoint and CA point at the fake K8s API.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::metadata::ACCESS_TOKEN;
use super::server::{FakeServer, Reply, Request};

/// A cluster the fake knows.
#[derive(Clone, Debug)]
pub struct FakeCluster {
    /// Project it lives in.
    pub project: String,
    /// Name.
    pub name: String,
    /// Region or zone.
    pub location: String,
    /// Resource labels.
    pub labels: BTreeMap<String, String>,
}

impl FakeCluster {
    /// A cluster without labels.
    pub fn new(project: &str, location: &str, name: &str) -> Self {
        FakeCluster {
            project: project.into(),
            name: name.into(),
            location: location.into(),
            labels: BTreeMap::new(),
        }
    }

    /// Adds the `mesh_id` label that marks a mesh cluster.
    pub fn mesh(mut self) -> Self {
        self.labels.insert("mesh_id".into(), "proj-1".into());
        self
    }
}

/// Where the clusters' API server is and how to trust it.
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    /// `host:port` of the fake K8s API.
    pub address: String,
    /// Base64 of its CA's PEM.
    pub ca_base64: String,
}

/// Starts the fake.
pub fn start(clusters: Vec<FakeCluster>, endpoint: Arc<Mutex<Endpoint>>) -> FakeServer {
    FakeServer::http(Arc::new(move |req: &Request| {
        answer(&clusters, &endpoint.lock().expect("endpoint"), req)
    }))
}

fn error(status: u16, message: &str) -> Reply {
    let mut reply = Reply::json(json!({"error": {"code": status, "message": message}}));
    reply.status = status;
    reply
}

fn describe(cluster: &FakeCluster, endpoint: &Endpoint) -> serde_json::Value {
    json!({
        "name": cluster.name,
        "location": cluster.location,
        "endpoint": endpoint.address,
        "masterAuth": {"clusterCaCertificate": endpoint.ca_base64},
        "resourceLabels": cluster.labels,
        "status": "RUNNING",
    })
}

fn answer(clusters: &[FakeCluster], endpoint: &Endpoint, req: &Request) -> Reply {
    if req.header("authorization") != Some(&format!("Bearer {ACCESS_TOKEN}")) {
        return error(401, "Request had invalid authentication credentials.");
    }
    if req.method != "GET" {
        return error(405, "method not allowed");
    }
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    // Like GKE, a project the caller has no clusters in (no permission) is a 403.
    if let ["v1", "projects", project, ..] = parts.as_slice()
        && !clusters.iter().any(|c| c.project == *project)
    {
        return error(
            403,
            &format!(
                "Required \"container.clusters.list\" permission(s) for \"projects/{project}\"."
            ),
        );
    }
    match parts.as_slice() {
        ["v1", "projects", project, "locations", location, "clusters"] => {
            let listed: Vec<_> = clusters
                .iter()
                .filter(|c| c.project == *project && (*location == "-" || c.location == *location))
                .map(|c| describe(c, endpoint))
                .collect();
            Reply::json(json!({ "clusters": listed }))
        }
        [
            "v1",
            "projects",
            project,
            "locations",
            location,
            "clusters",
            name,
        ] => clusters
            .iter()
            .find(|c| c.project == *project && c.location == *location && c.name == *name)
            .map(|c| Reply::json(describe(c, endpoint)))
            .unwrap_or_else(|| {
                error(
                    404,
                    &format!("Not found: projects/{project}/locations/{location}/clusters/{name}."),
                )
            }),
        _ => error(404, &format!("unknown path {}", req.path)),
    }
}
