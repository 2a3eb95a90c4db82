//! `krun --print-config`: the resolved configuration as JSON, with sources, secrets redacted,
//! and no side effects.

use krun_tests::{Krun, TempDir};
use serde_json::json;

#[test]
fn print_config_shows_sources_redacts_secrets_and_starts_nothing() {
    let dir = TempDir::new("print-config");
    let marker = dir.join("app-ran");
    let done = Krun::new()
        .env("WORKLOAD_NAMESPACE", "fortio")
        .env("K_SERVICE", "fortio")
        // Secrets under innocent names, and innocent values under names that sound secret:
        // redaction goes by what a value is.
        .env(
            "XDS_AGENT_DEBUG",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
        )
        .env("ENVOY_LOG_LEVEL", "Bearer s3cr3t-test-token")
        .env("MESH", "https://user:hunter2-test@mesh.example/env")
        .env("SECRET_TTL", "36h")
        .env(
            "IAM_CREDENTIALS_ENDPOINT",
            "https://iamcredentials.example.test",
        )
        .args(["--print-config", "--offline", "--", "touch"])
        .args([&marker])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    let printed: serde_json::Value = serde_json::from_str(&done.text()).expect("one JSON object");
    assert_eq!(
        printed["WORKLOAD_NAMESPACE"],
        json!({"value": "fortio", "source": "env"})
    );
    assert_eq!(
        printed["WORKLOAD_NAME"],
        json!({"value": "fortio", "source": "derived"})
    );
    assert_eq!(
        printed["KRUN_TUNNEL_PORT"],
        json!({"value": 0, "source": "env"})
    );
    assert_eq!(
        printed["KRUN_APP_READY_TIMEOUT"],
        json!({"value": "4m", "source": "default"})
    );
    assert_eq!(printed["XDS_AGENT_DEBUG"]["value"], "<redacted>");
    assert_eq!(printed["ENVOY_LOG_LEVEL"]["value"], "<redacted>");
    assert_eq!(printed["MESH"]["value"], "<redacted>");
    assert_eq!(printed["SECRET_TTL"]["value"], "1day 12h");
    assert_eq!(
        printed["IAM_CREDENTIALS_ENDPOINT"]["value"],
        "https://iamcredentials.example.test"
    );
    for secret in ["eyJhbGci", "s3cr3t-test-token", "hunter2-test"] {
        assert!(!done.text().contains(secret), "{secret} leaked");
    }
    assert!(!marker.exists(), "--print-config must not start the app");
}

#[test]
fn a_bad_value_stops_startup_with_one_line() {
    let done = Krun::new()
        .env("KRUN_DATAPLANE", "istio")
        .args(["true"])
        .run();
    assert_eq!(done.code, 1);
    assert_eq!(
        done.output,
        ["krun: KRUN_DATAPLANE=istio: expected one of auto, envoy, builtin, none"]
    );
}
