//! Configuration primitives shared by krun and hgate: every setting in one typed place, each
//! value remembering where it came from.
//!
//! Parsing is a pure function of an environment map ([`Inputs::new`]), so tests pass a
//! `HashMap` instead of mutating the process environment. Later layers (mesh-env, metadata,
//! discovery) fill in values that the environment left unset; the environment always wins.
//! Settings are declared once, in tables ([`settings!`](crate::settings), see [`table`]):
//! [`MeshConfig`] here, the launcher's and hgate's in their crates.

mod mesh_config;
mod redact;
pub mod table;
pub mod values;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{Value, json};

use table::Show;

pub use mesh_config::*;
pub use redact::{REDACTED, is_secret, redact};

/// Where a value came from, shown by `--print-config` so an operator can tell why krun did
/// what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The process environment.
    Env,
    /// The `istio-system/mesh-env` ConfigMap (or a `MESH=file://` map).
    MeshEnv,
    /// The GCE/Cloud Run metadata server.
    Metadata,
    /// A GCP or Kubernetes API lookup (cluster, project labels).
    Discovered,
    /// Computed from other settings.
    Derived,
    /// Built-in default.
    Default,
}

impl std::fmt::Display for Source {
    /// The name `--print-config` uses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Env => "env",
            Source::MeshEnv => "mesh-env",
            Source::Metadata => "metadata",
            Source::Discovered => "discovered",
            Source::Derived => "derived",
            Source::Default => "default",
        })
    }
}

/// A value and its source.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting<T> {
    /// The effective value.
    pub value: T,
    /// Where it came from.
    pub source: Source,
}

impl<T> Setting<T> {
    /// A value with its source.
    pub fn new(value: T, source: Source) -> Self {
        Setting { value, source }
    }
}

/// A bad setting: the one-line message names the variable, the value and the accepted form.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse.
    #[error("{name}={value}: expected {expected}")]
    Invalid {
        /// The variable.
        name: String,
        /// The value as given (redacted when secret).
        value: String,
        /// The accepted form.
        expected: String,
    },
}

impl ConfigError {
    /// The error for `name=value` (redacted when secret) not being of the `expected` form.
    pub fn invalid(name: &str, value: &str, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            name: name.to_owned(),
            value: redact(value).to_owned(),
            expected: expected.into(),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line with Cloud Logging's `severity` field.
    Json,
    /// Human-readable lines.
    Text,
}

/// The environment krun reads. Empty values count as unset, as in cloud-run-mesh, so
/// `FOO=` in a deployment means "not set" rather than "set to nothing".
#[derive(Clone, Debug, Default)]
pub struct Env(HashMap<String, String>);

impl Env {
    /// Captures the process environment; variables that are not UTF-8 are skipped.
    pub fn from_process() -> Self {
        Env(std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect())
    }

    /// The value of `name`, or `None` when unset or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Variables starting with `prefix` that are not `known`, sorted: probably typos such as
    /// `KRUN_DRAIN_TIMOUT`, worth a warning once logging is up.
    pub fn unknown(&self, prefix: &str, known: &[&str]) -> Vec<String> {
        let mut unknown: Vec<String> = self
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with(prefix) && !known.contains(k))
            .map(str::to_owned)
            .collect();
        unknown.sort();
        unknown
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Env {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Env(iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect())
    }
}

/// Values of lower precedence than the environment (mesh-env, metadata, discovery), each with
/// its own source. Empty values count as unset, as in the environment.
#[derive(Clone, Default, PartialEq)]
pub struct Layer(BTreeMap<String, Setting<String>>);

impl Layer {
    /// A layer whose values all come from `source` (e.g. the mesh-env map).
    pub fn from_map<'a>(
        source: Source,
        map: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        Layer(
            map.into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.clone(), Setting::new(v.clone(), source)))
                .collect(),
        )
    }

    /// Sets `name` unless this layer already has it: the first value set wins, so callers
    /// write a precedence chain in order.
    pub fn set_if_unset(&mut self, name: &str, value: impl Into<String>, source: Source) {
        let value = value.into();
        if !value.is_empty() {
            self.0
                .entry(name.to_owned())
                .or_insert(Setting::new(value, source));
        }
    }

    /// The value of `name` in this layer.
    pub fn get(&self, name: &str) -> Option<&Setting<String>> {
        self.0.get(name)
    }
}

/// Names only: layer values may be secrets (mesh-env carries CA roots, debug flags).
impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What settings tables are resolved from: the environment first, then each layer in order.
#[derive(Clone, Default)]
pub struct Inputs {
    env: Env,
    layers: Vec<Layer>,
}

/// Names only, so a debug print of the config never dumps the environment.
impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("env", &self.env.0.keys().collect::<Vec<_>>())
            .field("layers", &self.layers)
            .finish()
    }
}

impl Inputs {
    /// The environment alone, before any layer.
    pub fn new(env: &Env) -> Self {
        Inputs {
            env: env.clone(),
            layers: Vec::new(),
        }
    }

    /// Adds `layer` below the environment and the layers pushed before it.
    pub fn push(&mut self, layer: Layer) {
        self.layers.push(layer);
    }

    /// The environment alone, for derivations that must not see layers (a Cloud Run marker
    /// in mesh-env does not make this a Cloud Run container).
    pub fn env(&self) -> &Env {
        &self.env
    }

    /// The winning raw value of `name` and its source.
    pub fn lookup(&self, name: &str) -> Option<(&str, Source)> {
        self.env.get(name).map(|v| (v, Source::Env)).or_else(|| {
            self.layers
                .iter()
                .find_map(|l| l.get(name).map(|s| (s.value.as_str(), s.source)))
        })
    }

    /// Every name set anywhere, with the value and source that win (for variable families
    /// such as `PORT_<name>`).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, Source)> {
        let mut names: Vec<&str> = self.env.iter().map(|(k, _)| k).collect();
        for layer in &self.layers {
            names.extend(layer.0.keys().map(String::as_str));
        }
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .filter_map(|name| self.lookup(name).map(|(v, source)| (name, v, source)))
    }

    /// The winning value of `name` as text.
    pub fn string(&self, name: &str) -> Option<Setting<String>> {
        self.lookup(name)
            .map(|(v, source)| Setting::new(v.to_owned(), source))
    }

    /// The winning value of `name` parsed by `parse`; a bad value is a [`ConfigError`] naming
    /// the variable, the value and the form `parse` returns.
    pub fn parsed<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, &'static str>,
    ) -> Result<Option<Setting<T>>, ConfigError> {
        self.lookup(name)
            .map(|(raw, source)| {
                parse(raw)
                    .map(|v| Setting::new(v, source))
                    .map_err(|form| ConfigError::invalid(name, raw, form))
            })
            .transpose()
    }
}

/// A configuration resolved from [`Inputs`] that takes one more layer and resolves again;
/// discovery merges what it found through it without knowing the launcher's settings.
pub trait Merge {
    /// Adds `layer` below everything merged so far and resolves again.
    fn merge(&mut self, layer: Layer) -> Result<(), ConfigError>;
}

/// Collects `--print-config` entries, redacting secrets in every string it is given; hgate
/// prints its settings with it too, so both binaries show the same shape.
#[derive(Default)]
pub struct Printer(BTreeMap<String, Value>);

impl Printer {
    /// The entries, keyed by variable name.
    pub fn finish(self) -> BTreeMap<String, Value> {
        self.0
    }

    /// Adds `name` with a JSON value.
    pub fn value(&mut self, name: &str, value: Value, source: Source) {
        let value = redact_json(value);
        self.0
            .insert(name.to_owned(), json!({ "value": value, "source": source }));
    }

    /// Adds a setting.
    pub fn setting<T: Show>(&mut self, name: &str, setting: &Setting<T>) {
        self.value(name, setting.value.show(), setting.source);
    }

    /// Adds an optional setting (`null` when unset).
    pub fn optional<T: Show>(&mut self, name: &str, setting: &Option<Setting<T>>) {
        match setting {
            Some(s) => self.setting(name, s),
            None => self.value(name, Value::Null, Source::Default),
        }
    }
}

/// Writes `value` as pretty JSON to stdout (`--print-config` of both binaries). A reader that
/// stops early (`| head`) closes the pipe: that is the reader's choice, not an error, so the
/// output ends quietly where `println!` would panic.
pub fn print_json(value: &impl Serialize) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer_pretty(&mut out, value)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn redact_json(value: Value) -> Value {
    match value {
        Value::String(s) if is_secret(&s) => json!(REDACTED),
        Value::Array(items) => Value::Array(items.into_iter().map(redact_json).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests;
