//! Extra processes from `KRUN_PROCESSES`: dependency order, readiness, failure, ordered drain.

use krun_tests::{Krun, TempDir, free_port, testapp};
use nix::sys::signal::Signal;

fn yaml_list(argv: &[String]) -> String {
    format!(
        "[{}]",
        argv.iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[test]
fn processes_start_in_dependency_order_and_stop_in_reverse() {
    let dir = TempDir::new("order");
    let log = dir.join("log").display().to_string();
    let (a, b, app) = (
        free_port().to_string(),
        free_port().to_string(),
        free_port().to_string(),
    );
    // A is slow to listen; if krun did not wait for its probe, B would start first.
    let file = format!(
        "processes:\n  - name: b\n    command: {}\n    dependsOn: [a]\n    readiness: {{tcp: {b}}}\n  - name: a\n    command: {}\n    readiness: {{tcp: {a}}}\n",
        yaml_list(&testapp(&["serve", "B", &log, &b])),
        yaml_list(&testapp(&["serve", "A", &log, &a, "300"])),
    );
    let path = dir.join("processes.yaml");
    std::fs::write(&path, file).expect("write processes");
    let mut krun = Krun::new()
        .env("KRUN_PROCESSES", &path)
        .env("PORT_http", &app)
        .args(testapp(&["serve", "APP", &log, &app]))
        .start();
    krun.wait_for_line("app-ready");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    let events: Vec<String> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        events,
        [
            "A start",
            "A listening",
            "B start",
            "B listening",
            "APP start",
            "APP listening",
            "APP stop",
            "B stop",
            "A stop"
        ],
        "krun output:\n{}",
        done.text()
    );
}

/// A krun whose `KRUN_PROCESSES` file holds `yaml`; keep the directory until krun is done.
fn with_processes(tag: &str, yaml: &str) -> (TempDir, Krun) {
    let dir = TempDir::new(tag);
    let path = dir.join("processes.yaml");
    std::fs::write(&path, yaml).expect("write processes");
    let krun = Krun::new().env("KRUN_PROCESSES", &path);
    (dir, krun)
}

fn rejected(file: &str) -> krun_tests::Finished {
    let (dir, krun) = with_processes("bad-processes", file);
    let path = dir.join("processes.yaml");
    let done = krun.args(["true"]).run();
    assert_eq!(done.code, 1, "{}", done.text());
    assert_eq!(done.output.len(), 1, "one line: {}", done.text());
    assert!(
        done.output[0].starts_with(&format!("krun: KRUN_PROCESSES={}: ", path.display())),
        "{}",
        done.text()
    );
    done
}

#[test]
fn a_cycle_and_an_unknown_dependency_are_rejected_by_name() {
    let cycle = rejected(
        "processes:\n  - {name: a, command: [true], dependsOn: [b]}\n  - {name: b, command: [true], dependsOn: [a]}\n",
    );
    assert!(
        cycle.output[0].ends_with("dependency cycle: a -> b -> a"),
        "{}",
        cycle.text()
    );
    let unknown = rejected("processes:\n  - {name: a, command: [true], dependsOn: [db]}\n");
    assert!(
        unknown.output[0].ends_with("\"a\" depends on unknown process \"db\""),
        "{}",
        unknown.text()
    );
    let malformed = rejected("processes:\n  - name: a\n    command: true\n   bad indent\n");
    assert!(
        malformed.output[0].contains("malformed YAML"),
        "{}",
        malformed.text()
    );
}

#[test]
fn a_missing_processes_file_is_named() {
    let done = Krun::new()
        .env("KRUN_PROCESSES", "/nonexistent/processes.yaml")
        .args(["true"])
        .run();
    assert_eq!(done.code, 1);
    assert!(
        done.output[0]
            .starts_with("krun: KRUN_PROCESSES=/nonexistent/processes.yaml: cannot read the file"),
        "{}",
        done.text()
    );
}

#[test]
fn a_required_process_that_crashes_brings_krun_down() {
    let file = format!(
        "app: {{dependsOn: []}}\nprocesses:\n  - name: crasher\n    command: {}\n",
        yaml_list(&testapp(&["exit", "3"]))
    );
    let (_dir, krun) = with_processes("crash", &file);
    let done = krun.args(testapp(&["wait-term"])).run();
    assert_eq!(done.code, 1, "{}", done.text());
    assert!(
        done.has_line("process crasher exited with exit code 3 (restart: never); it is required"),
        "{}",
        done.text()
    );
}

#[test]
fn an_on_failure_process_is_restarted_then_gives_up() {
    let file = format!(
        "app: {{dependsOn: []}}\nprocesses:\n  - name: flaky\n    command: {}\n    restart: on-failure\n    maxRestarts: 2\n    restartBackoff: 10ms\n",
        yaml_list(&testapp(&["exit", "4"]))
    );
    let (_dir, krun) = with_processes("restart", &file);
    let done = krun.args(testapp(&["wait-term"])).run();
    assert_eq!(done.code, 1, "{}", done.text());
    assert_eq!(
        done.output
            .iter()
            .filter(|l| l.contains("process failed; restarting"))
            .count(),
        2,
        "{}",
        done.text()
    );
    assert!(
        done.has_line("(restart: on-failure, retries exhausted)"),
        "{}",
        done.text()
    );
}

#[test]
fn an_optional_process_may_die_without_stopping_the_app() {
    let file = format!(
        "processes:\n  - name: helper\n    command: {}\n    required: false\n",
        yaml_list(&testapp(&["exit", "5"]))
    );
    let (_dir, krun) = with_processes("optional", &file);
    let mut krun = krun.args(testapp(&["wait-term"])).start();
    // The app must have its SIGTERM handler (READY) before it is asked to stop.
    krun.wait_for_all(&["not required, continuing", "READY"]);
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
}
