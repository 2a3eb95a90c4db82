//! Fake Cloud Resource Manager v1: `GET v1/projects/P` with the project number and labels;
//! bearer token required.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use super::metadata::ACCESS_TOKEN;
use super::server::{FakeServer, Reply, Request};

/// A project the fake knows.
#[derive(Clone, Debug)]
pub struct FakeProject {
    /// Project id.
    pub id: String,
    /// Project number.
    pub number: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// Starts the fake.
pub fn start(projects: Vec<FakeProject>) -> FakeServer {
    FakeServer::http(Arc::new(move |req: &Request| {
        let status = |code: u16, message: &str| {
            let mut reply = Reply::json(json!({"error": {"code": code, "message": message}}));
            reply.status = code;
            reply
        };
        if req.header("authorization") != Some(&format!("Bearer {ACCESS_TOKEN}")) {
            return status(401, "Request had invalid authentication credentials.");
        }
        let Some(id) = req.path.strip_prefix("/v1/projects/") else {
            return status(404, "unknown path");
        };
        match projects.iter().find(|p| p.id == id) {
            Some(p) => Reply::json(json!({
                "projectId": p.id,
                "projectNumber": p.number,
                "labels": p.labels,
                "lifecycleState": "ACTIVE",
            })),
            None => status(403, "The caller does not have permission"),
        }
    }))
}
