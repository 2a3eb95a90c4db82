//! Cloud Resource Manager v1 `projects.get`: the project number, and the `mesh-namespace`
//! label that names the workload namespace of a project, as cloud-run-mesh read it
//! (<https://cloud.google.com/resource-manager/reference/rest/v1/projects/get>).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::google_api::{ApiError, GoogleApi};

/// The project label that names the default workload namespace.
pub const NAMESPACE_LABEL: &str = "mesh-namespace";

/// The fields of a project krun uses.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Project {
    /// Numeric project number (a string in the API).
    #[serde(default)]
    pub project_number: String,
    /// Project labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `GET v1/projects/{project}` at `endpoint`.
pub async fn get_project(
    api: &GoogleApi,
    endpoint: &str,
    project: &str,
    quota_project: Option<&str>,
) -> Result<Project, ApiError> {
    let url = format!("{endpoint}/v1/projects/{project}");
    api.get_json(&url, quota_project).await
}
