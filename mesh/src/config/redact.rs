//! Decides which values must never be printed: `--print-config`, error messages and logs go
//! to Cloud Logging, where a leaked token is readable by everyone with log access.

/// What is printed instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// Prefixes of well-known token formats: Google OAuth access tokens, GitHub tokens, AWS
/// access key IDs, HTTP authorization values.
const TOKEN_PREFIXES: &[&str] = &[
    "ya29.",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "AKIA",
    "bearer ",
    "basic ",
];

/// True when a value must be redacted, judged by what it is (a JWT, a PEM private key, a
/// well-known token or an authorization header, a URL with a password), never by the name of
/// the variable holding it: names lie both ways (`SECRET_TTL` is a duration,
/// `IAM_CREDENTIALS_ENDPOINT` a URL, `XDS_AGENT_DEBUG` could hold a token).
pub fn is_secret(value: &str) -> bool {
    let v = value.trim();
    is_jwt(v)
        || TOKEN_PREFIXES.iter().any(|prefix| {
            v.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        })
        || v.contains("PRIVATE KEY-----")
        || url_has_password(v)
}

/// Returns the value, or [`REDACTED`] when it is secret.
pub fn redact(value: &str) -> &str {
    if is_secret(value) { REDACTED } else { value }
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
    fn secrets_are_found_by_value_whatever_the_name() {
        for secret in [
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
            "https://user:hunter2@example.com/x",
            "Bearer abc",
            "-----BEGIN EC PRIVATE KEY-----\n...",
            "-----BEGIN PRIVATE KEY-----\n...",
            "ya29.a0AfH6SMBx",
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "AKIAIOSFODNN7EXAMPLE",
        ] {
            assert!(is_secret(secret), "{secret}");
            assert_eq!(redact(secret), REDACTED);
        }
    }

    #[test]
    fn names_that_sound_secret_do_not_hide_plain_values() {
        for plain in [
            "24h",
            "https://iamcredentials.googleapis.com",
            "gke://my-project/us-central1/istio",
            "https://user@example.com/x",
            "my-project.svc.id.goog",
            "istiod.istio-system.svc:15012",
            "-----BEGIN CERTIFICATE-----\n...",
        ] {
            assert!(!is_secret(plain), "{plain}");
            assert_eq!(redact(plain), plain);
        }
    }
}
