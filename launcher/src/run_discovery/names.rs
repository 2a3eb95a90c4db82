//! Which names are Cloud Run services, and their URLs. An app writes `http://SVC`,
//! `http://SVC.REGION` or `http://SVC.REGION.<zone>`; each maps to the service's URL from
//! `KRUN_RUN_URL_TEMPLATE` (by default the deterministic `https://SVC-PROJECTNUMBER.REGION.run.app`).
//! A name of another shape, a label too long for the URL, or a trailing dot is an error that
//! says so, never a guess.
//!
//! A region is recognised by its shape (`us-east1`, `northamerica-northeast1`: words joined by
//! `-`, ending in a digit), not a table, so new regions work; no top-level domain has that
//! shape, so `SVC.REGION` never hides a real name.

use std::collections::BTreeSet;

use mesh::cloud_run::{UrlValues, fill};

/// The longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;

/// A Cloud Run service as the app named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunName {
    /// The service name (lower case).
    pub service: String,
    /// Its region; `None` means the instance's own.
    pub region: Option<String>,
}

/// A name that is in the run zone but names no service; the message says what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// `hello.` in a Host header.
    #[error("{0:?} ends with a dot; write the service as SVC, SVC.REGION or SVC.REGION.{1}")]
    TrailingDot(String, String),
    /// A label longer than 63 characters, or an empty one.
    #[error("{0:?} has an empty label or one longer than 63 characters")]
    BadLabel(String),
    /// Not `SVC`, `SVC.REGION` nor `SVC.REGION.<zone>`.
    #[error("{0:?} is not SVC, SVC.REGION or SVC.REGION.{1} (REGION such as us-east1)")]
    UnknownForm(String, String),
    /// A service name with characters Cloud Run does not allow.
    #[error(
        "{0:?} is not a Cloud Run service name (lower-case letters, digits and -, starting with a letter)"
    )]
    BadService(String),
    /// `KRUN_RUN_SERVICES` is set and does not list it.
    #[error("{0:?} is not in KRUN_RUN_SERVICES; add it there, or unset KRUN_RUN_SERVICES")]
    NotListed(String),
    /// The filled URL's host has a label longer than 63 characters.
    #[error(
        "the URL of service {0:?} would have a host label longer than 63 characters ({1}); Cloud Run has no deterministic URL for it: shorten the service name or set KRUN_RUN_URL_TEMPLATE"
    )]
    UrlTooLong(String, String),
}

/// The run zone: its domain, which bare names are services, and the URL form.
#[derive(Clone, Debug)]
pub struct RunZone {
    domain: String,
    services: Option<BTreeSet<String>>,
    template: String,
    project_number: String,
    project: String,
    region: String,
}

/// What the zone needs to know to name services and build their URLs.
#[derive(Clone, Debug)]
pub struct ZoneInputs {
    /// `KRUN_RUN_DOMAIN`, e.g. `run.internal`.
    pub domain: String,
    /// `KRUN_RUN_SERVICES`; empty means every single-label name.
    pub services: Vec<String>,
    /// `KRUN_RUN_URL_TEMPLATE`.
    pub template: String,
    /// The project number (metadata).
    pub project_number: String,
    /// The project id (metadata).
    pub project: String,
    /// The instance's own region (metadata).
    pub region: String,
}

impl RunZone {
    /// The zone from its settings and the metadata values.
    pub fn new(inputs: ZoneInputs) -> RunZone {
        let services = (!inputs.services.is_empty()).then(|| {
            inputs
                .services
                .iter()
                .map(|s| s.trim().to_ascii_lowercase())
                .collect()
        });
        RunZone {
            domain: inputs
                .domain
                .trim()
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            services,
            template: inputs.template,
            project_number: inputs.project_number,
            project: inputs.project,
            region: inputs.region,
        }
    }

    /// The zone's domain, without a trailing dot.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// A fully qualified DNS query name: `None` when it is not ours (forward it), else the
    /// service or why the name is refused (answer NXDOMAIN).
    pub fn dns_name(&self, fqdn: &str) -> Option<Result<RunName, NameError>> {
        let name = fqdn.strip_suffix('.').unwrap_or(fqdn).to_ascii_lowercase();
        let labels: Vec<&str> = name.split('.').collect();
        let in_zone = self.zone_prefix(&name).is_some();
        // Outside the zone only SVC.REGION. is ours: no top-level domain looks like a region.
        let bare_region = labels.len() == 2 && is_region(labels[1]);
        (in_zone || bare_region).then(|| self.parse(&name))
    }

    /// An HTTP Host (port already removed): the service it names, or why not.
    pub fn host(&self, host: &str) -> Result<RunName, NameError> {
        if host.ends_with('.') {
            return Err(NameError::TrailingDot(host.to_owned(), self.domain.clone()));
        }
        self.parse(&host.to_ascii_lowercase())
    }

    /// The service's base URL (`https://host[:port]`, no path): where requests go and the
    /// ID token's audience.
    pub fn url(&self, name: &RunName) -> Result<String, NameError> {
        let region = name.region.as_deref().unwrap_or(&self.region);
        let url = fill(
            &self.template,
            &UrlValues {
                service: &name.service,
                project_number: &self.project_number,
                region,
                project: &self.project,
            },
        );
        let host = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        let host = host.split(['/', ':']).next().unwrap_or(host);
        if host.split('.').any(|label| label.len() > MAX_LABEL) {
            return Err(NameError::UrlTooLong(name.service.clone(), host.to_owned()));
        }
        Ok(url.trim_end_matches('/').to_owned())
    }

    /// `name` without `.<zone>`, when it is in the zone (or is the zone).
    fn zone_prefix<'a>(&self, name: &'a str) -> Option<&'a str> {
        if name == self.domain {
            return Some("");
        }
        name.strip_suffix(&self.domain)?.strip_suffix('.')
    }

    /// `SVC`, `SVC.REGION`, `SVC.<zone>` or `SVC.REGION.<zone>` (lower case, no trailing dot).
    fn parse(&self, name: &str) -> Result<RunName, NameError> {
        let unknown = || NameError::UnknownForm(name.to_owned(), self.domain.clone());
        let relative = self.zone_prefix(name).unwrap_or(name);
        let labels: Vec<&str> = relative.split('.').collect();
        if labels.iter().any(|l| l.is_empty() || l.len() > MAX_LABEL) {
            return Err(if relative.is_empty() {
                unknown()
            } else {
                NameError::BadLabel(name.to_owned())
            });
        }
        let (service, region) = match labels.as_slice() {
            [service] => (*service, None),
            [service, region] if is_region(region) => (*service, Some((*region).to_owned())),
            _ => return Err(unknown()),
        };
        if !is_service(service) {
            return Err(NameError::BadService(service.to_owned()));
        }
        if let Some(listed) = &self.services
            && !listed.contains(service)
        {
            return Err(NameError::NotListed(service.to_owned()));
        }
        Ok(RunName {
            service: service.to_owned(),
            region,
        })
    }
}

/// Cloud Run service names: lower-case letters, digits and `-`, starting with a letter, not
/// ending with `-`.
fn is_service(label: &str) -> bool {
    label.starts_with(|c: char| c.is_ascii_lowercase())
        && !label.ends_with('-')
        && label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A GCP region's shape: words of lower-case letters joined by single `-`, the last one
/// ending in digits (`us-east1`, `europe-west10`, `northamerica-northeast1`).
fn is_region(label: &str) -> bool {
    let words: Vec<&str> = label.split('-').collect();
    let Some((last, first)) = words.split_last() else {
        return false;
    };
    let letters = |w: &&str| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase());
    let word = last.trim_end_matches(|c: char| c.is_ascii_digit());
    !first.is_empty() && first.iter().all(letters) && letters(&word) && word.len() < last.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(services: &[&str]) -> RunZone {
        RunZone::new(ZoneInputs {
            domain: "run.internal".into(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            template: mesh::cloud_run::DETERMINISTIC_URL.into(),
            project_number: "123456789".into(),
            project: "proj".into(),
            region: "us-central1".into(),
        })
    }

    fn name(service: &str, region: Option<&str>) -> RunName {
        RunName {
            service: service.into(),
            region: region.map(str::to_owned),
        }
    }

    #[test]
    fn the_three_forms_name_a_service() {
        let z = zone(&[]);
        assert_eq!(z.host("hello"), Ok(name("hello", None)));
        assert_eq!(
            z.host("Hello.US-East1"),
            Ok(name("hello", Some("us-east1")))
        );
        assert_eq!(
            z.host("hello.us-east1.run.internal"),
            Ok(name("hello", Some("us-east1")))
        );
        assert_eq!(z.host("hello.run.internal"), Ok(name("hello", None)));
    }

    #[test]
    fn urls_are_deterministic_and_need_no_table() {
        let z = zone(&[]);
        assert_eq!(
            z.url(&name("hello", None)).as_deref(),
            Ok("https://hello-123456789.us-central1.run.app")
        );
        assert_eq!(
            z.url(&name("hello", Some("northamerica-northeast2")))
                .as_deref(),
            Ok("https://hello-123456789.northamerica-northeast2.run.app")
        );
        let long = "a".repeat(60);
        assert!(matches!(
            z.url(&name(&long, None)),
            Err(NameError::UrlTooLong(..))
        ));
    }

    #[test]
    fn odd_names_are_errors_not_guesses() {
        let z = zone(&[]);
        assert!(matches!(z.host("hello."), Err(NameError::TrailingDot(..))));
        assert!(matches!(
            z.host("a.b.c.run.internal"),
            Err(NameError::UnknownForm(..))
        ));
        assert!(matches!(
            z.host("hello.notaregion"),
            Err(NameError::UnknownForm(..))
        ));
        assert!(matches!(
            z.host(&"x".repeat(64)),
            Err(NameError::BadLabel(_))
        ));
        assert!(matches!(z.host("1hello"), Err(NameError::BadService(_))));
        assert!(matches!(
            z.host("run.internal"),
            Err(NameError::UnknownForm(..))
        ));
    }

    #[test]
    fn an_explicit_list_limits_the_bare_names() {
        let z = zone(&["hello"]);
        assert!(z.host("hello").is_ok());
        assert!(matches!(z.host("other"), Err(NameError::NotListed(_))));
    }

    #[test]
    fn dns_answers_the_zone_and_svc_region_only() {
        let z = zone(&[]);
        assert_eq!(
            z.dns_name("hello.run.internal."),
            Some(Ok(name("hello", None)))
        );
        assert_eq!(
            z.dns_name("hello.us-east1."),
            Some(Ok(name("hello", Some("us-east1"))))
        );
        assert!(matches!(
            z.dns_name("a.b.c.run.internal."),
            Some(Err(NameError::UnknownForm(..)))
        ));
        assert_eq!(z.dns_name("www.example.com."), None);
        assert_eq!(z.dns_name("example.com."), None);
        // IDN top-level domains (xn--...) are not region-shaped.
        assert_eq!(z.dns_name("site.xn--p1ai."), None);
        assert_eq!(z.dns_name("hello."), None);
    }

    #[test]
    fn regions_are_recognised_by_shape() {
        for region in [
            "us-east1",
            "europe-west10",
            "northamerica-northeast1",
            "me-central2",
        ] {
            assert!(is_region(region), "{region}");
        }
        for other in [
            "com",
            "us-east",
            "east1",
            "xn--p1ai",
            "us--east1",
            "-east1",
            "us-1",
        ] {
            assert!(!is_region(other), "{other}");
        }
    }
}
