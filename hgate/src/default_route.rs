//! The default route is Cloud Run's deterministic service URL,
//! `https://{service}-{project_number}.{region}.run.app`: every Cloud Run service answers on
//! it, so a mesh service reaches Cloud Run with no per-service route. The project number and
//! region come from settings or, when unset, from the metadata server (hgate's own project
//! and region), once at start; `--print-config` shows what was resolved and from where.

use std::time::Duration;

use mesh::cloud_run::{metadata_region, metadata_server, metadata_value};
use mesh::config::{Setting, Source};
use mesh::metadata::paths;

use crate::config::HgateConfig;

pub use mesh::cloud_run::{PROJECT_NUMBER, REGION};

/// Budget of each metadata request made while resolving.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// Fills `{project_number}` and `{region}` of `HGATE_ROUTE_TEMPLATE` from
/// `HGATE_CLOUD_RUN_PROJECT_NUMBER` / `HGATE_CLOUD_RUN_REGION`, asking the metadata server for
/// those unset (recorded in `config` with source `metadata`); with `HGATE_REGISTER_LABEL` set,
/// registration needs both, so they are resolved even when the template names neither. The filled template replaces the
/// setting with source `derived`. An error says what is missing and how to set it; the
/// template then keeps its placeholders and [`crate::route`] refuses it per connection.
pub async fn resolve(config: &mut HgateConfig) -> Result<(), String> {
    let template = config.route_template.value.clone();
    // Registration lists the services of this project, in this region unless told others.
    let registering = config.register_label.is_some();
    let need_number = (template.contains(PROJECT_NUMBER) || registering)
        && config.cloud_run_project_number.is_none();
    let need_region = (template.contains(REGION)
        || (registering && config.register_regions.is_none()))
        && config.cloud_run_region.is_none();
    if need_number || need_region {
        let host = config.metadata_host.value.clone();
        let metadata = metadata_server(
            &host,
            host == crate::config::DEFAULT_METADATA_HOST,
            METADATA_TIMEOUT,
        )
        .await
        .map_err(|why| unresolved(&why))?;
        if need_number {
            let number = metadata_value(&metadata, paths::NUMERIC_PROJECT_ID)
                .await
                .map_err(|why| unresolved(&why))?;
            config.cloud_run_project_number = Some(Setting::new(number, Source::Metadata));
        }
        if need_region {
            let region = metadata_region(&metadata)
                .await
                .map_err(|why| unresolved(&why))?;
            config.cloud_run_region = Some(Setting::new(region, Source::Metadata));
        }
    }
    let mut filled = template.clone();
    if let Some(number) = &config.cloud_run_project_number {
        filled = filled.replace(PROJECT_NUMBER, &number.value);
    }
    if let Some(region) = &config.cloud_run_region {
        filled = filled.replace(REGION, &region.value);
    }
    if filled != template {
        config.route_template = Setting::new(filled, Source::Derived);
    }
    Ok(())
}

fn unresolved(why: &str) -> String {
    format!(
        "HGATE_ROUTE_TEMPLATE (and HGATE_REGISTER_LABEL, when set) need {PROJECT_NUMBER} and {REGION}: {why}; set HGATE_CLOUD_RUN_PROJECT_NUMBER and HGATE_CLOUD_RUN_REGION, or a HGATE_ROUTE_TEMPLATE without them"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn explicit_values_fill_the_template_without_a_metadata_server() {
        let env = mesh::config::Env::from_iter([
            ("HGATE_CLOUD_RUN_PROJECT_NUMBER".to_owned(), "42".to_owned()),
            ("HGATE_CLOUD_RUN_REGION".to_owned(), "asia-east1".to_owned()),
            // Nothing listens here: a metadata request would fail the test.
            ("GCE_METADATA_HOST".to_owned(), "127.0.0.1:1".to_owned()),
        ]);
        let mut config = HgateConfig::from_env(&env).expect("config");
        resolve(&mut config).await.expect("resolved");
        assert_eq!(
            config.route_template.value,
            "https://{service}-42.asia-east1.run.app/_hbone/15003"
        );
        assert_eq!(config.route_template.source, Source::Derived);
    }

    #[tokio::test]
    async fn without_a_metadata_server_the_error_names_the_settings() {
        let env = mesh::config::Env::from_iter([(
            "GCE_METADATA_HOST".to_owned(),
            "127.0.0.1:1".to_owned(),
        )]);
        let mut config = HgateConfig::from_env(&env).expect("config");
        let e = resolve(&mut config).await.expect_err("unresolved");
        assert!(e.contains("HGATE_CLOUD_RUN_REGION"), "{e}");
        assert!(config.route_template.value.contains(REGION));
    }
}
