//! The `MESH` locator: which mesh this workload joins and how to find it ([`MESH_FORMS`],
//! docs/configuration.md). Parsing is strict: a malformed value stops krun with a message
//! that shows the accepted forms. cloud-run-mesh logged a malformed value, silently ignored
//! forms it did not implement (and the path of `gke://`), and fell back to `PROJECT_ID`.

use std::path::PathBuf;

/// The accepted forms, quoted in every error.
pub const MESH_FORMS: &str = "gke://PROJECT[/LOCATION[/CLUSTER]], //container.googleapis.com/projects/P/locations/L/clusters/C (optionally with https: and /v1), td:..., or file:///path/mesh-env.yaml";

/// A parsed `MESH` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshUrl {
    /// A GKE cluster (or a project to pick one from).
    Gke(GkeTarget),
    /// Traffic Director; the text after `td:` is kept for the agent layer.
    TrafficDirector(String),
    /// A local YAML map standing in for `istio-system/mesh-env`.
    File(PathBuf),
}

/// What `MESH` says about the config cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GkeTarget {
    /// The config project (the cluster's project).
    pub project: String,
    /// Location (region or zone), when given.
    pub location: Option<String>,
    /// Cluster name, when given (only with a location).
    pub cluster: Option<String>,
}

/// A `MESH` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MESH={value}: {problem}; expected {MESH_FORMS}")]
pub struct MeshUrlError {
    value: String,
    problem: String,
}

impl MeshUrl {
    /// Parses `MESH`.
    pub fn parse(raw: &str) -> Result<MeshUrl, MeshUrlError> {
        let value = raw.trim();
        let fail = |problem: &str| MeshUrlError {
            value: value.to_owned(),
            problem: problem.to_owned(),
        };
        if let Some(rest) = value.strip_prefix("gke://") {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.iter().any(|p| p.is_empty()) || parts.len() > 3 {
                return Err(fail(
                    "gke:// takes PROJECT, PROJECT/LOCATION or PROJECT/LOCATION/CLUSTER",
                ));
            }
            return Ok(MeshUrl::Gke(GkeTarget {
                project: parts[0].to_owned(),
                location: parts.get(1).map(|s| (*s).to_owned()),
                cluster: parts.get(2).map(|s| (*s).to_owned()),
            }));
        }
        if let Some(rest) = value.strip_prefix("td:") {
            return Ok(MeshUrl::TrafficDirector(rest.to_owned()));
        }
        if let Some(path) = value.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(fail(
                    "file:// needs an absolute path, as in file:///etc/mesh-env.yaml",
                ));
            }
            return Ok(MeshUrl::File(PathBuf::from(path)));
        }
        let resource = value
            .strip_prefix("https:")
            .unwrap_or(value)
            .strip_prefix("//container.googleapis.com/")
            .ok_or_else(|| fail("unknown scheme"))?;
        let resource = resource.strip_prefix("v1/").unwrap_or(resource);
        match resource.split('/').collect::<Vec<_>>().as_slice() {
            [
                "projects",
                project,
                "locations",
                location,
                "clusters",
                cluster,
            ] if [project, location, cluster].iter().all(|p| !p.is_empty()) => {
                Ok(MeshUrl::Gke(GkeTarget {
                    project: (*project).to_owned(),
                    location: Some((*location).to_owned()),
                    cluster: Some((*cluster).to_owned()),
                }))
            }
            _ => Err(fail(
                "a container.googleapis.com URL must name projects/P/locations/L/clusters/C",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gke(project: &str, location: Option<&str>, cluster: Option<&str>) -> MeshUrl {
        MeshUrl::Gke(GkeTarget {
            project: project.into(),
            location: location.map(Into::into),
            cluster: cluster.map(Into::into),
        })
    }

    #[test]
    fn every_documented_form_parses() {
        let full = gke("p", Some("us-central1"), Some("istio"));
        for (raw, expected) in [
            ("gke://p", gke("p", None, None)),
            ("gke://p/us-central1", gke("p", Some("us-central1"), None)),
            ("gke://p/us-central1/istio", full.clone()),
            (
                "//container.googleapis.com/projects/p/locations/us-central1/clusters/istio",
                full.clone(),
            ),
            (
                "https://container.googleapis.com/projects/p/locations/us-central1/clusters/istio",
                full.clone(),
            ),
            (
                "https://container.googleapis.com/v1/projects/p/locations/us-central1/clusters/istio",
                full.clone(),
            ),
            (
                "//container.googleapis.com/v1/projects/p/locations/us-central1/clusters/istio",
                full,
            ),
            (
                "td:projects=123&scopes=s",
                MeshUrl::TrafficDirector("projects=123&scopes=s".into()),
            ),
            ("td:", MeshUrl::TrafficDirector(String::new())),
            (
                "file:///etc/mesh-env.yaml",
                MeshUrl::File("/etc/mesh-env.yaml".into()),
            ),
        ] {
            assert_eq!(MeshUrl::parse(raw), Ok(expected), "{raw}");
        }
    }

    #[test]
    fn malformed_values_are_refused_with_the_forms() {
        for raw in [
            "gke://",
            "gke://p//c",
            "gke://p/l/c/extra",
            "//container.googleapis.com/projects/p/locations/l",
            "//container.googleapis.com/projects/p/zones/l/clusters/c",
            "https://example.com/projects/p/locations/l/clusters/c",
            "file://relative.yaml",
            "p",
        ] {
            let e = MeshUrl::parse(raw).expect_err(raw).to_string();
            assert!(e.starts_with(&format!("MESH={raw}: ")), "{e}");
            assert!(e.contains(MESH_FORMS), "{e}");
        }
    }
}
