//! The delta ADS client that keeps a [`WorkloadStore`] in step with istiod, as ztunnel's
//! `src/xds/client.rs` does: one gRPC stream over TLS (istiod's serving certificate verified
//! against the mesh roots, under istiod's name), authenticated with the workload certificate
//! and, when krun holds one, the istio-token; a wildcard subscription to
//! `istio.workload.Address` and to `istio.security.Authorization` (responses dispatched by
//! their type to the [`WorkloadStore`] or the [`PolicyStore`]); every response ACKed or
//! NACKed by its nonce. A lost stream is
//! reconnected with backoff while the store keeps serving the last known state; the
//! reconnect names what the store holds (`initial_resource_versions`), so istiod sends only
//! the differences.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hbone::tls::WorkloadCert;
use hyper_util::rt::TokioIo;
use prost::Message;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};

use super::authorization::PolicyStore;
use super::authorization::proto::{AUTHORIZATION_TYPE, Authorization};
use super::proto::{
    ADDRESS_TYPE, Address, AddressType, DELTA_ADS, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    Node, Status,
};
use super::store::WorkloadStore;
use crate::backoff::Backoff;

/// Where istiod is and who krun is to it.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// istiod's `host:port` (`XDS_ADDR`).
    pub addr: String,
    /// The name istiod's serving certificate carries (`istiod.istio-system.svc`).
    pub server_name: String,
    /// The node id, in ztunnel's form (`ztunnel~IP~NAME.NS~NS.svc.cluster.local`).
    pub node_id: String,
    /// Node metadata (`NAMESPACE`, `SERVICE_ACCOUNT`, ...).
    pub metadata: BTreeMap<String, String>,
    /// The istio-token file, sent as the bearer when it exists.
    pub token_path: Option<PathBuf>,
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
}

/// Pacing of reconnects: 1 s doubling to 30 s, as ztunnel's xDS client roughly does.
const RECONNECT: Backoff = Backoff::until_success(Duration::from_secs(1), Duration::from_secs(30));

/// What istiod's pushes fill: the workloads and the authorization policies.
#[derive(Clone, Default)]
pub struct Stores {
    /// `istio.workload.Address` resources.
    pub workloads: Arc<WorkloadStore>,
    /// `istio.security.Authorization` resources.
    pub policies: Arc<PolicyStore>,
}

/// Keeps `stores` in step with istiod until `stop`; never gives up.
pub async fn run(
    config: XdsConfig,
    certs: watch::Receiver<Arc<WorkloadCert>>,
    stores: Stores,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    let store = &stores.workloads;
    loop {
        let session = stream(&config, &certs, &stores, &mut failures);
        let ended = tokio::select! {
            _ = stop.cancelled() => return,
            ended = session => ended,
        };
        failures += 1;
        match ended {
            Ok(()) => {
                tracing::warn!(istiod = %config.addr, workloads = store.len(), "xDS stream closed by istiod; reconnecting, serving the last known state meanwhile")
            }
            Err(e) => {
                tracing::warn!(istiod = %config.addr, error = %e, workloads = store.len(), "xDS stream to istiod failed; reconnecting, serving the last known state meanwhile")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECONNECT.delay(failures)) => {}
        }
    }
}

/// One stream, from connect to its end.
async fn stream(
    config: &XdsConfig,
    certs: &watch::Receiver<Arc<WorkloadCert>>,
    stores: &Stores,
    failures: &mut u32,
) -> Result<(), StreamError> {
    let channel = connect(config, certs.clone()).await?;
    let (requests, outgoing) = mpsc::channel(16);
    let subscriptions = [
        (ADDRESS_TYPE, stores.workloads.versions()),
        (AUTHORIZATION_TYPE, stores.policies.versions()),
    ];
    for (type_url, versions) in subscriptions {
        let subscribe = DeltaDiscoveryRequest {
            node: Some(node(config)),
            type_url: type_url.to_owned(),
            initial_resource_versions: versions,
            ..Default::default()
        };
        let _ = requests.send(subscribe).await;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(outgoing));
    if let Some(token) = config
        .token_path
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        && let Ok(value) = format!("Bearer {}", token.trim()).parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| StreamError::Connect(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<DeltaDiscoveryRequest, DeltaDiscoveryResponse>::default();
    let mut responses = grpc
        .streaming(request, PathAndQuery::from_static(DELTA_ADS), codec)
        .await?
        .into_inner();
    tracing::info!(istiod = %config.addr, node = %config.node_id, "xDS stream to istiod open; subscribed to workload addresses and authorization policies");
    while let Some(response) = responses.message().await? {
        *failures = 0;
        let answer = apply(stores, &response);
        if requests.send(answer).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Applies one response to the store and returns its ACK, or its NACK naming what failed
/// (the store then holds everything else of the response).
fn apply(stores: &Stores, response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    let mut errors = Vec::new();
    let (store, policies) = (&stores.workloads, &stores.policies);
    match response.type_url.as_str() {
        ADDRESS_TYPE => {
            for resource in &response.resources {
                if let Err(e) = upsert(store, resource) {
                    errors.push(e);
                }
            }
            for name in &response.removed_resources {
                store.remove(name);
            }
        }
        AUTHORIZATION_TYPE => {
            for resource in &response.resources {
                let policy = body(resource).and_then(|bytes| {
                    Authorization::decode(bytes).map_err(|e| {
                        format!(
                            "{}: not an istio.security.Authorization: {e}",
                            resource.name
                        )
                    })
                });
                if let Err(e) =
                    policy.and_then(|p| policies.upsert(&resource.name, &resource.version, &p))
                {
                    errors.push(e);
                }
            }
            for name in &response.removed_resources {
                policies.remove(name);
            }
        }
        other => errors.push(format!("unexpected type {other}")),
    }
    // Open streams are checked again after any push: a policy, or a workload's selection
    // of policies, may have changed.
    policies.publish();
    let (added, removed) = (response.resources.len(), response.removed_resources.len());
    let kind = response.type_url.rsplit('.').next().unwrap_or_default();
    let error_detail = if errors.is_empty() {
        tracing::info!(kind, added, removed, workloads = store.len(), services = store.services(), policies = policies.len(), nonce = %response.nonce, "xDS push applied (ACK)");
        None
    } else {
        let message = errors.join("; ");
        tracing::warn!(kind, added, removed, error = %message, nonce = %response.nonce, "xDS push partly rejected (NACK)");
        Some(Status {
            code: tonic::Code::InvalidArgument as i32,
            message,
        })
    };
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        error_detail,
        ..Default::default()
    }
}

/// The encoded message a resource carries.
fn body(resource: &super::proto::Resource) -> Result<&[u8], String> {
    resource
        .resource
        .as_ref()
        .map(|any| any.value.as_slice())
        .ok_or_else(|| format!("{}: no resource body", resource.name))
}

fn upsert(store: &WorkloadStore, resource: &super::proto::Resource) -> Result<(), String> {
    let address = Address::decode(body(resource)?)
        .map_err(|e| format!("{}: not an istio.workload.Address: {e}", resource.name))?;
    match address.r#type {
        Some(AddressType::Workload(workload)) => {
            store.upsert(&resource.name, &resource.version, &workload)
        }
        Some(AddressType::Service(service)) => {
            store.upsert_service(&resource.name, &resource.version, &service)
        }
        None => Err(format!(
            "{}: an Address with neither workload nor service",
            resource.name
        )),
    }
}

fn node(config: &XdsConfig) -> Node {
    let fields = config
        .metadata
        .iter()
        .map(|(k, v)| {
            let value = prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(v.clone())),
            };
            (k.clone(), value)
        })
        .collect();
    Node {
        id: config.node_id.clone(),
        metadata: Some(prost_types::Struct { fields }),
    }
}

/// A channel to istiod over TLS made with the current workload certificate: istiod verified
/// under `server_name` against the mesh roots, krun presenting its certificate.
async fn connect(
    config: &XdsConfig,
    certs: watch::Receiver<Arc<WorkloadCert>>,
) -> Result<Channel, StreamError> {
    let addr = config.addr.clone();
    let server_name = ServerName::try_from(config.server_name.clone())
        .map_err(|e| StreamError::Connect(format!("{}: {e}", config.server_name)))?;
    let connector = tower::service_fn(move |_: Uri| {
        let (addr, server_name, cert) = (addr.clone(), server_name.clone(), certs.borrow().clone());
        async move {
            let tls = tls_config(&cert).map_err(io::Error::other)?;
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    Endpoint::from_shared(format!("http://{}", config.addr))
        .map_err(|e| StreamError::Connect(format!("XDS_ADDR={}: {e}", config.addr)))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| StreamError::Connect(format!("{e:?}")))
}

fn tls_config(cert: &WorkloadCert) -> Result<Arc<rustls::ClientConfig>, hbone::tls::TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(hbone::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(cert.root_store()?)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::proto::{Resource, TunnelProtocol, Workload};

    fn resource(name: &str, value: Vec<u8>) -> Resource {
        Resource {
            version: "1".into(),
            name: name.into(),
            resource: Some(prost_types::Any {
                type_url: ADDRESS_TYPE.into(),
                value,
            }),
        }
    }

    /// A good push is applied and ACKed by its nonce; a push with an undecodable resource
    /// is NACKed naming it, while the rest of it (here a removal) still applies.
    #[test]
    fn pushes_are_acked_or_nacked_by_nonce() {
        let stores = Stores::default();
        let store = &stores.workloads;
        let workload = Address {
            r#type: Some(AddressType::Workload(Workload {
                name: "pod".into(),
                namespace: "prod".into(),
                addresses: vec![vec![10, 0, 0, 5]],
                tunnel_protocol: TunnelProtocol::Hbone as i32,
                ..Default::default()
            })),
        };
        let push = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n1".into(),
            resources: vec![resource("w1", workload.encode_to_vec())],
            ..Default::default()
        };
        let ack = apply(&stores, &push);
        assert_eq!(ack.response_nonce, "n1");
        assert_eq!(ack.error_detail, None);
        assert_eq!(store.len(), 1);
        let bad = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n2".into(),
            resources: vec![resource("broken", vec![0xff, 0xff])],
            removed_resources: vec!["w1".into()],
            ..Default::default()
        };
        let nack = apply(&stores, &bad);
        assert_eq!(nack.response_nonce, "n2");
        let detail = nack.error_detail.expect("NACK");
        assert!(detail.message.contains("broken"), "{}", detail.message);
        assert!(store.is_empty());
    }

    /// Policies arrive on the same stream under their own type: applied to the policy store,
    /// ACKed, and removed by name; a push of a type krun did not subscribe to is NACKed.
    #[test]
    fn policy_pushes_are_dispatched_by_type() {
        let stores = Stores::default();
        let changes = stores.policies.changes();
        let policy = Authorization {
            name: "deny".into(),
            namespace: "prod".into(),
            ..Default::default()
        };
        let push = DeltaDiscoveryResponse {
            type_url: AUTHORIZATION_TYPE.into(),
            nonce: "p1".into(),
            resources: vec![Resource {
                version: "1".into(),
                name: "prod/deny".into(),
                resource: Some(prost_types::Any {
                    type_url: AUTHORIZATION_TYPE.into(),
                    value: policy.encode_to_vec(),
                }),
            }],
            ..Default::default()
        };
        let ack = apply(&stores, &push);
        assert_eq!(
            (ack.type_url.as_str(), ack.error_detail),
            (AUTHORIZATION_TYPE, None)
        );
        assert_eq!(stores.policies.len(), 1);
        assert!(stores.workloads.is_empty());
        assert!(
            changes.has_changed().expect("open"),
            "open streams are told"
        );
        let removal = DeltaDiscoveryResponse {
            type_url: AUTHORIZATION_TYPE.into(),
            removed_resources: vec!["prod/deny".into()],
            ..Default::default()
        };
        apply(&stores, &removal);
        assert!(stores.policies.is_empty());
        let odd = DeltaDiscoveryResponse {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..Default::default()
        };
        assert!(apply(&stores, &odd).error_detail.is_some());
    }
}
