//! krun as a PID-1 supervisor: exit codes, signals, reaping, drain, ordering, readiness.
//! Each test runs the real binary with `krun-testapp` as the app.

use krun_tests::{Krun, TempDir, free_port, testapp};
use nix::sys::signal::Signal;

#[test]
fn exit_status_is_passed_through() {
    assert_eq!(Krun::new().args(testapp(&["exit", "0"])).run().code, 0);
    assert_eq!(Krun::new().args(testapp(&["exit", "7"])).run().code, 7);
    let killed = Krun::new().args(testapp(&["kill-self", "TERM"])).run();
    assert_eq!(killed.code, 143, "{}", killed.text());
}

#[test]
fn app_is_found_on_path_and_gets_its_port() {
    let done = Krun::new()
        .env("PORT", "15009")
        .env("PORT_http", "-")
        .args(["sh", "-c", "echo port=${PORT:-none}"])
        .run();
    assert_eq!(done.code, 0);
    assert!(
        done.has_line("port=none"),
        "PORT_http=- gives the app no PORT: {}",
        done.text()
    );
    let port = free_port().to_string();
    let mut krun = Krun::new()
        .env("PORT", "15009")
        .env("PORT_http", &port)
        .args(testapp(&["env", "PORT"]))
        .start();
    krun.wait_for_line(&port);
    assert_eq!(krun.finish().code, 0);
}

#[test]
fn every_forwarded_signal_reaches_the_app_each_time() {
    let mut krun = Krun::new()
        .env("KRUN_DRAIN_TIMEOUT", "10m")
        .args(testapp(&["signals", "2"]))
        .start();
    krun.wait_for_line("READY");
    // SIGTERM first: the others must still be forwarded while krun drains. The list is
    // spelled out on purpose rather than taken from krun::supervisor::FORWARDED, so a signal
    // dropped from krun's list fails this test.
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
    ] {
        for _ in 0..2 {
            krun.signal(signal);
            krun.wait_for_line(&format!("got {}", signal.as_str()));
        }
    }
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
}

#[test]
fn an_app_that_ignores_sigterm_is_killed_at_the_drain_timeout() {
    let mut krun = Krun::new()
        .env("KRUN_DRAIN_TIMEOUT", "200ms")
        .args(testapp(&["ignore-term"]))
        .start();
    krun.wait_for_line("READY");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 137, "{}", done.text());
    assert!(done.has_line("drain timeout"), "{}", done.text());
}

#[test]
fn an_app_that_exits_on_sigterm_ends_krun_at_once_with_its_status() {
    // A one-hour budget: if krun waited for it instead of the app, the hang guard would fire.
    let mut krun = Krun::new()
        .env("KRUN_DRAIN_TIMEOUT", "1h")
        .args(testapp(&["wait-term"]))
        .start();
    krun.wait_for_line("READY");
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);

    let mut krun = Krun::new()
        .env("KRUN_DRAIN_TIMEOUT", "1h")
        .args(["sleep", "1000"])
        .start();
    krun.wait_for_line("started");
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 143);
}

fn process_alive(pid: &str) -> bool {
    let pid: i32 = pid.trim().parse().expect("pid file holds a pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[test]
fn a_grandchild_in_the_apps_process_group_does_not_survive_krun() {
    let dir = TempDir::new("grandchild");
    let pidfile = dir.join("pid");
    let mut krun = Krun::new()
        .env("KRUN_DRAIN_TIMEOUT", "1h")
        .args(testapp(&["grandchild", &pidfile.display().to_string()]))
        .start();
    krun.wait_for_line("READY");
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
    let pid = std::fs::read_to_string(&pidfile).expect("pid file");
    assert!(!process_alive(&pid), "grandchild {pid} survived krun");
}

#[test]
fn an_orphan_outside_krun_process_groups_does_not_survive_krun() {
    let dir = TempDir::new("stray");
    let pidfile = dir.join("pid");
    let mut krun = Krun::new()
        .args(testapp(&["stray", &pidfile.display().to_string()]))
        .start();
    krun.wait_for_line("READY");
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
    let pid = std::fs::read_to_string(&pidfile).expect("pid file");
    assert!(
        !process_alive(&pid),
        "orphan {pid} in its own session survived krun"
    );
}

const PID_NAMESPACE: &[&str] = &["unshare", "--pid", "--fork", "--mount-proc"];

#[test]
fn as_pid_1_orphans_are_reaped_while_running_and_at_exit() {
    let done = Krun::wrapped(PID_NAMESPACE)
        .args(testapp(&["orphans", "20"]))
        .run();
    assert!(done.has_line("all reaped"), "{}", done.text());
    assert_eq!(done.code, 0, "{}", done.text());

    // At exit: a process that escaped into its own session is killed and reaped by PID 1,
    // and the app's status still comes out.
    let dir = TempDir::new("pid1-stray");
    let pidfile = dir.join("pid").display().to_string();
    let mut krun = Krun::wrapped(PID_NAMESPACE)
        .args(testapp(&["stray", &pidfile]))
        .start();
    krun.wait_for_line("READY");
    krun.signal_wrapped(Signal::SIGTERM);
    let line = krun.wait_for_line("draining");
    assert!(line.contains("SIGTERM"), "{line}");
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(!done.has_line("still running"), "{}", done.text());
}

#[test]
fn the_app_waits_for_every_declared_port() {
    let (first, late) = (free_port().to_string(), free_port().to_string());
    let mut krun = Krun::new()
        .env("PORT_http", &first)
        .env("PORT_grpc", &late)
        .env("PORT_other", "db.internal:5432")
        .args(testapp(&["listen", &first, "--late", &late]))
        .start();
    krun.wait_for_line("app-ready");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert!(
        done.line_index(&format!("binding {late}")) < done.line_index("app-ready"),
        "ready before the late port:\n{}",
        done.text()
    );
}

#[test]
fn an_app_that_never_listens_fails_naming_the_port() {
    let port = free_port().to_string();
    let done = Krun::new()
        .env("PORT_http", &port)
        .env("KRUN_APP_READY_TIMEOUT", "300ms")
        .args(testapp(&["wait-term"]))
        .run();
    assert_eq!(done.code, 1, "{}", done.text());
    let line = &done.output[done.line_index("not ready after 300ms")];
    assert!(
        line.contains(&format!("127.0.0.1:{port}")) && line.contains("KRUN_APP_READY_TIMEOUT"),
        "{line}"
    );
}

#[test]
fn a_startup_probe_replaces_the_port_wait() {
    let port = free_port().to_string();
    let mut krun = Krun::new()
        .env("PORT_http", "1") // nothing listens there; the probe below decides
        .env("startupProbe.tcp", format!("127.0.0.1:{port}"))
        .args(testapp(&["listen", "--late", &port]))
        .start();
    krun.wait_for_line("app-ready");
    krun.signal(Signal::SIGTERM);
    assert_eq!(krun.finish().code, 0);
}

#[test]
fn a_missing_app_is_a_one_line_startup_error() {
    let done = Krun::new().args(["/nonexistent/app"]).run();
    assert_eq!(done.code, 1);
    assert!(
        done.has_line("cannot start app (/nonexistent/app)"),
        "{}",
        done.text()
    );
}

#[test]
fn as_root_the_app_runs_as_k8s_uid_with_its_own_groups() {
    krun_tests::require_root("only root can start the app as another user");
    let done = Krun::new()
        .env("K8S_UID", "65534")
        .args(testapp(&["id"]))
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    let nobody = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(65534))
        .ok()
        .flatten()
        .map(|u| u.gid.as_raw())
        .unwrap_or(65534);
    assert!(
        done.has_line(&format!("uid=65534 gid={nobody} groups={nobody}")),
        "{}",
        done.text()
    );

    let done = Krun::new()
        .env("K8S_UID", "4242")
        .env("K8S_GID", "4343")
        .args(testapp(&["id"]))
        .run();
    assert!(
        done.has_line("uid=4242 gid=4343 groups="),
        "no root groups may leak: {}",
        done.text()
    );
    assert!(!done.has_line("groups=0"), "{}", done.text());
}
