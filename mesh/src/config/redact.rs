//! Decides which values must never be printed: `--print-config`, error messages and logs go
//! to Cloud Logging, where a leaked token is readable by everyone with log access.

/// What is printed instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// Name fragments that mark a variable as secret whatever its value.
const SECRET_NAME_PARTS: &[&str] = &[
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "PRIVATE_KEY",
    "API_KEY",
];

/// Variables whose names contain a fragment above but hold no secret (Istio's certificate
/// lifetime, the email of the account whose ID tokens hgate sends), judged by their value's shape
/// only.
const NOT_SECRET_NAMES: &[&str] = &["SECRET_TTL", "HGATE_ID_TOKEN_SERVICE_ACCOUNT"];

/// True when a value must be redacted, judged by its variable name or by its shape
/// (a JWT, a bearer header, a PEM private key, a URL with a password).
pub fn is_secret(name: &str, value: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    let by_name = !NOT_SECRET_NAMES.contains(&upper.as_str())
        && SECRET_NAME_PARTS.iter().any(|part| upper.contains(part));
    by_name || looks_secret(value)
}

/// Returns the value, or [`REDACTED`] when it is secret.
pub fn redact<'a>(name: &str, value: &'a str) -> &'a str {
    if is_secret(name, value) {
        REDACTED
    } else {
        value
    }
}

fn looks_secret(value: &str) -> bool {
    let v = value.trim();
    is_jwt(v)
        || v.get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
        || v.contains("PRIVATE KEY-----")
        || url_has_password(v)
}

/// A JWT is three base64url segments, the first starting with `eyJ` (`{"` encoded).
fn is_jwt(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && v.starts_with("eyJ")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        })
}

fn url_has_password(v: &str) -> bool {
    let Some((_, rest)) = v.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority
        .split_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_by_name_and_by_shape() {
        assert!(is_secret("GITHUB_TOKEN", "abc"));
        assert!(is_secret(
            "XDS_AGENT_DEBUG",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
        ));
        assert!(is_secret("MESH", "https://user:hunter2@example.com/x"));
        assert!(is_secret("X", "Bearer abc"));
        assert!(is_secret("X", "-----BEGIN EC PRIVATE KEY-----\n..."));
        assert!(!is_secret("MESH", "gke://my-project/us-central1/istio"));
        assert!(!is_secret("MESH", "https://user@example.com/x"));
        assert!(!is_secret("TRUST_DOMAIN", "my-project.svc.id.goog"));
        assert!(!is_secret("SECRET_TTL", "24h"));
        assert_eq!(
            redact("CA_ADDR", "istiod.istio-system.svc:15012"),
            "istiod.istio-system.svc:15012"
        );
    }
}
