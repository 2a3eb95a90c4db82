//! The `files:` section of `KRUN_PROCESSES`: copies of mounted secrets and environment values
//! at the paths, with the owner and mode, the app expects, written before the app starts (what
//! a custom entrypoint script did on Cloud Run). Contents are never logged: only the path and
//! the kind of source.
//!
//! ```yaml
//! files:
//!   - path: /app/config/db-password   # where the app reads it
//!     from: /secrets/db/password      # or env: VAR, or value: "text"
//!     mode: "0400"                    # default 0400
//!     owner: "1000:1000"              # default: the app's user (K8S_UID), else krun's
//!     refresh: true                   # copy again when `from` changes
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::{Gid, Uid};
use serde::Deserialize;

use mesh::config::Env;
use mesh::files::{Access, write_atomic};

use super::RunAs;

/// How often a `refresh: true` source is read again. A wall-clock poll (not inotify): a Secret
/// volume changes by a symlink swap that a watch on the file itself misses, and a throttled
/// container simply catches up on its next tick.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(2);

/// Mode of a file that declares none: readable by its owner only.
const DEFAULT_MODE: u32 = 0o400;

/// One declared file.
#[derive(Clone, Debug, PartialEq)]
pub struct FileSpec {
    /// Where it is written.
    pub path: PathBuf,
    /// Where its content comes from.
    pub source: Source,
    /// Permission bits.
    pub mode: u32,
    /// Explicit owner; `None`: the app's user.
    pub owner: Option<(Uid, Gid)>,
    /// Copy again when the source file changes.
    pub refresh: bool,
}

/// Where a file's content comes from.
#[derive(Clone, PartialEq)]
pub enum Source {
    /// A file, typically a mounted secret.
    File(PathBuf),
    /// An environment variable of krun.
    Env(String),
    /// Literal text from the process file.
    Value(String),
}

impl std::fmt::Debug for Source {
    /// Never shows a literal value: the file may hold a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "File({})", path.display()),
            Source::Env(name) => write!(f, "Env({name})"),
            Source::Value(_) => f.write_str("Value(..)"),
        }
    }
}

impl Source {
    /// The kind of source, for logs.
    fn kind(&self) -> &'static str {
        match self {
            Source::File(_) => "file",
            Source::Env(_) => "env",
            Source::Value(_) => "value",
        }
    }

    /// The content, or why it cannot be had (naming the source and the fix).
    fn read(&self, env: &Env) -> Result<Vec<u8>, String> {
        match self {
            Source::File(from) => std::fs::read(from).map_err(|e| {
                format!(
                    "cannot read from: {}: {e}; mount the secret there or fix `from:`",
                    from.display()
                )
            }),
            Source::Env(name) => env
                .get(name)
                .map(|v| v.as_bytes().to_vec())
                .ok_or_else(|| format!("env: {name} is not set; set it or fix `env:`")),
            Source::Value(text) => Ok(text.as_bytes().to_vec()),
        }
    }
}

/// A `files:` entry as written in YAML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFileSpec {
    path: PathBuf,
    from: Option<PathBuf>,
    env: Option<String>,
    value: Option<String>,
    mode: Option<String>,
    owner: Option<String>,
    #[serde(default)]
    refresh: bool,
}

impl RawFileSpec {
    /// Validates entry `index` (from 1, for messages).
    pub(super) fn validate(&self, index: usize) -> Result<FileSpec, String> {
        let name = format!("files #{index} ({})", self.path.display());
        if !self.path.is_absolute() {
            return Err(format!("{name}: path must be absolute"));
        }
        let mut sources = Vec::new();
        if let Some(from) = &self.from {
            sources.push(Source::File(from.clone()));
        }
        if let Some(var) = &self.env {
            sources.push(Source::Env(var.clone()));
        }
        if let Some(text) = &self.value {
            sources.push(Source::Value(text.clone()));
        }
        let [source] = <[Source; 1]>::try_from(sources).map_err(|_| {
            format!("{name}: needs exactly one of from: FILE, env: VARIABLE, value: TEXT")
        })?;
        if self.refresh && !matches!(source, Source::File(_)) {
            return Err(format!(
                "{name}: refresh: true needs from: FILE (an environment value or a literal never changes)"
            ));
        }
        let mode = match &self.mode {
            Some(raw) => u32::from_str_radix(raw.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    format!("{name}: mode={raw}: expected an octal string such as \"0400\"")
                })?,
            None => DEFAULT_MODE,
        };
        let owner = self
            .owner
            .as_deref()
            .map(|raw| {
                owner(raw).ok_or_else(|| {
                    format!("{name}: owner={raw}: expected UID or UID:GID (numbers)")
                })
            })
            .transpose()?;
        Ok(FileSpec {
            path: self.path.clone(),
            source,
            mode,
            owner,
            refresh: self.refresh,
        })
    }
}

/// `uid` (gid = uid) or `uid:gid`.
fn owner(raw: &str) -> Option<(Uid, Gid)> {
    let (uid, gid) = raw.split_once(':').unwrap_or((raw, raw));
    Some((
        Uid::from_raw(uid.parse().ok()?),
        Gid::from_raw(gid.parse().ok()?),
    ))
}

/// Writes every declared file; the first that cannot be written is the error, naming it.
/// `run_as` is the app's user, the owner of files that declare none.
pub fn materialize(files: &[FileSpec], run_as: Option<&RunAs>, env: &Env) -> Result<(), String> {
    for file in files {
        let content = file
            .source
            .read(env)
            .map_err(|e| format!("files entry {}: {e}", file.path.display()))?;
        write(file, run_as, &content)?;
        tracing::info!(path = %file.path.display(), source = file.source.kind(), mode = format!("{:04o}", file.mode), "file written");
    }
    Ok(())
}

fn write(file: &FileSpec, run_as: Option<&RunAs>, content: &[u8]) -> Result<(), String> {
    let owner = file.owner.or(run_as.map(|r| (r.uid, r.gid)));
    let access = Access::Exact {
        mode: file.mode,
        owner,
    };
    write_atomic(&file.path, content, access)
        .map_err(|e| format!("files entry {}: {e}", file.path.display()))
}

/// Copies each `refresh: true` file again whenever its source's content changes, every
/// [`REFRESH_PERIOD`], for as long as krun runs. A source that disappears (a secret volume
/// being swapped) keeps the last copy.
pub fn keep_fresh(files: &[FileSpec], run_as: Option<RunAs>) {
    let watched: Vec<(FileSpec, PathBuf)> = files
        .iter()
        .filter(|f| f.refresh)
        .filter_map(|f| match &f.source {
            Source::File(from) => Some((f.clone(), from.clone())),
            _ => None,
        })
        .collect();
    if watched.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut last: Vec<Option<Vec<u8>>> = watched.iter().map(|(_, from)| read(from)).collect();
        let mut tick = tokio::time::interval(REFRESH_PERIOD);
        loop {
            tick.tick().await;
            for ((file, from), last) in watched.iter().zip(last.iter_mut()) {
                let Some(now) = read(from) else { continue };
                if last.as_ref() == Some(&now) {
                    continue;
                }
                match write(file, run_as.as_ref(), &now) {
                    Ok(()) => {
                        tracing::info!(path = %file.path.display(), from = %from.display(), "file refreshed")
                    }
                    Err(e) => tracing::warn!("{e}; keeping the previous copy"),
                }
                *last = Some(now);
            }
        }
    });
}

fn read(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(yaml: &str) -> Result<FileSpec, String> {
        let raw: RawFileSpec = serde_saphyr::from_str(yaml).expect("yaml");
        raw.validate(1)
    }

    #[test]
    fn an_entry_parses_with_defaults() {
        let file = entry("{path: /a/b, from: /s/x}").expect("valid");
        assert_eq!(file.mode, 0o400);
        assert_eq!(file.owner, None);
        assert_eq!(file.source, Source::File("/s/x".into()));
        let file = entry("{path: /a/b, env: X, mode: \"0640\", owner: \"5:6\"}").expect("valid");
        assert_eq!(file.mode, 0o640);
        assert_eq!(file.owner, Some((Uid::from_raw(5), Gid::from_raw(6))));
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        assert_eq!(
            entry("{path: /a, from: /x, env: Y}").expect_err("two sources"),
            "files #1 (/a): needs exactly one of from: FILE, env: VARIABLE, value: TEXT"
        );
        assert_eq!(
            entry("{path: /a, from: /x, mode: \"0999\"}").expect_err("bad mode"),
            "files #1 (/a): mode=0999: expected an octal string such as \"0400\""
        );
        assert_eq!(
            entry("{path: a, from: /x}").expect_err("relative"),
            "files #1 (a): path must be absolute"
        );
        assert!(
            entry("{path: /a, value: v, refresh: true}")
                .expect_err("refresh")
                .contains("refresh: true needs from: FILE")
        );
        assert!(format!("{:?}", Source::Value("hunter2".into())).contains(".."));
    }

    #[test]
    fn an_unset_variable_is_named_with_the_fix() {
        let env: Env = [("OTHER", "x")].into_iter().collect();
        assert_eq!(
            Source::Env("API_TOKEN".into()).read(&env),
            Err("env: API_TOKEN is not set; set it or fix `env:`".to_owned())
        );
    }
}
