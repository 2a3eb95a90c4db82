//! What registration keeps in the cluster for one Cloud Run service `NAME` labelled for
//! namespace `NS`, as plain Kubernetes JSON: a selector-less Service `NS/NAME` whose
//! `krun.dev/tunnel-url` annotation is the existing annotation route to the service's URL; an
//! EndpointSlice `NS/NAME-hgate` that gives that Service hgate's address as its only endpoint;
//! and a DestinationRule `NS/NAME` that makes mesh clients use Istio mTLS towards it (the
//! endpoint is no sidecar pod, so auto-mTLS would otherwise send plain text and hgate would
//! have no SNI to read). Also the ownership test and the comparison that decides an update.

use std::collections::BTreeMap;

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::route::TUNNEL_URL_ANNOTATION;
use crate::run_admin::ContainerPort;

/// The label every object hgate creates carries; its absence means "not ours".
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// [`MANAGED_BY_LABEL`]'s value.
pub const MANAGED_BY: &str = "hgate";
/// The Cloud Run service an object belongs to (its short name).
pub const SERVICE_LABEL: &str = "krun.dev/cloud-run-service";
/// The path of krun's mTLS terminator behind a Cloud Run URL (as in the default route).
pub const TUNNEL_PATH: &str = "/_hbone/15003";
/// EndpointSlices name their controller; Kubernetes' own must not adopt ours.
const ENDPOINTSLICE_MANAGER: &str = "hgate.krun.dev";

/// One Cloud Run service to register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The namespace (the label's value).
    pub namespace: String,
    /// The service name, also the Kubernetes Service's.
    pub name: String,
    /// `region/name`, for log lines.
    pub source: String,
    /// The tunnel URL (the service's URL and [`TUNNEL_PATH`]).
    pub tunnel_url: String,
    /// The ingress port.
    pub port: ContainerPort,
}

/// Where mesh clients reach hgate's SNI listener: the cluster IP and port of its in-cluster
/// Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    /// The IP.
    pub ip: String,
    /// The port.
    pub port: u16,
}

/// The kinds of object registration maintains, in the order they are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `v1 Service`.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice,
    /// `networking.istio.io/v1 DestinationRule`.
    DestinationRule,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::DestinationRule];

    /// Group, version, kind and plural, for the dynamic API.
    pub fn resource(self) -> ApiResource {
        let (group, version, kind, plural) = match self {
            Kind::Service => ("", "v1", "Service", "services"),
            Kind::EndpointSlice => ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
            Kind::DestinationRule => (
                "networking.istio.io",
                "v1",
                "DestinationRule",
                "destinationrules",
            ),
        };
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    }

    /// The object's name for the Cloud Run service `service`.
    pub fn object_name(self, service: &str) -> String {
        match self {
            // Kubernetes' slice names end in 5 characters without vowels: no clash.
            Kind::EndpointSlice => format!("{service}-hgate"),
            Kind::Service | Kind::DestinationRule => service.to_owned(),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Istio's protocol for the port name: `h2c` is end-to-end HTTP/2, anything else HTTP/1.
fn port_name(port: &ContainerPort) -> &'static str {
    if port.name == "h2c" { "http2" } else { "http" }
}

/// The object of `kind` for `reg`, pointing at `gateway`.
pub fn desired(kind: Kind, reg: &Registration, gateway: &Gateway) -> Value {
    let resource = kind.resource();
    let mut labels = BTreeMap::from([
        (MANAGED_BY_LABEL, MANAGED_BY.to_owned()),
        (SERVICE_LABEL, reg.name.clone()),
    ]);
    let port = reg
        .port
        .container_port
        .unwrap_or(crate::run_admin::DEFAULT_CONTAINER_PORT);
    let name = port_name(&reg.port);
    let mut object = json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {"name": kind.object_name(&reg.name), "namespace": reg.namespace},
    });
    match kind {
        Kind::Service => {
            object["metadata"]["annotations"] = json!({TUNNEL_URL_ANNOTATION: reg.tunnel_url});
            object["spec"] = json!({
                "type": "ClusterIP",
                "ports": [{"name": name, "port": port, "targetPort": gateway.port, "protocol": "TCP"}],
            });
        }
        Kind::EndpointSlice => {
            labels.insert("kubernetes.io/service-name", reg.name.clone());
            labels.insert(
                "endpointslice.kubernetes.io/managed-by",
                ENDPOINTSLICE_MANAGER.to_owned(),
            );
            let family = if gateway.ip.contains(':') {
                "IPv6"
            } else {
                "IPv4"
            };
            object["addressType"] = json!(family);
            object["endpoints"] =
                json!([{"addresses": [gateway.ip], "conditions": {"ready": true}}]);
            object["ports"] = json!([{"name": name, "port": gateway.port, "protocol": "TCP"}]);
        }
        Kind::DestinationRule => {
            object["spec"] = json!({
                "host": format!("{}.{}.svc", reg.name, reg.namespace),
                "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
            });
        }
    }
    object["metadata"]["labels"] = json!(labels);
    object
}

/// Whether hgate created `object` (it carries [`MANAGED_BY_LABEL`]` = hgate`); the Cloud Run
/// service it belongs to, when so.
pub fn owner(object: &Value) -> Option<&str> {
    let labels = &object["metadata"]["labels"];
    if labels[MANAGED_BY_LABEL] != MANAGED_BY {
        return None;
    }
    labels[SERVICE_LABEL].as_str()
}

/// Whether `current` already holds every field of `desired` (the API server adds its own:
/// defaults, cluster IPs, resourceVersion).
pub fn holds(current: &Value, desired: &Value) -> bool {
    match (current, desired) {
        (Value::Object(current), Value::Object(desired)) => desired
            .iter()
            .all(|(k, v)| current.get(k).is_some_and(|c| holds(c, v))),
        (Value::Array(current), Value::Array(desired)) => {
            current.len() == desired.len() && current.iter().zip(desired).all(|(c, d)| holds(c, d))
        }
        (Value::Number(c), Value::Number(d)) => c.as_f64() == d.as_f64(),
        _ => current == desired,
    }
}

/// `current` with every field of `desired` written over it (objects merged key by key,
/// anything else replaced): an update that keeps what the API server and others added.
pub fn overlay(current: &mut Value, desired: &Value) {
    match (current, desired) {
        (Value::Object(current), Value::Object(desired)) => {
            for (k, v) in desired {
                overlay(current.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (current, desired) => *current = desired.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registration {
        Registration {
            namespace: "shop".into(),
            name: "echo".into(),
            source: "us-central1/echo".into(),
            tunnel_url: "https://echo-abc-uc.a.run.app/_hbone/15003".into(),
            port: ContainerPort {
                name: "h2c".into(),
                container_port: Some(9090),
            },
        }
    }

    fn gateway() -> Gateway {
        Gateway {
            ip: "10.0.0.7".into(),
            port: 15442,
        }
    }

    #[test]
    fn the_service_carries_the_route_and_the_slice_points_at_hgate() {
        let service = desired(Kind::Service, &reg(), &gateway());
        assert_eq!(service["apiVersion"], "v1");
        assert_eq!(
            service["metadata"]["annotations"][TUNNEL_URL_ANNOTATION],
            "https://echo-abc-uc.a.run.app/_hbone/15003"
        );
        assert!(service["spec"].get("selector").is_none(), "selector-less");
        assert_eq!(service["spec"]["ports"][0]["port"], 9090);
        assert_eq!(service["spec"]["ports"][0]["name"], "http2");
        assert_eq!(owner(&service), Some("echo"));

        let slice = desired(Kind::EndpointSlice, &reg(), &gateway());
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(slice["metadata"]["name"], "echo-hgate");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "echo"
        );
        assert_eq!(slice["endpoints"][0]["addresses"][0], "10.0.0.7");
        assert_eq!(slice["ports"][0]["port"], 15442);
        assert_eq!(
            slice["ports"][0]["name"], "http2",
            "matches the Service port"
        );

        let rule = desired(Kind::DestinationRule, &reg(), &gateway());
        assert_eq!(rule["apiVersion"], "networking.istio.io/v1");
        assert_eq!(rule["spec"]["trafficPolicy"]["tls"]["mode"], "ISTIO_MUTUAL");
    }

    #[test]
    fn an_object_without_the_label_is_not_owned() {
        let mut service = desired(Kind::Service, &reg(), &gateway());
        service["metadata"]["labels"] = json!({"app": "echo"});
        assert_eq!(owner(&service), None);
        service["metadata"]["labels"] = json!({MANAGED_BY_LABEL: "Helm", SERVICE_LABEL: "echo"});
        assert_eq!(owner(&service), None);
    }

    #[test]
    fn server_added_fields_are_no_change_and_an_overlay_keeps_them() {
        let want = desired(Kind::Service, &reg(), &gateway());
        let mut current = want.clone();
        current["metadata"]["resourceVersion"] = json!("7");
        current["spec"]["clusterIP"] = json!("10.1.2.3");
        assert!(holds(&current, &want));
        let mut moved = reg();
        moved.tunnel_url = "https://elsewhere/_hbone/15003".into();
        let want = desired(Kind::Service, &moved, &gateway());
        assert!(!holds(&current, &want));
        overlay(&mut current, &want);
        assert!(holds(&current, &want));
        assert_eq!(current["spec"]["clusterIP"], "10.1.2.3");
        assert_eq!(current["metadata"]["resourceVersion"], "7");
    }
}
