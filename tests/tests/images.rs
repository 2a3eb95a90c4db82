//! The container images: every Dockerfile passes the lint below, and the krun-only image is
//! built `FROM scratch` offline with buildah from the debug krun binary (no second release
//! build), its krun answering `--version` inside the image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use krun_tests::{binary, require_root};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every Dockerfile of the repository (`Dockerfile`, `*.Dockerfile`, `Dockerfile.*`).
fn dockerfiles(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                dockerfiles(&path, out);
            }
        } else if name == "Dockerfile"
            || name.ends_with(".Dockerfile")
            || name.starts_with("Dockerfile.")
        {
            out.push(path);
        }
    }
}

/// Instructions with continuation lines joined and comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (op, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((op.to_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

/// `${NAME}` / `$NAME` expanded from `args`; a name without a default stays as `<NAME>`.
fn expand(value: &str, args: &HashMap<String, Option<String>>) -> String {
    let mut out = value.to_owned();
    for (name, default) in args {
        let with = default.clone().unwrap_or_else(|| format!("<{name}>"));
        out = out
            .replace(&format!("${{{name}}}"), &with)
            .replace(&format!("${name}"), &with);
    }
    out
}

fn pinned_digest(reference: &str) -> bool {
    reference.split_once("@sha256:").is_some_and(|(_, hex)| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

/// What matters in a Dockerfile here: bases pinned by digest (a literal `@sha256:` of 64 hex
/// digits, or a required `*_DIGEST` build argument without a default), never `latest`,
/// `cargo build`/`install` with `--locked`, ENTRYPOINT and CMD in exec form, and USER set in
/// every stage that has an ENTRYPOINT. Returns one line per problem.
fn lint(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut args: HashMap<String, Option<String>> = HashMap::new();
    let mut stages: Vec<String> = Vec::new();
    // (stage, has ENTRYPOINT, has USER)
    let mut current: Option<(String, bool, bool)> = None;
    let finish = |stage: Option<(String, bool, bool)>, problems: &mut Vec<String>| {
        if let Some((name, true, false)) = stage {
            problems.push(format!("stage {name}: ENTRYPOINT without USER"));
        }
    };
    for (op, rest) in instructions(text) {
        if rest.contains(":latest") {
            problems.push(format!("{op} {rest}: uses the floating tag latest"));
        }
        match op.as_str() {
            "ARG" => {
                let (name, default) = match rest.split_once('=') {
                    Some((n, d)) => (n.to_owned(), Some(d.trim_matches('"').to_owned())),
                    None => (rest.clone(), None),
                };
                args.entry(name).or_insert(default);
            }
            "FROM" => {
                finish(current.take(), &mut problems);
                let words: Vec<&str> = rest
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let image = words.first().copied().unwrap_or_default();
                let name = match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => (*name).to_owned(),
                    _ => format!("#{}", stages.len()),
                };
                let expanded = expand(image, &args);
                let required_digest = expanded.contains("@<") && expanded.ends_with("_DIGEST>");
                if image != "scratch"
                    && !stages.iter().any(|s| s == image)
                    && !pinned_digest(&expanded)
                    && !required_digest
                {
                    problems.push(format!("FROM {image}: not pinned by digest ({expanded})"));
                }
                stages.push(name.clone());
                current = Some((name, false, false));
            }
            "RUN"
                if (rest.contains("cargo build") || rest.contains("cargo install"))
                    && !rest.contains("--locked") =>
            {
                problems.push(format!("RUN {rest}: cargo without --locked"));
            }
            "ENTRYPOINT" | "CMD" => {
                if serde_json::from_str::<Vec<String>>(&rest).is_err() {
                    problems.push(format!("{op} {rest}: not exec form (a JSON array)"));
                }
                if op == "ENTRYPOINT"
                    && let Some(stage) = current.as_mut()
                {
                    stage.1 = true;
                }
            }
            "USER" => {
                if let Some(stage) = current.as_mut() {
                    stage.2 = true;
                }
            }
            _ => {}
        }
    }
    finish(current.take(), &mut problems);
    problems
}

#[test]
fn every_dockerfile_pins_its_bases_locks_cargo_and_uses_exec_form() {
    let mut files = Vec::new();
    dockerfiles(&repo(), &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("golden-image/Dockerfile")),
        "golden-image/Dockerfile is found: {files:?}"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read Dockerfile");
        let problems = lint(&text);
        assert!(problems.is_empty(), "{}: {problems:#?}", file.display());
    }
}

#[test]
fn the_lint_catches_each_rule() {
    let bad = "\
ARG BASE=debian:12
FROM ${BASE} AS build
RUN cargo build --release
FROM ubuntu:latest
ENTRYPOINT /bin/app
CMD [\"ok\"]
";
    let problems = lint(bad);
    let expect = [
        "FROM ${BASE}: not pinned by digest",
        "cargo without --locked",
        "uses the floating tag latest",
        "ENTRYPOINT /bin/app: not exec form",
        "ENTRYPOINT without USER",
    ];
    for e in expect {
        assert!(problems.iter().any(|p| p.contains(e)), "{e}: {problems:#?}");
    }
    let good = "\
ARG D=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
ARG REQUIRED_DIGEST
FROM example.com/img:1@${D} AS a
FROM example.com/rust:1@${REQUIRED_DIGEST} AS b
RUN cargo build --locked
FROM scratch
COPY --from=a / /
USER 1:1
ENTRYPOINT [\"/x\"]
";
    assert_eq!(lint(good), Vec::<String>::new());
}

#[test]
fn the_scratch_image_builds_offline_and_its_krun_answers_version() {
    require_root("buildah builds images as root with the vfs driver");
    assert!(
        Command::new("buildah")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "buildah is missing: run scripts/install-prereqs.sh (it installs Debian's buildah)"
    );
    let out = Command::new(repo().join("golden-image/build-local.sh"))
        .arg(binary("krun"))
        .output()
        .expect("run golden-image/build-local.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("): krun "), "{text}");
}
