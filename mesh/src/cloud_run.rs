//! Cloud Run's deterministic service URL, `https://{service}-{project_number}.{region}.run.app`,
//! shared by hgate's default route and krun's service discovery: the placeholders, filling them
//! in, and the instance's own region from the metadata server (no region table, no project
//! hash: both come from metadata).

use std::time::Duration;

use crate::metadata::{
    METADATA_DNS_NAME, MetadataClient, Platform, ProbeOptions, last_segment, paths, region_of_zone,
};

/// The service name placeholder.
pub const SERVICE: &str = "{service}";
/// The project number placeholder.
pub const PROJECT_NUMBER: &str = "{project_number}";
/// The region placeholder.
pub const REGION: &str = "{region}";
/// The project id placeholder.
pub const PROJECT: &str = "{project}";
/// Cloud Run's deterministic URL form.
pub const DETERMINISTIC_URL: &str = "https://{service}-{project_number}.{region}.run.app";

/// The values a URL template is filled with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlValues<'a> {
    /// `{service}`.
    pub service: &'a str,
    /// `{project_number}`.
    pub project_number: &'a str,
    /// `{region}`.
    pub region: &'a str,
    /// `{project}`.
    pub project: &'a str,
}

/// `template` with every placeholder replaced.
pub fn fill(template: &str, values: &UrlValues<'_>) -> String {
    template
        .replace(SERVICE, values.service)
        .replace(PROJECT_NUMBER, values.project_number)
        .replace(REGION, values.region)
        .replace(PROJECT, values.project)
}

/// The metadata server at `host`, when one answers the probe (racing HTTP with resolving
/// `metadata.google.internal` when `resolve_name`), else why not: the project number and
/// region the URL needs come from it.
pub async fn metadata_server(
    host: &str,
    resolve_name: bool,
    timeout: Duration,
) -> Result<MetadataClient, String> {
    let metadata = MetadataClient::new(host, timeout);
    let probe = ProbeOptions {
        timeout,
        dns_name: resolve_name.then(|| METADATA_DNS_NAME.to_owned()),
        wait_for_both: false,
    };
    if let Platform::NotGcp(why) = metadata.probe(&probe).await {
        return Err(format!("no metadata server at {host} ({why})"));
    }
    Ok(metadata)
}

/// A metadata value that must be there; the error says what the metadata server lacked.
pub async fn metadata_value(metadata: &MetadataClient, path: &str) -> Result<String, String> {
    match metadata.get(path).await {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(format!("the metadata server has no {path}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The instance's region: `instance/region` (Cloud Run), else the region of `instance/zone`
/// (GCE, GKE). The error says what the metadata server lacked.
pub async fn metadata_region(metadata: &MetadataClient) -> Result<String, String> {
    if let Ok(Some(region)) = metadata.get(paths::REGION).await {
        return Ok(last_segment(&region).to_owned());
    }
    let zone = metadata_value(metadata, paths::ZONE).await?;
    let zone = last_segment(&zone);
    region_of_zone(zone)
        .filter(|region| region.contains('-'))
        .map(str::to_owned)
        .ok_or_else(|| format!("metadata zone {zone} is not REGION-ZONE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled() {
        let values = UrlValues {
            service: "hello",
            project_number: "123",
            region: "us-east1",
            project: "p",
        };
        assert_eq!(
            fill(DETERMINISTIC_URL, &values),
            "https://hello-123.us-east1.run.app"
        );
        assert_eq!(
            fill("http://{project}.{service}:8443", &values),
            "http://p.hello:8443"
        );
    }
}
