//! Mesh discovery against fakes of the metadata server, the GKE Container API, Cloud
//! Resource Manager and a K8s API (HTTPS, its CA handed out by the GKE fake). Most scenarios
//! run `krun --print-config`, which performs the same read-only discovery as startup and
//! shows each value with its source.

use std::time::Duration;

use krun_tests::fakes::gke::FakeCluster;
use krun_tests::fakes::oauth::FakeOAuth;
use krun_tests::fakes::server::{FakeServer, Reply};
use krun_tests::fakes::{TestWorld, TestWorldBuilder, server};
use krun_tests::{Finished, Krun, TempDir, free_port};
use mesh::backoff::{Backoff, Jitter};
use mesh::metadata::{MetadataClient, NotGcp, Platform, ProbeOptions};
use serde_json::{Value, json};

/// The config project of most scenarios; the workload runs in `wl-project`.
const CFG: &str = "cfg-project";

fn mesh_world() -> TestWorldBuilder {
    TestWorld::builder()
        .cluster(FakeCluster::new(CFG, "europe-west1", "istio-far").mesh())
        .cluster(FakeCluster::new(CFG, "us-central1", "apps"))
        .cluster(FakeCluster::new(CFG, "us-central1-c", "istio-main").mesh())
        .cluster(FakeCluster::new("wl-project", "us-central1", "istio-local").mesh())
        .mesh_env(&[
            ("XDS_ADDR", "meshcon.example:15012"),
            ("MESH_TENANT", "-"),
            ("PORT_grpc", "9090"),
            ("PORT_admin", "9901"),
        ])
}

/// The JSON object `--print-config` printed (logs go to stderr, in the same stream).
fn printed(done: &Finished) -> Value {
    assert_eq!(done.code, 0, "{}", done.text());
    let start = done
        .output
        .iter()
        .position(|l| l == "{")
        .unwrap_or_else(|| panic!("no JSON object in:\n{}", done.text()));
    let end = start
        + done.output[start..]
            .iter()
            .position(|l| l == "}")
            .expect("end of the JSON object");
    serde_json::from_str(&done.output[start..=end].join("\n")).expect("print-config JSON")
}

fn print_config(krun: Krun) -> Value {
    printed(&krun.args(["--print-config"]).run())
}

fn setting(value: &str, source: &str) -> Value {
    json!({"value": value, "source": source})
}

#[test]
fn without_mesh_on_gcp_the_labelled_cluster_of_the_workload_project_is_used() {
    let world = mesh_world().start();
    let config = print_config(world.krun().env("XDS_ADDR", "istiod.local:15012"));
    assert_eq!(config["PROJECT_ID"], setting("wl-project", "metadata"));
    assert_eq!(config["WORKLOAD_NAMESPACE"], setting("fortio", "metadata"));
    assert_eq!(config["PROJECT_NUMBER"], setting("1234567890", "metadata"));
    assert_eq!(config["CLUSTER_NAME"], setting("istio-local", "discovered"));
    assert_eq!(
        config["CLUSTER_LOCATION"],
        setting("us-central1", "discovered")
    );
    assert_eq!(
        config["TRUST_DOMAIN"],
        setting("wl-project.svc.id.goog", "derived")
    );
    assert_eq!(config["XDS_ADDR"], setting("istiod.local:15012", "env"));
    assert_eq!(config["MESH_TENANT"], setting("-", "mesh-env"));
    let list = &world.gke.seen()[0];
    assert_eq!(list.path, "/v1/projects/wl-project/locations/-/clusters");
    assert_eq!(list.header("x-goog-user-project"), None, "same project");
    assert!(
        world.resource_manager.seen().is_empty(),
        "namespace and number were known from metadata"
    );
}

#[test]
fn without_mesh_unlabelled_clusters_mean_no_mesh_and_the_app_runs() {
    let world = TestWorld::builder()
        .cluster(FakeCluster::new(
            "wl-project",
            "us-central1",
            "istio-unlabelled",
        ))
        .start();
    let done = world.krun().args(["--", "sh", "-c", "echo app-ran"]).run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("no mesh configured: running as a plain supervisor"));
    assert!(done.has_line("app-ran"));
    assert!(world.kube.server.seen().is_empty());
}

#[test]
fn without_mesh_no_permission_to_list_clusters_means_no_mesh() {
    let world = TestWorld::builder().start();
    let done = world.krun().args(["--", "sh", "-c", "echo app-ran"]).run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("may not list GKE clusters"));
    assert!(done.has_line("app-ran"));
}

#[test]
fn gke_project_form_picks_the_first_istio_cluster_in_my_region_and_bills_the_config_project() {
    let world = mesh_world().start();
    let done = world
        .krun()
        .env("MESH", format!("gke://{CFG}"))
        .args(["--print-config"])
        .run();
    let config = printed(&done);
    assert_eq!(config["PROJECT_ID"], setting(CFG, "derived"));
    assert_eq!(config["CLUSTER_NAME"], setting("istio-main", "discovered"));
    assert_eq!(
        config["CLUSTER_LOCATION"],
        setting("us-central1-c", "discovered")
    );
    assert_eq!(config["WORKLOAD_NAMESPACE"], setting("fortio", "metadata"));
    assert_eq!(
        config["TRUST_DOMAIN"],
        setting("cfg-project.svc.id.goog", "derived")
    );
    assert!(done.has_line("first istio* cluster in my region us-central1"));
    for call in world.gke.seen() {
        assert_eq!(
            call.path,
            format!("/v1/projects/{CFG}/locations/-/clusters")
        );
        assert_eq!(
            call.header("x-goog-user-project"),
            Some(CFG),
            "multi-project"
        );
    }
}

#[test]
fn gke_location_form_lists_only_that_location() {
    let world = mesh_world().start();
    let config = print_config(
        world
            .krun()
            .env("MESH", format!("gke://{CFG}/europe-west1")),
    );
    assert_eq!(config["CLUSTER_NAME"], setting("istio-far", "discovered"));
    assert_eq!(
        config["CLUSTER_LOCATION"],
        setting("europe-west1", "derived")
    );
    assert_eq!(
        world.gke.seen()[0].path,
        format!("/v1/projects/{CFG}/locations/europe-west1/clusters")
    );
}

#[test]
fn every_explicit_cluster_form_gets_that_cluster() {
    let forms = [
        format!("gke://{CFG}/us-central1/apps"),
        format!("//container.googleapis.com/projects/{CFG}/locations/us-central1/clusters/apps"),
        format!(
            "https://container.googleapis.com/projects/{CFG}/locations/us-central1/clusters/apps"
        ),
        format!(
            "https://container.googleapis.com/v1/projects/{CFG}/locations/us-central1/clusters/apps"
        ),
    ];
    for mesh in forms {
        let world = mesh_world().start();
        let config = print_config(world.krun().env("MESH", &mesh));
        assert_eq!(config["PROJECT_ID"], setting(CFG, "derived"), "{mesh}");
        assert_eq!(config["CLUSTER_NAME"], setting("apps", "derived"), "{mesh}");
        assert_eq!(
            config["CLUSTER_LOCATION"],
            setting("us-central1", "derived")
        );
        assert_eq!(config["WORKLOAD_NAMESPACE"], setting("fortio", "metadata"));
        assert_eq!(
            config["TRUST_DOMAIN"],
            setting("cfg-project.svc.id.goog", "derived")
        );
        assert_eq!(
            config["XDS_ADDR"],
            setting("meshcon.example:15012", "mesh-env")
        );
        let paths: Vec<String> = world.gke.seen().into_iter().map(|s| s.path).collect();
        assert_eq!(
            paths,
            [format!(
                "/v1/projects/{CFG}/locations/us-central1/clusters/apps"
            )],
            "{mesh}"
        );
    }
}

#[test]
fn cluster_name_from_env_selects_among_listed_clusters() {
    let world = mesh_world().start();
    let done = world
        .krun()
        .env("MESH", format!("gke://{CFG}"))
        .env("CLUSTER_NAME", "apps")
        .args(["--print-config"])
        .run();
    let config = printed(&done);
    assert_eq!(config["CLUSTER_NAME"], setting("apps", "env"));
    assert_eq!(
        config["CLUSTER_LOCATION"],
        setting("us-central1", "discovered")
    );
    assert!(done.has_line("CLUSTER_NAME=apps in my region us-central1"));
}

#[test]
fn get_cluster_is_retried_on_server_errors() {
    let world = mesh_world().start();
    world.gke.fail("/clusters/apps", 2, 503, &[]);
    let config = print_config(
        world
            .krun()
            .env("MESH", format!("gke://{CFG}/us-central1/apps")),
    );
    assert_eq!(config["CLUSTER_NAME"]["value"], "apps");
    let statuses: Vec<u16> = world.gke.seen().iter().map(|s| s.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
}

#[test]
fn mesh_env_fills_only_what_env_left_unset_and_env_ports_survive() {
    let world = mesh_world().start();
    let config = print_config(
        world
            .krun()
            .env("MESH", format!("gke://{CFG}/us-central1/apps"))
            .env("PORT_grpc", "7070")
            .env("TRUST_DOMAIN", "explicit.example")
            .env("MESH_TENANT", "tenant-from-env"),
    );
    assert_eq!(config["PORT_grpc"], json!({"value": 7070, "source": "env"}));
    assert_eq!(
        config["PORT_admin"],
        json!({"value": 9901, "source": "mesh-env"})
    );
    assert_eq!(config["MESH_TENANT"], setting("tenant-from-env", "env"));
    assert_eq!(config["TRUST_DOMAIN"], setting("explicit.example", "env"));
    assert_eq!(
        config["XDS_ADDR"],
        setting("meshcon.example:15012", "mesh-env")
    );
}

#[test]
fn a_missing_mesh_env_is_a_warning_not_a_failure() {
    let world = TestWorld::builder()
        .cluster(FakeCluster::new(CFG, "us-central1", "istio"))
        .start();
    let done = world
        .krun()
        .env("MESH", format!("gke://{CFG}"))
        .args(["--print-config"])
        .run();
    let config = printed(&done);
    assert!(done.has_line("ConfigMap istio-system/mesh-env not found"));
    assert_eq!(config["CLUSTER_NAME"]["value"], "istio");
    assert_eq!(config["XDS_ADDR"]["value"], Value::Null);
    let kube = world.kube.server.seen();
    assert_eq!(kube.len(), 1, "a 404 is not retried");
    assert_eq!(kube[0].status, 404);
}

#[test]
fn namespace_falls_back_to_the_project_label_then_the_project_id_rule() {
    let world = TestWorld::builder()
        .instance(|i| i.email = "runner@wl-project.iam.gserviceaccount.com".into())
        .cluster(FakeCluster::new("acme-shop-prod", "us-central1", "istio"))
        .cluster(FakeCluster::new(CFG, "us-central1", "istio"))
        .project(CFG, "42", &[("mesh-namespace", "payments")])
        .start();
    let labelled = print_config(world.krun().env("MESH", format!("gke://{CFG}")));
    assert_eq!(
        labelled["WORKLOAD_NAMESPACE"],
        setting("payments", "discovered")
    );
    assert_eq!(labelled["PROJECT_NUMBER"], setting("42", "discovered"));
    // Resource Manager refuses this project: the project-id rule still applies
    // (cloud-run-mesh returned early on that error and skipped it).
    let ruled = print_config(world.krun().env("MESH", "gke://acme-shop-prod"));
    assert_eq!(ruled["WORKLOAD_NAMESPACE"], setting("shop", "derived"));
}

#[test]
fn metadata_503_twice_then_ok_succeeds() {
    let world = mesh_world().start();
    world.metadata.fail(
        "project/project-id",
        2,
        503,
        &[("metadata-flavor", "Google")],
    );
    let config = print_config(world.krun());
    assert_eq!(config["PROJECT_ID"], setting("wl-project", "metadata"));
    let statuses: Vec<u16> = world
        .metadata
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with("project/project-id"))
        .map(|s| s.status)
        .collect();
    assert_eq!(statuses, [503, 503, 200]);
}

#[test]
fn metadata_down_is_a_clear_error() {
    let (_held, port) = krun_tests::refusing_port();
    let done = Krun::new()
        .env("GCE_METADATA_HOST", format!("127.0.0.1:{port}"))
        .env("MESH", "gke://p")
        .env("KRUN_METADATA_TIMEOUT", "200ms")
        .args(["--", "true"])
        .run();
    assert_eq!(done.code, 1, "{}", done.text());
    let last = done.output.last().expect("an error line");
    assert!(
        last.starts_with(&format!(
            "krun: metadata server 127.0.0.1:{port} unreachable for project/project-id after 5 attempts"
        )),
        "{last}"
    );
    assert!(last.contains("GCE_METADATA_HOST"), "{last}");
}

#[test]
fn a_malformed_mesh_stops_krun_with_the_accepted_forms() {
    let done = Krun::new().env("MESH", "gke://").args(["true"]).run();
    assert_eq!(done.code, 1);
    let last = done.output.last().expect("an error line");
    assert!(last.starts_with("krun: MESH=gke://: "), "{last}");
    assert!(last.contains("file:///path/mesh-env.yaml"), "{last}");
}

#[test]
fn mesh_file_needs_no_network() {
    let world = mesh_world().start();
    let dir = TempDir::new("mesh-file");
    let file = dir.join("mesh-env.yaml");
    std::fs::write(
        &file,
        "XDS_ADDR: istiod.local:15012\nPROJECT_ID: file-project\nPORT_grpc: 9090\nMESH_DEBUG: false\n",
    )
    .expect("write mesh-env");
    let config = print_config(
        world
            .krun()
            .env("MESH", format!("file://{}", file.display()))
            .env("WORKLOAD_NAMESPACE", "local"),
    );
    assert_eq!(
        config["XDS_ADDR"],
        setting("istiod.local:15012", "mesh-env")
    );
    assert_eq!(config["PROJECT_ID"], setting("file-project", "mesh-env"));
    assert_eq!(
        config["PORT_grpc"],
        json!({"value": 9090, "source": "mesh-env"})
    );
    assert_eq!(config["WORKLOAD_NAMESPACE"], setting("local", "env"));
    assert_eq!(
        config["TRUST_DOMAIN"],
        setting("file-project.svc.id.goog", "derived")
    );
    assert_eq!(world.calls(), 0, "MESH=file:// must not touch the network");
}

#[test]
fn discovered_values_reach_startup() {
    let world = mesh_world().start();
    let done = world
        .krun()
        .env("MESH", format!("gke://{CFG}/us-central1/apps"))
        .args(["--", "true"])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    let line = &done.output[done.line_index("mesh discovered")];
    assert!(line.contains("cluster=apps"), "{line}");
    assert!(line.contains("namespace=fortio"), "{line}");
    assert!(done.line_index("phase=\"discover\"") < done.line_index("started process=app"));
}

// Not-on-GCP detection, by the code path it takes (no timing).

fn fast() -> Backoff {
    Backoff {
        attempts: 3,
        base: Duration::ZERO,
        max: Duration::ZERO,
        jitter: Jitter::Full,
    }
}

fn http_only() -> ProbeOptions {
    ProbeOptions {
        timeout: Duration::from_secs(5),
        dns_name: None,
        wait_for_both: false,
    }
}

#[test]
fn a_name_that_does_not_resolve_to_the_metadata_ip_wins_over_a_silent_address() {
    // Packets to the address vanish (a listener that never answers); the DNS answer decides
    // long before the probe's 60 s budget.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = MetadataClient::with_backoff(
        &silent.local_addr().expect("addr").to_string(),
        Duration::from_secs(60),
        fast(),
    );
    let platform = server::runtime().block_on(client.probe(&ProbeOptions {
        timeout: Duration::from_secs(60),
        dns_name: Some("localhost.".into()),
        wait_for_both: false,
    }));
    assert_eq!(platform, Platform::NotGcp(NotGcp::NoMetadataDns));
}

#[test]
fn a_refused_connection_means_not_on_gcp_without_retries() {
    let port = free_port();
    let client =
        MetadataClient::with_backoff(&format!("127.0.0.1:{port}"), Duration::from_secs(5), fast());
    let platform = server::runtime().block_on(client.probe(&http_only()));
    assert_eq!(platform, Platform::NotGcp(NotGcp::Refused));
}

#[test]
fn an_answer_without_the_flavor_header_means_not_on_gcp_after_one_request() {
    let portal = FakeServer::http(std::sync::Arc::new(|_req: &server::Request| {
        Reply::status(200, "captive portal")
    }));
    let client =
        MetadataClient::with_backoff(&portal.addr().to_string(), Duration::from_secs(5), fast());
    let platform = server::runtime().block_on(client.probe(&http_only()));
    assert_eq!(platform, Platform::NotGcp(NotGcp::NotMetadataServer));
    assert_eq!(portal.seen().len(), 1, "the probe is a single request");
}

#[test]
fn a_metadata_server_is_recognised_and_values_are_cached() {
    let world = TestWorld::builder().start();
    let client = MetadataClient::with_backoff(
        &world.metadata.addr().to_string(),
        Duration::from_secs(5),
        fast(),
    );
    server::runtime().block_on(async {
        assert_eq!(client.probe(&http_only()).await, Platform::Gcp);
        for _ in 0..3 {
            assert_eq!(
                client.get("project/project-id").await.expect("project id"),
                Some("wl-project".into())
            );
            client.access_token().await.expect("token");
        }
        assert_eq!(
            client
                .get("instance/attributes/absent")
                .await
                .expect("404 is None"),
            None
        );
    });
    let paths: Vec<String> = world.metadata.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        [
            "/",
            "/computeMetadata/v1/project/project-id",
            "/computeMetadata/v1/instance/service-accounts/default/token",
            "/computeMetadata/v1/instance/attributes/absent"
        ]
    );
}

#[test]
fn off_gcp_without_mesh_the_app_runs_as_a_plain_supervisor() {
    // No GCE_METADATA_HOST, no Cloud Run or pod variables, and this machine has no DMI
    // product name of Google's: the metadata probe is not even sent.
    assert!(
        mesh::discovery::gcp_hint::dmi_product_name()
            .is_none_or(|name| !name.starts_with("Google")),
        "this test assumes a machine off GCP"
    );
    let done = Krun::new().args(["--", "sh", "-c", "echo app-ran"]).run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("no mesh configured: running as a plain supervisor"));
    assert!(done.has_line("nothing suggests GCP"));
    assert!(!done.has_line("GCP suggested"));
    assert!(done.has_line("app-ran"));
}

#[test]
fn without_mesh_a_kubeconfig_reads_mesh_env_with_no_gcp() {
    let world = mesh_world().start();
    let dir = TempDir::new("kubeconfig");
    let kubeconfig = dir.join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: gke_ctx-project_us-east1_istio\n\
             clusters:\n- name: fake\n  cluster:\n    server: https://{}\n    certificate-authority-data: {}\n\
             users:\n- name: fake\n  user:\n    token: {}\n\
             contexts:\n- name: gke_ctx-project_us-east1_istio\n  context:\n    cluster: fake\n    user: fake\n",
            world.kube.server.addr(),
            world.kube.ca_base64(),
            krun_tests::fakes::metadata::ACCESS_TOKEN,
        ),
    )
    .expect("write kubeconfig");
    // No GCE_METADATA_HOST: this machine has no metadata server, and none is needed.
    let done = Krun::new()
        .env("KUBECONFIG", &kubeconfig)
        .args(["--print-config"])
        .run();
    let config = printed(&done);
    assert!(done.has_line("config cluster from KUBECONFIG"));
    assert_eq!(
        config["XDS_ADDR"],
        setting("meshcon.example:15012", "mesh-env")
    );
    assert_eq!(config["PROJECT_ID"], setting("ctx-project", "discovered"));
    assert_eq!(config["CLUSTER_NAME"], setting("istio", "discovered"));
    assert_eq!(
        config["CLUSTER_LOCATION"],
        setting("us-east1", "discovered")
    );
    assert_eq!(config["WORKLOAD_NAMESPACE"], setting("default", "default"));
    assert_eq!(world.kube.server.seen().len(), 1);
    assert!(world.gke.seen().is_empty() && world.metadata.seen().is_empty());
}

#[test]
fn a_token_close_to_expiry_is_replaced_before_use() {
    // Five minutes is the refresh margin: a 4-minute token is renewed on every use.
    let world = TestWorld::builder()
        .instance(|i| i.token_lifetime = 240)
        .start();
    let client = MetadataClient::with_backoff(
        &world.metadata.addr().to_string(),
        Duration::from_secs(5),
        fast(),
    );
    server::runtime().block_on(async {
        client.access_token().await.expect("first token");
        client.access_token().await.expect("second token");
    });
    let token_requests = world
        .metadata
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("/token"))
        .count();
    assert_eq!(token_requests, 2);
}

#[test]
fn off_gcp_a_gke_mesh_is_a_clear_error() {
    // No GCE_METADATA_HOST, and this machine has no metadata server.
    let done = Krun::new().env("MESH", "gke://p").args(["true"]).run();
    assert_eq!(done.code, 1, "{}", done.text());
    let last = done.output.last().expect("an error line");
    assert!(
        last.starts_with(
            "krun: MESH=gke://p needs Google credentials, but there is no metadata server at 169.254.169.254"
        ),
        "{last}"
    );
    assert!(done.has_line("GCP suggested: asking the metadata server"));
}

#[test]
fn traffic_director_mesh_reads_metadata_only() {
    let world = mesh_world().start();
    let config = print_config(world.krun().env("MESH", "td:projects=1234567890"));
    assert_eq!(config["MESH"], setting("td:projects=1234567890", "env"));
    assert_eq!(config["PROJECT_ID"], setting("wl-project", "metadata"));
    assert_eq!(config["PROJECT_NUMBER"], setting("1234567890", "metadata"));
    assert!(world.gke.seen().is_empty() && world.kube.server.seen().is_empty());
}

#[test]
fn mesh_env_errors_are_retried_then_reported() {
    let world = mesh_world().start();
    world.kube.server.fail("/configmaps/mesh-env", 2, 500, &[]);
    let config = print_config(
        world
            .krun()
            .env("MESH", format!("gke://{CFG}/us-central1/apps")),
    );
    assert_eq!(
        config["XDS_ADDR"],
        setting("meshcon.example:15012", "mesh-env")
    );

    world.kube.server.fail("/configmaps/mesh-env", 5, 500, &[]);
    let done = world
        .krun()
        .env("MESH", format!("gke://{CFG}/us-central1/apps"))
        .args(["--print-config"])
        .run();
    assert_eq!(done.code, 1, "{}", done.text());
    let last = done.output.last().expect("an error line");
    assert!(
        last.starts_with(
            "krun: reading ConfigMap istio-system/mesh-env from us-central1/apps failed after 5 attempts"
        ),
        "{last}"
    );
}

#[test]
fn print_config_offline_makes_no_call() {
    let world = mesh_world().start();
    let config = printed(
        &world
            .krun()
            .env("MESH", format!("gke://{CFG}"))
            .args(["--print-config", "--offline"])
            .run(),
    );
    assert_eq!(config["MESH"], setting(&format!("gke://{CFG}"), "env"));
    assert_eq!(config["PROJECT_ID"]["value"], Value::Null);
    assert_eq!(world.calls(), 0);
}

#[test]
fn a_100_mib_metadata_answer_is_refused_without_reading_it_all() {
    use krun_tests::fakes::metadata::{Flood, Framing};
    use mesh::metadata::ANSWER_LIMIT;
    const HUNDRED_MIB: u64 = 100 << 20;
    // What the fake can write before it notices the close: the client's cap plus the two
    // kernels' socket buffers (6 to 8 MiB measured on loopback; the send side is capped by
    // tcp_wmem at 4 MiB, the receive side does not grow while nobody reads); a third of the
    // 100 MiB it offers.
    const WELL_BEFORE: u64 = 32 << 20;
    for framing in [Framing::Declared, Framing::Chunked] {
        let flood = Flood::start(HUNDRED_MIB, framing);
        let client = MetadataClient::with_backoff(
            &flood.addr().to_string(),
            Duration::from_secs(60),
            fast(),
        );
        server::runtime().block_on(async {
            let value = client
                .get("project/project-id")
                .await
                .expect_err("a 100 MiB value is refused");
            let token = client
                .id_token("https://svc.a.run.app")
                .await
                .expect_err("a 100 MiB ID token is refused");
            for error in [value.to_string(), token.to_string()] {
                assert!(
                    error.contains(&format!("answer larger than {ANSWER_LIMIT} bytes")),
                    "{framing:?}: {error}"
                );
            }
            // One request each: an answer too large is not retried.
            let written = flood.written_after(2).await;
            assert!(
                written < WELL_BEFORE,
                "{framing:?}: the fake wrote {written} bytes before the client closed"
            );
        });
    }
}

#[test]
fn print_config_lists_mesh_env_keys_and_the_derived_xds_address_with_why() {
    let world = TestWorld::builder()
        .cluster(FakeCluster::new(CFG, "us-central1", "istio-main").mesh())
        .mesh_env(&[
            ("IMCON_ADDR", "10.128.0.9"),
            ("MESH_TENANT", "-"),
            (
                "CAROOT_EXTRA",
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            ),
            (
                "SOME_HANDLE",
                "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtZXNoIn0.c2ln",
            ),
        ])
        .start();
    let config = print_config(world.krun().env("MESH", format!("gke://{CFG}")));
    assert_eq!(config["IMCON_ADDR"], setting("10.128.0.9", "mesh-env"));
    assert_eq!(config["CAROOT_EXTRA"]["source"], "mesh-env");
    assert_eq!(config["SOME_HANDLE"], setting("<redacted>", "mesh-env"));
    let xds = &config["derived.xds_addr"];
    assert_eq!(xds["value"], "10.128.0.9:15012", "{xds}");
    assert_eq!(xds["source"], "derived");
    assert!(
        xds["why"]
            .as_str()
            .is_some_and(|w| w.contains("IMCON_ADDR")),
        "{xds}"
    );
    assert_eq!(config["derived.dataplane"]["source"], "derived");
    assert!(config["derived.dataplane"]["why"].is_string(), "{config}");
    assert_eq!(config["derived.app_port"]["source"], "derived");
    // Not root-dependent in shape: either rung names its reason.
    let interception = &config["derived.interception"];
    assert!(
        interception["value"] == "iptables" || interception["value"] == "whitebox",
        "{config}"
    );
    assert!(interception["why"].is_string(), "{config}");
    let config = print_config(
        world
            .krun()
            .env("MESH", format!("gke://{CFG}"))
            .env("ISTIO_META_INTERCEPTION_MODE", "NONE"),
    );
    assert_eq!(config["derived.interception"]["value"], "whitebox");
    assert_eq!(
        config["derived.interception"]["why"],
        "ISTIO_META_INTERCEPTION_MODE=NONE"
    );
}

/// The discovery world with no metadata server: the Google API fakes, a fake OAuth token
/// endpoint, and krun pointed at both but not at a metadata server (the probe goes to the
/// link-local address, where this machine has none).
struct OffGcp {
    world: TestWorld,
    oauth: FakeOAuth,
    dir: TempDir,
}

impl OffGcp {
    fn start() -> Self {
        OffGcp {
            world: mesh_world().start(),
            oauth: FakeOAuth::start(),
            dir: TempDir::new("google-credentials"),
        }
    }

    /// krun with the Google API endpoints of the world (not its metadata server) and `MESH`
    /// naming the `apps` cluster.
    fn krun(&self) -> Krun {
        self.world
            .env()
            .into_iter()
            .filter(|(name, _)| *name != "GCE_METADATA_HOST")
            .fold(Krun::new(), |krun, (name, value)| krun.env(name, value))
            .env("MESH", format!("gke://{CFG}/us-central1/apps"))
    }

    /// Runs `krun --print-config` and checks it reached the cluster's mesh-env.
    fn discover(&self, krun: Krun) -> (Finished, Value) {
        let done = krun.args(["--print-config"]).run();
        let config = printed(&done);
        assert_eq!(
            config["XDS_ADDR"],
            setting("meshcon.example:15012", "mesh-env"),
            "{}",
            done.text()
        );
        (done, config)
    }

    /// Writes `json` to `name` in the scenario's directory.
    fn write(&self, name: &str, json: &Value) -> std::path::PathBuf {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, json.to_string()).expect("write credentials");
        path
    }

    /// Runs krun with `GOOGLE_APPLICATION_CREDENTIALS=file`, which must stop it; its last line.
    fn stops_krun(&self, file: &std::path::Path) -> String {
        let done = self
            .krun()
            .env("GOOGLE_APPLICATION_CREDENTIALS", file)
            .args(["true"])
            .run();
        assert_eq!(done.code, 1, "{}", done.text());
        done.output.last().expect("an error line").clone()
    }

    /// A service-account key for `k8s-fortio@wl-project` whose token_uri is the fake.
    fn service_account_key(&self) -> std::path::PathBuf {
        let key = self.oauth.service_account_key(
            "k8s-fortio@wl-project.iam.gserviceaccount.com",
            "wl-project",
        );
        self.write("key.json", &key)
    }

    fn grants(&self) -> Vec<String> {
        self.oauth
            .seen()
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect()
    }
}

#[test]
fn with_a_service_account_key_and_no_metadata_server_krun_discovers_the_mesh() {
    let off = OffGcp::start();
    let (done, config) = off.discover(
        off.krun()
            .env("GOOGLE_APPLICATION_CREDENTIALS", off.service_account_key()),
    );
    assert!(
        done.has_line("Google credentials from a file: no metadata server answered"),
        "{}",
        done.text()
    );
    assert!(done.has_line("service-account key for k8s-fortio@wl-project.iam.gserviceaccount.com"));
    assert_eq!(config["CLUSTER_NAME"], setting("apps", "derived"));
    // The key's service account names the namespace, as the metadata server's would.
    assert_eq!(config["WORKLOAD_NAMESPACE"], setting("fortio", "derived"));
    // GKE, Resource Manager and the K8s API all got the token the fake endpoint issued,
    // minted once for all of them (they ask concurrently) from one verified assertion.
    assert_eq!(off.grants(), ["POST /token"]);
    assert_eq!(off.oauth.verified_signatures(), 1);
    assert!(!off.world.gke.seen().is_empty());
    assert!(!off.world.kube.server.seen().is_empty());
    // Nothing in the key file reaches the log.
    assert!(!done.text().contains("PRIVATE KEY"));
    assert!(
        !done
            .text()
            .contains(krun_tests::fakes::metadata::ACCESS_TOKEN)
    );
}

#[test]
fn with_the_gcloud_login_of_a_user_krun_discovers_the_mesh() {
    let off = OffGcp::start();
    off.write(
        ".config/gcloud/application_default_credentials.json",
        &off.oauth.authorized_user("dev-quota"),
    );
    let (done, _) = off.discover(off.krun().env("HOME", off.dir.join("")));
    assert!(done.has_line("authorized user dev@example.com"));
    assert!(done.has_line("the gcloud application-default credentials file"));
    // The login's quota project is billed, as Google's libraries do for user credentials.
    let gke = off.world.gke.seen();
    assert!(!gke.is_empty());
    for call in gke {
        assert_eq!(
            call.header("x-goog-user-project"),
            Some("dev-quota"),
            "{}",
            call.path
        );
    }
    assert_eq!(off.grants(), ["POST /token"]);
    assert_eq!(
        off.oauth.verified_signatures(),
        0,
        "a refresh grant, no assertion"
    );
}

#[test]
fn cloudsdk_config_moves_the_gcloud_credentials_file() {
    let off = OffGcp::start();
    let file = off.write(
        "gcloud-elsewhere/application_default_credentials.json",
        &off.oauth.authorized_user(CFG),
    );
    let dir = file.parent().expect("dir").to_owned();
    off.discover(
        off.krun()
            .env("HOME", "/nonexistent")
            .env("CLOUDSDK_CONFIG", &dir),
    );
    assert_eq!(off.grants(), ["POST /token"]);
}

#[test]
fn a_revoked_key_stops_krun_naming_the_file_googles_answer_and_the_fix() {
    let off = OffGcp::start();
    let key = off.service_account_key();
    off.oauth.revoke();
    let last = off.stops_krun(&key);
    assert!(last.contains(&key.display().to_string()), "{last}");
    assert!(
        last.contains("invalid_grant: Token has been expired or revoked."),
        "{last}"
    );
    assert!(last.contains("create a new key"), "{last}");
}

#[test]
fn a_revoked_user_login_says_to_log_in_again() {
    let off = OffGcp::start();
    let file = off.write("user.json", &off.oauth.authorized_user(CFG));
    off.oauth.revoke();
    let last = off.stops_krun(&file);
    assert!(last.contains("invalid_grant"), "{last}");
    assert!(
        last.contains("gcloud auth application-default login"),
        "{last}"
    );
}

#[test]
fn an_unusable_credentials_file_stops_krun_naming_the_file_and_the_field() {
    let off = OffGcp::start();
    let wrong_type = off.write("external.json", &json!({"type": "external_account"}));
    let cases = [
        (
            "/nonexistent/key.json".into(),
            "cannot read Google credentials /nonexistent/key.json (from GOOGLE_APPLICATION_CREDENTIALS)",
        ),
        (
            wrong_type.clone(),
            "\"type\" is \"external_account\"; krun reads \"service_account\"",
        ),
    ];
    for (path, expected) in cases {
        let last = off.stops_krun(&path);
        assert!(last.contains(expected), "{last}");
        assert!(last.contains(&path.display().to_string()), "{last}");
    }
    assert!(off.grants().is_empty());
}

#[test]
fn a_gcloud_login_alone_does_not_make_krun_look_for_a_mesh() {
    let off = OffGcp::start();
    off.write(
        ".config/gcloud/application_default_credentials.json",
        &off.oauth.authorized_user(CFG),
    );
    let done = off
        .krun()
        .env_remove("MESH")
        .env("HOME", off.dir.join(""))
        .args(["--", "sh", "-c", "echo app-ran"])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("no mesh configured: running as a plain supervisor"));
    assert!(off.grants().is_empty() && off.world.gke.seen().is_empty());
}

#[test]
fn on_gcp_the_metadata_server_comes_before_a_credentials_file() {
    let off = OffGcp::start();
    off.discover(
        off.world
            .krun()
            .env("GOOGLE_APPLICATION_CREDENTIALS", off.service_account_key())
            .env("MESH", format!("gke://{CFG}/us-central1/apps")),
    );
    assert!(off.grants().is_empty(), "the token endpoint was asked");
    assert!(
        off.world
            .metadata
            .seen()
            .iter()
            .any(|s| s.path.ends_with("/token"))
    );
}

#[test]
fn key_file_tokens_are_minted_once_for_concurrent_callers_and_renewed_near_expiry() {
    use mesh::credentials::AccessTokens;
    use mesh::credentials::file_tokens::FileTokens;
    use mesh::credentials::key_file::{Located, Origin};
    let off = OffGcp::start();
    let located = Located {
        path: off.service_account_key(),
        origin: Origin::Env,
    };
    let mint_twice = |callers: usize| {
        server::runtime().block_on(async {
            let tokens = std::sync::Arc::new(FileTokens::load(&located).await.expect("key"));
            let concurrent: Vec<_> = (0..callers)
                .map(|_| {
                    let tokens = tokens.clone();
                    tokio::spawn(async move { tokens.access_token().await })
                })
                .collect();
            for caller in concurrent {
                let token = caller.await.expect("task").expect("token");
                assert_eq!(token, krun_tests::fakes::metadata::ACCESS_TOKEN);
            }
            tokens.access_token().await.expect("second use");
        });
    };
    // A token good for an hour: eight concurrent callers and a later one share one grant.
    mint_twice(8);
    assert_eq!(off.grants().len(), 1);
    // Four minutes is inside the five-minute refresh margin: the second use mints again.
    off.oauth.token_lifetime(240);
    mint_twice(1);
    assert_eq!(off.grants().len(), 3);
}

#[test]
fn a_wrong_client_secret_says_to_log_in_again() {
    let off = OffGcp::start();
    let mut user = off.oauth.authorized_user(CFG);
    user["client_secret"] = "stale-secret".into();
    let file = off.write("user.json", &user);
    let last = off.stops_krun(&file);
    assert!(last.contains("HTTP 401: invalid_client"), "{last}");
    assert!(
        last.contains("client_id or client_secret is wrong"),
        "{last}"
    );
    assert!(!last.contains("stale-secret"), "{last}");
}
