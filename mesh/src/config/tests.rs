use super::*;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs.iter().map(|(k, v)| (*k, *v)).collect()
}

#[test]
fn workload_name_comes_from_k_service_including_the_tagged_form() {
    let plain = MeshConfig::from_env(&env(&[("K_SERVICE", "reviews")])).expect("valid");
    assert_eq!(
        plain.workload_name,
        Some(Setting::new("reviews".into(), Source::Derived))
    );
    let tagged = MeshConfig::from_env(&env(&[("K_SERVICE", "v2--reviews")])).expect("valid");
    assert_eq!(
        tagged.workload_name.map(|s| s.value),
        Some("reviews".into())
    );
    let explicit = MeshConfig::from_env(&env(&[
        ("K_SERVICE", "v2--reviews"),
        ("WORKLOAD_NAME", "r"),
    ]))
    .expect("valid");
    assert_eq!(
        explicit.workload_name,
        Some(Setting::new("r".into(), Source::Env))
    );
}

#[test]
fn cloud_run_defaults_to_json_logs() {
    let config = MeshConfig::from_env(&env(&[("K_SERVICE", "reviews")])).expect("valid");
    assert_eq!(
        config.log_format,
        Setting::new(LogFormat::Json, Source::Derived)
    );
    let config = MeshConfig::from_env(&env(&[
        ("K_SERVICE", "reviews"),
        ("KRUN_LOG_FORMAT", "text"),
    ]))
    .expect("valid");
    assert_eq!(
        config.log_format,
        Setting::new(LogFormat::Text, Source::Env)
    );
}

#[test]
fn namespace_falls_back_to_the_project_id_rule_then_default() {
    let ruled = MeshConfig::from_env(&env(&[("PROJECT_ID", "acme-shop-prod")])).expect("valid");
    assert_eq!(
        ruled.workload_namespace,
        Setting::new("shop".into(), Source::Derived)
    );
    let short = MeshConfig::from_env(&env(&[("PROJECT_ID", "acme-prod")])).expect("valid");
    assert_eq!(
        short.workload_namespace,
        Setting::new("default".into(), Source::Default)
    );
}

#[test]
fn a_secret_never_appears_in_an_error() {
    let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
    let e = MeshConfig::from_env(&env(&[("KRUN_LOG_FORMAT", jwt)])).expect_err("not a format");
    assert_eq!(
        e.to_string(),
        "KRUN_LOG_FORMAT=<redacted>: expected json or text"
    );
}

#[test]
fn an_explicit_trust_domain_is_never_replaced() {
    let mut inputs = Inputs::new(&env(&[("TRUST_DOMAIN", "mesh.example")]));
    let mut metadata = Layer::default();
    metadata.set_if_unset(names::PROJECT_ID, "p", Source::Metadata);
    inputs.push(metadata);
    let config = MeshConfig::resolve(&inputs).expect("valid");
    assert_eq!(
        config.trust_domain,
        Some(Setting::new("mesh.example".into(), Source::Env))
    );
}
