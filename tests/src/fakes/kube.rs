//! Fake Kubernetes API server: HTTPS with its own CA (made with rcgen), bearer token
//! required, serving `GET /api/v1/namespaces/istio-system/configmaps/mesh-env` (or a K8s
//! `Status` 404 when no mesh-env is set).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
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
