//! Installing and removing the ruleset: one `iptables-save` read and one atomic
//! `iptables-restore --noflush -w` per address family, on the backend (nft or legacy) the host's
//! `iptables` uses.
//!
//! Applying runs before the supervisor exists, so there is no reaper yet and
//! `std::process::Command::output` may wait for its own child. Cleanup runs after the
//! supervisor, while the reaper owns `waitpid`, so it goes through [`Reaper::spawn`] with files
//! for stdin and stdout.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::rules::{Family, Rules, cleanup_input};
use crate::reaper::Reaper;

/// Which netfilter backend `iptables` drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`.
    Nft,
    /// `iptables-legacy`.
    Legacy,
}

/// Why the rules could not be read or installed. Messages name the command and its output.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A command could not start (not installed).
    #[error("cannot run {program}: {cause}; install iptables (and iproute2 for IPv6) in the image")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        cause: std::io::Error,
    },
    /// A command failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program and its arguments.
        program: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The tools of one backend and family.
#[derive(Clone, Debug)]
pub struct Tools {
    family: Family,
    save: String,
    restore: String,
}

impl Tools {
    /// `iptables-<backend>-save/-restore` when installed, else the plain names.
    pub fn new(backend: Backend, family: Family) -> Tools {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let flavour = match backend {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        };
        let pick = |verb: &str| {
            let specific = format!("{base}-{flavour}-{verb}");
            if on_path(&specific) {
                specific
            } else {
                format!("{base}-{verb}")
            }
        };
        Tools {
            family,
            save: pick("save"),
            restore: pick("restore"),
        }
    }

    /// The address family these tools manage.
    pub fn family(&self) -> Family {
        self.family
    }
}

/// Asks `iptables --version` which backend it uses (`(nf_tables)` or `(legacy)`).
pub fn detect_backend() -> Result<Backend, ApplyError> {
    let version = run_now("iptables", &["--version"], None)?;
    Ok(if version.contains("nf_tables") {
        Backend::Nft
    } else {
        Backend::Legacy
    })
}

/// True when the network namespace has IPv6 (any address in `/proc/net/if_inet6`).
pub fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty())
}

/// Installs `rules` for one family: reads the tables, then one atomic restore. For IPv6 it
/// also puts `::6/128` on `lo`, as istio-iptables does: Envoy's inbound passthrough binds that
/// source, which the `-s ::6/128 -o lo` rule returns; without the address the bind fails.
/// `replace` makes it idempotent.
pub fn apply(tools: &Tools, rules: &Rules) -> Result<(), ApplyError> {
    let existing = run_now(&tools.save, &[], None)?;
    let input = rules.restore_input(tools.family, &existing);
    run_now(&tools.restore, &["--noflush", "-w"], Some(&input))?;
    if tools.family == Family::V6 {
        run_now(
            "ip",
            &["-6", "addr", "replace", "::6/128", "dev", "lo"],
            None,
        )?;
    }
    Ok(())
}

/// Adds `input` (an `iptables-restore` text) to the tables without flushing them, in one
/// atomic restore: for rules of other features (Cloud Run discovery's port redirect).
pub fn restore_noflush(tools: &Tools, input: &str) -> Result<(), ApplyError> {
    run_now(&tools.restore, &["--noflush", "-w"], Some(input)).map(drop)
}

/// Removes every chain and jump of ours, through the reaper (the supervisor owns `waitpid`).
pub async fn cleanup(reaper: &Reaper, tools: &Tools) -> Result<(), ApplyError> {
    let existing = run_reaped(reaper, &tools.save, &[], None).await?;
    if let Some(input) = cleanup_input(&existing) {
        run_reaped(reaper, &tools.restore, &["--noflush", "-w"], Some(&input)).await?;
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| crate::processes::is_executable(&dir.join(program)))
    })
}

/// Runs a command to completion and returns its stdout. Only before the reaper starts.
fn run_now(program: &str, args: &[&str], input: Option<&str>) -> Result<String, ApplyError> {
    use std::io::Write;
    let spawn_error = |cause| ApplyError::Spawn {
        program: program.to_owned(),
        cause,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(ApplyError::Failed {
            program: format!("{program} {}", args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs a command through the reaper with stdin, stdout and stderr in temporary files.
async fn run_reaped(
    reaper: &Reaper,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, ApplyError> {
    let spawn_error = |cause| ApplyError::Spawn {
        program: program.to_owned(),
        cause,
    };
    let scratch = Scratch::new(program);
    std::fs::write(scratch.path("in"), input.unwrap_or_default()).map_err(spawn_error)?;
    let stdin = std::fs::File::open(scratch.path("in")).map_err(spawn_error)?;
    let stdout = std::fs::File::create(scratch.path("out")).map_err(spawn_error)?;
    let stderr = std::fs::File::create(scratch.path("err")).map_err(spawn_error)?;
    let child = reaper
        .spawn(
            Command::new(program)
                .args(args)
                .stdin(stdin)
                .stdout(stdout)
                .stderr(stderr),
        )
        .map_err(spawn_error)?;
    let status = child.exit.await;
    let read = |name| std::fs::read_to_string(scratch.path(name)).unwrap_or_default();
    match status {
        Ok(status) if status.success() => Ok(read("out")),
        status => Err(ApplyError::Failed {
            program: format!("{program} {}", args.join(" ")),
            status: status.map_or("not reaped".to_owned(), |s| format!("{s:?}")),
            stderr: read("err").trim().to_owned(),
        }),
    }
}

/// Temporary files of one reaped command, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(program: &str) -> Scratch {
        Scratch(std::env::temp_dir().join(format!("krun-{}-{program}", std::process::id())))
    }

    fn path(&self, suffix: &str) -> PathBuf {
        self.0.with_extension(suffix)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for suffix in ["in", "out", "err"] {
            let _ = std::fs::remove_file(self.path(suffix));
        }
    }
}
