//! Fakes of Google STS (`POST /v1/token`) and IAM Credentials (`generateAccessToken`,
//! `generateIdToken`), on one server. Strict like the real ones: JSON content type, the
//! token-exchange grant, a bearer federated token for IAM, `lifetime` as a duration string.
//! Failures use Google's error shapes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::pki::jwt;
use super::server::{FakeServer, Reply, Request};

#[derive(Default)]
struct State {
    sts_calls: AtomicUsize,
    iam_calls: AtomicUsize,
    sts_fails: AtomicBool,
    iam_denies: AtomicBool,
    /// (caller's access token, service account) pairs holding
    /// `roles/iam.serviceAccountOpenIdTokenCreator`.
    id_token_creators: Mutex<BTreeSet<(String, String)>>,
}

/// The running fake.
pub struct FakeGoogle {
    server: FakeServer,
    state: Arc<State>,
}

impl FakeGoogle {
    /// Starts it; each answer is delayed by `delay`.
    pub fn start(delay: Duration) -> FakeGoogle {
        let state = Arc::new(State::default());
        let s = state.clone();
        let server = FakeServer::http(Arc::new(move |req: &Request| answer(&s, req)));
        server.set_latency(delay);
        FakeGoogle { server, state }
    }

    /// Base URL for both `STS_ENDPOINT` and `IAM_CREDENTIALS_ENDPOINT`.
    pub fn url(&self) -> String {
        self.server.url("http")
    }

    /// STS calls so far.
    pub fn sts_calls(&self) -> usize {
        self.state.sts_calls.load(Ordering::SeqCst)
    }

    /// IAM calls so far.
    pub fn iam_calls(&self) -> usize {
        self.state.iam_calls.load(Ordering::SeqCst)
    }

    /// STS answers 400 invalid_grant from now on.
    pub fn fail_sts(&self) {
        self.state.sts_fails.store(true, Ordering::SeqCst);
    }

    /// Grants the caller whose access token is `bearer` `roles/iam.serviceAccountOpenIdTokenCreator`
    /// on `gsa`: its `generateIdToken` calls for `gsa` then get a Google-style ID token
    /// (`email` = `gsa`, [`super::metadata::id_token`]).
    pub fn grant_id_token_creator(&self, bearer: &str, gsa: &str) {
        self.state
            .id_token_creators
            .lock()
            .expect("grants")
            .insert((bearer.to_owned(), gsa.to_owned()));
    }

    /// IAM answers 403 PERMISSION_DENIED from now on.
    pub fn deny_iam(&self) {
        self.state.iam_denies.store(true, Ordering::SeqCst);
    }
}

fn answer(s: &State, req: &Request) -> Reply {
    if req.header("content-type") != Some("application/json") {
        return Reply::json_status(
            400,
            json!({"error": "invalid_request", "error_description": "Content-Type must be application/json"}),
        );
    }
    let body: serde_json::Value =
        serde_json::from_slice(&req.body).unwrap_or(serde_json::Value::Null);
    if req.path == "/v1/token" {
        s.sts_calls.fetch_add(1, Ordering::SeqCst);
        if s.sts_fails.load(Ordering::SeqCst) {
            return Reply::json_status(
                400,
                json!({"error": "invalid_grant", "error_description": "The audience in ID Token does not match the expected audience."}),
            );
        }
        if body["grantType"] != "urn:ietf:params:oauth:grant-type:token-exchange"
            || body["subjectToken"].as_str().is_none_or(str::is_empty)
        {
            return Reply::json_status(
                400,
                json!({"error": "invalid_request", "error_description": "bad grant"}),
            );
        }
        return Reply::json(
            json!({"access_token": "federated-token", "issued_token_type": "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer", "expires_in": 3600}),
        );
    }
    if req.path.starts_with("/v1/projects/-/serviceAccounts/") {
        s.iam_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(reply) = impersonated_id_token(s, req, &body) {
            return reply;
        }
        if req.header("authorization") != Some("Bearer federated-token") {
            return Reply::json_status(
                401,
                json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}}),
            );
        }
        if s.iam_denies.load(Ordering::SeqCst) {
            return Reply::json_status(
                403,
                json!({"error": {"code": 403, "message": "Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource (or it may not exist).", "status": "PERMISSION_DENIED"}}),
            );
        }
        if req.path.ends_with(":generateIdToken") {
            let aud = body["audience"].as_str().unwrap_or("");
            return Reply::json(json!({"token": jwt("gsa", aud, Duration::from_secs(3600))}));
        }
        if req.path.ends_with(":generateAccessToken") {
            let lifetime = body["lifetime"].as_str().unwrap_or("");
            if !lifetime.ends_with('s') {
                return Reply::json_status(
                    400,
                    json!({"error": {"code": 400, "message": "Invalid value at 'lifetime'", "status": "INVALID_ARGUMENT"}}),
                );
            }
            return Reply::json(
                json!({"accessToken": "access-token", "expireTime": "2099-01-01T00:00:00Z"}),
            );
        }
    }
    Reply::json_status(
        404,
        json!({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}),
    )
}

/// `generateIdToken` by a caller other than the federated token (an account's own access
/// token, as hgate's with `HGATE_ID_TOKEN_SERVICE_ACCOUNT`): POST, the service account in
/// the path, a non-empty `audience`, and the caller's grant on that account, as IAM checks.
/// `None`: not such a call.
fn impersonated_id_token(s: &State, req: &Request, body: &serde_json::Value) -> Option<Reply> {
    let bearer = req.header("authorization")?.strip_prefix("Bearer ")?;
    let gsa = req
        .path
        .strip_prefix("/v1/projects/-/serviceAccounts/")?
        .strip_suffix(":generateIdToken")?;
    if bearer == "federated-token" {
        return None;
    }
    if req.method != "POST" {
        return Some(Reply::json_status(
            405,
            json!({"error": {"code": 405, "message": "Method not allowed", "status": "METHOD_NOT_ALLOWED"}}),
        ));
    }
    let granted = s
        .id_token_creators
        .lock()
        .expect("grants")
        .contains(&(bearer.to_owned(), gsa.to_owned()));
    if !granted {
        return Some(Reply::json_status(
            403,
            json!({"error": {"code": 403, "message": format!("Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource projects/-/serviceAccounts/{gsa} (or it may not exist)."), "status": "PERMISSION_DENIED"}}),
        ));
    }
    Some(match body["audience"].as_str().filter(|a| !a.is_empty()) {
        Some(audience) => Reply::json(json!({"token": super::metadata::id_token(gsa, audience)})),
        None => Reply::json_status(
            400,
            json!({"error": {"code": 400, "message": "Invalid value at 'audience'", "status": "INVALID_ARGUMENT"}}),
        ),
    })
}
