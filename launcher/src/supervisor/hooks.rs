//! The app's lifecycle hooks from `KRUN_PROCESSES` (`app.preStart`, `app.preStop`): spawned
//! through the reaper with the app's user and environment, each watched by a task that tells
//! the supervisor when it is done.

use std::io::{Read, Seek, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::{Instant, sleep_until};

use crate::reaper::Reaper;

/// The variable that gives preStop the drain budget it has left, e.g. `4.5s`.
pub const DRAIN_REMAINING_VAR: &str = "KRUN_DRAIN_REMAINING";

/// How much of a failed preStart's output goes into krun's error (its end, where the reason
/// usually is).
const OUTPUT_TAIL: usize = 2048;

/// Starts the preStart hook with its output captured and returns its pid; `done` gets `Ok`
/// when it exits 0, else the one-line error with its exit status and output. Its output is
/// copied to krun's stderr when it has exited, either way.
pub fn pre_start(
    reaper: &Reaper,
    command: Option<Command>,
    hook: &[String],
    done: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Result<nix::unistd::Pid, String> {
    let program = hook.first().cloned().unwrap_or_default();
    let cannot = |e: std::io::Error| {
        format!(
            "cannot run the app's preStart {program}: {e}; check the command exists in PATH and is executable"
        )
    };
    let mut command = command.ok_or_else(|| cannot(std::io::ErrorKind::InvalidInput.into()))?;
    let mut output = capture_file().map_err(cannot)?;
    command
        .stdin(Stdio::null())
        .stdout(output.try_clone().map_err(cannot)?)
        .stderr(output.try_clone().map_err(cannot)?);
    let child = reaper.spawn(&mut command).map_err(cannot)?;
    let pid = child.pid;
    tokio::spawn(async move {
        let status = child.exit.await;
        let text = read_back(&mut output);
        let _ = std::io::stderr().write_all(&text);
        let result = match status {
            Ok(status) if status.success() => {
                tracing::info!(hook = "preStart", "hook done");
                Ok(())
            }
            Ok(status) => Err(format!(
                "the app's preStart {program} failed with {status}: {}; the app was not started",
                one_line(&text)
            )),
            Err(_) => Err("the app's preStart: reaper stopped".to_owned()),
        };
        done(result);
    });
    Ok(pid)
}

/// Starts the preStop hook (output inherited) with [`DRAIN_REMAINING_VAR`]; once it exits, or
/// at `deadline` (then it is killed), calls `then`, which stops the app.
pub fn pre_stop(
    reaper: &Reaper,
    command: Option<Command>,
    hook: &[String],
    deadline: Instant,
    then: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    let program = hook.first().cloned().unwrap_or_default();
    let cannot = |e: std::io::Error| format!("cannot run the app's preStop {program}: {e}");
    let mut command = command.ok_or_else(|| cannot(std::io::ErrorKind::InvalidInput.into()))?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    command
        .stdin(Stdio::null())
        .env(DRAIN_REMAINING_VAR, seconds(remaining));
    let mut child = reaper.spawn(&mut command).map_err(cannot)?;
    tracing::info!(hook = "preStop", program = %program, pid = child.pid.as_raw(), remaining = %seconds(remaining), "running the app's hook before stopping it");
    tokio::spawn(async move {
        tokio::select! {
            status = &mut child.exit => match status {
                Ok(status) if status.success() => tracing::info!(hook = "preStop", "hook done"),
                Ok(status) => tracing::warn!(hook = "preStop", %status, "hook failed; stopping the app anyway"),
                Err(_) => {}
            },
            () = sleep_until(deadline) => {
                tracing::warn!(hook = "preStop", "hook still running when the drain budget ended; killed");
                child.kill_group(Signal::SIGKILL);
            }
        }
        then();
    });
    Ok(())
}

/// `4.5s`: a duration as seconds with up to millisecond precision, the form a script can
/// compare.
fn seconds(d: Duration) -> String {
    let text = format!("{:.3}", d.as_secs_f64());
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}s")
}

/// An anonymous in-memory file for a hook's output: complete once the hook has exited (no pipe
/// to drain, and a daemon the hook leaves behind holding it cannot block krun).
fn capture_file() -> std::io::Result<std::fs::File> {
    let fd =
        nix::sys::memfd::memfd_create(c"krun-hook-output", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    Ok(std::fs::File::from(fd))
}

fn read_back(file: &mut std::fs::File) -> Vec<u8> {
    let mut text = Vec::new();
    if file.rewind().is_ok() {
        let _ = file.read_to_end(&mut text);
    }
    text
}

/// The end of `text` on one line: lines joined with ` | `.
fn one_line(text: &[u8]) -> String {
    let start = text.len().saturating_sub(OUTPUT_TAIL);
    let text = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "(no output)".to_owned()
    } else {
        lines.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remaining_budget_reads_as_seconds() {
        assert_eq!(seconds(Duration::from_millis(4500)), "4.5s");
        assert_eq!(seconds(Duration::from_secs(5)), "5s");
        assert_eq!(seconds(Duration::ZERO), "0s");
    }

    #[test]
    fn output_is_one_line() {
        assert_eq!(one_line(b"a\n\nb\n"), "a | b");
        assert_eq!(one_line(b""), "(no output)");
    }
}
