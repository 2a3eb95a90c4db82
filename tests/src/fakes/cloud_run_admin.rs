//! Fake Cloud Run Admin API v2, `GET v2/projects/P/locations/L/services`
//! (<https://cloud.google.com/run/docs/reference/rest/v2/projects.locations.services/list>):
//! the services of one project the test puts, edits and deletes, as the v2 JSON (`name`,
//! `uri`, `urls`, `labels`, `template.containers[].ports[]`), in pages of at most
//! [`MAX_PAGE`] (smaller with `pageSize`) chained by an opaque `nextPageToken` that the client
//! must send back percent-encoded. Bearer token required (401 as Google answers it); another
//! project is 403, an unknown path 404.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{Value, json};

use super::metadata::ACCESS_TOKEN;
use super::server::{FakeServer, Reply, Request};

/// The largest page the fake answers, so that a handful of services already spans pages.
pub const MAX_PAGE: usize = 2;

/// Services by (region, name), as the v2 JSON.
type Services = Arc<Mutex<BTreeMap<(String, String), Value>>>;

/// The running fake.
pub struct FakeRunAdmin {
    /// The server.
    pub server: FakeServer,
    project: String,
    services: Services,
}

impl FakeRunAdmin {
    /// Starts the fake for project `project` (what the client puts in the path).
    pub fn start(project: &str) -> FakeRunAdmin {
        let services = Services::default();
        let (state, owner) = (services.clone(), project.to_owned());
        let server = FakeServer::http(Arc::new(move |req: &Request| answer(&owner, &state, req)));
        FakeRunAdmin {
            server,
            project: project.to_owned(),
            services,
        }
    }

    /// Creates or replaces service `name` in `region`: its URL, labels and ingress port
    /// (`None`: the template declares none, as `gcloud run deploy` without `--port`).
    pub fn put_service(
        &self,
        region: &str,
        name: &str,
        uri: &str,
        labels: &[(&str, &str)],
        port: Option<(&str, u16)>,
    ) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let mut container =
            json!({"image": format!("us-docker.pkg.dev/{}/app/{name}", self.project)});
        if let Some((port_name, number)) = port {
            container["ports"] = json!([{"name": port_name, "containerPort": number}]);
        }
        let service = json!({
            "name": format!("projects/{}/locations/{region}/services/{name}", self.project),
            "uid": format!("uid-{region}-{name}"),
            "uri": uri,
            "urls": [uri],
            "labels": labels,
            "template": {"containers": [container]},
        });
        self.lock()
            .insert((region.to_owned(), name.to_owned()), service);
    }

    /// Replaces the labels of a service.
    pub fn set_labels(&self, region: &str, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        if let Some(service) = self.lock().get_mut(&(region.to_owned(), name.to_owned())) {
            service["labels"] = json!(labels);
        }
    }

    /// Deletes a service, as `gcloud run services delete`.
    pub fn delete_service(&self, region: &str, name: &str) {
        self.lock().remove(&(region.to_owned(), name.to_owned()));
    }

    /// The list requests answered 200, as paths with their query.
    pub fn list_requests(&self) -> Vec<String> {
        self.server
            .seen()
            .into_iter()
            .filter(|s| s.status == 200)
            .map(|s| s.path)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Value>> {
        self.services.lock().expect("fake Cloud Run state")
    }
}

fn error(code: u16, status: &str, message: &str) -> Reply {
    Reply::json_status(
        code,
        json!({"error": {"code": code, "status": status, "message": message}}),
    )
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// An opaque page token, base64 like Google's (so it holds `=`, which a client must encode).
fn token(offset: usize) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("offset:{offset}"))
}

fn offset(token: &str) -> Option<usize> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    String::from_utf8(raw)
        .ok()?
        .strip_prefix("offset:")?
        .parse()
        .ok()
}

fn answer(project: &str, services: &Services, req: &Request) -> Reply {
    if req.header("authorization") != Some(&format!("Bearer {ACCESS_TOKEN}")) {
        return error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let ["v2", "projects", asked, "locations", region, "services"] = parts[..] else {
        return error(404, "NOT_FOUND", &format!("unknown path {}", req.path));
    };
    if req.method != "GET" {
        return error(405, "METHOD_NOT_ALLOWED", "only list is faked");
    }
    if asked != project {
        return error(
            403,
            "PERMISSION_DENIED",
            &format!("Permission 'run.services.list' denied on resource 'projects/{asked}'"),
        );
    }
    let query = req.query.as_deref();
    let size = query_value(query, "pageSize")
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&s| s > 0)
        .map_or(MAX_PAGE, |s| s.min(MAX_PAGE));
    let start = match query_value(query, "pageToken") {
        None => 0,
        Some(t) => match offset(&t) {
            Some(o) => o,
            None => return error(400, "INVALID_ARGUMENT", "Invalid page token."),
        },
    };
    let Ok(services) = services.lock() else {
        return error(500, "INTERNAL", "state poisoned");
    };
    let in_region: Vec<&Value> = services
        .iter()
        .filter(|((r, _), _)| r == region)
        .map(|(_, s)| s)
        .collect();
    let page: Vec<&Value> = in_region.iter().skip(start).take(size).copied().collect();
    let mut body = json!({"services": page});
    if start + size < in_region.len() {
        body["nextPageToken"] = json!(token(start + size));
    }
    Reply::json(body)
}
