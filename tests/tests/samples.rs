//! The deploy samples: every `samples/cloudrun/*.yaml` is a Knative Service that Cloud Run
//! accepts, checked against a schema written here from Cloud Run's published YAML reference
//! (the fields of `serving.knative.dev/v1` Service it supports, and its rules: one ingress
//! container, port names, probe kinds, annotation values); the kustomize trees render.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Collects problems as "path: what".
#[derive(Default)]
struct Check(Vec<String>);

impl Check {
    fn fail(&mut self, at: &str, what: impl std::fmt::Display) {
        self.0.push(format!("{at}: {what}"));
    }

    /// `value` is an object with only `allowed` keys, every `required` one among them.
    fn object<'v>(
        &mut self,
        at: &str,
        value: &'v Value,
        allowed: &[&str],
        required: &[&str],
    ) -> Option<&'v serde_json::Map<String, Value>> {
        let Some(map) = value.as_object() else {
            self.fail(at, "expected a map");
            return None;
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                self.fail(
                    at,
                    format!("unknown field {key} (Cloud Run accepts {allowed:?})"),
                );
            }
        }
        for key in required {
            if !map.contains_key(*key) {
                self.fail(at, format!("missing required field {key}"));
            }
        }
        Some(map)
    }

    fn string_map(&mut self, at: &str, value: &Value) {
        match value.as_object() {
            Some(map) => {
                for (k, v) in map {
                    if !v.is_string() {
                        self.fail(&format!("{at}.{k}"), "values must be strings (quote them)");
                    }
                }
            }
            None => self.fail(at, "expected a map of strings"),
        }
    }

    fn int(&mut self, at: &str, value: Option<&Value>, range: std::ops::RangeInclusive<i64>) {
        if let Some(v) = value {
            match v.as_i64() {
                Some(n) if range.contains(&n) => {}
                _ => self.fail(at, format!("expected an integer in {range:?}, got {v}")),
            }
        }
    }
}

/// Service-level annotations Cloud Run accepts.
const SERVICE_ANNOTATIONS: &[&str] = &[
    "run.googleapis.com/ingress",
    "run.googleapis.com/launch-stage",
    "run.googleapis.com/description",
    "run.googleapis.com/binary-authorization",
    "run.googleapis.com/invoker-iam-disabled",
    "run.googleapis.com/default-url-disabled",
];

/// Revision-level annotations (`spec.template.metadata.annotations`) Cloud Run accepts, and a
/// validator of each value.
fn revision_annotation(key: &str, value: &str) -> Result<(), String> {
    let boolean = || match value {
        "true" | "false" => Ok(()),
        _ => Err("\"true\" or \"false\"".to_owned()),
    };
    let count = || {
        value
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| "a number as a string".to_owned())
    };
    match key {
        "run.googleapis.com/cpu-throttling"
        | "run.googleapis.com/startup-cpu-boost"
        | "run.googleapis.com/sessionAffinity" => boolean(),
        "autoscaling.knative.dev/minScale" | "autoscaling.knative.dev/maxScale" => count(),
        "run.googleapis.com/execution-environment" => match value {
            "gen1" | "gen2" => Ok(()),
            _ => Err("gen1 or gen2".into()),
        },
        "run.googleapis.com/vpc-access-egress" => match value {
            "all-traffic" | "private-ranges-only" => Ok(()),
            _ => Err("all-traffic or private-ranges-only".into()),
        },
        "run.googleapis.com/network-interfaces" => serde_json::from_str::<Vec<Value>>(value)
            .map(|_| ())
            .map_err(|e| format!("a JSON list of {{network, subnetwork}}: {e}")),
        "run.googleapis.com/container-dependencies" => {
            serde_json::from_str::<std::collections::BTreeMap<String, Vec<String>>>(value)
                .map(|_| ())
                .map_err(|e| format!("a JSON map of container to the containers it waits for: {e}"))
        }
        "run.googleapis.com/vpc-access-connector"
        | "run.googleapis.com/cloudsql-instances"
        | "run.googleapis.com/secrets"
        | "run.googleapis.com/encryption-key" => Ok(()),
        _ => Err("not an annotation Cloud Run accepts on a revision".into()),
    }
}

const CONTAINER_FIELDS: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    "ports",
    "resources",
    "startupProbe",
    "livenessProbe",
    "volumeMounts",
    "workingDir",
];

fn probe(check: &mut Check, at: &str, value: &Value, liveness: bool) {
    let Some(map) = check.object(
        at,
        value,
        &[
            "httpGet",
            "tcpSocket",
            "grpc",
            "initialDelaySeconds",
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
        ],
        &[],
    ) else {
        return;
    };
    let kinds: Vec<&str> = ["httpGet", "tcpSocket", "grpc"]
        .into_iter()
        .filter(|k| map.contains_key(*k))
        .collect();
    if kinds.len() != 1 {
        check.fail(
            at,
            format!("exactly one of httpGet, tcpSocket, grpc; got {kinds:?}"),
        );
    }
    if liveness && map.contains_key("tcpSocket") {
        check.fail(
            at,
            "a liveness probe is httpGet or grpc (tcpSocket is for startup)",
        );
    }
    if let Some(http) = map.get("httpGet") {
        check.object(
            &format!("{at}.httpGet"),
            http,
            &["path", "port", "httpHeaders"],
            &[],
        );
    }
    for kind in ["tcpSocket", "grpc"] {
        if let Some(v) = map.get(kind) {
            check.object(&format!("{at}.{kind}"), v, &["port", "service"], &[]);
        }
    }
    for kind in ["httpGet", "tcpSocket", "grpc"] {
        check.int(
            &format!("{at}.{kind}.port"),
            map.get(kind).and_then(|k| k.get("port")),
            1..=65535,
        );
    }
    for (field, range) in [
        ("initialDelaySeconds", 0..=240),
        ("periodSeconds", 1..=240),
        ("timeoutSeconds", 1..=240),
        ("failureThreshold", 1..=i64::MAX),
    ] {
        check.int(&format!("{at}.{field}"), map.get(field), range);
    }
    if let (Some(t), Some(p)) = (
        map.get("timeoutSeconds").and_then(Value::as_i64),
        map.get("periodSeconds").and_then(Value::as_i64),
    ) && t > p
    {
        check.fail(at, "timeoutSeconds must not exceed periodSeconds");
    }
}

fn container(check: &mut Check, at: &str, value: &Value) -> Option<(String, bool)> {
    let map = check.object(at, value, CONTAINER_FIELDS, &["image"])?;
    let name = map
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut ingress = false;
    if let Some(ports) = map.get("ports") {
        let list = ports.as_array().map(Vec::as_slice).unwrap_or_default();
        if list.len() > 1 {
            check.fail(&format!("{at}.ports"), "at most one port per container");
        }
        for (i, port) in list.iter().enumerate() {
            let p = format!("{at}.ports[{i}]");
            check.object(&p, port, &["name", "containerPort"], &["containerPort"]);
            if let Some(name) = port.get("name")
                && !matches!(name.as_str(), Some("h2c" | "http1"))
            {
                check.fail(&p, format!("port name {name} is not h2c or http1"));
            }
            check.int(
                &format!("{p}.containerPort"),
                port.get("containerPort"),
                1..=65535,
            );
            ingress = true;
        }
    }
    for (i, env) in map
        .get("env")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let e = format!("{at}.env[{i}]");
        if let Some(m) = check.object(&e, env, &["name", "value", "valueFrom"], &["name"])
            && m.get("value").is_some_and(|v| !v.is_string())
        {
            check.fail(&e, "value must be a string (quote it)");
        }
    }
    if let Some(resources) = map.get("resources")
        && let Some(r) = check.object(&format!("{at}.resources"), resources, &["limits"], &[])
        && let Some(limits) = r.get("limits")
    {
        check.object(
            &format!("{at}.resources.limits"),
            limits,
            &["cpu", "memory", "nvidia.com/gpu"],
            &[],
        );
        check.string_map(&format!("{at}.resources.limits"), limits);
    }
    if let Some(p) = map.get("startupProbe") {
        probe(check, &format!("{at}.startupProbe"), p, false);
    }
    if let Some(p) = map.get("livenessProbe") {
        probe(check, &format!("{at}.livenessProbe"), p, true);
    }
    Some((name, ingress))
}

/// Every problem with `doc` as a Cloud Run service.
fn cloud_run_service(doc: &Value) -> Vec<String> {
    let mut check = Check::default();
    let Some(top) = check.object(
        "",
        doc,
        &["apiVersion", "kind", "metadata", "spec"],
        &["apiVersion", "kind", "metadata", "spec"],
    ) else {
        return check.0;
    };
    if top.get("apiVersion").and_then(Value::as_str) != Some("serving.knative.dev/v1") {
        check.fail("apiVersion", "must be serving.knative.dev/v1");
    }
    if top.get("kind").and_then(Value::as_str) != Some("Service") {
        check.fail("kind", "must be Service");
    }
    if let Some(meta) = check.object(
        "metadata",
        &doc["metadata"],
        &["name", "namespace", "labels", "annotations"],
        &["name"],
    ) {
        let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
        let label = name.len() <= 49
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && !name.ends_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !label {
            check.fail(
                "metadata.name",
                format!("{name:?}: lower-case letters, digits and -, at most 49"),
            );
        }
        if let Some(a) = meta.get("annotations") {
            check.string_map("metadata.annotations", a);
            for key in a.as_object().into_iter().flat_map(|m| m.keys()) {
                if !SERVICE_ANNOTATIONS.contains(&key.as_str()) {
                    check.fail(
                        "metadata.annotations",
                        format!("{key} is not a service annotation Cloud Run accepts"),
                    );
                }
            }
        }
        if let Some(l) = meta.get("labels") {
            check.string_map("metadata.labels", l);
        }
    }
    let Some(spec) = check.object(
        "spec",
        &doc["spec"],
        &["template", "traffic"],
        &["template"],
    ) else {
        return check.0;
    };
    let template = &spec["template"];
    check.object("spec.template", template, &["metadata", "spec"], &["spec"]);
    let annotations = template["metadata"]["annotations"].clone();
    if !annotations.is_null() {
        check.string_map("spec.template.metadata.annotations", &annotations);
    }
    for (key, value) in annotations.as_object().into_iter().flatten() {
        if let Err(e) = revision_annotation(key, value.as_str().unwrap_or_default()) {
            check.fail(&format!("spec.template.metadata.annotations.{key}"), e);
        }
    }
    let Some(rev) = check.object(
        "spec.template.spec",
        &template["spec"],
        &[
            "containers",
            "serviceAccountName",
            "containerConcurrency",
            "timeoutSeconds",
            "volumes",
            "nodeSelector",
        ],
        &["containers"],
    ) else {
        return check.0;
    };
    check.int(
        "spec.template.spec.containerConcurrency",
        rev.get("containerConcurrency"),
        0..=1000,
    );
    check.int(
        "spec.template.spec.timeoutSeconds",
        rev.get("timeoutSeconds"),
        1..=3600,
    );
    if let Some(sa) = rev.get("serviceAccountName")
        && !sa.as_str().is_some_and(|s| {
            s.ends_with(".iam.gserviceaccount.com")
                || s.ends_with("-compute@developer.gserviceaccount.com")
        })
    {
        check.fail(
            "spec.template.spec.serviceAccountName",
            "a Google service account email",
        );
    }
    let containers = rev["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if containers.is_empty() || containers.len() > 10 {
        check.fail("spec.template.spec.containers", "1 to 10 containers");
    }
    let mut names = Vec::new();
    let mut ingress = 0;
    for (i, c) in containers.iter().enumerate() {
        if let Some((name, has_port)) = container(
            &mut check,
            &format!("spec.template.spec.containers[{i}]"),
            c,
        ) {
            if containers.len() > 1 && name.is_empty() {
                check.fail(
                    &format!("spec.template.spec.containers[{i}]"),
                    "containers need names when there are several",
                );
            }
            names.push(name);
            ingress += usize::from(has_port);
        }
    }
    if ingress != 1 {
        check.fail(
            "spec.template.spec.containers",
            format!("exactly one container (the ingress) has a port; {ingress} do"),
        );
    }
    let dependencies = annotations["run.googleapis.com/container-dependencies"]
        .as_str()
        .and_then(|s| {
            serde_json::from_str::<std::collections::BTreeMap<String, Vec<String>>>(s).ok()
        })
        .unwrap_or_default();
    for (container, needs) in &dependencies {
        for name in std::iter::once(container).chain(needs) {
            if !names.contains(name) {
                check.fail(
                    "container-dependencies",
                    format!("{name} is not a container of this service"),
                );
            }
        }
    }
    check.0
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("samples directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_cloud_run_sample_is_a_service_cloud_run_accepts() {
    let files = yaml_files(&repo().join("samples/cloudrun"));
    assert!(files.len() >= 3, "{files:?}");
    let mut ports = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read sample");
        let doc: Value = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
        let problems = cloud_run_service(&doc);
        assert!(problems.is_empty(), "{}: {problems:#?}", file.display());
        for c in doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(port) = c["ports"].get(0) {
                ports.push((port["name"].clone(), port["containerPort"].clone()));
            }
        }
    }
    assert!(ports.contains(&("h2c".into(), 15009.into())), "{ports:?}");
    assert!(ports.contains(&("http1".into(), 15009.into())), "{ports:?}");
}

#[test]
fn the_schema_rejects_what_cloud_run_rejects() {
    let bad: Value = serde_saphyr::from_str(
        r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: Bad_Name
  annotations:
    run.googleapis.com/cpu-throttling: "false"
spec:
  template:
    metadata:
      annotations:
        run.googleapis.com/cpu-throttling: "sometimes"
        run.googleapis.com/container-dependencies: '{"a":["ghost"]}'
    spec:
      serviceAccountName: someone
      containers:
        - name: a
          image: img
          ports:
            - name: grpc
              containerPort: 15009
          stdin: true
          livenessProbe:
            tcpSocket:
              port: 15009
        - name: b
          image: img
          ports:
            - containerPort: 8080
"#,
    )
    .expect("YAML");
    let problems = cloud_run_service(&bad).join("\n");
    for expected in [
        "metadata.name",
        "not a service annotation",
        "cpu-throttling: \"true\" or \"false\"",
        "ghost is not a container",
        "a Google service account email",
        "port name \"grpc\"",
        "unknown field stdin",
        "liveness probe is httpGet or grpc",
        "exactly one container (the ingress) has a port; 2 do",
    ] {
        assert!(problems.contains(expected), "{expected}:\n{problems}");
    }
}

/// `kubectl kustomize DIR` renders, when kubectl is installed (it is not a Debian package:
/// it comes from Kubernetes' or Google Cloud's apt repository); otherwise the reason is printed.
fn renders(dir: &str) -> Option<String> {
    let Ok(out) = Command::new("kubectl")
        .args(["kustomize", &repo().join(dir).display().to_string()])
        .output()
    else {
        println!(
            "skipped `kubectl kustomize {dir}`: kubectl is not installed (not in Debian's archive)"
        );
        return None;
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_kustomize_trees_render_and_the_k8s_sample_routes_echo_through_hgate() {
    renders("manifests");
    let Some(text) = renders("samples/k8s") else {
        return;
    };
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text).expect("rendered YAML");
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} in samples/k8s"))
    };
    let service = find("Service", "echo");
    let entry = find("WorkloadEntry", "echo-sni");
    // The Service selects the WorkloadEntry (hgate's address and SNI port), which carries the
    // Istio mTLS label so clients' sidecars send mesh mTLS with the outbound_ SNI.
    assert_eq!(
        service["spec"]["selector"]["app"],
        entry["spec"]["labels"]["app"]
    );
    assert_eq!(entry["spec"]["ports"]["http"], 15442);
    assert_eq!(
        entry["spec"]["labels"]["security.istio.io/tlsMode"],
        "istio"
    );
    assert_eq!(service["spec"]["ports"][0]["name"], "http");
    find("Deployment", "client");
}
