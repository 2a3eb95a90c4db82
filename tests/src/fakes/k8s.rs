//! A fake K8s API server for `POST /api/v1/namespaces/NS/serviceaccounts/KSA/token`
//! (TokenRequest). Strict: it wants a bearer credential, JSON, audiences and
//! expirationSeconds; it answers with a JWT-shaped token whose `sub` and `aud` are real.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use serde_json::json;

use super::http::{HttpServer, json};
use super::pki::jwt;

/// The running fake.
pub struct FakeK8s {
    server: HttpServer,
    requests: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
}

impl FakeK8s {
    /// Starts it; each answer is delayed by `delay`.
    pub async fn start(delay: Duration) -> FakeK8s {
        let requests = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let (counter, to_fail) = (requests.clone(), failures.clone());
        let server = HttpServer::start(delay, move |call| {
            let (counter, to_fail) = (counter.clone(), to_fail.clone());
            async move {
                if to_fail
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"kind": "Status", "code": 503, "message": "the server is currently unable to handle the request"}),
                    );
                }
                let path = call.path.split('?').next().unwrap_or_default().to_owned();
                let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                let ["api", "v1", "namespaces", ns, "serviceaccounts", sa, "token"] = parts[..]
                else {
                    return json(StatusCode::NOT_FOUND, json!({"kind": "Status", "message": "not found"}));
                };
                if !call.header("authorization").starts_with("Bearer ") {
                    return json(StatusCode::UNAUTHORIZED, json!({"kind": "Status", "message": "Unauthorized"}));
                }
                let body = call.json();
                let audiences = body["spec"]["audiences"].as_array().cloned().unwrap_or_default();
                let Some(expiration) = body["spec"]["expirationSeconds"].as_u64() else {
                    return json(StatusCode::BAD_REQUEST, json!({"kind": "Status", "message": "expirationSeconds required by this fake"}));
                };
                let Some(aud) = audiences.first().and_then(|a| a.as_str()) else {
                    return json(StatusCode::BAD_REQUEST, json!({"kind": "Status", "message": "spec.audiences required"}));
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let token = jwt(&format!("system:serviceaccount:{ns}:{sa}"), aud, Duration::from_secs(expiration));
                json(StatusCode::CREATED, json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "metadata": {"name": sa, "namespace": ns},
                    "spec": body["spec"],
                    "status": {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"},
                }))
            }
        })
        .await;
        FakeK8s {
            server,
            requests,
            failures,
        }
    }

    /// A kube client pointed at this fake.
    pub fn client(&self) -> kube::Client {
        let url: http::Uri = self.server.url().parse().expect("fake URL");
        let mut config = kube::Config::new(url);
        config.auth_info.token = Some("admin-token".to_owned().into());
        kube::Client::try_from(config).expect("kube client")
    }

    /// The next `n` requests fail with 503, as an API server that is restarting.
    pub fn fail_next(&self, n: usize) {
        self.failures.store(n, Ordering::SeqCst);
    }

    /// Injected failures not yet answered.
    pub fn pending_failures(&self) -> usize {
        self.failures.load(Ordering::SeqCst)
    }

    /// TokenRequests served.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

use hyper::http;
