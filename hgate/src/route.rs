//! Where a mesh connection goes: the destination named by its SNI, then a tunnel URL from, in
//! order, the static routes file, the `krun.dev/tunnel-url` Service annotations, and the
//! URL template. The SNI's port and namespace are part of the decision (cloud-run-mesh's
//! gateway kept only the service name, so two namespaces with one service name collided).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::default_route;

/// The Service annotation that names a service's tunnel URL.
pub const TUNNEL_URL_ANNOTATION: &str = "krun.dev/tunnel-url";

/// The destination an SNI names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Service name.
    pub service: String,
    /// Namespace.
    pub namespace: String,
    /// Port, when the SNI carries one (`outbound_.PORT_...`).
    pub port: Option<u16>,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.service, self.namespace)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// Reads `outbound_.PORT_._.SVC.NS.svc.<domain>` (Istio's cluster names as SNI) and
/// `SVC.NS.svc.<domain>`; anything else names no destination.
pub fn destination(sni: &str) -> Option<Destination> {
    let parts: Vec<&str> = sni.split('.').collect();
    let (port, rest) = match parts.as_slice() {
        ["outbound_", port, _subset, rest @ ..] => {
            let port: u16 = port.strip_suffix('_')?.parse().ok()?;
            (Some(port), rest)
        }
        rest => (None, rest),
    };
    match rest {
        [service, namespace, "svc", ..] if !service.is_empty() && !namespace.is_empty() => {
            Some(Destination {
                service: (*service).to_owned(),
                namespace: (*namespace).to_owned(),
                port,
            })
        }
        _ => None,
    }
}

/// Which rule chose the URL, for the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteSource {
    /// `HGATE_ROUTES`.
    Static,
    /// A Service annotation.
    Annotation,
    /// `HGATE_ROUTE_TEMPLATE`.
    Template,
}

/// A route file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("HGATE_ROUTES={path}: {detail}; expected a YAML map of <service>[.<namespace>] to URL")]
pub struct RoutesFileError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub detail: String,
}

/// Reads the static routes file.
pub fn load_routes(path: &Path) -> Result<HashMap<String, String>, RoutesFileError> {
    let fail = |detail: String| RoutesFileError {
        path: path.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    if text.trim().is_empty() {
        return Ok(HashMap::new());
    }
    serde_saphyr::from_str(&text).map_err(|e| fail(e.to_string()))
}

/// Service annotations seen in the cluster: `svc.ns` → URL; replaced on every refresh.
pub type AnnotationRoutes = Arc<RwLock<HashMap<String, String>>>;

/// The routing table.
pub struct Routes {
    static_routes: HashMap<String, String>,
    annotations: AnnotationRoutes,
    template: String,
}

impl Routes {
    /// A table over the three sources.
    pub fn new(
        static_routes: HashMap<String, String>,
        annotations: AnnotationRoutes,
        template: String,
    ) -> Self {
        Routes {
            static_routes,
            annotations,
            template,
        }
    }

    /// The tunnel URL for `dest`, or why there is none.
    pub fn resolve(&self, dest: &Destination) -> Result<(String, RouteSource), String> {
        let qualified = format!("{}.{}", dest.service, dest.namespace);
        let pick = self
            .static_routes
            .get(&qualified)
            .or_else(|| self.static_routes.get(&dest.service));
        if let Some(url) = pick {
            return Ok((substitute(url, dest)?, RouteSource::Static));
        }
        let annotated = self
            .annotations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&qualified)
            .cloned();
        if let Some(url) = annotated {
            return Ok((substitute(&url, dest)?, RouteSource::Annotation));
        }
        Ok((substitute(&self.template, dest)?, RouteSource::Template))
    }
}

/// Fills `{service}`, `{namespace}` and `{port}` into `template`.
fn substitute(template: &str, dest: &Destination) -> Result<String, String> {
    let mut url = template
        .replace("{service}", &dest.service)
        .replace("{namespace}", &dest.namespace);
    if url.contains(default_route::PROJECT_NUMBER) || url.contains(default_route::REGION) {
        return Err(format!(
            "route {template} still has {} or {}: hgate could not resolve them at start (see its log); set HGATE_CLOUD_RUN_PROJECT_NUMBER and HGATE_CLOUD_RUN_REGION",
            default_route::PROJECT_NUMBER,
            default_route::REGION
        ));
    }
    if url.contains("{port}") {
        let port = dest
            .port
            .ok_or_else(|| format!("route {template} needs {{port}} but the SNI names no port"))?;
        url = url.replace("{port}", &port.to_string());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(service: &str, namespace: &str, port: Option<u16>) -> Destination {
        Destination {
            service: service.into(),
            namespace: namespace.into(),
            port,
        }
    }

    #[test]
    fn reads_both_sni_forms() {
        assert_eq!(
            destination("outbound_.8080_._.echo.default.svc.cluster.local"),
            Some(dest("echo", "default", Some(8080)))
        );
        assert_eq!(
            destination("outbound_.9090_.v1.echo.prod.svc.cluster.local"),
            Some(dest("echo", "prod", Some(9090)))
        );
        assert_eq!(
            destination("echo.prod.svc.cluster.local"),
            Some(dest("echo", "prod", None))
        );
        for bad in [
            "example.com",
            "outbound_.x_._.echo.default.svc.cluster.local",
            "outbound_.8080_._.echo",
            "",
        ] {
            assert_eq!(destination(bad), None, "{bad}");
        }
    }

    #[test]
    fn routes_apply_in_order_and_honour_port_and_namespace() {
        let annotations: AnnotationRoutes = Arc::default();
        annotations.write().expect("lock").insert(
            "api.prod".into(),
            "https://api-prod.example/_hbone/{port}".into(),
        );
        let routes = Routes::new(
            HashMap::from([
                (
                    "echo.default".into(),
                    "http://127.0.0.1:1/_hbone/15003".into(),
                ),
                ("echo".into(), "http://any-ns/_hbone/15003".into()),
            ]),
            annotations,
            "https://{service}-{namespace}.a.run.app/_hbone/{port}".into(),
        );
        let r = |s, n, p| routes.resolve(&dest(s, n, p));
        assert_eq!(
            r("echo", "default", Some(1)),
            Ok((
                "http://127.0.0.1:1/_hbone/15003".into(),
                RouteSource::Static
            ))
        );
        assert_eq!(
            r("echo", "other", Some(1)),
            Ok(("http://any-ns/_hbone/15003".into(), RouteSource::Static))
        );
        assert_eq!(
            r("api", "prod", Some(8443)),
            Ok((
                "https://api-prod.example/_hbone/8443".into(),
                RouteSource::Annotation
            ))
        );
        assert_eq!(
            r("web", "shop", Some(80)),
            Ok((
                "https://web-shop.a.run.app/_hbone/80".into(),
                RouteSource::Template
            ))
        );
        assert!(r("web", "shop", None).is_err());
    }
}
