//! Cloud Run Admin API v2 `projects.locations.services.list`
//! (<https://cloud.google.com/run/docs/reference/rest/v2/projects.locations.services/list>):
//! every service of one region, page by page, with the fields registration reads (name, URL,
//! labels, the ingress container's ports).

use std::collections::BTreeMap;

use mesh::discovery::google_api::{ApiError, GoogleApi};
use serde::Deserialize;

/// Services asked for per page (the API's maximum is larger; a mesh has few).
const PAGE_SIZE: u32 = 100;

/// The port Cloud Run sends requests to when the container declares none.
pub const DEFAULT_CONTAINER_PORT: u16 = 8080;

/// One page of the list.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    #[serde(default)]
    services: Vec<RunService>,
    #[serde(default)]
    next_page_token: String,
}

/// The fields of a Cloud Run service that registration reads.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunService {
    /// `projects/P/locations/L/services/NAME`.
    pub name: String,
    /// The main URL (`https://NAME-HASH-REGION.a.run.app`); empty until the service is ready.
    #[serde(default)]
    pub uri: String,
    /// User labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The revision template.
    #[serde(default)]
    pub template: Template,
}

/// A revision template: only its containers matter here.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Template {
    /// The containers; at most one (the ingress container) has ports.
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// One container of the template.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Container {
    /// Its ports (Cloud Run allows one, on the ingress container).
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// A container port: `http1` or `h2c`, and its number.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// `http1` or `h2c` (end-to-end HTTP/2).
    #[serde(default)]
    pub name: String,
    /// The port (Cloud Run's default is 8080).
    pub container_port: Option<u16>,
}

impl RunService {
    /// The service's short name, the last segment of [`RunService::name`].
    pub fn short_name(&self) -> &str {
        mesh::metadata::last_segment(&self.name)
    }

    /// The ingress port and its protocol name; Cloud Run's default (`http1`, 8080) when the
    /// template declares none.
    pub fn port(&self) -> ContainerPort {
        let declared = self
            .template
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .next();
        ContainerPort {
            name: declared.map_or_else(|| "http1".to_owned(), |p| p.name.clone()),
            container_port: Some(
                declared
                    .and_then(|p| p.container_port)
                    .unwrap_or(DEFAULT_CONTAINER_PORT),
            ),
        }
    }
}

/// Every Cloud Run service of `project` in `region`, following `nextPageToken`.
pub async fn list_services(
    api: &GoogleApi,
    endpoint: &str,
    project: &str,
    region: &str,
) -> Result<Vec<RunService>, ApiError> {
    let base = format!(
        "{endpoint}/v2/projects/{project}/locations/{region}/services?pageSize={PAGE_SIZE}"
    );
    let mut services = Vec::new();
    let mut token = String::new();
    loop {
        let url = if token.is_empty() {
            base.clone()
        } else {
            format!(
                "{base}&pageToken={}",
                form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>()
            )
        };
        let page: Page = api.get_json(&url, None).await?;
        services.extend(page.services);
        if page.next_page_token.is_empty() {
            return Ok(services);
        }
        token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_v2_fields_and_defaults_the_port() {
        let page: Page = serde_json::from_value(serde_json::json!({
            "services": [
                {"name": "projects/p/locations/us-central1/services/echo",
                 "uri": "https://echo-abc-uc.a.run.app",
                 "labels": {"krun-mesh": "shop"},
                 "template": {"containers": [
                     {"image": "sidecar"},
                     {"image": "app", "ports": [{"name": "h2c", "containerPort": 9090}]}]}},
                {"name": "projects/p/locations/us-central1/services/plain", "template": {}}
            ],
            "nextPageToken": "more"
        }))
        .expect("page");
        assert_eq!(page.next_page_token, "more");
        let echo = &page.services[0];
        assert_eq!(echo.short_name(), "echo");
        assert_eq!(echo.labels["krun-mesh"], "shop");
        assert_eq!(
            echo.port(),
            ContainerPort {
                name: "h2c".into(),
                container_port: Some(9090)
            }
        );
        assert_eq!(
            page.services[1].port(),
            ContainerPort {
                name: "http1".into(),
                container_port: Some(8080)
            }
        );
    }
}
