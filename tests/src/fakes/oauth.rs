//! Fake Google OAuth 2.0 token endpoint (`POST /token`, what `oauth2.googleapis.com/token`
//! serves), strict like the real one:
//! - a form body (`application/x-www-form-urlencoded`), `POST` only;
//! - the JWT-bearer grant: an RS256 assertion whose signature `openssl dgst -verify` accepts
//!   with the public half of the key it issued ([`FakeOAuth::service_account_key`]), `kid` that
//!   key's id, `iss` its service account, `aud` this endpoint, a `scope` with `cloud-platform`,
//!   and `iat`/`exp` at most an hour apart and not expired; with `target_audience` instead of
//!   a scope it answers an ID token of that service account for that audience;
//! - the `refresh_token` grant: the client id, secret and refresh token it issued
//!   ([`FakeOAuth::authorized_user`]);
//! - [`FakeOAuth::revoke`] makes every grant `invalid_grant`, as a deleted key or a revoked
//!   login does.
//!
//! Success hands out [`ACCESS_TOKEN`], the token the GKE and Resource Manager fakes require.
//! Failures use the OAuth error shape (`error`, `error_description`).

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::metadata::ACCESS_TOKEN;
use super::server::{FakeServer, Reply, Request};
use crate::TempDir;

/// The id of the key the fake issues.
pub const KEY_ID: &str = "fake-key-id-1";
/// The OAuth client of authorized users.
pub const CLIENT_ID: &str = "764086051850-fake.apps.googleusercontent.com";
/// Its secret.
pub const CLIENT_SECRET: &str = "fake-client-secret";
/// The refresh token the fake issued.
pub const REFRESH_TOKEN: &str = "1//fake-refresh-token";
/// The scope every access token must carry.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

struct State {
    dir: TempDir,
    token_uri: Mutex<String>,
    service_account: Mutex<Option<String>>,
    revoked: AtomicBool,
    lifetime: AtomicU64,
    verifications: AtomicUsize,
    attempts: AtomicUsize,
}

/// The running fake.
pub struct FakeOAuth {
    server: FakeServer,
    state: Arc<State>,
}

impl FakeOAuth {
    /// Starts it and generates its RSA key with openssl.
    pub fn start() -> FakeOAuth {
        let dir = TempDir::new("oauth");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = dir.join("key.pem");
        let public = dir.join("public.pem");
        let (key_s, public_s) = (key.to_string_lossy(), public.to_string_lossy());
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &key_s,
        ]);
        openssl(&["pkey", "-in", &key_s, "-pubout", "-out", &public_s]);
        let state = Arc::new(State {
            dir,
            token_uri: Mutex::new(String::new()),
            service_account: Mutex::new(None),
            revoked: AtomicBool::new(false),
            lifetime: AtomicU64::new(3599),
            verifications: AtomicUsize::new(0),
            attempts: AtomicUsize::new(0),
        });
        let s = state.clone();
        let server = FakeServer::http(Arc::new(move |req: &Request| answer(&s, req)));
        *state.token_uri.lock().expect("lock") = format!("{}/token", server.url("http"));
        FakeOAuth { server, state }
    }

    /// The endpoint, as `token_uri` names it.
    pub fn token_uri(&self) -> String {
        self.state.token_uri.lock().expect("lock").clone()
    }

    /// A service-account JSON key for `email` (of `project`), as `gcloud iam service-accounts
    /// keys create` writes it, with `token_uri` this fake; the fake accepts its assertions.
    pub fn service_account_key(&self, email: &str, project: &str) -> Value {
        *self.state.service_account.lock().expect("lock") = Some(email.to_owned());
        let pem = std::fs::read_to_string(self.state.dir.join("key.pem")).expect("read key");
        json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": KEY_ID,
            "private_key": pem,
            "client_email": email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
            "universe_domain": "googleapis.com",
        })
    }

    /// An authorized-user file as `gcloud auth application-default login` writes it, plus
    /// `token_uri` pointing at this fake (Google's libraries honour it).
    pub fn authorized_user(&self, quota_project: &str) -> Value {
        json!({
            "account": "dev@example.com",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "quota_project_id": quota_project,
            "refresh_token": REFRESH_TOKEN,
            "type": "authorized_user",
            "universe_domain": "googleapis.com",
            "token_uri": self.token_uri(),
        })
    }

    /// `expires_in` of the access tokens handed out from now on (default 3599 s).
    pub fn token_lifetime(&self, seconds: u64) {
        self.state.lifetime.store(seconds, Ordering::SeqCst);
    }

    /// Every grant is refused with `invalid_grant` from now on.
    pub fn revoke(&self) {
        self.state.revoked.store(true, Ordering::SeqCst);
    }

    /// Assertion signatures openssl verified.
    pub fn verified_signatures(&self) -> usize {
        self.state.verifications.load(Ordering::SeqCst)
    }

    /// Delays every answer by `latency` (benchmarks).
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.server.set_latency(latency);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<super::server::Seen> {
        self.server.seen()
    }
}

fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::json_status(
        status,
        json!({"error": error, "error_description": description}),
    )
}

fn answer(s: &State, req: &Request) -> Reply {
    if req.method != "POST" || req.path != "/token" {
        return Reply::status(404, "Not Found");
    }
    if req.header("content-type") != Some("application/x-www-form-urlencoded") {
        return oauth_error(
            400,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        );
    }
    let form: Form = form_urlencoded::parse(&req.body).into_owned().collect();
    let checked = match field(&form, "grant_type") {
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            check_assertion(s, field(&form, "assertion"))
        }
        "refresh_token" => check_refresh(&form).map(|()| Asked::AccessToken),
        other => {
            return oauth_error(
                400,
                "unsupported_grant_type",
                &format!("Invalid grant_type: {other}"),
            );
        }
    };
    let asked = match checked {
        Ok(asked) => asked,
        Err(reply) => return reply,
    };
    if s.revoked.load(Ordering::SeqCst) {
        return oauth_error(400, "invalid_grant", "Token has been expired or revoked.");
    }
    match asked {
        Asked::AccessToken => Reply::json(json!({
            "access_token": ACCESS_TOKEN,
            "expires_in": s.lifetime.load(Ordering::SeqCst),
            "token_type": "Bearer",
        })),
        Asked::IdToken { email, audience } => Reply::json(json!({
            "id_token": super::metadata::id_token(&email, &audience),
        })),
    }
}

/// What a valid grant asks for.
enum Asked {
    /// An access token (`scope` with `cloud-platform`, or a refresh token).
    AccessToken,
    /// An ID token of the key's service account (`target_audience`).
    IdToken {
        /// The service account.
        email: String,
        /// The audience.
        audience: String,
    },
}

/// The form fields of a request.
type Form = std::collections::HashMap<String, String>;

/// A form field, empty when absent.
fn field<'a>(form: &'a Form, name: &str) -> &'a str {
    form.get(name).map_or("", String::as_str)
}

fn check_refresh(form: &Form) -> Result<(), Reply> {
    if field(form, "client_id") != CLIENT_ID || field(form, "client_secret") != CLIENT_SECRET {
        return Err(oauth_error(401, "invalid_client", "Unauthorized"));
    }
    if field(form, "refresh_token") != REFRESH_TOKEN {
        return Err(oauth_error(400, "invalid_grant", "Bad Request"));
    }
    Ok(())
}

fn check_assertion(s: &State, assertion: &str) -> Result<Asked, Reply> {
    let invalid = |why: &str| oauth_error(400, "invalid_grant", &format!("Invalid JWT: {why}"));
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts.as_slice() else {
        return Err(invalid("not three dot-separated parts"));
    };
    let decode = |part: &str| -> Result<Vec<u8>, Reply> {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| invalid("a part is not base64url"))
    };
    let json = |part: &str| -> Result<Value, Reply> {
        serde_json::from_slice(&decode(part)?).map_err(|_| invalid("a part is not JSON"))
    };
    let (header_json, claims_json) = (json(header)?, json(claims)?);
    if header_json["alg"] != "RS256" {
        return Err(invalid("alg must be RS256"));
    }
    if header_json["kid"] != KEY_ID {
        return Err(invalid("kid names no key of the service account"));
    }
    verify_signature(s, &format!("{header}.{claims}"), &decode(signature)?)
        .map_err(|()| oauth_error(400, "invalid_grant", "Invalid JWT Signature."))?;
    let registered = s.service_account.lock().expect("lock").clone();
    if claims_json["iss"].as_str() != registered.as_deref() {
        return Err(invalid("iss is not the key's service account"));
    }
    if claims_json["aud"].as_str() != Some(s.token_uri.lock().expect("lock").as_str()) {
        return Err(invalid("Invalid audience: aud must be the token endpoint"));
    }
    let asked = match (
        claims_json["scope"].as_str(),
        claims_json["target_audience"].as_str(),
    ) {
        (Some(scopes), None) if scopes.split(' ').any(|scope| scope == CLOUD_PLATFORM) => {
            Asked::AccessToken
        }
        (None, Some(audience)) if !audience.is_empty() => Asked::IdToken {
            email: registered.unwrap_or_default(),
            audience: audience.to_owned(),
        },
        _ => {
            return Err(oauth_error(
                400,
                "invalid_scope",
                "the assertion must ask for the cloud-platform scope or name one target_audience",
            ));
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (iat, exp) = (
        claims_json["iat"].as_u64().unwrap_or(0),
        claims_json["exp"].as_u64().unwrap_or(0),
    );
    if exp <= now || iat > now + 60 || exp.saturating_sub(iat) > 3600 {
        return Err(invalid(
            "Token must be a short-lived token (60 minutes) and in a reasonable timeframe",
        ));
    }
    Ok(asked)
}

/// Verifies an RS256 signature with openssl (an implementation krun's signer does not share).
fn verify_signature(s: &State, signing_input: &str, signature: &[u8]) -> Result<(), ()> {
    // Each verification gets its own files: requests may be served concurrently.
    let n = s.attempts.fetch_add(1, Ordering::SeqCst);
    let input = s.dir.join(&format!("input-{n}"));
    let sig = s.dir.join(&format!("sig-{n}"));
    std::fs::write(&input, signing_input).expect("write signing input");
    std::fs::write(&sig, signature).expect("write signature");
    let status = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(s.dir.join("public.pem"))
        .arg("-signature")
        .arg(&sig)
        .arg(&input)
        .output()
        .expect("run openssl dgst");
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&sig);
    if status.status.success() {
        s.verifications.fetch_add(1, Ordering::SeqCst);
        Ok(())
    } else {
        Err(())
    }
}
