//! Google credential files, for calling Google APIs off GCP (a laptop, a VM elsewhere): a
//! service-account JSON key (`gcloud iam service-accounts keys create`) or an authorized-user
//! file (`gcloud auth application-default login`), found where Google's client libraries look:
//! `GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's application-default credentials file.
//! The file is read and the key parsed once, at startup, so a bad file stops krun with a
//! message naming the file, the field and the fix, not at the first API call.

use std::path::{Path, PathBuf};

use ring::signature::RsaKeyPair;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

/// The file gcloud writes application-default credentials to, in its config directory.
pub const ADC_FILE: &str = "application_default_credentials.json";
/// Where an authorized-user file sends its refresh token when it names no `token_uri`
/// (the Google client libraries' default).
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// How a credentials file was found, for the log line and the errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Named by `GOOGLE_APPLICATION_CREDENTIALS`.
    Env,
    /// gcloud's application-default credentials file (`CLOUDSDK_CONFIG` or `~/.config/gcloud`).
    Gcloud,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Env => "GOOGLE_APPLICATION_CREDENTIALS",
            Origin::Gcloud => "the gcloud application-default credentials file",
        })
    }
}

/// A credentials file to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// Its path.
    pub path: PathBuf,
    /// How it was found.
    pub origin: Origin,
}

/// Finds the credentials file as Google's libraries do: `GOOGLE_APPLICATION_CREDENTIALS` when
/// set (a missing file is then an error at [`CredentialsFile::load`], not skipped), else
/// `$CLOUDSDK_CONFIG/application_default_credentials.json` or
/// `$HOME/.config/gcloud/application_default_credentials.json` when it exists.
pub fn locate(
    google_application_credentials: Option<&Path>,
    cloudsdk_config: Option<&Path>,
    home: Option<&Path>,
) -> Option<Located> {
    if let Some(path) = google_application_credentials {
        return Some(Located {
            path: path.to_owned(),
            origin: Origin::Env,
        });
    }
    let dir = match (cloudsdk_config, home) {
        (Some(dir), _) => dir.to_owned(),
        (None, Some(home)) => home.join(".config").join("gcloud"),
        (None, None) => return None,
    };
    let path = dir.join(ADC_FILE);
    path.is_file().then_some(Located {
        path,
        origin: Origin::Gcloud,
    })
}

/// A credentials file that cannot be used; each message names the file, the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error(
        "cannot read Google credentials {path} (from {origin}): {cause}; point GOOGLE_APPLICATION_CREDENTIALS at a readable service-account key, or run `gcloud auth application-default login`"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// How it was found.
        origin: Origin,
        /// The OS error.
        cause: std::io::Error,
    },
    /// Not JSON, or a field of the wrong JSON type.
    #[error(
        "Google credentials {path} is not a credentials JSON file: {reason}; download the key again (gcloud iam service-accounts keys create)"
    )]
    NotJson {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A `type` krun does not read.
    #[error(
        "Google credentials {path}: \"type\" is {found:?}; krun reads \"service_account\" (a key from `gcloud iam service-accounts keys create`) and \"authorized_user\" (`gcloud auth application-default login`)"
    )]
    Type {
        /// The file.
        path: PathBuf,
        /// The `type` found (empty when absent).
        found: String,
    },
    /// A required field is missing or empty.
    #[error(
        "Google credentials {path} ({kind}): field \"{field}\" is missing or empty; download the file again"
    )]
    MissingField {
        /// The file.
        path: PathBuf,
        /// `service_account` or `authorized_user`.
        kind: &'static str,
        /// The field.
        field: &'static str,
    },
    /// `private_key` is not a PKCS#8 RSA key.
    #[error(
        "Google credentials {path}: field \"private_key\" is not a PEM PKCS#8 RSA key ({reason}); download the key again (gcloud iam service-accounts keys create)"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A service-account key: krun signs a JWT with it and trades it at `token_uri` (the OAuth 2.0
/// JWT-bearer grant, RFC 7523).
pub struct ServiceAccountKey {
    /// The service account (`iss` of the assertion).
    pub client_email: String,
    /// The key's id (`kid` of the assertion header), when the file names it.
    pub private_key_id: Option<String>,
    /// Where the assertion is sent (also its `aud`).
    pub token_uri: String,
    /// The service account's project.
    pub project_id: Option<String>,
    /// The parsed private key.
    pub key: RsaKeyPair,
}

/// An authorized user: krun trades the refresh token at `token_uri` (the `refresh_token` grant).
pub struct AuthorizedUser {
    /// The OAuth client.
    pub client_id: String,
    /// The OAuth client's secret.
    pub client_secret: String,
    /// The user's refresh token.
    pub refresh_token: String,
    /// Where it is sent ([`DEFAULT_TOKEN_URI`] unless the file names one).
    pub token_uri: String,
    /// The project billed for API calls, when gcloud recorded one.
    pub quota_project_id: Option<String>,
    /// The user, when gcloud recorded it.
    pub account: Option<String>,
}

/// A parsed credentials file.
pub enum CredentialsFile {
    /// `"type": "service_account"`.
    ServiceAccount(ServiceAccountKey),
    /// `"type": "authorized_user"`.
    AuthorizedUser(AuthorizedUser),
}

impl std::fmt::Debug for CredentialsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialsFile::ServiceAccount(key) => f
                .debug_struct("ServiceAccount")
                .field("client_email", &key.client_email)
                .field("token_uri", &key.token_uri)
                .finish_non_exhaustive(),
            CredentialsFile::AuthorizedUser(user) => f
                .debug_struct("AuthorizedUser")
                .field("client_id", &user.client_id)
                .field("token_uri", &user.token_uri)
                .finish_non_exhaustive(),
        }
    }
}

/// The fields of both kinds, as the file has them.
#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    private_key: Option<String>,
    private_key_id: Option<String>,
    token_uri: Option<String>,
    project_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
    quota_project_id: Option<String>,
    account: Option<String>,
}

impl CredentialsFile {
    /// Reads and parses the file `located` names (a small blocking read).
    pub fn load(located: &Located) -> Result<Self, KeyFileError> {
        let text =
            std::fs::read_to_string(&located.path).map_err(|cause| KeyFileError::Unreadable {
                path: located.path.clone(),
                origin: located.origin,
                cause,
            })?;
        Self::parse(&located.path, &text)
    }

    /// Parses `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, KeyFileError> {
        let raw: RawFile = serde_json::from_str(text).map_err(|e| KeyFileError::NotJson {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let kind = raw.kind.clone().unwrap_or_default();
        let required = |kind: &'static str, field: &'static str, value: Option<String>| {
            value
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| KeyFileError::MissingField {
                    path: path.to_owned(),
                    kind,
                    field,
                })
        };
        let present = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
        match kind.as_str() {
            "service_account" => {
                const KIND: &str = "service_account";
                let client_email = required(KIND, "client_email", raw.client_email)?;
                let pem = required(KIND, "private_key", raw.private_key)?;
                let token_uri = required(KIND, "token_uri", raw.token_uri)?;
                let bad_key = |reason: String| KeyFileError::BadKey {
                    path: path.to_owned(),
                    reason,
                };
                let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| bad_key(format!("no PRIVATE KEY block: {e}")))?;
                let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                    .map_err(|e| bad_key(format!("not an RSA key ring accepts: {e}")))?;
                Ok(CredentialsFile::ServiceAccount(ServiceAccountKey {
                    client_email,
                    private_key_id: present(raw.private_key_id),
                    token_uri,
                    project_id: present(raw.project_id),
                    key,
                }))
            }
            "authorized_user" => {
                const KIND: &str = "authorized_user";
                Ok(CredentialsFile::AuthorizedUser(AuthorizedUser {
                    client_id: required(KIND, "client_id", raw.client_id)?,
                    client_secret: required(KIND, "client_secret", raw.client_secret)?,
                    refresh_token: required(KIND, "refresh_token", raw.refresh_token)?,
                    token_uri: present(raw.token_uri).unwrap_or_else(|| DEFAULT_TOKEN_URI.into()),
                    quota_project_id: present(raw.quota_project_id),
                    account: present(raw.account),
                }))
            }
            _ => Err(KeyFileError::Type {
                path: path.to_owned(),
                found: kind,
            }),
        }
    }

    /// The project the file belongs to: the key's `project_id`, or the user's
    /// `quota_project_id`.
    pub fn project(&self) -> Option<&str> {
        match self {
            CredentialsFile::ServiceAccount(key) => key.project_id.as_deref(),
            CredentialsFile::AuthorizedUser(user) => user.quota_project_id.as_deref(),
        }
    }

    /// The project an authorized user's API calls bill (`x-goog-user-project`), when gcloud
    /// recorded one; `None` for a service account, whose own project pays.
    pub fn quota_project(&self) -> Option<&str> {
        match self {
            CredentialsFile::ServiceAccount(_) => None,
            CredentialsFile::AuthorizedUser(user) => user.quota_project_id.as_deref(),
        }
    }

    /// The service account's email (`None` for a user).
    pub fn service_account(&self) -> Option<&str> {
        match self {
            CredentialsFile::ServiceAccount(key) => Some(&key.client_email),
            CredentialsFile::AuthorizedUser(_) => None,
        }
    }

    /// What the log line calls it: `service-account key for X` or `authorized user Y`.
    pub fn describe(&self) -> String {
        match self {
            CredentialsFile::ServiceAccount(key) => {
                format!("service-account key for {}", key.client_email)
            }
            CredentialsFile::AuthorizedUser(user) => format!(
                "authorized user {}",
                user.account.as_deref().unwrap_or("(account not recorded)")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CredentialsFile, KeyFileError> {
        CredentialsFile::parse(Path::new("/k.json"), text)
    }

    #[test]
    fn google_application_credentials_wins_over_the_gcloud_file() {
        let dir = std::env::temp_dir().join(format!("krun-adc-{}", std::process::id()));
        let gcloud = dir.join(".config").join("gcloud");
        std::fs::create_dir_all(&gcloud).expect("mkdir");
        std::fs::write(gcloud.join(ADC_FILE), "{}").expect("write");
        let explicit = locate(Some(Path::new("/missing.json")), None, Some(&dir));
        assert_eq!(
            explicit,
            Some(Located {
                path: "/missing.json".into(),
                origin: Origin::Env
            })
        );
        let from_home = locate(None, None, Some(&dir)).expect("the gcloud file under HOME");
        assert_eq!(from_home.path, gcloud.join(ADC_FILE));
        assert_eq!(from_home.origin, Origin::Gcloud);
        let from_cloudsdk = locate(None, Some(&gcloud), None).expect("CLOUDSDK_CONFIG");
        assert_eq!(from_cloudsdk.path, gcloud.join(ADC_FILE));
        assert_eq!(locate(None, Some(&dir), Some(&dir)), None, "no file there");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn an_unreadable_file_is_named_with_its_origin() {
        let err = CredentialsFile::load(&Located {
            path: "/nonexistent/key.json".into(),
            origin: Origin::Env,
        })
        .expect_err("missing");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/key.json"), "{text}");
        assert!(
            text.contains("from GOOGLE_APPLICATION_CREDENTIALS"),
            "{text}"
        );
    }

    #[test]
    fn a_wrong_type_names_the_field_and_the_types_read() {
        let err = parse(r#"{"type":"external_account"}"#).expect_err("type");
        let text = err.to_string();
        assert!(text.contains(r#""type" is "external_account""#), "{text}");
        assert!(text.contains("service_account"), "{text}");
        assert!(matches!(parse("{}"), Err(KeyFileError::Type { .. })));
        assert!(matches!(
            parse("not json"),
            Err(KeyFileError::NotJson { .. })
        ));
    }

    #[test]
    fn a_missing_field_is_named() {
        let err = parse(r#"{"type":"authorized_user","client_id":"c","client_secret":"s"}"#)
            .expect_err("no refresh token");
        assert!(
            err.to_string().contains(r#"field "refresh_token""#),
            "{err}"
        );
        let err = parse(r#"{"type":"service_account","client_email":"a@b.c","token_uri":"x"}"#)
            .expect_err("no key");
        assert!(err.to_string().contains(r#"field "private_key""#), "{err}");
    }

    #[test]
    fn a_key_that_is_not_rsa_pkcs8_is_refused() {
        let file = serde_json::json!({
            "type": "service_account",
            "client_email": "a@p.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
            "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        });
        let err = parse(&file.to_string()).expect_err("bad key");
        assert!(matches!(err, KeyFileError::BadKey { .. }), "{err}");
        assert!(err.to_string().contains(r#"field "private_key""#), "{err}");
    }

    #[test]
    fn an_authorized_user_without_token_uri_uses_googles() {
        let file = parse(
            r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r","quota_project_id":"q"}"#,
        )
        .expect("parses");
        let CredentialsFile::AuthorizedUser(user) = &file else {
            panic!("{file:?}");
        };
        assert_eq!(user.token_uri, DEFAULT_TOKEN_URI);
        assert_eq!(file.project(), Some("q"));
        assert_eq!(file.quota_project(), Some("q"));
        assert_eq!(file.service_account(), None);
    }
}
