//! The command line of both binaries: `--help` that teaches, flags that only make sense
//! together, a closed output pipe, and error causes printed once.

use std::process::{Command, Stdio};

use krun_tests::{Krun, binary};

#[test]
fn help_shows_the_double_dash_form_the_main_settings_and_the_reference() {
    let done = Krun::new().args(["--help"]).run();
    assert_eq!(done.code, 0, "{}", done.text());
    let help = done.text();
    for needle in [
        "krun [OPTIONS] -- APP [ARGS]...",
        "MESH",
        "PORT_http",
        "KRUN_DATAPLANE",
        "KRUN_PROCESSES",
        "docs/configuration.md",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn offline_without_print_config_is_an_error_that_names_both_flags() {
    let done = Krun::new().args(["--offline", "true"]).run();
    assert_eq!(done.code, 2, "{}", done.text());
    let text = done.text();
    assert!(
        text.contains("--offline") && text.contains("--print-config"),
        "{text}"
    );
}

#[test]
fn hgate_print_config_into_a_closed_pipe_exits_quietly() {
    // `hgate --print-config | head -1`, made deterministic: the reader is gone before hgate
    // writes anything, so its first write already fails with EPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(binary("hgate"))
        .args(["--print-config", "--offline"])
        .env_clear()
        .env("HGATE_KUBE", "off")
        .env("HGATE_ISTIOD_ADDR", "off")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run hgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "", "nothing on stderr for a closed pipe");
}

#[test]
fn an_unreadable_processes_file_prints_its_cause_once() {
    let done = Krun::new()
        .env("KRUN_PROCESSES", "/nonexistent")
        .args(["true"])
        .run();
    assert_eq!(done.code, 1, "{}", done.text());
    let text = done.text();
    assert_eq!(
        text.matches("No such file or directory").count(),
        1,
        "{text}"
    );
    assert!(text.contains("KRUN_PROCESSES=/nonexistent"), "{text}");
}
