//! Extra processes declared in the `KRUN_PROCESSES` YAML file, with Cloud Run
//! `container-dependencies` semantics: a process starts once everything it depends on passed
//! its readiness probe, and the app starts once its own dependencies are ready.
//!
//! ```yaml
//! app:
//!   dependsOn: [proxy]          # default: every process
//!   preStart: [/bin/restore-state]  # runs to completion before the app; failure stops krun
//!   preStop: [/bin/save-state]      # runs on drain before the app's SIGTERM
//! files: []                     # see [`files`]
//! processes:
//!   - name: proxy
//!     command: ["/usr/bin/cloud-sql-proxy", "--port", "5432", "db"]
//!     env: { LOG_LEVEL: info }
//!     dependsOn: []
//!     readiness: { tcp: 5432, period: 250ms, timeout: 1s }   # or http: URL, or exec: [cmd]
//!     restart: on-failure       # or never (default)
//!     maxRestarts: 5
//!     restartBackoff: 1s        # doubles up to 30s
//!     required: true            # default: its death stops the container
//! ```
//!
//! The file is validated as a whole before anything starts: unknown fields, unknown
//! dependencies and cycles are startup errors that name the culprit.
//!
//! The `Command`s for the app and these processes, including the user the app runs as
//! ([`RunAs`]), are built here too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::probe::{Check, Probe};
use mesh::config::values;

mod command;
pub mod files;

pub use command::{RunAs, command, is_executable};
pub use files::FileSpec;

/// Name under which the app appears in messages; no process may take it.
pub const APP_NAME: &str = "app";
/// Upper bound of the restart backoff.
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// A validated process file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessPlan {
    /// The processes, in file order.
    pub processes: Vec<ProcessSpec>,
    /// Indices of the processes the app waits for.
    pub app_depends_on: Vec<usize>,
    /// The app's lifecycle hooks.
    pub app_hooks: Hooks,
    /// Files written before anything starts.
    pub files: Vec<FileSpec>,
}

/// Commands run around the app, as Kubernetes lifecycle hooks, with the app's user and
/// environment: what an entrypoint script did to restore state at boot and save it on SIGTERM.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hooks {
    /// Runs to completion before the app starts; a failure stops krun with its output.
    pub pre_start: Option<Vec<String>>,
    /// Runs when the drain starts, before the app gets SIGTERM, within `KRUN_DRAIN_TIMEOUT`
    /// (the remaining budget is in its `KRUN_DRAIN_REMAINING`); killed when the budget ends.
    pub pre_stop: Option<Vec<String>>,
}

/// One declared process.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessSpec {
    /// Unique name, used in logs and `dependsOn`.
    pub name: String,
    /// Program and arguments (PATH lookup, no shell).
    pub command: Vec<String>,
    /// Extra environment on top of krun's.
    pub env: BTreeMap<String, String>,
    /// Indices of the processes it waits for.
    pub depends_on: Vec<usize>,
    /// How krun learns it is ready; without one it is ready once started.
    pub readiness: Option<Probe>,
    /// What happens when it exits.
    pub restart: RestartPolicy,
    /// Whether its final exit stops the whole container.
    pub required: bool,
    /// Another identity (krun must be root): the mesh agent runs as uid 0 / gid 1337, the gid
    /// that exempts it from traffic capture. Not settable from the file.
    pub run_as: Option<RunAs>,
    /// Working directory; `None` keeps krun's. The agent resolves its relative paths here.
    pub cwd: Option<PathBuf>,
    /// Its own readiness budget; `None` uses `KRUN_APP_READY_TIMEOUT`.
    pub ready_budget: Option<ReadyBudget>,
    /// How to stop it without cutting its connections; `None`: SIGTERM.
    pub graceful_stop: Option<GracefulStop>,
}

/// How a proxy is stopped during the drain without cutting the connections it still carries,
/// with Envoy's admin API (<https://www.envoyproxy.io/docs/envoy/latest/operations/admin>): drain
/// its listeners, wait until its connections are gone, then SIGTERM it.
#[derive(Clone, Debug, PartialEq)]
pub struct GracefulStop {
    /// Start stopping it this long before the drain deadline even while dependents still run,
    /// so it finishes before the SIGKILL.
    pub lead: Duration,
    /// POSTed first (Envoy's `/drain_listeners?graceful`).
    pub drain_url: String,
    /// Passes once its connections are gone (Envoy's `server.total_connections: 0`); krun
    /// SIGTERMs it then, or at the drain deadline.
    pub idle: Probe,
}

/// How long a process may take to become ready, and what krun saves when it does not, so the
/// operator has something to debug after the container is gone.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadyBudget {
    /// The budget.
    pub timeout: Duration,
    /// The variable that sets it, named in the error.
    pub variable: &'static str,
    /// Fetched and saved when the budget is spent (Envoy's `config_dump`).
    pub evidence: Option<Evidence>,
}

/// A diagnostic document krun saves when a process is never ready.
#[derive(Clone, Debug, PartialEq)]
pub struct Evidence {
    /// What it is, for the error message (e.g. `Envoy's config_dump`).
    pub what: &'static str,
    /// Where to GET it.
    pub url: String,
    /// Where to write it.
    pub path: PathBuf,
}

impl ProcessPlan {
    /// Adds a process the app depends on (the mesh agent): it starts first, the app waits for
    /// its readiness, and the drain stops it only after the app has exited.
    /// Fails when `KRUN_PROCESSES` already declares a process of that name.
    pub fn add_app_dependency(&mut self, spec: ProcessSpec) -> Result<(), String> {
        if self.processes.iter().any(|p| p.name == spec.name) {
            return Err(format!(
                "KRUN_PROCESSES declares a process named {:?}, which krun needs for the mesh agent; rename it",
                spec.name
            ));
        }
        self.app_depends_on.push(self.processes.len());
        self.processes.push(spec);
        Ok(())
    }
}

/// What krun does when a process exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Never restart.
    Never,
    /// Restart after a non-zero exit or a signal, with exponential backoff.
    OnFailure {
        /// Restarts before giving up.
        max_restarts: u32,
        /// First delay; doubles up to [`MAX_RESTART_BACKOFF`].
        backoff: Duration,
    },
}

/// A process file that cannot be used. Messages start with `KRUN_PROCESSES=<path>`.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file cannot be read.
    /// The cause is part of this message and deliberately not a `source`: `{:#}` would
    /// print it a second time.
    #[error("KRUN_PROCESSES={path}: cannot read the file: {cause}")]
    Read {
        /// The path.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape, or breaks a rule.
    #[error("KRUN_PROCESSES={path}: {problem}")]
    Invalid {
        /// The path.
        path: String,
        /// What is wrong, with the accepted form.
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFile {
    #[serde(default)]
    app: RawApp,
    #[serde(default)]
    processes: Vec<RawProcess>,
    #[serde(default)]
    files: Vec<files::RawFileSpec>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawApp {
    depends_on: Option<Vec<String>>,
    pre_start: Option<Vec<String>>,
    pre_stop: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProcess {
    name: String,
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    depends_on: Vec<String>,
    readiness: Option<RawProbe>,
    #[serde(default)]
    restart: RawRestart,
    max_restarts: Option<u32>,
    restart_backoff: Option<String>,
    required: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawRestart {
    #[default]
    Never,
    OnFailure,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProbe {
    tcp: Option<RawTcp>,
    http: Option<String>,
    exec: Option<Vec<String>>,
    period: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTcp {
    Port(u16),
    Address(String),
}

impl ProcessPlan {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<ProcessPlan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|cause| PlanError::Read {
            path: path.display().to_string(),
            cause,
        })?;
        Self::parse(&text).map_err(|problem| PlanError::Invalid {
            path: path.display().to_string(),
            problem,
        })
    }

    /// Parses and validates YAML text; the error is the problem, without the path.
    pub fn parse(text: &str) -> Result<ProcessPlan, String> {
        let raw: RawFile = serde_saphyr::from_str(text).map_err(|e| {
            // Only the first line: the parser goes on to quote the offending source line,
            // which may hold a `files:` value (a secret).
            let text = e.to_string();
            let detail = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
            format!("malformed YAML: {detail}; expected a map with `app:` {{dependsOn, preStart, preStop}}, `processes:`, a list of {{name, command, dependsOn, readiness, restart}}, and `files:`, a list of {{path, from|env|value, mode, owner, refresh}}")
        })?;
        let names: Vec<&str> = raw.processes.iter().map(|p| p.name.as_str()).collect();
        let index_of = |dependent: &str, dependency: &str| {
            names
                .iter()
                .position(|n| *n == dependency)
                .ok_or_else(|| format!("{dependent:?} depends on unknown process {dependency:?}"))
        };
        let mut processes = Vec::with_capacity(raw.processes.len());
        for (i, p) in raw.processes.iter().enumerate() {
            if p.name.is_empty() || p.name == APP_NAME {
                return Err(format!(
                    "process #{} needs a name other than {APP_NAME:?} or empty",
                    i + 1
                ));
            }
            if names[..i].contains(&p.name.as_str()) {
                return Err(format!("two processes are named {:?}", p.name));
            }
            if p.command.is_empty() {
                return Err(format!(
                    "process {:?} has an empty command; expected command: [program, args...]",
                    p.name
                ));
            }
            let depends_on = p
                .depends_on
                .iter()
                .map(|d| index_of(&p.name, d))
                .collect::<Result<_, _>>()?;
            processes.push(ProcessSpec {
                name: p.name.clone(),
                command: p.command.clone(),
                env: p.env.clone(),
                depends_on,
                readiness: p
                    .readiness
                    .as_ref()
                    .map(|r| probe(&p.name, r))
                    .transpose()?,
                restart: restart(p)?,
                required: p.required.unwrap_or(true),
                run_as: None,
                cwd: None,
                ready_budget: None,
                graceful_stop: None,
            });
        }
        let app_depends_on = match &raw.app.depends_on {
            Some(deps) => deps
                .iter()
                .map(|d| index_of(APP_NAME, d))
                .collect::<Result<_, _>>()?,
            None => (0..processes.len()).collect(),
        };
        let hook = |field: &str, argv: &Option<Vec<String>>| match argv {
            Some(argv) if argv.is_empty() => Err(format!(
                "app.{field} is empty; expected {field}: [program, args...]"
            )),
            _ => Ok(argv.clone()),
        };
        let app_hooks = Hooks {
            pre_start: hook("preStart", &raw.app.pre_start)?,
            pre_stop: hook("preStop", &raw.app.pre_stop)?,
        };
        let files = raw
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| f.validate(i + 1))
            .collect::<Result<_, _>>()?;
        let plan = ProcessPlan {
            processes,
            app_depends_on,
            app_hooks,
            files,
        };
        plan.check_acyclic()?;
        Ok(plan)
    }

    /// Rejects dependency cycles, naming the loop (`a -> b -> a`).
    fn check_acyclic(&self) -> Result<(), String> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Visiting,
            Done,
        }
        fn visit(
            plan: &ProcessPlan,
            i: usize,
            marks: &mut [Mark],
            path: &mut Vec<usize>,
        ) -> Result<(), String> {
            match marks[i] {
                Mark::Done => return Ok(()),
                Mark::Visiting => {
                    let start = path.iter().position(|&p| p == i).unwrap_or(0);
                    let names: Vec<&str> = path[start..]
                        .iter()
                        .chain([&i])
                        .map(|&p| plan.processes[p].name.as_str())
                        .collect();
                    return Err(format!("dependency cycle: {}", names.join(" -> ")));
                }
                Mark::New => {}
            }
            marks[i] = Mark::Visiting;
            path.push(i);
            for &dep in &plan.processes[i].depends_on {
                visit(plan, dep, marks, path)?;
            }
            path.pop();
            marks[i] = Mark::Done;
            Ok(())
        }
        let mut marks = vec![Mark::New; self.processes.len()];
        (0..self.processes.len()).try_for_each(|i| visit(self, i, &mut marks, &mut Vec::new()))
    }
}

fn probe(name: &str, raw: &RawProbe) -> Result<Probe, String> {
    let mut checks = Vec::new();
    if let Some(tcp) = &raw.tcp {
        checks.push(Check::Tcp(match tcp {
            RawTcp::Port(port) => format!("127.0.0.1:{port}"),
            RawTcp::Address(addr) => addr.clone(),
        }));
    }
    if let Some(url) = &raw.http {
        checks.push(Check::Http(url.clone()));
    }
    if let Some(cmd) = raw.exec.as_ref().filter(|c| !c.is_empty()) {
        checks.push(Check::Exec(cmd.clone()));
    }
    let [check] = <[Check; 1]>::try_from(checks).map_err(|_| {
        format!(
            "process {name:?}: readiness needs exactly one of tcp: PORT, http: URL, exec: [cmd]"
        )
    })?;
    let mut probe = Probe::new(check);
    if let Some(period) = &raw.period {
        probe.period = duration(name, "readiness.period", period)?;
    }
    if let Some(timeout) = &raw.timeout {
        probe.timeout = duration(name, "readiness.timeout", timeout)?;
    }
    Ok(probe)
}

fn restart(p: &RawProcess) -> Result<RestartPolicy, String> {
    Ok(match p.restart {
        RawRestart::Never => RestartPolicy::Never,
        RawRestart::OnFailure => RestartPolicy::OnFailure {
            max_restarts: p.max_restarts.unwrap_or(5),
            backoff: match &p.restart_backoff {
                Some(raw) => duration(&p.name, "restartBackoff", raw)?,
                None => Duration::from_secs(1),
            },
        },
    })
}

fn duration(name: &str, field: &str, raw: &str) -> Result<Duration, String> {
    values::duration(raw)
        .map_err(|form| format!("process {name:?}: {field}={raw}: expected {form}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        ProcessPlan::parse(text).expect_err("should be rejected")
    }

    #[test]
    fn a_full_file_parses() {
        let plan = ProcessPlan::parse(
            r#"
app:
  dependsOn: [b]
processes:
  - name: a
    command: ["a", "--x"]
    env: { X: "1" }
    readiness: { tcp: 5432, period: 100ms, timeout: 2s }
  - name: b
    command: [b]
    dependsOn: [a]
    readiness: { exec: [true] }
    restart: on-failure
    maxRestarts: 2
    restartBackoff: 10ms
    required: false
"#,
        )
        .expect("valid");
        assert_eq!(plan.app_depends_on, vec![1]);
        let a = &plan.processes[0];
        assert_eq!(
            a.readiness.as_ref().map(|p| &p.check),
            Some(&Check::Tcp("127.0.0.1:5432".into()))
        );
        assert_eq!(
            a.readiness.as_ref().map(|p| p.period),
            Some(Duration::from_millis(100))
        );
        assert_eq!(a.env["X"], "1");
        assert!(a.required);
        let b = &plan.processes[1];
        assert_eq!(b.depends_on, vec![0]);
        assert_eq!(
            b.restart,
            RestartPolicy::OnFailure {
                max_restarts: 2,
                backoff: Duration::from_millis(10)
            }
        );
        assert!(!b.required);
    }

    #[test]
    fn the_app_waits_for_every_process_by_default() {
        let plan = ProcessPlan::parse(
            "processes:\n  - {name: a, command: [a]}\n  - {name: b, command: [b]}\n",
        )
        .expect("valid");
        assert_eq!(plan.app_depends_on, vec![0, 1]);
    }

    #[test]
    fn cycles_and_unknown_dependencies_are_named() {
        let cycle = "processes:\n  - {name: a, command: [a], dependsOn: [c]}\n  - {name: b, command: [b], dependsOn: [a]}\n  - {name: c, command: [c], dependsOn: [b]}\n";
        assert_eq!(err(cycle), "dependency cycle: a -> c -> b -> a");
        let unknown = "processes:\n  - {name: a, command: [a], dependsOn: [ghost]}\n";
        assert_eq!(err(unknown), "\"a\" depends on unknown process \"ghost\"");
        let app_unknown = "app: {dependsOn: [ghost]}\nprocesses: []\n";
        assert_eq!(
            err(app_unknown),
            "\"app\" depends on unknown process \"ghost\""
        );
        let self_loop = "processes:\n  - {name: a, command: [a], dependsOn: [a]}\n";
        assert_eq!(err(self_loop), "dependency cycle: a -> a");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(
            err("processes: [").starts_with("malformed YAML: "),
            "{}",
            err("processes: [")
        );
        assert!(
            err("processes:\n  - {name: a, command: [a], colour: red}\n")
                .starts_with("malformed YAML: ")
        );
        let quoted = err("files:\n  - {path: /a, value: hunter2, colour: red}\n");
        assert!(
            quoted.contains("unknown field `colour`") && !quoted.contains("hunter2"),
            "{quoted}"
        );
        assert_eq!(
            err("processes:\n  - {name: a, command: []}\n"),
            "process \"a\" has an empty command; expected command: [program, args...]"
        );
        assert_eq!(
            err("processes:\n  - {name: a, command: [a]}\n  - {name: a, command: [b]}\n"),
            "two processes are named \"a\""
        );
        assert_eq!(
            err("processes:\n  - {name: app, command: [a]}\n"),
            "process #1 needs a name other than \"app\" or empty"
        );
        assert_eq!(
            err(
                "processes:\n  - {name: a, command: [a], readiness: {tcp: 1, http: 'http://x/'}}\n"
            ),
            "process \"a\": readiness needs exactly one of tcp: PORT, http: URL, exec: [cmd]"
        );
        assert_eq!(
            err(
                "processes:\n  - {name: a, command: [a], restart: on-failure, restartBackoff: soon}\n"
            ),
            "process \"a\": restartBackoff=soon: expected a duration such as 8s, 500ms or 2m"
        );
    }
}
