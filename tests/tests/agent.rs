//! The Istio agent and Envoy data plane, with stand-in `pilot-agent` and `envoy` executables
//! (`krun_tests::fakes::proxy`) that record what krun gave them and serve the real endpoints.
//!
//! Scenarios that run a proxy start krun in a fresh network namespace (`unshare --net`), so
//! the proxy's fixed ports (15000, 15021) are private to the test, as in a container.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use krun_tests::fakes::kube::{self, FakeKube};
use krun_tests::{Finished, Krun, Running, TempDir, binary, testapp};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;

/// Runs krun in the world's network namespace (see [`World::krun`]) with loopback up.
const NETNS: &[&str] = &["sh", "-c", "ip link set lo up && exec \"$@\"", "sh"];
/// The same, with krun running as `nobody` (non-root).
const NETNS_NOBODY: &[&str] = &[
    "sh",
    "-c",
    "ip link set lo up && exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$@\"",
    "sh",
];

/// A stand-in for istiod's root certificate (nothing parses it).
const ISTIOD_ROOT: &str = "-----BEGIN CERTIFICATE-----\nistiod root\n-----END CERTIFICATE-----\n";

/// A workload with a mesh file layout, an installed (stand-in) pilot-agent and Envoy, the
/// stand-ins' record and event files, and a network namespace of its own holding a fake K8s
/// API (mesh-env and TokenRequest), so the proxy's fixed ports are private to the test, as in a
/// container, and krun reaches the API on 127.0.0.1.
struct World {
    dir: TempDir,
    base: PathBuf,
    kube: FakeKube,
    /// The namespace, held open (with the API's socket) for as long as the world lives.
    netns: std::fs::File,
}

impl World {
    fn new(tag: &str) -> World {
        let dir = TempDir::new(tag);
        let base = dir.join("root");
        std::fs::create_dir_all(&base).expect("base dir");
        std::fs::create_dir_all(dir.join("records")).expect("records dir");
        // Writable for the proxy user (1337) and for non-root krun.
        for path in [dir.join(""), dir.join("records"), base.clone()] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        // The proxyv2 image ships Envoy's bootstrap template; without it the agent runs as a
        // gRPC agent.
        let template = base.join("var/lib/istio/envoy/envoy_bootstrap_tmpl.json");
        std::fs::create_dir_all(template.parent().expect("parent")).expect("envoy dir");
        std::fs::write(&template, "{}").expect("template");
        // istiod's root as hgate publishes it in mesh-env.
        let mesh_env = format!(
            "CAROOT_ISTIOD: |\n  {}\n",
            ISTIOD_ROOT.trim().replace('\n', "\n  ")
        );
        std::fs::write(dir.join("mesh-env.yaml"), mesh_env).expect("mesh-env");
        krun_tests::require_root("it makes a network namespace for the workload");
        let _ = krun_tests::fakes::server::runtime();
        let (kube, netns) = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare --net");
            let kube = kube::start(Some(BTreeMap::from([(
                "CAROOT_ISTIOD".to_owned(),
                ISTIOD_ROOT.to_owned(),
            )])));
            let netns = std::fs::File::open("/proc/thread-self/ns/net").expect("open netns");
            (kube, netns)
        })
        .join()
        .expect("netns thread");
        std::fs::write(dir.join("kubeconfig"), kube.kubeconfig()).expect("kubeconfig");
        World {
            dir,
            base,
            kube,
            netns,
        }
    }

    /// krun with the workload of cloud-run-mesh's fortio sample: run through `wrapper` in the
    /// world's network namespace, with the fake K8s API as its config cluster (KUBECONFIG);
    /// without a wrapper, in the test's namespace with `MESH=file://` (no K8s client).
    fn krun(&self, wrapper: &[&str]) -> Krun {
        let krun = if wrapper.is_empty() {
            Krun::new().env(
                "MESH",
                format!("file://{}", self.dir.join("mesh-env.yaml").display()),
            )
        } else {
            let netns = format!(
                "--net=/proc/{}/fd/{}",
                std::process::id(),
                self.netns.as_raw_fd()
            );
            let full: Vec<&str> = ["nsenter", netns.as_str()]
                .into_iter()
                .chain(wrapper.iter().copied())
                .collect();
            Krun::wrapped(&full).env("KUBECONFIG", self.dir.join("kubeconfig"))
        };
        krun.env("MESH_BASE_DIR", &self.base)
            .env("KRUN_PILOT_AGENT_PATH", binary("pilot-agent"))
            .env("KRUN_ENVOY_PATH", binary("envoy"))
            .env("STANDIN_RECORD_DIR", self.dir.join("records"))
            .env("STANDIN_EVENTS", self.events_path())
            .env(
                "STANDIN_FILES",
                [
                    "etc/istio/pod/labels",
                    "var/run/secrets/istio/root-cert.pem",
                    "etc/istio/proxy",
                    "etc/istio/pod",
                    "var/lib/istio/envoy",
                ]
                .map(|p| self.base.join(p).display().to_string())
                .join(","),
            )
            .env("K_SERVICE", "fortio")
            .env("K_REVISION", "fortio-00001-abc")
            .env("WORKLOAD_NAMESPACE", "fortio")
            .env("PROJECT_ID", "my-proj")
            .env("PROJECT_NUMBER", "123456")
            .env("CLUSTER_NAME", "istio")
            .env("CLUSTER_LOCATION", "us-central1-c")
    }

    fn events_path(&self) -> PathBuf {
        self.dir.join("events")
    }

    fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.events_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// What the stand-in `name` recorded.
    fn record(&self, name: &str) -> Record {
        let path = self.dir.join(&format!("records/{name}.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{name} recorded nothing at {}: {e}", path.display()));
        Record(serde_json::from_str(&text).expect("record JSON"))
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.base.join(relative)
    }
}

/// One stand-in's view of its start.
struct Record(Value);

impl Record {
    fn argv(&self) -> Vec<String> {
        serde_json::from_value(self.0["argv"].clone()).expect("argv")
    }

    fn env(&self) -> BTreeMap<String, String> {
        serde_json::from_value(self.0["env"].clone()).expect("env")
    }

    fn ids(&self) -> (u64, u64, Vec<u64>) {
        let groups = serde_json::from_value(self.0["groups"].clone()).expect("groups");
        (
            self.0["uid"].as_u64().expect("uid"),
            self.0["gid"].as_u64().expect("gid"),
            groups,
        )
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.0["pid"].as_i64().expect("pid") as i32)
    }

    fn file(&self, path: &Path) -> &Value {
        &self.0["files"][path.display().to_string()]
    }
}

/// The `PROXY_CONFIG` krun generates for the stand-in Envoy under `base`.
fn proxy_config(base: &Path, xds: &str) -> String {
    format!(
        r#"{{"binaryPath":"{}","configPath":"{}","discoveryAddress":"{xds}"}}"#,
        binary("envoy").display(),
        base.join("etc/istio/proxy").display()
    )
}

fn assert_env(env: &BTreeMap<String, String>, expected: &[(&str, &str)]) {
    for (name, value) in expected {
        assert_eq!(
            env.get(*name).map(String::as_str),
            Some(*value),
            "agent env {name}; whole env: {env:#?}"
        );
    }
}

fn assert_unset(env: &BTreeMap<String, String>, names: &[&str]) {
    for name in names {
        assert!(!env.contains_key(*name), "{name} must not be set: {env:#?}");
    }
}

fn serve_app(world: &World) -> Vec<String> {
    testapp(&[
        "serve",
        "APP",
        &world.events_path().display().to_string(),
        "8080",
    ])
}

/// Starts a served app behind the agent, waits until it is ready, SIGTERMs krun.
fn run_to_sigterm(world: &World, krun: Krun) -> Finished {
    let mut running = krun.env("PORT_http", "8080").args(serve_app(world)).start();
    running.wait_for_line("app-ready");
    running.signal(Signal::SIGTERM);
    running.finish()
}

fn signal(pid: Pid, signal: Signal) {
    nix::sys::signal::kill(pid, signal).expect("signal the stand-in");
}

#[test]
fn sidecar_gets_the_reference_command_environment_identity_and_files() {
    let world = World::new("sidecar");
    let done = run_to_sigterm(
        &world,
        world
            .krun(NETNS)
            .env("XDS_ADDR", "10.128.0.5:15012")
            .env("TRUST_DOMAIN", "my-proj.svc.id.goog")
            .env("XDS_AGENT_DEBUG", "dns:debug")
            .env("ENVOY_LOG_LEVEL", "debug"),
    );
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("data plane: pilot-agent")
            && done.has_line("with XDS 10.128.0.5:15012 from XDS_ADDR"),
        "one line says which data plane and why: {}",
        done.text()
    );
    let agent = world.record("pilot-agent");
    assert_eq!(
        agent.argv(),
        [
            binary("pilot-agent").display().to_string().as_str(),
            "proxy",
            "sidecar",
            "--domain",
            "fortio.svc.cluster.local",
            "--serviceCluster",
            "fortio.fortio",
            "--log_output_level=dns:debug",
            "--proxyLogLevel=debug",
            "--stsPort=15463",
        ]
    );
    let env = agent.env();
    let bootstrap = world
        .path("etc/istio/proxy/grpc_bootstrap.json")
        .display()
        .to_string();
    let certs = format!("{}/", world.path("var/run/secrets/istio-agent").display());
    let template = world
        .path("var/lib/istio/envoy/envoy_bootstrap_tmpl.json")
        .display()
        .to_string();
    assert_env(
        &env,
        &[
            // The stand-in Envoy is not at pilot-agent's default path: krun says where it is.
            (
                "PROXY_CONFIG",
                &proxy_config(&world.base, "10.128.0.5:15012"),
            ),
            ("ISTIOD_SAN", "istiod.istio-system.svc"),
            ("POD_NAMESPACE", "fortio"),
            ("ISTIO_META_WORKLOAD_NAME", "fortio"),
            ("CANONICAL_SERVICE", "fortio"),
            ("CANONICAL_REVISION", "fortio-00001-abc"),
            ("SERVICE_ACCOUNT", "default"),
            ("ISTIO_META_MESH_ID", "proj-123456"),
            ("OUTPUT_CERTS", &certs),
            (
                "GKE_CLUSTER_URL",
                "https://container.googleapis.com/v1/projects/my-proj/locations/us-central1-c/clusters/istio",
            ),
            ("GCP_METADATA", "my-proj|123456|istio|us-central1-c"),
            ("XDS_ADDR", "10.128.0.5:15012"),
            ("JWT_POLICY", "third-party-jwt"),
            ("PROXY_CONFIG_XDS_AGENT", "true"),
            ("TRUST_DOMAIN", "my-proj.svc.id.goog"),
            ("ISTIO_META_APP_CONTAINERS", "cloudrun"),
            ("ISTIO_META_INTERCEPTION_MODE", "NONE"),
            ("ISTIO_META_HTTP_PROXY_PORT", "15007"),
            ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
            (
                "ISTIO_META_OWNER",
                "kubernetes://apis/serving.knative.dev/v1/namespaces/fortio/services/fortio",
            ),
            (
                "ISTIO_META_POD_PORTS",
                r#"[{"containerPort":8080,"name":"http","protocol":"TCP"}]"#,
            ),
            ("ISTIO_BOOTSTRAP", &template),
            ("GRPC_XDS_BOOTSTRAP", &bootstrap),
        ],
    );
    assert!(
        env["POD_NAME"].starts_with("fortio-00001-abc-"),
        "POD_NAME is K_REVISION-<id>: {}",
        env["POD_NAME"]
    );
    assert_unset(
        &env,
        &[
            "XDS_ROOT_CA",
            "CA_ROOT_CA",
            "PILOT_CERT_PROVIDER",
            "CA_ADDR",
            "XDS_AUTH_PROVIDER",
            "DISABLE_ENVOY",
            "ISTIO_META_UNPRIVILEGED_POD",
            "ISTIO_META_DNS_CAPTURE",
            "HTTP_PROXY_PORT",
        ],
    );
    // uid and gid 1337 as Istio runs the proxy, no supplementary groups, cwd at the base.
    assert_eq!(agent.ids(), (1337, 1337, vec![]));
    // istiod's root from mesh-env, where pilot-agent verifies istiod with it.
    assert_eq!(
        agent.file(&world.path("var/run/secrets/istio/root-cert.pem"))["content"],
        ISTIOD_ROOT
    );
    assert_eq!(agent.0["cwd"], world.base.display().to_string());
    assert_eq!(
        agent.file(&world.path("etc/istio/pod/labels"))["content"],
        "version=\"fortio-00001-abc\"\nsecurity.istio.io/tlsMode=\"istio\"\napp=\"fortio\"\nservice.istio.io/canonical-name=\"fortio\"\nservice.istio.io/canonical-revision=\"fortio-00001-abc\"\nenvironment=\"cloud-run-mesh\"\n"
    );
    assert_eq!(
        agent.file(&world.path("etc/istio/pod/labels"))["mode"],
        "0644"
    );
    assert_eq!(agent.file(&world.path("etc/istio/proxy"))["mode"], "0755");
    assert_eq!(
        agent.file(&world.path("var/lib/istio/envoy"))["mode"],
        "0700"
    );
    // The app waited for the agent; the agent outlived the app.
    assert_eq!(
        world.events(),
        [
            "pilot-agent start",
            "pilot-agent ready",
            "APP start",
            "APP listening",
            "APP stop",
            "pilot-agent drain_listeners",
            "pilot-agent stop"
        ],
        "{}",
        done.text()
    );
}

#[test]
fn the_app_does_not_start_before_the_agent_is_ready() {
    let world = World::new("slow");
    let mut krun = world
        .krun(NETNS)
        .env("XDS_ADDR", "10.128.0.5:15012")
        .env("STANDIN_MODE", "slow")
        .env("PORT_http", "8080")
        .args(serve_app(&world))
        .start();
    // krun has asked and heard "not ready": the app must still be waiting.
    krun.wait_for_line("standin pilot-agent answered 503 to a readiness probe");
    assert_eq!(world.events(), ["pilot-agent start"]);
    signal(world.record("pilot-agent").pid(), Signal::SIGUSR1);
    krun.wait_for_line("app-ready");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    let events = world.events();
    assert_eq!(
        events[..3],
        ["pilot-agent start", "pilot-agent ready", "APP start"],
        "{}",
        done.text()
    );
}

#[test]
fn a_never_ready_agent_fails_startup_and_saves_envoys_config_dump() {
    let world = World::new("never");
    let done = world
        .krun(NETNS)
        .env("XDS_ADDR", "10.128.0.5:15012")
        .env("STANDIN_MODE", "never")
        .env("KRUN_AGENT_READY_TIMEOUT", "300ms")
        .env("PORT_http", "8080")
        .args(serve_app(&world))
        .run();
    assert_eq!(done.code, 1, "{}", done.text());
    let dump = world.path("var/lib/istio/envoy/config_dump.json");
    let line = done.line_index(&format!("Envoy's config_dump saved to {}", dump.display()));
    assert!(
        done.output[line].contains("pilot-agent not ready after 300ms")
            && done.output[line].contains("KRUN_AGENT_READY_TIMEOUT"),
        "the message names the budget and its variable: {}",
        done.output[line]
    );
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(&dump).expect("config_dump written"))
            .expect("config_dump is Envoy's JSON");
    assert_eq!(saved["configs"][0]["standin"], "pilot-agent");
    assert!(
        !world.events().contains(&"APP start".to_owned()),
        "the app never started: {:?}",
        world.events()
    );
}

#[test]
fn an_agent_crash_drains_the_app_and_fails() {
    let world = World::new("crash");
    let mut krun = world
        .krun(NETNS)
        .env("XDS_ADDR", "10.128.0.5:15012")
        .env("STANDIN_MODE", "crash")
        .env("PORT_http", "8080")
        .args(serve_app(&world))
        .start();
    krun.wait_for_line("app-ready");
    signal(world.record("pilot-agent").pid(), Signal::SIGUSR2);
    let done = krun.finish();
    assert_eq!(done.code, 1, "{}", done.text());
    assert!(
        done.has_line("process pilot-agent exited with exit code 3"),
        "{}",
        done.text()
    );
    assert_eq!(
        world.events(),
        [
            "pilot-agent start",
            "pilot-agent ready",
            "APP start",
            "APP listening",
            "pilot-agent crash",
            "APP stop"
        ]
    );
}

#[test]
fn envoy_drains_before_the_deadline_even_when_the_app_does_not_exit() {
    let world = World::new("late-app");
    let mut krun = world
        .krun(NETNS)
        .env("XDS_ADDR", "10.128.0.5:15012")
        .env("KRUN_DRAIN_TIMEOUT", "3s")
        .args(testapp(&["ignore-term"]))
        .start();
    krun.wait_for_line("READY"); // the app ignores SIGTERM from here on
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    // The app ignored SIGTERM and was killed at the deadline...
    assert_eq!(done.code, 137, "{}", done.text());
    // ...but 2 s before that, Envoy was drained and the agent stopped cleanly.
    assert!(done.has_line("drain deadline near"), "{}", done.text());
    assert_eq!(
        world.events(),
        [
            "pilot-agent start",
            "pilot-agent ready",
            "pilot-agent drain_listeners",
            "pilot-agent stop"
        ]
    );
}

/// Runs krun without an app until the agent has recorded its start, then stops it.
fn agent_record(world: &World, krun: Krun) -> (Record, Finished) {
    let mut running: Running = krun.start();
    running.wait_for_line("standin pilot-agent ready");
    running.signal(Signal::SIGTERM);
    let done = running.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    (world.record("pilot-agent"), done)
}

#[test]
fn a_gateway_runs_the_agent_as_router_with_gateway_labels() {
    let world = World::new("router");
    let (agent, _) = agent_record(
        &world,
        world
            .krun(NETNS)
            .env("XDS_ADDR", "10.128.0.5:15012")
            .env("GATEWAY_NAME", "ingress"),
    );
    assert_eq!(agent.argv()[1..3], ["proxy", "router"]);
    assert_eq!(
        agent.file(&world.path("etc/istio/pod/labels"))["content"],
        "version=\"fortio-00001-abc\"\nsecurity.istio.io/tlsMode=\"istio\"\nistio=\"ingress\"\n"
    );
    assert_env(&agent.env(), &[("ISTIO_META_INTERCEPTION_MODE", "NONE")]);
}

#[test]
fn a_managed_control_plane_tenant_selects_mcp_and_its_variables() {
    let world = World::new("mcp");
    let (agent, done) = agent_record(
        &world,
        world.krun(NETNS).env("MESH_TENANT", "cloudrun-tenant-1"),
    );
    assert!(
        done.has_line("with XDS meshconfig.googleapis.com:443 from MESH_TENANT"),
        "{}",
        done.text()
    );
    let env = agent.env();
    assert_env(
        &env,
        &[
            (
                "PROXY_CONFIG",
                &proxy_config(&world.base, "meshconfig.googleapis.com:443"),
            ),
            ("XDS_ROOT_CA", "SYSTEM"),
            ("CA_ROOT_CA", "SYSTEM"),
            ("PILOT_CERT_PROVIDER", "system"),
            ("CA_ADDR", "meshca.googleapis.com:443"),
            ("XDS_AUTH_PROVIDER", "gcp"),
            ("ISTIO_META_CLOUDRUN_ADDR", "cloudrun-tenant-1"),
            ("ISTIO_META_CLUSTER_ID", "cn-my-proj-us-central1-c-istio"),
        ],
    );
    assert_unset(&env, &["ISTIOD_SAN"]);
}

#[test]
fn in_cluster_istiod_gets_its_san_and_no_mcp_variables() {
    let world = World::new("istiod");
    let (agent, _) = agent_record(
        &world,
        world
            .krun(NETNS)
            .env("XDS_ADDR", "istiod.istio-system.svc:15012")
            .env("MESH_TENANT", "-"),
    );
    let env = agent.env();
    assert_env(
        &env,
        &[
            ("ISTIOD_SAN", "istiod.istio-system.svc"),
            ("XDS_ADDR", "istiod.istio-system.svc:15012"),
        ],
    );
    assert_unset(
        &env,
        &[
            "CA_ADDR",
            "XDS_AUTH_PROVIDER",
            "ISTIO_META_CLOUDRUN_ADDR",
            "XDS_ROOT_CA",
        ],
    );
}

#[test]
fn user_set_variables_win_over_krun_defaults() {
    let world = World::new("user-env");
    let proxy_config = "discoveryAddress: mine.example:15012\nmeshId: m1\n";
    let (agent, done) = agent_record(
        &world,
        world
            .krun(NETNS)
            .env("PROXY_CONFIG", proxy_config)
            .env("POD_NAME", "my-pod")
            .env("CANONICAL_REVISION", "blue")
            .env("JWT_POLICY", "first-party-jwt")
            .env("MESH_TENANT", "cloudrun-tenant-1"),
    );
    assert!(
        done.has_line("from PROXY_CONFIG discoveryAddress"),
        "{}",
        done.text()
    );
    let env = agent.env();
    assert_env(
        &env,
        &[
            ("PROXY_CONFIG", proxy_config),
            ("POD_NAME", "my-pod"),
            ("CANONICAL_REVISION", "blue"),
            ("JWT_POLICY", "first-party-jwt"),
            ("XDS_ADDR", "mine.example:15012"),
        ],
    );
    // A user PROXY_CONFIG turns off the MCP additions, as in cloud-run-mesh.
    assert_unset(&env, &["CA_ADDR", "XDS_AUTH_PROVIDER"]);
}

#[test]
fn non_root_krun_runs_the_agent_unprivileged_in_whitebox_mode() {
    let world = World::new("nonroot");
    // The base belongs to the user krun runs as, like `.` of a non-root container.
    let chown = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&world.base)
        .status()
        .expect("chown");
    assert!(chown.success());
    let (agent, _) = agent_record(
        &world,
        world.krun(NETNS_NOBODY).env("XDS_ADDR", "10.128.0.5:15012"),
    );
    assert_eq!(agent.ids(), (65534, 65534, vec![]));
    assert_env(
        &agent.env(),
        &[
            ("ISTIO_META_UNPRIVILEGED_POD", "true"),
            ("ISTIO_META_INTERCEPTION_MODE", "NONE"),
            ("ISTIO_META_HTTP_PROXY_PORT", "15007"),
        ],
    );
}

#[test]
fn without_envoy_the_agent_runs_as_grpc_agent_and_app_and_agent_share_the_bootstrap() {
    let world = World::new("grpc-agent");
    let app = "echo \"app GRPC_XDS_BOOTSTRAP=$GRPC_XDS_BOOTSTRAP\"; echo \"app RBAC=$GRPC_XDS_EXPERIMENTAL_RBAC SECURITY=$GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT\"; echo \"app HTTP_PROXY=${HTTP_PROXY:-none}\"";
    let done = world
        .krun(NETNS)
        .env("XDS_ADDR", "10.128.0.5:15012")
        .env("KRUN_ENVOY_PATH", "/nonexistent/envoy")
        // Relative, as cloud-run-mesh's agent saw it: krun makes it absolute for both.
        .env(
            "GRPC_XDS_BOOTSTRAP",
            "./etc/istio/proxy/grpc_bootstrap.json",
        )
        .args(["sh", "-c", app])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("DISABLE_ENVOY"), "{}", done.text());
    let env = world.record("pilot-agent").env();
    assert_env(&env, &[("DISABLE_ENVOY", "true")]);
    assert_unset(&env, &["ISTIO_BOOTSTRAP"]);
    let shared = &env["GRPC_XDS_BOOTSTRAP"];
    assert!(shared.starts_with('/'), "absolute: {shared}");
    assert!(
        done.has_line(&format!("app GRPC_XDS_BOOTSTRAP={shared}")),
        "{}",
        done.text()
    );
    assert!(
        done.has_line("app RBAC=true SECURITY=true"),
        "{}",
        done.text()
    );
    // No Envoy, so no HTTP proxy on 15007 to send the app to.
    assert!(done.has_line("app HTTP_PROXY=none"), "{}", done.text());
}

#[test]
fn whitebox_apps_get_envoys_http_proxy() {
    let world = World::new("whitebox");
    let done = world
        .krun(NETNS)
        .env("XDS_ADDR", "10.128.0.5:15012")
        .args(["sh", "-c", "echo \"app HTTP_PROXY=$HTTP_PROXY\""])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("app HTTP_PROXY=http://127.0.0.1:15007"),
        "{}",
        done.text()
    );
}

#[test]
fn proxyless_apps_get_a_grpc_bootstrap_pointing_at_existing_cert_files() {
    let world = World::new("proxyless");
    let certs = world.path("var/run/secrets/istio.io");
    std::fs::create_dir_all(&certs).expect("cert dir");
    for name in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        std::fs::write(certs.join(name), "-----BEGIN CERTIFICATE-----\n").expect("cert file");
    }
    let done = world
        .krun(&[])
        .env("KRUN_PILOT_AGENT_PATH", "/nonexistent/pilot-agent")
        .env("XDS_ADDR", "10.128.0.5:15012")
        .env("TRUST_DOMAIN", "my-proj.svc.id.goog")
        .args([
            "sh",
            "-c",
            "echo \"app GRPC_XDS_BOOTSTRAP=$GRPC_XDS_BOOTSTRAP\"",
        ])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("data plane: pilot-agent is not installed at KRUN_PILOT_AGENT_PATH=/nonexistent/pilot-agent"),
        "{}",
        done.text()
    );
    let path = world.path("etc/istio/proxy/grpc_bootstrap.json");
    assert!(
        done.has_line(&format!("app GRPC_XDS_BOOTSTRAP={}", path.display())),
        "{}",
        done.text()
    );
    assert_eq!(
        std::fs::metadata(&path)
            .expect("bootstrap")
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    let bootstrap: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
    let server = &bootstrap["xds_servers"][0];
    assert_eq!(server["server_uri"], "10.128.0.5:15012");
    assert_eq!(server["server_features"], serde_json::json!(["xds_v3"]));
    assert_eq!(server["channel_creds"][0]["type"], "tls");
    let node = &bootstrap["node"];
    assert!(
        node["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sidecar~127.0.0.1~fortio-00001-abc-")
                && id.ends_with(".fortio~fortio.svc.cluster.local")),
        "{node}"
    );
    assert_eq!(node["metadata"]["NAMESPACE"], "fortio");
    assert_eq!(node["metadata"]["TRUST_DOMAIN"], "my-proj.svc.id.goog");
    let provider = &bootstrap["certificate_providers"]["default"];
    assert_eq!(provider["plugin_name"], "file_watcher");
    for (key, file) in [
        ("certificate_file", "cert-chain.pem"),
        ("private_key_file", "key.pem"),
        ("ca_certificate_file", "root-cert.pem"),
    ] {
        let configured = provider["config"][key].as_str().expect(key);
        assert_eq!(configured, certs.join(file).display().to_string());
        assert!(PathBuf::from(configured).is_file(), "{key} exists");
    }
    assert_eq!(provider["config"]["refresh_interval"], "900s");
    assert_eq!(
        bootstrap["server_listener_resource_name_template"],
        "xds.istio.io/grpc/lds/inbound/%s"
    );
    assert_eq!(node["metadata"]["CLUSTER_ID"], "Kubernetes");
    // gRPC's own xDS client accepts it: it gets as far as dialing the XDS server (in a
    // namespace without a network, so that fails at once) with krun's node id.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/grpc_xds_bootstrap.py");
    let checked = std::process::Command::new("unshare")
        .arg("--net")
        .arg(krun_tests::python())
        .arg(&script)
        .env("GRPC_XDS_BOOTSTRAP", &path)
        .output()
        .expect("run python3 with grpcio (scripts/install-prereqs.sh installs it)");
    let verdict = String::from_utf8_lossy(&checked.stdout);
    assert!(
        verdict.contains("grpc xds: ")
            && verdict.contains("xDS channel for server 10.128.0.5:15012")
            && verdict.contains(node["id"].as_str().unwrap_or("no node id")),
        "{verdict}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[test]
fn xds_addr_dash_means_no_agent() {
    let world = World::new("dash");
    let done = world.krun(&[]).env("XDS_ADDR", "-").args(["true"]).run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("data plane: XDS_ADDR=- disables the agent"),
        "{}",
        done.text()
    );
    assert!(!world.events().contains(&"pilot-agent start".to_owned()));
}

/// Traffic Director: Envoy started directly with the rendered bootstrap.
fn traffic_director(mesh: &str, network: &str, project: &str) {
    let world = World::new("td");
    let bootstrap = world.path("etc/istio/proxy/td_bootstrap.yaml");
    let done = run_to_sigterm(
        &world,
        world
            .krun(NETNS)
            .env("MESH", mesh)
            .env("KRUN_PILOT_AGENT_PATH", "/nonexistent/pilot-agent")
            .env("STANDIN_FILES", bootstrap.display().to_string()),
    );
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("data plane: MESH is a Traffic Director locator"),
        "{}",
        done.text()
    );
    let envoy = world.record("envoy");
    assert_eq!(
        envoy.argv(),
        [
            binary("envoy").display().to_string().as_str(),
            "--config-path",
            bootstrap.display().to_string().as_str(),
            "--log-level",
            "info",
            "--allow-unknown-static-fields",
        ]
    );
    assert_eq!(envoy.ids(), (1337, 1337, vec![]));
    let rendered = envoy.file(&bootstrap)["content"]
        .as_str()
        .expect("Envoy could read its bootstrap")
        .to_owned();
    let node_prefix = format!("id: \"projects/{project}/networks/{network}/nodes/");
    assert!(rendered.contains(&node_prefix), "{rendered}");
    assert!(
        rendered.contains("~127.0.0.1\""),
        "node id <uuid>~<ip>: {rendered}"
    );
    assert!(
        rendered.contains("zone: \"cloud-run-cluster\""),
        "{rendered}"
    );
    assert!(rendered.contains("port_value: 15000"), "{rendered}");
    assert!(
        rendered.contains("TRAFFICDIRECTOR_INTERCEPTION_PORT: \"15001\""),
        "{rendered}"
    );
    assert_eq!(
        world.events(),
        [
            "envoy start",
            "envoy ready",
            "APP start",
            "APP listening",
            "APP stop",
            "envoy drain_listeners",
            "envoy stop"
        ]
    );
}

#[test]
fn traffic_director_head_form_projects_and_scopes() {
    traffic_director("td:projects=987&scopes=edge", "scope:edge", "987");
}

#[test]
fn traffic_director_mesh_name_form_uses_project_number_from_env() {
    traffic_director("td:mesh_name=prod", "mesh:prod", "123456");
}

#[test]
fn an_explicit_envoy_data_plane_without_pilot_agent_fails_in_one_line() {
    let world = World::new("explicit");
    let done = world
        .krun(&[])
        .env("KRUN_DATAPLANE", "envoy")
        .env("KRUN_PILOT_AGENT_PATH", "/nonexistent/pilot-agent")
        .env("XDS_ADDR", "10.128.0.5:15012")
        .args(["true"])
        .run();
    assert_eq!(done.code, 1, "{}", done.text());
    let line = done.line_index("krun: KRUN_DATAPLANE=envoy: ");
    assert!(
        done.output[line].contains(
            "pilot-agent is not installed at KRUN_PILOT_AGENT_PATH=/nonexistent/pilot-agent"
        ),
        "{}",
        done.text()
    );
}

#[test]
fn without_pilot_agent_or_xds_nothing_is_started_or_written() {
    let world = World::new("default");
    let done = world
        .krun(&[])
        .env("KRUN_PILOT_AGENT_PATH", "/nonexistent/pilot-agent")
        .args(["true"])
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("data plane: no XDS address is known"),
        "{}",
        done.text()
    );
    assert!(!world.path("etc").exists(), "no mesh files written");
}

/// Runs `scenario` on a thread of its own that first moves into a fresh network namespace with
/// loopback up. Everything the thread then creates lives there: the fakes' listening sockets
/// (bound on this thread) and krun (forked from it), so krun reaches the fakes on 127.0.0.1
/// while the proxy's fixed ports stay private, as with `unshare --net`.
fn in_private_netns<T: Send + 'static>(scenario: impl FnOnce() -> T + Send + 'static) -> T {
    // The fakes' runtime threads stay in the host namespace; sockets keep the one they were
    // made in, so they serve from there.
    krun_tests::require_root("it moves into a new network namespace");
    let _ = krun_tests::fakes::server::runtime();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare --net");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(up.success(), "ip link set lo up");
        scenario()
    })
    .join()
    .expect("scenario thread")
}

#[test]
fn traffic_director_takes_zone_and_node_id_from_the_metadata_server() {
    use krun_tests::fakes::metadata::{self, Instance};
    let (done, rendered) = in_private_netns(|| {
        let mut instance = Instance::default();
        instance.extra.extend(
            [
                ("instance/zone", "projects/1234567890/zones/us-central1-a"),
                ("instance/id", "4471892301765243"),
                ("instance/network-interfaces/0/ip", "10.128.0.7"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        let metadata = metadata::start(instance);
        let world = World::new("td-metadata");
        let bootstrap = world.path("etc/istio/proxy/td_bootstrap.yaml");
        let done = run_to_sigterm(
            &world,
            world
                .krun(&[])
                .env("MESH", "td:projects=987&scopes=edge")
                .env("GCE_METADATA_HOST", metadata.addr().to_string())
                .env("KRUN_PILOT_AGENT_PATH", "/nonexistent/pilot-agent")
                .env("STANDIN_FILES", bootstrap.display().to_string()),
        );
        let rendered = world.record("envoy").file(&bootstrap)["content"]
            .as_str()
            .expect("Envoy could read its bootstrap")
            .to_owned();
        (done, rendered)
    });
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(
        rendered.contains("zone: \"us-central1-a\""),
        "zone is the last segment of instance/zone: {rendered}"
    );
    assert!(
        rendered
            .contains("id: \"projects/987/networks/scope:edge/nodes/4471892301765243~10.128.0.7\""),
        "node id <instance id>~<instance ip>: {rendered}"
    );
}

/// krun with `MESH_BASE_DIR=/` in private network and mount namespaces: Istio's directories
/// are fresh tmpfs mounts (the mount points are created on the host if missing), with Envoy's
/// bootstrap template where the proxyv2 image has it.
const NETNS_ROOT_BASE: &[&str] = &[
    "unshare",
    "--mount",
    "sh",
    "-c",
    "ip link set lo up && for d in /etc/istio /var/lib/istio /var/run/secrets; do mkdir -p $d && mount -t tmpfs tmpfs $d || exit 1; done && mkdir -p /var/lib/istio/envoy && echo {} > /var/lib/istio/envoy/envoy_bootstrap_tmpl.json && exec \"$@\"",
    "sh",
];

/// The stand-in pilot-agent, which checks at startup what the real one checks, starts under
/// krun as a sidecar, a router and a gRPC agent, with a temporary `MESH_BASE_DIR` and with `/`.
#[test]
fn the_checking_agent_starts_in_every_mode_with_any_base_dir() {
    for (mode, extra) in [
        ("sidecar", None),
        ("router", Some(("GATEWAY_NAME", "ingress"))),
        (
            "grpc-agent",
            Some(("KRUN_ENVOY_PATH", "/nonexistent/envoy")),
        ),
    ] {
        for root_base in [false, true] {
            let world = World::new(mode);
            let mut krun = if root_base {
                world.krun(NETNS_ROOT_BASE).env("MESH_BASE_DIR", "/")
            } else {
                world.krun(NETNS)
            };
            krun = krun.env("XDS_ADDR", "10.128.0.5:15012");
            if let Some((name, value)) = extra {
                krun = krun.env(name, value);
            }
            let (agent, done) = agent_record(&world, krun);
            let base = if root_base {
                "/".to_owned()
            } else {
                world.base.display().to_string()
            };
            assert_eq!(agent.0["cwd"], base, "{mode}: {}", done.text());
            let role = if mode == "router" {
                "router"
            } else {
                "sidecar"
            };
            assert_eq!(agent.argv()[2], role, "{mode}");
            let env = agent.env();
            assert_eq!(
                env.contains_key("DISABLE_ENVOY"),
                mode == "grpc-agent",
                "{mode}"
            );
            let bootstrap = std::path::Path::new(&base).join("etc/istio/proxy/grpc_bootstrap.json");
            assert_eq!(
                env["GRPC_XDS_BOOTSTRAP"],
                bootstrap.display().to_string(),
                "{mode} with base {base}"
            );
            // pilot-agent's XDS socket, named in the bootstrap it writes, is under the base.
            let proxy_config: Value =
                serde_json::from_str(&env["PROXY_CONFIG"]).expect("PROXY_CONFIG JSON");
            assert_eq!(
                proxy_config["configPath"],
                Path::new(&base)
                    .join("etc/istio/proxy")
                    .display()
                    .to_string(),
                "{mode} with base {base}"
            );
        }
    }
}

/// Each input pilot-agent checks at startup, taken away from what krun gave it, makes the
/// stand-in exit 1 naming it, as pilot-agent fails (run directly, as the proxy user, in the
/// working directory krun chose).
#[test]
fn removing_a_required_input_makes_the_agent_fail_like_pilot_agent() {
    let world = World::new("preflight");
    let (agent, _) = agent_record(
        &world,
        world.krun(NETNS).env("XDS_ADDR", "10.128.0.5:15012"),
    );
    let mut given = agent.env();
    given.remove("STANDIN_RECORD_DIR");
    given.remove("STANDIN_EVENTS");
    let run = |env: &BTreeMap<String, String>| {
        std::process::Command::new("unshare")
            .args([
                "--net",
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
            ])
            .arg(binary("pilot-agent"))
            .args(["proxy", "sidecar"])
            .env_clear()
            .envs(env)
            .current_dir(&world.base)
            .output()
            .expect("run the stand-in")
    };
    let expect_failure = |env: &BTreeMap<String, String>, needle: &str| {
        let output = run(env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{needle}: {stderr}");
        assert!(
            stderr.contains("standin pilot-agent: error: ") && stderr.contains(needle),
            "{needle}: {stderr}"
        );
    };
    for (name, needle) in [
        ("POD_NAME", "POD_NAME is not set"),
        ("POD_NAMESPACE", "POD_NAMESPACE is not set"),
        ("PROXY_CONFIG", "PROXY_CONFIG"),
    ] {
        let mut env = given.clone();
        env.remove(name);
        expect_failure(&env, needle);
    }
    let root = world.path("var/run/secrets/istio/root-cert.pem");
    std::fs::remove_file(&root).expect("remove istiod's root");
    expect_failure(&given, "var/run/secrets/istio/root-cert.pem: no such file");
    // System roots instead of istiod's: the file is not needed.
    let mut system = given.clone();
    system.insert("XDS_ROOT_CA".into(), "SYSTEM".into());
    system.insert("CA_ROOT_CA".into(), "SYSTEM".into());
    system.insert("POD_NAME".into(), String::new());
    expect_failure(&system, "POD_NAME is not set");
    std::fs::write(&root, ISTIOD_ROOT).expect("restore istiod's root");
    // The istio-token krun minted through the K8s API: without it pilot-agent's CA and XDS
    // clients cannot authenticate (its default JWT policy, whether given or not).
    assert_eq!(world.kube.token_requests(), 1);
    let token = world.path("var/run/secrets/tokens/istio-token");
    let minted = std::fs::read(&token).expect("krun wrote the istio-token");
    std::fs::remove_file(&token).expect("remove the istio-token");
    expect_failure(
        &given,
        "failed to get credential token: open ./var/run/secrets/tokens/istio-token",
    );
    let mut unset = given.clone();
    unset.remove("JWT_POLICY");
    expect_failure(&unset, "var/run/secrets/tokens/istio-token");
    std::fs::write(&token, minted).expect("restore the istio-token");
    let proxy_dir = world.path("etc/istio/proxy");
    std::fs::set_permissions(&proxy_dir, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    expect_failure(&given, "cannot write ./etc/istio/proxy");
}

/// Without a K8s client krun cannot mint the istio-token: it says so in one line naming the
/// fix, and the agent fails the way pilot-agent does.
#[test]
fn without_a_k8s_client_the_agent_gets_no_istio_token_and_fails() {
    let world = World::new("no-token");
    let done = world
        .krun(NETNS)
        .env_remove("KUBECONFIG")
        .env(
            "MESH",
            format!("file://{}", world.dir.join("mesh-env.yaml").display()),
        )
        .env("XDS_ADDR", "10.128.0.5:15012")
        .args(["true"])
        .run();
    assert_ne!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line("discovery built no K8s client to mint its istio-token")
            && done.has_line("set KUBECONFIG"),
        "{}",
        done.text()
    );
    assert!(
        done.has_line("failed to get credential token: open ./var/run/secrets/tokens/istio-token"),
        "{}",
        done.text()
    );
    assert_eq!(world.kube.token_requests(), 0);
}

/// The stand-in Envoy stays not ready with a bootstrap it cannot parse, as Envoy does, and
/// says why; the Traffic Director tests show it ready with the bootstrap krun renders.
#[test]
fn the_envoy_stand_in_is_not_ready_without_a_bootstrap_it_can_parse() {
    use std::io::BufRead;
    let dir = TempDir::new("envoy-bootstrap");
    let bad = dir.join("bootstrap.yaml");
    std::fs::write(&bad, "node: [unclosed\n").expect("write");
    let mut envoy = std::process::Command::new("unshare")
        .args(["--net"])
        .arg(binary("envoy"))
        .arg("--config-path")
        .arg(&bad)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the stand-in Envoy");
    let stderr = envoy.stderr.take().expect("stderr");
    let mut line = String::new();
    std::io::BufReader::new(stderr)
        .read_line(&mut line)
        .expect("read stderr");
    let _ = envoy.kill();
    let _ = envoy.wait();
    assert!(
        line.starts_with("standin envoy: not ready: ") && line.contains("unable to parse"),
        "{line}"
    );
}
