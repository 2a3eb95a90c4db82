//! Parsers for the value forms used by krun's and hgate's settings: ports, durations, booleans, lists.
//!
//! Each parser returns the accepted form on failure so the caller can build one error line
//! that names the variable, the bad value and what would have been accepted.

use std::path::PathBuf;
use std::time::Duration;

/// The accepted form of a duration, quoted in error messages.
pub const DURATION_FORM: &str = "a duration such as 8s, 500ms or 2m";
/// The accepted form of a port, quoted in error messages.
pub const PORT_FORM: &str = "a port number from 0 to 65535";
/// The accepted form of a boolean, quoted in error messages.
pub const BOOL_FORM: &str = "true or false (also 1/0, yes/no, on/off)";

/// Parses `8s`, `500ms`, `2m`, `1h30m`. A bare number is refused: `8` could mean seconds or
/// milliseconds, and guessing wrong turns a drain budget into a hang.
pub fn duration(raw: &str) -> Result<Duration, &'static str> {
    let raw = raw.trim();
    if raw.is_empty() || raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DURATION_FORM);
    }
    humantime::parse_duration(raw).map_err(|_| DURATION_FORM)
}

/// Parses a TCP port number.
pub fn port(raw: &str) -> Result<u16, &'static str> {
    raw.trim().parse::<u16>().map_err(|_| PORT_FORM)
}

/// Parses a boolean the way operators write them in YAML and env files.
pub fn boolean(raw: &str) -> Result<bool, &'static str> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(BOOL_FORM),
    }
}

/// The accepted form of a count, quoted in error messages.
pub const POSITIVE_FORM: &str = "a positive number";

/// Parses a count that must be at least 1 (a cap of 0 would refuse everything).
pub fn positive<T: std::str::FromStr + PartialOrd + From<u8>>(
    raw: &str,
) -> Result<T, &'static str> {
    raw.trim()
        .parse::<T>()
        .ok()
        .filter(|n| *n >= T::from(1))
        .ok_or(POSITIVE_FORM)
}

/// Takes a path as given.
pub fn path(raw: &str) -> Result<PathBuf, &'static str> {
    Ok(PathBuf::from(raw))
}

/// A Google API base URL, without a trailing `/` (`http://` allowed: private endpoints and
/// tests' fakes).
pub fn base_url(raw: &str) -> Result<String, &'static str> {
    let url = raw.trim().trim_end_matches('/');
    (url.starts_with("https://") || url.starts_with("http://"))
        .then(|| url.to_owned())
        .ok_or("a base URL such as https://host or http://127.0.0.1:PORT")
}

/// A Google service account email, `NAME@PROJECT.iam.gserviceaccount.com`.
pub fn service_account_email(raw: &str) -> Result<String, &'static str> {
    let raw = raw.trim();
    raw.split_once('@')
        .is_some_and(|(name, domain)| !name.is_empty() && domain.contains('.'))
        .then(|| raw.to_owned())
        .ok_or("a service account email such as NAME@PROJECT.iam.gserviceaccount.com")
}

/// Splits a comma-separated list, dropping blanks (`"a, b,,"` is `["a", "b"]`).
pub fn list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(duration("8s"), Ok(Duration::from_secs(8)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("8"), Err(DURATION_FORM));
        assert_eq!(duration("abc"), Err(DURATION_FORM));
        assert_eq!(duration(""), Err(DURATION_FORM));
    }

    #[test]
    fn ports_and_booleans() {
        assert_eq!(port("15009"), Ok(15009));
        assert_eq!(port("65536"), Err(PORT_FORM));
        assert_eq!(port("http"), Err(PORT_FORM));
        assert_eq!(boolean("ON"), Ok(true));
        assert_eq!(boolean("0"), Ok(false));
        assert_eq!(boolean("maybe"), Err(BOOL_FORM));
        assert_eq!(list(" 1, 2,,3 "), vec!["1", "2", "3"]);
    }
}
