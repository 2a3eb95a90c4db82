//! The app's lifecycle hooks (`app.preStart`, `app.preStop`) and the `files:` section of
//! `KRUN_PROCESSES`, with stand-in shell scripts as hooks and app.

use krun_tests::{Krun, TempDir, http_request, require_root};
use nix::sys::signal::Signal;

/// The user the app (and its hooks and files) run as in these tests.
const APP_UID: &str = "65534";

/// A krun whose `KRUN_PROCESSES` file holds `yaml`; `$DIR` in it is the temporary directory.
fn with_processes(dir: &TempDir, yaml: &str) -> Krun {
    let path = dir.join("processes.yaml");
    let yaml = yaml.replace("$DIR", &dir.join("").display().to_string());
    std::fs::write(&path, yaml).expect("write processes");
    Krun::new().env("KRUN_PROCESSES", &path)
}

/// A directory the app's user may write to.
fn shared_dir(tag: &str) -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new(tag);
    std::fs::set_permissions(dir.join(""), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    dir
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

#[test]
fn prestart_runs_to_completion_as_the_app_user_before_the_app() {
    require_root("the app and its hook run as another user (K8S_UID)");
    let dir = shared_dir("prestart");
    // The hook holds until the test has seen krun report it; then it leaves its marker.
    let krun = with_processes(
        &dir,
        "app:\n  preStart: [sh, -c, 'echo restoring state; while [ ! -e $DIR/go ]; do sleep 0.05; done; echo \"uid=$(id -u) env=$APP_SETTING\" > $DIR/marker']\nprocesses: []\n",
    );
    let marker = dir.join("marker").display().to_string();
    let mut krun = krun
        .env("K8S_UID", APP_UID)
        .env("APP_SETTING", "from-env")
        .env("KRUN_ADMIN_ADDR", "127.0.0.1:0")
        .args(sh(&format!("echo app sees: $(cat {marker})")))
        .start();
    let admin = krun.wait_for_addr("admin endpoint listening");
    krun.wait_for_line("running the app's hook");
    let (status, ready) = http_request(admin, "GET", "/healthz/ready");
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready.contains("app: not started: its preStart hook is running"),
        "{ready}"
    );
    std::fs::write(dir.join("go"), "").expect("release the hook");
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    let hook_done = done.line_index("restoring state");
    let app = done.line_index(&format!("app sees: uid={APP_UID} env=from-env"));
    assert!(hook_done < app, "{}", done.text());
}

#[test]
fn a_failing_prestart_stops_krun_with_its_output() {
    let dir = TempDir::new("prestart-fails");
    let ran = dir.join("app-ran");
    let krun = with_processes(
        &dir,
        "app:\n  preStart: [sh, -c, 'echo fetching state; echo \"bucket gs://state not found\" >&2; exit 3']\n",
    );
    let done = krun.args(["touch", &ran.display().to_string()]).run();
    assert_eq!(done.code, 1, "{}", done.text());
    let error = &done.output[done.line_index("krun exits 1")];
    assert!(
        error.contains("preStart sh failed with exit code 3")
            && error.contains("fetching state | bucket gs://state not found"),
        "{}",
        done.text()
    );
    assert!(!ran.exists(), "the app must not start: {}", done.text());
}

#[test]
fn prestop_runs_while_the_app_still_runs_then_the_app_gets_sigterm() {
    let dir = TempDir::new("prestop");
    let pid_file = dir.join("app.pid").display().to_string();
    let krun = with_processes(
        &dir,
        &format!(
            "app:\n  preStop: [sh, -c, 'kill -0 $(cat {pid_file}) && echo \"prestop: app alive, remaining=$KRUN_DRAIN_REMAINING\"']\n"
        ),
    );
    let mut krun = krun
        .env("KRUN_DRAIN_TIMEOUT", "7s")
        .args(sh(&format!(
            "echo $$ > {pid_file}; trap 'echo app got SIGTERM; kill $!; exit 0' TERM; echo app up; sleep 1000 & wait"
        )))
        .start();
    krun.wait_for_line("app up");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    let prestop = done.line_index("prestop: app alive, remaining=");
    assert!(
        prestop < done.line_index("app got SIGTERM"),
        "{}",
        done.text()
    );
    let remaining = done.output[prestop]
        .rsplit("remaining=")
        .next()
        .and_then(|r| r.strip_suffix('s'))
        .and_then(|r| r.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("KRUN_DRAIN_REMAINING: {}", done.output[prestop]));
    assert!(remaining > 0.0 && remaining <= 7.0, "{remaining}");
}

#[test]
fn a_prestop_that_outlives_the_drain_budget_is_killed() {
    let dir = TempDir::new("prestop-hangs");
    let krun = with_processes(&dir, "app:\n  preStop: [sleep, '1000']\n");
    let mut krun = krun
        .env("KRUN_DRAIN_TIMEOUT", "1s")
        .args(sh("echo app up; exec sleep 1000"))
        .start();
    krun.wait_for_line("app up");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert!(
        done.has_line("hook still running when the drain budget ended; killed"),
        "{}",
        done.text()
    );
}

#[test]
fn a_mounted_secret_appears_with_its_mode_before_the_app_and_is_never_shown() {
    require_root("the files are given to the app's user");
    let dir = shared_dir("files");
    let secret = "s3cr3t-from-the-volume-4242";
    let env_secret = "env-secret-token-9191";
    let mounted = dir.join("mounted-password");
    std::fs::write(&mounted, secret).expect("write secret");
    let target = dir.join("app/config/password");
    let token = dir.join("app/token");
    let yaml = format!(
        "files:\n  - {{path: {}, from: {}, mode: \"0440\", refresh: true}}\n  - {{path: {}, env: APP_TOKEN}}\n",
        target.display(),
        mounted.display(),
        token.display()
    );
    let processes = dir.join("processes.yaml");
    std::fs::write(&processes, &yaml).expect("write processes");
    let app = format!(
        "stat -c 'password: mode=%a owner=%u' {t}; stat -c 'token: mode=%a owner=%u' {k}; cmp -s {t} {m} && echo password matches; trap 'exit 0' TERM; echo app up; sleep 1000 & wait",
        t = target.display(),
        k = token.display(),
        m = mounted.display()
    );
    let mut krun = Krun::new()
        .env("KRUN_PROCESSES", &processes)
        .env("K8S_UID", APP_UID)
        .env("APP_TOKEN", env_secret)
        .env("KRUN_ADMIN_ADDR", "127.0.0.1:0")
        .args(sh(&app))
        .start();
    let admin = krun.wait_for_addr("admin endpoint listening");
    krun.wait_for_all(&[
        &format!("password: mode=440 owner={APP_UID}"),
        &format!("token: mode=400 owner={APP_UID}"),
        "password matches",
        "app up",
    ]);
    // refresh: the mounted secret changes (as a Secret volume's does); the copy follows.
    std::fs::write(&mounted, "rotated-secret-7777").expect("rotate secret");
    krun.wait_for_line("file refreshed");
    assert_eq!(
        std::fs::read_to_string(&target).expect("copy"),
        "rotated-secret-7777"
    );
    let (status, dump) = http_request(admin, "GET", "/config_dump");
    assert_eq!(status, 200, "{dump}");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    let printed = Krun::new()
        .env("KRUN_PROCESSES", &processes)
        .env("APP_TOKEN", env_secret)
        .args(["--print-config", "--offline"])
        .run();
    assert_eq!(printed.code, 0, "{}", printed.text());
    for shown in [done.text(), printed.text(), dump] {
        for secret in [secret, env_secret, "rotated-secret-7777"] {
            assert!(!shown.contains(secret), "secret shown:\n{shown}");
        }
    }
}

#[test]
fn a_missing_source_is_a_startup_error_naming_the_entry() {
    let dir = TempDir::new("files-missing");
    let target = dir.join("password");
    let krun = with_processes(
        &dir,
        &format!(
            "files:\n  - {{path: {}, from: /nonexistent/secret}}\n",
            target.display()
        ),
    );
    let done = krun.args(["true"]).run();
    assert_eq!(done.code, 1, "{}", done.text());
    let error = &done.output[done.line_index("krun: KRUN_PROCESSES=")];
    assert!(
        error.contains(&format!(
            "files entry {}: cannot read from: /nonexistent/secret",
            target.display()
        )) && error.contains("mount the secret there or fix `from:`"),
        "{}",
        done.text()
    );
}
