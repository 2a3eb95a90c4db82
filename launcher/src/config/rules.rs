//! The launcher's two settings that are not one variable each: the `PORT_<name>` family and
//! the startup probe, which has three spellings. Each is still one entry of the table.

use std::collections::BTreeMap;

use mesh::config::table::Rule;
use mesh::config::{ConfigError, Inputs, Printer, Setting, Source};
use serde_json::Value;

use super::{DEFAULT_APP_PORT, PortTarget, StartupProbe};

/// The documented name of the `PORT_<name>` family.
const PORT_FAMILY: &str = "PORT_<name>";
/// Knative's spelling of an HTTP startup probe.
const STARTUP_PROBE_HTTP: &str = "startupProbe.http";
/// Knative's spelling of a TCP startup probe.
const STARTUP_PROBE_TCP: &str = "startupProbe.tcp";

/// `PORT_<name>=target` for any name, from any layer; `http` defaults to
/// [`DEFAULT_APP_PORT`]. The entry's name is the prefix.
pub(super) struct Ports;

impl Rule for Ports {
    type Value = BTreeMap<String, Setting<PortTarget>>;

    fn resolve(self, prefix: &'static str, inputs: &Inputs) -> Result<Self::Value, ConfigError> {
        let mut ports = BTreeMap::new();
        for (name, raw, source) in inputs.iter() {
            let Some(port_name) = name.strip_prefix(prefix) else {
                continue;
            };
            if port_name.is_empty() || raw.is_empty() {
                continue;
            }
            let target =
                PortTarget::parse(raw).map_err(|form| ConfigError::invalid(name, raw, form))?;
            ports.insert(port_name.to_owned(), Setting::new(target, source));
        }
        ports.entry("http".to_owned()).or_insert(Setting::new(
            PortTarget::Local(DEFAULT_APP_PORT),
            Source::Default,
        ));
        Ok(ports)
    }

    fn print(self, prefix: &'static str, ports: &Self::Value, out: &mut Printer) {
        for (name, port) in ports {
            out.setting(&format!("{prefix}{name}"), port);
        }
    }

    fn names(self, _: &'static str) -> Vec<&'static str> {
        vec![PORT_FAMILY]
    }
}

/// A startup probe parser, returning the accepted form on failure.
type ParseProbe = fn(&str) -> Result<StartupProbe, &'static str>;

/// The app's startup probe: `KRUN_STARTUP_PROBE` (the entry's name; an `http://` or `tcp://`
/// URL), else Knative's `startupProbe.http`, else `startupProbe.tcp`. The value remembers
/// which name it came from, and only that name prints a value.
pub(super) struct StartupProbes;

impl StartupProbes {
    fn all(name: &'static str) -> [&'static str; 3] {
        [name, STARTUP_PROBE_HTTP, STARTUP_PROBE_TCP]
    }
}

impl Rule for StartupProbes {
    type Value = Option<(&'static str, Setting<StartupProbe>)>;

    fn resolve(self, name: &'static str, inputs: &Inputs) -> Result<Self::Value, ConfigError> {
        let parsers: [ParseProbe; 3] = [
            StartupProbe::parse_url,
            StartupProbe::parse_http,
            StartupProbe::parse_tcp,
        ];
        for (name, parse) in Self::all(name).into_iter().zip(parsers) {
            if let Some(probe) = inputs.parsed(name, parse)? {
                return Ok(Some((name, probe)));
            }
        }
        Ok(None)
    }

    fn print(self, name: &'static str, probe: &Self::Value, out: &mut Printer) {
        for name in Self::all(name) {
            match probe {
                Some((from, probe)) if *from == name => out.setting(name, probe),
                _ => out.value(name, Value::Null, Source::Default),
            }
        }
    }

    fn names(self, name: &'static str) -> Vec<&'static str> {
        Self::all(name).to_vec()
    }
}
