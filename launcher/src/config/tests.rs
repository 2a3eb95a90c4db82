use std::collections::BTreeMap;

use mesh::config::{
    LogFormat, Source,
    names::{PROJECT_ID, WORKLOAD_NAMESPACE},
};

use super::*;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs.iter().map(|(k, v)| (*k, *v)).collect()
}

fn error_of(pairs: &[(&str, &str)]) -> String {
    match Config::from_env(&env(pairs)) {
        Ok(_) => panic!("{pairs:?} should be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_without_any_environment() {
    let config = Config::from_env(&Env::default()).expect("empty env is valid");
    assert_eq!(
        config.launcher.tunnel_port,
        Setting::new(15009, Source::Default)
    );
    assert_eq!(config.launcher.hbone_port.value, 15008);
    assert_eq!(config.launcher.drain_timeout.value, Duration::from_secs(8));
    assert_eq!(
        config.launcher.app_ready_timeout.value,
        Duration::from_secs(240)
    );
    assert_eq!(config.launcher.dataplane.value, DataPlane::Auto);
    assert_eq!(
        config.log_format,
        Setting::new(LogFormat::Text, Source::Default)
    );
    assert_eq!(config.app_port(), Some(8080));
    assert_eq!(config.app_ready_ports(), vec![8080]);
    assert_eq!(config.workload_service_account.value, "default");
    assert_eq!(config.launcher.capture_addr.value, DEFAULT_CAPTURE_ADDR);
    assert!(!config.launcher.capture_dns.value && !config.launcher.capture_cleanup.value);
    assert!(config.launcher.capture_inbound_ports.value.is_empty());
}

#[test]
fn env_values_carry_their_source() {
    let config = Config::from_env(&env(&[
        ("KRUN_DRAIN_TIMEOUT", "500ms"),
        ("KRUN_DATAPLANE", "builtin"),
        ("PORT_http", "9000"),
        ("PORT_grpc", "9001"),
        ("PORT_db", "db.internal:5432"),
        ("PORT_debug", "-"),
        (
            "KRUN_FORWARD",
            "127.0.0.1:5432=db.prod.svc.cluster.local:5432",
        ),
    ]))
    .expect("valid env");
    assert_eq!(
        config.launcher.drain_timeout,
        Setting::new(Duration::from_millis(500), Source::Env)
    );
    assert_eq!(config.launcher.dataplane.value, DataPlane::Builtin);
    assert_eq!(config.app_port(), Some(9000));
    assert_eq!(config.app_ready_ports(), vec![9000, 9001]);
    assert_eq!(
        config.launcher.ports["db"].value,
        PortTarget::Remote("db.internal:5432".into())
    );
    assert_eq!(
        config.launcher.forwards.value[0].target,
        "db.prod.svc.cluster.local:5432"
    );
}

#[test]
fn every_bad_value_names_variable_value_and_form() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("KRUN_TUNNEL_PORT", "abc")],
            "KRUN_TUNNEL_PORT=abc: expected a port number from 0 to 65535",
        ),
        (
            &[("KRUN_HBONE_PORT", "70000")],
            "KRUN_HBONE_PORT=70000: expected a port number from 0 to 65535",
        ),
        (
            &[("KRUN_DATAPLANE", "istio")],
            "KRUN_DATAPLANE=istio: expected one of auto, envoy, builtin, none",
        ),
        (
            &[("KRUN_DRAIN_TIMEOUT", "abc")],
            "KRUN_DRAIN_TIMEOUT=abc: expected a duration such as 8s, 500ms or 2m",
        ),
        (
            &[("KRUN_APP_READY_TIMEOUT", "10")],
            "KRUN_APP_READY_TIMEOUT=10: expected a duration such as 8s, 500ms or 2m",
        ),
        (
            &[("SECRET_TTL", "0s")],
            "SECRET_TTL=0s: expected a duration above zero such as 24h or 90m",
        ),
        (
            &[("KRUN_ADMIN_ADDR", "15030")],
            "KRUN_ADMIN_ADDR=15030: expected an address such as 127.0.0.1:15030, or off",
        ),
        (
            &[("KRUN_LOG_FORMAT", "xml")],
            "KRUN_LOG_FORMAT=xml: expected json or text",
        ),
        (
            &[("KRUN_CAPTURE_ADDR", "15001")],
            "KRUN_CAPTURE_ADDR=15001: expected an address such as 127.0.0.1:15001",
        ),
        (
            &[("KRUN_CAPTURE_INBOUND_PORTS", "8080,http")],
            "KRUN_CAPTURE_INBOUND_PORTS=8080,http: expected a comma-separated list of port numbers",
        ),
        (
            &[("PORT_http", "http")],
            "PORT_http=http: expected a port number, host:port, or - to disable",
        ),
        (&[("K8S_UID", "app")], "K8S_UID=app: expected a numeric uid"),
        (&[("K8S_GID", "-1")], "K8S_GID=-1: expected a numeric gid"),
        (
            &[("OSS_ISTIO", "maybe")],
            "OSS_ISTIO=maybe: expected true or false (also 1/0, yes/no, on/off)",
        ),
        (
            &[("MESH_DEBUG", "verbose")],
            "MESH_DEBUG=verbose: expected true or false (also 1/0, yes/no, on/off)",
        ),
        (
            &[("OUTBOUND_PORTS_EXCLUDE", "22,ssh")],
            "OUTBOUND_PORTS_EXCLUDE=22,ssh: expected a comma-separated list of port numbers",
        ),
        (
            &[("PROJECT_NUMBER", "my-project")],
            "PROJECT_NUMBER=my-project: expected the numeric project number",
        ),
        (
            &[("CA_POOL", "projects/p/caPools/mesh")],
            "CA_POOL=projects/p/caPools/mesh: expected a pool name projects/PROJECT/locations/LOCATION/caPools/NAME",
        ),
        (
            &[("KRUN_CA_SERVICE_ACCOUNT", "mesh-ca")],
            "KRUN_CA_SERVICE_ACCOUNT=mesh-ca: expected a service account email such as NAME@PROJECT.iam.gserviceaccount.com",
        ),
        (
            &[("KRUN_RUN_TOKEN_SERVICE_ACCOUNT", "caller")],
            "KRUN_RUN_TOKEN_SERVICE_ACCOUNT=caller: expected a service account email such as NAME@PROJECT.iam.gserviceaccount.com",
        ),
        (
            &[
                (
                    "KRUN_RUN_TOKEN_SERVICE_ACCOUNT",
                    "caller@p.iam.gserviceaccount.com",
                ),
                ("KRUN_RUN_TOKEN_SOURCE", "none"),
            ],
            "KRUN_RUN_TOKEN_SERVICE_ACCOUNT=caller@p.iam.gserviceaccount.com: expected unset while KRUN_RUN_TOKEN_SOURCE=none (no ID token is added); set KRUN_RUN_TOKEN_SOURCE=metadata to add this account's tokens",
        ),
        (
            &[("STS_ENDPOINT", "sts.local")],
            "STS_ENDPOINT=sts.local: expected a base URL such as https://host or http://127.0.0.1:PORT",
        ),
        (
            &[("KRUN_STARTUP_PROBE", "ftp://x")],
            "KRUN_STARTUP_PROBE=ftp://x: expected http://HOST:PORT/PATH or tcp://HOST:PORT",
        ),
        (
            &[("startupProbe.tcp", "8080")],
            "startupProbe.tcp=8080: expected host:port",
        ),
        (
            &[("startupProbe.http", "tcp://a:1")],
            "startupProbe.http=tcp://a:1: expected an http:// URL",
        ),
        (
            &[("KRUN_FORWARD", "5432=db:5432")],
            "KRUN_FORWARD=5432=db:5432: expected a comma-separated list of LISTEN=HOST:PORT, e.g. 127.0.0.1:5432=db.prod.svc.cluster.local:5432",
        ),
        (
            &[("KRUN_ALLOWED_PRINCIPALS", "spiffe://td/ns/*/sa/x")],
            "KRUN_ALLOWED_PRINCIPALS=spiffe://td/ns/*/sa/x: expected comma-separated SPIFFE IDs such as spiffe://TD/ns/NS/sa/SA or patterns spiffe://TD/ns/NS/*",
        ),
        (
            &[("KRUN_PEER_IDENTITIES", "db:5432=spiffe://td/ns/prod/sa/db")],
            "KRUN_PEER_IDENTITIES=db:5432=spiffe://td/ns/prod/sa/db: expected a comma-separated list of DESTINATION=SPIFFE_ID (DESTINATION an IP address or host name), e.g. 10.8.0.12=spiffe://cluster.local/ns/prod/sa/db",
        ),
        (
            &[("KRUN_PEER_IDENTITIES", "10.8.0.12=spiffe://td/ns/prod")],
            "KRUN_PEER_IDENTITIES=10.8.0.12=spiffe://td/ns/prod: expected a comma-separated list of DESTINATION=SPIFFE_ID (DESTINATION an IP address or host name), e.g. 10.8.0.12=spiffe://cluster.local/ns/prod/sa/db",
        ),
        (
            &[("KRUN_MESH_CIDRS", "10.8.0.0/14,10.300.0.0/16")],
            "KRUN_MESH_CIDRS=10.8.0.0/14,10.300.0.0/16: expected a comma-separated list of CIDRs such as 10.8.0.0/14,fd00::/8 (a bare address is one host, * is every address)",
        ),
    ];
    for (pairs, message) in cases {
        assert_eq!(&error_of(pairs), message);
    }
}

#[test]
fn printable_shows_sources_and_redacts_secrets() {
    let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
    let config = Config::from_env(&env(&[
        ("WORKLOAD_NAMESPACE", "fortio"),
        ("K_SERVICE", "v1--fortio"),
        ("XDS_AGENT_DEBUG", jwt),
        ("MESH", "https://admin:hunter2@mesh.example.com/"),
    ]))
    .expect("valid");
    let printed = config.printable();
    assert_eq!(
        printed["WORKLOAD_NAMESPACE"],
        json!({"value": "fortio", "source": "env"})
    );
    assert_eq!(
        printed["WORKLOAD_NAME"],
        json!({"value": "fortio", "source": "derived"})
    );
    assert_eq!(
        printed["KRUN_DRAIN_TIMEOUT"],
        json!({"value": "8s", "source": "default"})
    );
    assert_eq!(
        printed["PORT_http"],
        json!({"value": 8080, "source": "default"})
    );
    assert_eq!(
        printed["XDS_AGENT_DEBUG"],
        json!({"value": "<redacted>", "source": "env"})
    );
    assert_eq!(
        printed["MESH"],
        json!({"value": "<redacted>", "source": "env"})
    );
    assert_eq!(
        printed["CA_ADDR"],
        json!({"value": null, "source": "default"})
    );
}

#[test]
fn unknown_krun_variables_are_reported() {
    let config = Config::from_env(&env(&[
        ("KRUN_DRAIN_TIMOUT", "1s"),
        ("KRUN_DRAIN_TIMEOUT", "1s"),
    ]))
    .expect("valid");
    assert_eq!(config.unknown_vars, vec!["KRUN_DRAIN_TIMOUT".to_owned()]);
}

/// docs/configuration.md is the user's reference: every variable krun reads must be there.
#[test]
fn every_setting_is_documented() {
    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let doc = std::fs::read_to_string(doc_path).expect("docs/configuration.md exists");
    let missing: Vec<&str> = Config::names()
        .into_iter()
        .filter(|name| !doc.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "add these to docs/configuration.md: {missing:?}"
    );
}

fn layer(source: Source, pairs: &[(&str, &str)]) -> Layer {
    let map: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Layer::from_map(source, &map)
}

#[test]
fn merged_layers_fill_only_what_env_left_unset() {
    let mut config = Config::from_env(&env(&[
        ("PORT_grpc", "7070"),
        ("XDS_ADDR", "istiod.env:15012"),
    ]))
    .expect("valid");
    let mut discovered = Layer::default();
    discovered.set_if_unset(PROJECT_ID, "cfg", Source::Derived);
    discovered.set_if_unset(PROJECT_ID, "ignored", Source::Metadata);
    discovered.set_if_unset(WORKLOAD_NAMESPACE, "fortio", Source::Metadata);
    config.merge(discovered).expect("valid layer");
    config
        .merge(layer(
            Source::MeshEnv,
            &[
                ("XDS_ADDR", "istiod.mesh:15012"),
                ("PORT_grpc", "9090"),
                ("PORT_admin", "9901"),
                ("PROJECT_ID", "from-mesh-env"),
                ("CAROOT_ISTIOD", "-----BEGIN CERTIFICATE-----"),
            ],
        ))
        .expect("valid layer");
    assert_eq!(
        config.xds_addr,
        Some(Setting::new("istiod.env:15012".into(), Source::Env))
    );
    assert_eq!(
        config.launcher.ports["grpc"],
        Setting::new(PortTarget::Local(7070), Source::Env)
    );
    assert_eq!(
        config.launcher.ports["admin"],
        Setting::new(PortTarget::Local(9901), Source::MeshEnv)
    );
    assert_eq!(
        config.project_id,
        Some(Setting::new("cfg".into(), Source::Derived))
    );
    assert_eq!(
        config.workload_namespace,
        Setting::new("fortio".into(), Source::Metadata)
    );
    assert_eq!(
        config.trust_domain,
        Some(Setting::new("cfg.svc.id.goog".into(), Source::Derived))
    );
    assert_eq!(
        config.lookup("CAROOT_ISTIOD").map(|s| s.source),
        Some(Source::MeshEnv)
    );
}

#[test]
fn a_bad_mesh_env_value_is_reported_like_an_env_value() {
    let mut config = Config::from_env(&Env::default()).expect("valid");
    let e = config
        .merge(layer(Source::MeshEnv, &[("PORT_grpc", "grpc")]))
        .expect_err("not a port");
    assert_eq!(
        e.to_string(),
        "PORT_grpc=grpc: expected a port number, host:port, or - to disable"
    );
}
