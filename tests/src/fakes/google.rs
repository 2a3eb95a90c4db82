//! Fakes of Google STS (`POST /v1/token`) and IAM Credentials (`generateAccessToken`,
//! `generateIdToken`), on one server. Strict like the real ones:
//! - STS: JSON content type; the token-exchange grant, a JWT subject token, an access token
//!   requested; the audience `identitynamespace:TD:CLUSTER_URL` (the one configured with
//!   [`FakeGoogle::expect_audience`], when set) and a subject token whose own audience is
//!   that trust domain, as a workload identity pool checks;
//! - IAM: `POST` only, the federated token as bearer, the service account in the path must
//!   exist ([`FakeGoogle::with_service_account`]), and the caller must hold the permission
//!   ([`FakeGoogle::deny_iam`] takes it away), `lifetime` a duration string.
//!
//! Failures use Google's error shapes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh::identity::jwt::Claims;
use serde_json::{Value, json};

use super::pki::jwt;
use super::server::{FakeServer, Reply, Request};

/// The service account the fake knows unless told otherwise: project 123's mesh data plane
/// P4SA.
pub const DEFAULT_SERVICE_ACCOUNT: &str =
    "service-123@gcp-sa-meshdataplane.iam.gserviceaccount.com";
/// The federated token STS hands out.
pub const FEDERATED_TOKEN: &str = "federated-token";
/// The access token IAM hands out.
pub const ACCESS_TOKEN: &str = "access-token";

struct State {
    sts_calls: AtomicUsize,
    iam_calls: AtomicUsize,
    sts_fails: AtomicBool,
    iam_denies: AtomicBool,
    audience: Mutex<Option<String>>,
    service_account: Mutex<String>,
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
        let state = Arc::new(State {
            sts_calls: AtomicUsize::new(0),
            iam_calls: AtomicUsize::new(0),
            sts_fails: AtomicBool::new(false),
            iam_denies: AtomicBool::new(false),
            audience: Mutex::new(None),
            service_account: Mutex::new(DEFAULT_SERVICE_ACCOUNT.to_owned()),
            id_token_creators: Mutex::new(BTreeSet::new()),
        });
        let s = state.clone();
        let server = FakeServer::http(Arc::new(move |req: &Request| answer(&s, req)));
        server.set_latency(delay);
        FakeGoogle { server, state }
    }

    /// Base URL for both `STS_ENDPOINT` and `IAM_CREDENTIALS_ENDPOINT`.
    pub fn url(&self) -> String {
        self.server.url("http")
    }

    /// Every request so far, in order (the hop log).
    pub fn seen(&self) -> Vec<super::server::Seen> {
        self.server.seen()
    }

    /// STS accepts only this audience (the workload identity pool and cluster).
    pub fn expect_audience(&self, audience: &str) {
        *self.state.audience.lock().expect("lock") = Some(audience.to_owned());
    }

    /// The one service account IAM knows (others are 404).
    pub fn with_service_account(&self, email: &str) {
        *self.state.service_account.lock().expect("lock") = email.to_owned();
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

    /// IAM answers 403 PERMISSION_DENIED from now on: the caller lacks the binding.
    pub fn deny_iam(&self) {
        self.state.iam_denies.store(true, Ordering::SeqCst);
    }
}

fn invalid(status: u16, error: &str, description: &str) -> Reply {
    Reply::json_status(
        status,
        json!({"error": error, "error_description": description}),
    )
}

fn google_error(code: u16, status: &str, message: &str) -> Reply {
    Reply::json_status(
        code,
        json!({"error": {"code": code, "message": message, "status": status}}),
    )
}

fn answer(s: &State, req: &Request) -> Reply {
    if req.header("content-type") != Some("application/json") {
        return invalid(
            400,
            "invalid_request",
            "Content-Type must be application/json",
        );
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    if req.path == "/v1/token" {
        s.sts_calls.fetch_add(1, Ordering::SeqCst);
        if s.sts_fails.load(Ordering::SeqCst) {
            return invalid(
                400,
                "invalid_grant",
                "The audience in ID Token does not match the expected audience.",
            );
        }
        return sts(s, &body);
    }
    if let Some(rest) = req.path.strip_prefix("/v1/projects/-/serviceAccounts/") {
        s.iam_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(reply) = impersonated_id_token(s, req, &body) {
            return reply;
        }
        return iam(s, req, rest, &body);
    }
    google_error(404, "NOT_FOUND", "not found")
}

/// STS token exchange, as a workload identity pool checks it.
fn sts(s: &State, body: &Value) -> Reply {
    let expected = [
        (
            "grantType",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subjectTokenType", "urn:ietf:params:oauth:token-type:jwt"),
        (
            "requestedTokenType",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
    ];
    for (field, value) in expected {
        if body[field] != value {
            return invalid(400, "invalid_request", &format!("{field} must be {value}"));
        }
    }
    let audience = body["audience"].as_str().unwrap_or("");
    if let Some(want) = s.audience.lock().expect("lock").as_deref()
        && audience != want
    {
        return invalid(
            400,
            "invalid_target",
            &format!(
                "The target service indicated by the \"audience\" parameters is invalid: {audience}"
            ),
        );
    }
    let Some(trust_domain) = audience
        .strip_prefix("identitynamespace:")
        .and_then(|rest| rest.split(':').next())
    else {
        return invalid(
            400,
            "invalid_target",
            "audience must be identitynamespace:TRUST_DOMAIN:CLUSTER_URL",
        );
    };
    let subject = body["subjectToken"].as_str().unwrap_or("");
    match Claims::decode(subject) {
        Ok(claims) if claims.aud.contains(trust_domain) => {}
        Ok(_) => {
            return invalid(
                400,
                "invalid_grant",
                "The audience in ID Token does not match the expected audience.",
            );
        }
        Err(_) => return invalid(400, "invalid_grant", "Unable to parse the ID Token."),
    }
    Reply::json(json!({
        "access_token": FEDERATED_TOKEN,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": 3600
    }))
}

/// IAM Credentials: `rest` is `EMAIL:method`.
fn iam(s: &State, req: &Request, rest: &str, body: &Value) -> Reply {
    if req.method != "POST" {
        return google_error(405, "METHOD_NOT_ALLOWED", "method must be POST");
    }
    if req.header("authorization") != Some(&format!("Bearer {FEDERATED_TOKEN}")) {
        return google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    let Some((email, method)) = rest.rsplit_once(':') else {
        return google_error(404, "NOT_FOUND", "not found");
    };
    if email != s.service_account.lock().expect("lock").as_str() {
        return google_error(404, "NOT_FOUND", "Requested entity was not found.");
    }
    let permission = match method {
        "generateAccessToken" => "iam.serviceAccounts.getAccessToken",
        "generateIdToken" => "iam.serviceAccounts.getOpenIdToken",
        _ => return google_error(404, "NOT_FOUND", "not found"),
    };
    if s.iam_denies.load(Ordering::SeqCst) {
        return google_error(
            403,
            "PERMISSION_DENIED",
            &format!("Permission '{permission}' denied on resource (or it may not exist)."),
        );
    }
    if method == "generateIdToken" {
        let aud = body["audience"].as_str().unwrap_or("");
        return Reply::json(json!({"token": jwt(email, aud, Duration::from_secs(3600))}));
    }
    let lifetime = body["lifetime"].as_str().unwrap_or("");
    if !lifetime.ends_with('s') || body["scope"].as_array().is_none_or(Vec::is_empty) {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "Invalid value at 'lifetime' or 'scope'",
        );
    }
    Reply::json(json!({"accessToken": ACCESS_TOKEN, "expireTime": "2099-01-01T00:00:00Z"}))
}

/// `generateIdToken` called with an access token other than the federated one (hgate's own
/// account impersonating `HGATE_ID_TOKEN_SERVICE_ACCOUNT`): allowed only with the grant of
/// [`FakeGoogle::grant_id_token_creator`]. `None`: not such a call.
fn impersonated_id_token(s: &State, req: &Request, body: &Value) -> Option<Reply> {
    let bearer = req.header("authorization")?.strip_prefix("Bearer ")?;
    let gsa = req
        .path
        .strip_prefix("/v1/projects/-/serviceAccounts/")?
        .strip_suffix(":generateIdToken")?;
    if bearer == FEDERATED_TOKEN {
        return None;
    }
    if req.method != "POST" {
        return Some(google_error(
            405,
            "METHOD_NOT_ALLOWED",
            "method must be POST",
        ));
    }
    let granted = s
        .id_token_creators
        .lock()
        .expect("grants")
        .contains(&(bearer.to_owned(), gsa.to_owned()));
    if !granted {
        return Some(google_error(
            403,
            "PERMISSION_DENIED",
            &format!(
                "Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource projects/-/serviceAccounts/{gsa} (or it may not exist)."
            ),
        ));
    }
    Some(match body["audience"].as_str().filter(|a| !a.is_empty()) {
        Some(audience) => Reply::json(json!({"token": super::metadata::id_token(gsa, audience)})),
        None => google_error(400, "INVALID_ARGUMENT", "Invalid value at 'audience'"),
    })
}
