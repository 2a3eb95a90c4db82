//! Log output: human-readable text, or one JSON object per line in Cloud Logging's structured
//! format (`severity`, `message`, `time`, then the event's fields).
//!
//! Logs go to stderr so the app keeps stdout to itself; Cloud Run collects both.

use std::fmt;

use serde_json::{Map, Value};
use std::sync::OnceLock;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// The handle that swaps the log filter at run time (the admin endpoint's `/logging`).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// A log filter the admin endpoint was asked for that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Not a `RUST_LOG` directive list.
    #[error(
        "level={0}: not a log filter; use debug, info, warn, error or a RUST_LOG directive list such as info,hbone=debug"
    )]
    Invalid(String),
    /// Logging was not initialised by [`init`] (a test harness).
    #[error("logging was not initialised; no filter to change")]
    NotInitialised,
}

/// Installs the global subscriber. `debug` (from `MESH_DEBUG`) lowers the default level;
/// `RUST_LOG` overrides both, for one-off investigations.
pub fn init(format: LogFormat, debug: bool) {
    let default_level = if debug { "debug" } else { "info" };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (tests) keeps the first subscriber; that is fine.
    let installed = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(CloudLoggingJson)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// The log filter in effect.
pub fn filter() -> Option<String> {
    FILTER
        .get()
        .and_then(|handle| handle.with_current(ToString::to_string).ok())
}

/// Replaces the log filter with `spec` (a `RUST_LOG` directive list); returns it as parsed.
pub fn set_filter(spec: &str) -> Result<String, FilterError> {
    let handle = FILTER.get().ok_or(FilterError::NotInitialised)?;
    let filter = EnvFilter::try_new(spec).map_err(|_| FilterError::Invalid(spec.to_owned()))?;
    let shown = filter.to_string();
    handle
        .reload(filter)
        .map_err(|_| FilterError::NotInitialised)?;
    Ok(shown)
}

/// Formats events as Cloud Logging structured JSON lines.
pub struct CloudLoggingJson;

impl<S, N> FormatEvent<S, N> for CloudLoggingJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writeln!(writer, "{}", json_line(event))
    }
}

fn json_line(event: &Event<'_>) -> Value {
    let mut fields = JsonFields(Map::new());
    event.record(&mut fields);
    let mut line = Map::new();
    line.insert("severity".into(), severity(event.metadata().level()).into());
    line.insert(
        "message".into(),
        fields.0.remove("message").unwrap_or_default(),
    );
    line.insert(
        "time".into(),
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
            .to_string()
            .into(),
    );
    line.insert("target".into(), event.metadata().target().into());
    line.extend(fields.0);
    Value::Object(line)
}

/// Cloud Logging severities (`WARN` is not one of them).
fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        _ => "DEBUG",
    }
}

struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
