//! The one fake Kubernetes API server: HTTPS with its own CA (made with rcgen), bearer token
//! required, serving `GET /api/v1/namespaces/istio-system/configmaps/mesh-env` (or a K8s
//! `Status` 404 when no mesh-env is set) and TokenRequest
//! (`POST /api/v1/namespaces/NS/serviceaccounts/KSA/token`, for krun's istio-token), or, with
//! [`start_cluster`], a stateful cluster of ConfigMaps, Services, EndpointSlices and Istio
//! DestinationRules.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use hyper::body::Bytes;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use serde_json::json;

use super::metadata::ACCESS_TOKEN;
use super::server::{FakeServer, Reply, Request, Streaming};

/// The running fake and the CA that signed its certificate.
pub struct FakeKube {
    /// The server.
    pub server: FakeServer,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

impl FakeKube {
    /// Base64 of the CA PEM, as GKE's `masterAuth.clusterCaCertificate`.
    pub fn ca_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.ca_pem)
    }

    /// A kube client for this server: its CA, the fake metadata token as bearer.
    pub fn client(&self) -> kube::Client {
        let url = self.server.url("https").parse().expect("fake URL");
        let mut config = kube::Config::new(url);
        let ca = rustls::pki_types::CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .expect("fake CA PEM");
        config.root_cert = Some(vec![ca.to_vec()]);
        config.auth_info.token = Some(ACCESS_TOKEN.to_owned().into());
        kube::Client::try_from(config).expect("kube client")
    }

    /// TokenRequests answered with a token.
    pub fn token_requests(&self) -> usize {
        self.server
            .seen()
            .iter()
            .filter(|s| {
                s.status == 201
                    && s.path
                        .split('?')
                        .next()
                        .is_some_and(|p| p.ends_with("/token"))
            })
            .count()
    }

    /// The next `n` TokenRequests fail with 503, as an API server that is restarting.
    pub fn fail_token_requests(&self, n: u32) {
        self.server.fail("/token", n, 503, &[]);
    }
}

/// A server config for `localhost` and 127.0.0.1 signed by a fresh CA; returns it and the CA PEM.
pub(crate) fn tls_config() -> (Arc<rustls::ServerConfig>, String) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fake-kube-ca");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server TLS config");
    (Arc::new(config), ca.pem())
}

/// Starts the fake with `mesh_env` (`None`: no ConfigMap).
pub fn start(mesh_env: Option<BTreeMap<String, String>>) -> FakeKube {
    let (tls, ca_pem) = tls_config();
    let server = FakeServer::https(Arc::new(move |req: &Request| answer(&mesh_env, req)), tls);
    FakeKube { server, ca_pem }
}

fn status(code: u16, reason: &str, message: &str) -> Reply {
    let mut reply = Reply::json(json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    }));
    reply.status = code;
    reply
}

fn answer(mesh_env: &Option<BTreeMap<String, String>>, req: &Request) -> Reply {
    if req.header("authorization") != Some(&format!("Bearer {ACCESS_TOKEN}")) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    if let [
        "api",
        "v1",
        "namespaces",
        ns,
        "serviceaccounts",
        sa,
        "token",
    ] = parts[..]
    {
        return token_request(ns, sa, req);
    }
    if req.method != "GET" {
        return status(405, "MethodNotAllowed", "method not allowed");
    }
    if req.path != "/api/v1/namespaces/istio-system/configmaps/mesh-env" {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {}", req.path),
        );
    }
    match mesh_env {
        Some(data) => Reply::json(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mesh-env", "namespace": "istio-system"},
            "data": data,
        })),
        None => status(404, "NotFound", "configmaps \"mesh-env\" not found"),
    }
}

/// A TokenRequest, strict like the API server: POST, `spec.audiences` and
/// `spec.expirationSeconds`; the token's `sub` and `aud` are the real ones.
fn token_request(ns: &str, sa: &str, req: &Request) -> Reply {
    if req.method != "POST" {
        return status(405, "MethodNotAllowed", "method not allowed");
    }
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return status(400, "BadRequest", "body is not a TokenRequest");
    };
    let Some(audience) = body["spec"]["audiences"][0].as_str() else {
        return status(422, "Invalid", "spec.audiences: Required value");
    };
    let Some(expiration) = body["spec"]["expirationSeconds"].as_u64() else {
        return status(
            422,
            "Invalid",
            "spec.expirationSeconds: required by this fake",
        );
    };
    let token = super::pki::jwt(
        &format!("system:serviceaccount:{ns}:{sa}"),
        audience,
        std::time::Duration::from_secs(expiration),
    );
    let mut reply = Reply::json(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "metadata": {"name": sa, "namespace": ns},
        "spec": body["spec"],
        "status": {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"},
    }));
    reply.status = 201;
    reply
}

/// The API group path of each kind the stateful fake serves, keyed by its plural.
const KINDS: &[(&str, &str, &str)] = &[
    ("services", "api/v1", "Service"),
    ("configmaps", "api/v1", "ConfigMap"),
    (
        "endpointslices",
        "apis/discovery.k8s.io/v1",
        "EndpointSlice",
    ),
    (
        "destinationrules",
        "apis/networking.istio.io/v1",
        "DestinationRule",
    ),
];

/// One change, as a watch stream sends it.
struct Change {
    revision: u64,
    plural: String,
    kind: &'static str,
    object: serde_json::Value,
}

/// What one watch asked for, and where its events go.
struct Watch {
    filter: Filter,
    events: tokio::sync::mpsc::UnboundedSender<Bytes>,
}

/// Which objects a list or watch selects: kind, namespace, `fieldSelector` on
/// `metadata.name`, and equality `labelSelector`s.
#[derive(Clone)]
struct Filter {
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    labels: Vec<(String, String)>,
}

impl Filter {
    fn matches(&self, plural: &str, object: &serde_json::Value) -> bool {
        let meta = &object["metadata"];
        plural == self.plural
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| meta["namespace"] == ns)
            && self.name.as_deref().is_none_or(|n| meta["name"] == n)
            && self
                .labels
                .iter()
                .all(|(k, v)| meta["labels"][k.as_str()] == v.as_str())
    }
}

/// Objects of a fake cluster, shared between the test and the API server, as the JSON the
/// API server stores, keyed by (plural, namespace, name); every change gets the next
/// resourceVersion and is kept, so a watch can resume from any version it saw.
#[derive(Default)]
pub struct ClusterState {
    objects: BTreeMap<(String, String, String), serde_json::Value>,
    /// Last resourceVersion handed out.
    revision: u64,
    changes: Vec<Change>,
    watches: Vec<Watch>,
}

impl ClusterState {
    /// Stores a ConfigMap with `data` (as an operator's `kubectl apply` would).
    pub fn put_configmap(&mut self, ns: &str, name: &str, data: &[(&str, &str)]) {
        let data: BTreeMap<&str, &str> = data.iter().copied().collect();
        self.put(
            "configmaps",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": name, "namespace": ns}, "data": data}),
        );
    }

    /// Stores a Service; `lb` is its load balancer ingress (`{"ip": ..}` or `{"hostname": ..}`)
    /// and `annotations` its annotations.
    pub fn put_service(
        &mut self,
        ns: &str,
        name: &str,
        lb: Option<serde_json::Value>,
        annotations: &[(&str, &str)],
    ) {
        let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let ingress: Vec<serde_json::Value> = lb.into_iter().collect();
        self.put(
            "services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                   "spec": {"type": "LoadBalancer"},
                   "status": {"loadBalancer": {"ingress": ingress}}}),
        );
    }

    /// Creates or replaces an object of kind `plural` (its namespace and name from its
    /// metadata) with the next resourceVersion, and tells the watches.
    pub fn put(&mut self, plural: &str, mut object: serde_json::Value) {
        let meta = &object["metadata"];
        let key = (
            plural.to_owned(),
            meta["namespace"].as_str().unwrap_or_default().to_owned(),
            meta["name"].as_str().unwrap_or_default().to_owned(),
        );
        let kind = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.objects.insert(key, object.clone());
        self.record(plural, kind, object);
    }

    /// Deletes an object; `false` when there was none.
    pub fn delete(&mut self, plural: &str, ns: &str, name: &str) -> bool {
        let Some(mut object) = self
            .objects
            .remove(&(plural.into(), ns.into(), name.into()))
        else {
            return false;
        };
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.record(plural, "DELETED", object);
        true
    }

    /// An object.
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<serde_json::Value> {
        self.objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Ends every open watch stream, as an API server restart or a load balancer's idle
    /// timeout does; clients must watch again from the last version they saw.
    pub fn drop_watches(&mut self) {
        self.watches.clear();
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.watches
            .iter()
            .filter(|w| !w.events.is_closed())
            .count()
    }

    /// A ConfigMap's data.
    pub fn configmap_data(&self, ns: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let cm = self.get("configmaps", ns, name)?;
        serde_json::from_value(cm["data"].clone()).ok()
    }

    /// A ConfigMap's annotation.
    pub fn configmap_annotation(&self, ns: &str, name: &str, key: &str) -> Option<String> {
        let cm = self.get("configmaps", ns, name)?;
        cm["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_owned)
    }

    fn record(&mut self, plural: &str, kind: &'static str, object: serde_json::Value) {
        let change = Change {
            revision: self.revision,
            plural: plural.to_owned(),
            kind,
            object,
        };
        self.watches.retain(|w| {
            !w.filter.matches(&change.plural, &change.object)
                || w.events.send(watch_line(&change)).is_ok()
        });
        self.changes.push(change);
    }

    fn list(&self, filter: &Filter) -> Vec<serde_json::Value> {
        self.objects
            .iter()
            .filter(|((plural, _, _), object)| filter.matches(plural, object))
            .map(|(_, object)| object.clone())
            .collect()
    }
}

/// One watch event line: `{"type": "ADDED", "object": {...}}`.
fn watch_line(change: &Change) -> Bytes {
    let mut line = json!({"type": change.kind, "object": change.object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// Shared cluster state.
pub type SharedCluster = Arc<std::sync::Mutex<ClusterState>>;

/// Starts a stateful API server over `state`: for every kind of [`KINDS`], GET, POST (409
/// `AlreadyExists` for a taken name, 400 for a body of another kind), PUT
/// (which requires the current resourceVersion, as the real one) and DELETE of one object;
/// lists, cluster-wide and per namespace, with field (`metadata.name`) and label selectors;
/// and watches (`?watch=true`) that replay every change after the given resourceVersion and
/// then stream, until [`ClusterState::drop_watches`].
pub fn start_cluster(state: SharedCluster) -> FakeKube {
    let (tls, ca_pem) = tls_config();
    let server = FakeServer::https(
        Arc::new(move |req: &Request| answer_cluster(&state, req)),
        tls,
    );
    FakeKube { server, ca_pem }
}

fn not_found(what: &str, name: &str) -> Reply {
    status(404, "NotFound", &format!("{what} \"{name}\" not found"))
}

/// The value of `name` in a query string, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            v.replace("%3D", "=")
                .replace("%3d", "=")
                .replace("%2F", "/")
                .replace("%2f", "/")
                .replace("%2C", ",")
                .replace("%2c", ",")
        })
    })
}

/// `v1` or `group/version` of the kind `plural`.
fn route_base(plural: &str) -> &'static str {
    KINDS
        .iter()
        .find(|(p, _, _)| *p == plural)
        .map_or("v1", |(_, base, _)| {
            base.trim_start_matches("apis/").trim_start_matches("api/")
        })
}

/// A request path split into (plural, namespace, name) for a kind this fake serves.
fn route(path: &str) -> Option<(&'static str, &'static str, Option<String>, Option<String>)> {
    let trimmed = path.trim_matches('/');
    KINDS.iter().find_map(|(plural, base, kind)| {
        let rest = trimmed.strip_prefix(base)?.trim_start_matches('/');
        let parts: Vec<&str> = rest.split('/').collect();
        match parts[..] {
            [p] if p == *plural => Some((*plural, *kind, None, None)),
            ["namespaces", ns, p] if p == *plural => {
                Some((*plural, *kind, Some(ns.to_owned()), None))
            }
            ["namespaces", ns, p, name] if p == *plural => {
                Some((*plural, *kind, Some(ns.to_owned()), Some(name.to_owned())))
            }
            _ => None,
        }
    })
}

fn answer_cluster(state: &SharedCluster, req: &Request) -> Reply {
    if req.header("authorization") != Some(&format!("Bearer {ACCESS_TOKEN}")) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let Ok(mut state) = state.lock() else {
        return status(500, "InternalError", "state poisoned");
    };
    let Some((plural, kind, ns, name)) = route(&req.path) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {} {}", req.method, req.path),
        );
    };
    match (req.method.as_str(), ns, name) {
        ("GET", ns, None) => list_or_watch(&mut state, plural, kind, ns, req),
        ("GET", Some(ns), Some(name)) => match state.get(plural, &ns, &name) {
            Some(object) => Reply::json(object),
            None => not_found(plural, &name),
        },
        ("POST", Some(ns), None) => {
            let Ok(mut object) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
                return status(400, "BadRequest", &format!("body is not a {kind}"));
            };
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            if object["kind"] != kind {
                return status(
                    400,
                    "BadRequest",
                    &format!("the body is a {}, not a {kind}", object["kind"]),
                );
            }
            if state.get(plural, &ns, &name).is_some() {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{plural} \"{name}\" already exists"),
                );
            }
            object["metadata"]["namespace"] = json!(ns);
            state.put(plural, object);
            let mut reply = Reply::json(state.get(plural, &ns, &name).unwrap_or_default());
            reply.status = 201;
            reply
        }
        ("PUT", Some(ns), Some(name)) => {
            let Ok(object) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
                return status(400, "BadRequest", &format!("body is not a {kind}"));
            };
            let Some(current) = state.get(plural, &ns, &name) else {
                return not_found(plural, &name);
            };
            if object["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            state.put(plural, object);
            Reply::json(state.get(plural, &ns, &name).unwrap_or_default())
        }
        ("DELETE", Some(ns), Some(name)) => {
            let Some(object) = state.get(plural, &ns, &name) else {
                return not_found(plural, &name);
            };
            state.delete(plural, &ns, &name);
            Reply::json(object)
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

/// A list (`{Kind}List` with the current resourceVersion), or with `watch=true` a watch
/// stream: every change after `resourceVersion` (all current objects as ADDED when it is
/// unset or `0`), then each new change as it happens.
fn list_or_watch(
    state: &mut ClusterState,
    plural: &str,
    kind: &str,
    namespace: Option<String>,
    req: &Request,
) -> Reply {
    let query = req.query.as_deref();
    let field = query_value(query, "fieldSelector");
    let name = match field.as_deref().map(|f| f.split_once('=')) {
        None => None,
        Some(Some(("metadata.name", name))) => Some(name.trim_start_matches('=').to_owned()),
        Some(_) => {
            return status(
                400,
                "BadRequest",
                "this fake supports fieldSelector=metadata.name=NAME only",
            );
        }
    };
    let labels = query_value(query, "labelSelector")
        .map(|l| {
            l.split(',')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_owned(), v.trim_start_matches('=').to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    let filter = Filter {
        plural: plural.to_owned(),
        namespace,
        name,
        labels,
    };
    let watch = matches!(query_value(query, "watch").as_deref(), Some("true" | "1"));
    if !watch {
        let api_version = route_base(plural);
        return Reply::json(
            json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                                  "metadata": {"resourceVersion": state.revision.to_string()},
                                  "items": state.list(&filter)}),
        );
    }
    let since = query_value(query, "resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let backlog: Vec<Bytes> = if since == 0 {
        state
            .list(&filter)
            .into_iter()
            .map(|object| {
                watch_line(&Change {
                    revision: 0,
                    plural: plural.to_owned(),
                    kind: "ADDED",
                    object,
                })
            })
            .collect()
    } else {
        state
            .changes
            .iter()
            .filter(|c| c.revision > since && filter.matches(&c.plural, &c.object))
            .map(watch_line)
            .collect()
    };
    let (events, stream) = Streaming::channel();
    for line in backlog {
        let _ = events.send(line);
    }
    state.watches.push(Watch { filter, events });
    let mut reply = Reply::json(json!(null));
    reply.body = String::new();
    reply.stream = Some(stream);
    reply
}

impl FakeKube {
    /// A kubeconfig for this server, authenticating with the fake metadata token.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: {}\n    certificate-authority-data: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\nusers:\n- name: fake\n  user:\n    token: {ACCESS_TOKEN}\n",
            self.server.url("https"),
            self.ca_base64()
        )
    }
}
