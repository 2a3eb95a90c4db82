//! The one fake Kubernetes API server: HTTPS with its own CA (made with rcgen), bearer token
//! required, serving `GET /api/v1/namespaces/istio-system/configmaps/mesh-env` (or a K8s
//! `Status` 404 when no mesh-env is set) and TokenRequest
//! (`POST /api/v1/namespaces/NS/serviceaccounts/KSA/token`, for krun's istio-token), or, with
//! [`start_cluster`], a stateful cluster of ConfigMaps and Services.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use serde_json::json;

use super::metadata::ACCESS_TOKEN;
use super::server::{FakeServer, Reply, Request};

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

/// Objects of a fake cluster, shared between the test and the API server: ConfigMaps and
/// Services keyed by (namespace, name), as the JSON the API server stores.
#[derive(Default)]
pub struct ClusterState {
    /// ConfigMaps.
    pub configmaps: BTreeMap<(String, String), serde_json::Value>,
    /// Services.
    pub services: BTreeMap<(String, String), serde_json::Value>,
    /// Last resourceVersion handed out.
    revision: u64,
}

impl ClusterState {
    /// Stores a ConfigMap with `data` (as an operator's `kubectl apply` would).
    pub fn put_configmap(&mut self, ns: &str, name: &str, data: &[(&str, &str)]) {
        self.revision += 1;
        let data: BTreeMap<&str, &str> = data.iter().copied().collect();
        self.configmaps.insert(
            (ns.into(), name.into()),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": name, "namespace": ns, "resourceVersion": self.revision.to_string()},
                   "data": data}),
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
        self.revision += 1;
        let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let ingress: Vec<serde_json::Value> = lb.into_iter().collect();
        self.services.insert(
            (ns.into(), name.into()),
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": ns, "annotations": annotations,
                                "resourceVersion": self.revision.to_string()},
                   "spec": {"type": "LoadBalancer"},
                   "status": {"loadBalancer": {"ingress": ingress}}}),
        );
    }

    /// A ConfigMap's data.
    pub fn configmap_data(&self, ns: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let cm = self.configmaps.get(&(ns.into(), name.into()))?;
        serde_json::from_value(cm["data"].clone()).ok()
    }

    /// A ConfigMap's annotation.
    pub fn configmap_annotation(&self, ns: &str, name: &str, key: &str) -> Option<String> {
        let cm = self.configmaps.get(&(ns.into(), name.into()))?;
        cm["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_owned)
    }
}

/// Shared cluster state.
pub type SharedCluster = Arc<std::sync::Mutex<ClusterState>>;

/// Starts a stateful API server over `state`: GET/POST/PUT ConfigMaps (PUT requires the
/// current resourceVersion, as the real one), GET Services, and the cluster-wide Service list.
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

fn answer_cluster(state: &SharedCluster, req: &Request) -> Reply {
    if req.header("authorization") != Some(&format!("Bearer {ACCESS_TOKEN}")) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let Ok(mut state) = state.lock() else {
        return status(500, "InternalError", "state poisoned");
    };
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["api", "v1", "services"]) => {
            let items: Vec<serde_json::Value> = state.services.values().cloned().collect();
            Reply::json(json!({"apiVersion": "v1", "kind": "ServiceList",
                               "metadata": {"resourceVersion": state.revision.to_string()}, "items": items}))
        }
        ("GET", ["api", "v1", "namespaces", ns, "services", name]) => {
            match state.services.get(&((*ns).into(), (*name).into())) {
                Some(s) => Reply::json(s.clone()),
                None => not_found("services", name),
            }
        }
        ("GET", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            match state.configmaps.get(&((*ns).into(), (*name).into())) {
                Some(cm) => Reply::json(cm.clone()),
                None => not_found("configmaps", name),
            }
        }
        ("POST", ["api", "v1", "namespaces", ns, "configmaps"]) => {
            let Ok(mut cm) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
                return status(400, "BadRequest", "body is not a ConfigMap");
            };
            let Some(name) = cm["metadata"]["name"].as_str().map(str::to_owned) else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            let key = ((*ns).to_owned(), name.clone());
            if state.configmaps.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("configmaps \"{name}\" already exists"),
                );
            }
            state.revision += 1;
            cm["metadata"]["resourceVersion"] = json!(state.revision.to_string());
            state.configmaps.insert(key, cm.clone());
            let mut reply = Reply::json(cm);
            reply.status = 201;
            reply
        }
        ("PUT", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            let Ok(mut cm) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
                return status(400, "BadRequest", "body is not a ConfigMap");
            };
            let key = ((*ns).to_owned(), (*name).to_owned());
            let Some(current) = state.configmaps.get(&key) else {
                return not_found("configmaps", name);
            };
            if cm["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            state.revision += 1;
            cm["metadata"]["resourceVersion"] = json!(state.revision.to_string());
            state.configmaps.insert(key, cm.clone());
            Reply::json(cm)
        }
        _ => status(
            404,
            "NotFound",
            &format!("the server could not find {} {}", req.method, req.path),
        ),
    }
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
