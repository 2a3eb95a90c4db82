//! Declarative settings tables: each setting is declared once, with its doc line, field,
//! type, variable name and [`Rule`], and [`settings!`](crate::settings) derives the rest.
//!
//! From one table entry such as
//!
//! ```text
//! /// Drain budget after SIGTERM.
//! drain_timeout: Setting<Duration> = KRUN_DRAIN_TIMEOUT => parse(values::duration).or_default(DEFAULT_DRAIN_TIMEOUT),
//! ```
//!
//! the macro derives the struct field, the name constant, resolution (environment first,
//! then each layer in order), the `--print-config` entry and the list of names the table
//! reads (for unknown-variable warnings and the docs check). Adding a setting is adding an
//! entry; nothing else names it.
//!
//! Most settings need only [`parse`] with [`Parsed::or_derive`], [`Parsed::or_default`] or
//! [`Parsed::or_compute`]; a family of variables (`PORT_<name>`) or a setting read from
//! several names implements [`Rule`] itself and is still one entry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::{ConfigError, Inputs, LogFormat, Printer, Setting, Source};

/// How one table entry is resolved, printed and named. Rules are built afresh each time the
/// table uses them, so methods take `self`.
pub trait Rule {
    /// The field type (`Setting<T>`, `Option<Setting<T>>`, or a family's own type).
    type Value;

    /// The value from `inputs`, read under `name` (the entry's variable).
    fn resolve(self, name: &'static str, inputs: &Inputs) -> Result<Self::Value, ConfigError>;

    /// Adds the `--print-config` entries of `value`.
    fn print(self, name: &'static str, value: &Self::Value, out: &mut Printer);

    /// Every name the entry reads, as documented; most read just `name`.
    fn names(self, name: &'static str) -> Vec<&'static str>
    where
        Self: Sized,
    {
        vec![name]
    }
}

/// Pins a rule's value to the field type, so closures in a table entry infer their types from
/// the field. Used by [`settings!`](crate::settings); not needed by hand.
pub fn rule<V, R: Rule<Value = V>>(rule: R) -> R {
    rule
}

/// How a value shows in `--print-config`: JSON, durations in humantime form (`8s`).
pub trait Show {
    /// The JSON shown (before redaction).
    fn show(&self) -> Value;
}

/// `Show` through serde for types whose serde form is what operators should read.
macro_rules! show_by_serde {
    ($($ty:ty),*) => {
        $(impl Show for $ty {
            fn show(&self) -> Value {
                json!(self)
            }
        })*
    };
}

show_by_serde!(String, bool, u16, u32, usize, SocketAddr, LogFormat);

impl Show for PathBuf {
    fn show(&self) -> Value {
        json!(self.to_string_lossy())
    }
}

impl Show for Duration {
    fn show(&self) -> Value {
        json!(humantime::format_duration(*self).to_string())
    }
}

impl<T: Show> Show for Vec<T> {
    fn show(&self) -> Value {
        Value::Array(self.iter().map(Show::show).collect())
    }
}

/// The value of a variable parsed by `parse`, which returns the accepted form on failure.
/// Unset means `None` unless a fallback is added.
pub fn parse<T, P: Fn(&str) -> Result<T, &'static str>>(parse: P) -> Parsed<T, P> {
    Parsed {
        parse,
        derive: None,
    }
}

/// A text setting taken as given.
pub fn text() -> Parsed<String, impl Fn(&str) -> Result<String, &'static str>> {
    parse(|raw| Ok(raw.to_owned()))
}

/// The rule of [`parse`]: an optional setting, perhaps derived from other inputs when unset.
pub struct Parsed<T, P> {
    parse: P,
    derive: Option<fn(&Inputs) -> Option<T>>,
}

impl<T, P> Parsed<T, P> {
    /// When unset, `derive` may compute it from other inputs (source `derived`).
    pub fn or_derive(self, derive: fn(&Inputs) -> Option<T>) -> Self {
        Parsed {
            derive: Some(derive),
            ..self
        }
    }

    /// When unset and not derived, `value` (source `default`); the setting is then always set.
    pub fn or_default(self, value: T) -> Defaulted<T, P> {
        Defaulted {
            parsed: self,
            last: Fallback::Default(value),
        }
    }

    /// When unset, always computed from the inputs (source `derived`).
    pub fn or_compute(self, compute: fn(&Inputs) -> T) -> Defaulted<T, P> {
        Defaulted {
            parsed: self,
            last: Fallback::Derived(compute),
        }
    }
}

impl<T: Show, P: Fn(&str) -> Result<T, &'static str>> Rule for Parsed<T, P> {
    type Value = Option<Setting<T>>;

    fn resolve(self, name: &'static str, inputs: &Inputs) -> Result<Self::Value, ConfigError> {
        Ok(inputs.parsed(name, self.parse)?.or_else(|| {
            let derived = (self.derive?)(inputs)?;
            Some(Setting::new(derived, Source::Derived))
        }))
    }

    fn print(self, name: &'static str, value: &Self::Value, out: &mut Printer) {
        out.optional(name, value);
    }
}

/// The rule of a setting that is always set: [`Parsed::or_default`] or [`Parsed::or_compute`].
pub struct Defaulted<T, P> {
    parsed: Parsed<T, P>,
    last: Fallback<T>,
}

/// The last resort of a [`Defaulted`] setting.
enum Fallback<T> {
    Default(T),
    Derived(fn(&Inputs) -> T),
}

impl<T: Show, P: Fn(&str) -> Result<T, &'static str>> Rule for Defaulted<T, P> {
    type Value = Setting<T>;

    fn resolve(self, name: &'static str, inputs: &Inputs) -> Result<Self::Value, ConfigError> {
        Ok(match self.parsed.resolve(name, inputs)? {
            Some(setting) => setting,
            None => match self.last {
                Fallback::Default(value) => Setting::new(value, Source::Default),
                Fallback::Derived(compute) => Setting::new(compute(inputs), Source::Derived),
            },
        })
    }

    fn print(self, name: &'static str, value: &Self::Value, out: &mut Printer) {
        out.setting(name, value);
    }
}

/// Declares a settings table: a struct whose every field is one setting, a module of name
/// constants, and `resolve`, `print` and `names` derived from the entries.
///
/// Each entry is `/// doc`, `field: Type = NAME => rule`. `NAME` is the variable and becomes
/// a constant in the names module; `NAME("literal")` gives the constant another value (the
/// `PORT_` prefix). `Type` must be the rule's [`Rule::Value`].
///
/// ```ignore
/// mesh::settings! {
///     /// Everything the tool reads.
///     #[derive(Clone, Debug)]
///     pub struct ToolConfig {
///         /// How long to wait.
///         timeout: Setting<Duration> = TOOL_TIMEOUT => parse(values::duration).or_default(Duration::from_secs(5)),
///     }
///     /// Env var names.
///     pub mod names;
/// }
/// ```
#[macro_export]
macro_rules! settings {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $var:ident $(($literal:literal))? => $rule:expr
            ),* $(,)?
        }
        $(#[$names_meta:meta])*
        $names_vis:vis mod $names:ident;
    ) => {
        $(#[$names_meta])*
        $names_vis mod $names {
            $(
                #[allow(missing_docs)]
                pub const $var: &str = $crate::settings!(@name $var $($literal)?);
            )*
        }

        $(#[$meta])*
        $vis struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl $name {
            /// Resolves every setting: the environment first, then each layer in order.
            pub fn resolve(
                inputs: &$crate::config::Inputs,
            ) -> ::std::result::Result<Self, $crate::config::ConfigError> {
                use $crate::config::table::Rule as _;
                Ok($name {
                    $( $field: $crate::config::table::rule::<$ty, _>($rule)
                        .resolve($names::$var, inputs)?, )*
                })
            }

            /// Adds every setting to `--print-config`.
            pub fn print(&self, out: &mut $crate::config::Printer) {
                use $crate::config::table::Rule as _;
                $( $crate::config::table::rule::<$ty, _>($rule)
                    .print($names::$var, &self.$field, out); )*
            }

            /// Every variable the table reads, for unknown-variable warnings and the docs check.
            pub fn names() -> ::std::vec::Vec<&'static str> {
                use $crate::config::table::Rule as _;
                let mut names = ::std::vec::Vec::new();
                $( names.extend($crate::config::table::rule::<$ty, _>($rule)
                    .names($names::$var)); )*
                names
            }
        }
    };
    (@name $var:ident) => { stringify!($var) };
    (@name $var:ident $literal:literal) => { $literal };
}
