//! Fakes of the services krun talks to, as real servers on 127.0.0.1 speaking the real wire
//! format, strict like the real service. Each records what it was asked so tests can assert.
//! [`TestWorld`] starts the discovery fakes together and wires the GKE fake to hand out the
//! K8s fake's endpoint and CA.

pub mod ca;
pub mod ca_wire;
pub mod cloud_run_admin;
pub mod dns;
pub mod front;
pub mod gke;
pub mod google;
pub mod istiod;
pub mod kube;
pub mod metadata;
pub mod oauth;
pub mod pki;
pub mod proxy;
pub mod resource_manager;
pub mod run_app;
pub mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Krun;
use gke::{Endpoint, FakeCluster};
use kube::FakeKube;
use metadata::Instance;
use resource_manager::FakeProject;
use server::FakeServer;

/// Everything a discovery scenario talks to.
pub struct TestWorld {
    /// Metadata server.
    pub metadata: FakeServer,
    /// GKE Container API.
    pub gke: FakeServer,
    /// Cloud Resource Manager.
    pub resource_manager: FakeServer,
    /// The clusters' K8s API.
    pub kube: FakeKube,
}

/// Describes a world; [`TestWorldBuilder::start`] starts it.
#[derive(Default)]
pub struct TestWorldBuilder {
    instance: Instance,
    clusters: Vec<FakeCluster>,
    projects: Vec<FakeProject>,
    mesh_env: Option<BTreeMap<String, String>>,
    latency: Duration,
}

impl TestWorldBuilder {
    /// The metadata server's instance.
    pub fn instance(mut self, f: impl FnOnce(&mut Instance)) -> Self {
        f(&mut self.instance);
        self
    }

    /// Adds a GKE cluster.
    pub fn cluster(mut self, cluster: FakeCluster) -> Self {
        self.clusters.push(cluster);
        self
    }

    /// Adds a project to Resource Manager.
    pub fn project(mut self, id: &str, number: &str, labels: &[(&str, &str)]) -> Self {
        self.projects.push(FakeProject {
            id: id.into(),
            number: number.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        });
        self
    }

    /// The `istio-system/mesh-env` ConfigMap of every cluster.
    pub fn mesh_env(mut self, pairs: &[(&str, &str)]) -> Self {
        self.mesh_env = Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        );
        self
    }

    /// Latency every fake adds to every answer.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Starts the fakes.
    pub fn start(self) -> TestWorld {
        let kube = kube::start(self.mesh_env);
        let endpoint = Arc::new(Mutex::new(Endpoint {
            address: kube.server.addr().to_string(),
            ca_base64: kube.ca_base64(),
        }));
        let world = TestWorld {
            metadata: metadata::start(self.instance),
            gke: gke::start(self.clusters, endpoint),
            resource_manager: resource_manager::start(self.projects),
            kube,
        };
        for server in world.servers() {
            server.set_latency(self.latency);
        }
        world
    }
}

impl TestWorld {
    /// A builder with a default instance (project `wl-project`, region `us-central1`,
    /// service account `k8s-fortio@...`) and nothing else.
    pub fn builder() -> TestWorldBuilder {
        TestWorldBuilder::default()
    }

    /// Every fake.
    pub fn servers(&self) -> [&FakeServer; 4] {
        [
            &self.metadata,
            &self.gke,
            &self.resource_manager,
            &self.kube.server,
        ]
    }

    /// The endpoint variables that point krun at this world.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GCE_METADATA_HOST", self.metadata.addr().to_string()),
            ("CONTAINER_API_ENDPOINT", self.gke.url("http")),
            (
                "RESOURCE_MANAGER_ENDPOINT",
                self.resource_manager.url("http"),
            ),
        ]
    }

    /// A krun pointed at this world.
    pub fn krun(&self) -> Krun {
        self.env()
            .into_iter()
            .fold(Krun::new(), |krun, (name, value)| krun.env(name, value))
    }

    /// Requests served by all fakes.
    pub fn calls(&self) -> usize {
        self.servers().iter().map(|s| s.seen().len()).sum()
    }
}
