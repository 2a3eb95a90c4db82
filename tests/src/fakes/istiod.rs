//! A fake istiod serving delta ADS (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`) over TLS with istiod's serving certificate, strict like istiod:
//! clients must present a certificate of the mesh, and the first request must name the node
//! and the `istio.workload.Address` type; a later subscription to `istio.security.Authorization`
//! is answered with the policies held. The test drives it: [`FakeIstiod::push_workload`],
//! [`FakeIstiod::push_service`], [`FakeIstiod::push_address`], [`FakeIstiod::push_policy`] and
//! [`FakeIstiod::remove`] reach every open stream subscribed to their type at once (and later
//! ones on connect),
//! [`FakeIstiod::down`] drops every stream and answers nothing more (new connections wait in
//! the listen backlog, as with a hung istiod), [`FakeIstiod::up`] serves again on the same
//! socket, so it can run in another network namespace. It records every request (node ids,
//! ACKs, NACKs).

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use mesh::xds::authorization::proto::{
    AUTHORIZATION_TYPE, Action, Authorization, Group, Match, MatchType, Rules, Scope, StringMatch,
};
use mesh::xds::proto::{
    ADDRESS_TYPE, Address, AddressType, DELTA_ADS, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    NetworkAddress, Port, Resource, Service as MeshService, TunnelProtocol, Workload,
};
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::pki::TestCa;
use super::server::runtime;

/// A resource's key: its type and name.
type Key = (&'static str, String);

/// A change pushed to every stream subscribed to its type.
#[derive(Clone, Debug)]
enum Change {
    Upsert(Key),
    Remove(Key),
    /// Ends every open stream with UNAVAILABLE (istiod going away).
    Disconnect,
}

#[derive(Default)]
struct State {
    /// (type, name) -> (version, encoded resource).
    resources: BTreeMap<Key, (String, Vec<u8>)>,
    requests: Vec<DeltaDiscoveryRequest>,
    version: u64,
}

/// A NAMESPACE-scoped DENY policy `namespace/name` for `principals` (Istio's form, without
/// `spiffe://`), as istiod sends an AuthorizationPolicy with `action: DENY` and
/// `from.source.principals`.
pub fn deny_principals(namespace: &str, name: &str, principals: &[&str]) -> Authorization {
    let principals = principals
        .iter()
        .map(|p| StringMatch {
            match_type: Some(MatchType::Exact((*p).to_owned())),
        })
        .collect();
    Authorization {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope: Scope::Namespace as i32,
        action: Action::Deny as i32,
        groups: vec![Group {
            rules: vec![Rules {
                matches: vec![Match {
                    principals,
                    ..Default::default()
                }],
            }],
        }],
    }
}

/// A serving instance.
struct Serving {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// istiod's serving certificate and key, and the mesh root its clients must chain to.
#[derive(Clone)]
pub struct IstiodTls {
    cert: String,
    key: String,
    root: String,
}

impl IstiodTls {
    /// istiod's certificate from `ca`, accepting clients with certificates from `ca`.
    pub fn new(ca: &TestCa) -> IstiodTls {
        let (cert, key) = ca.server_cert(&[mesh::identity::istio_ca::ISTIOD_SERVER_NAME]);
        IstiodTls {
            cert,
            key,
            root: ca.root_pem.clone(),
        }
    }
}

/// The running fake.
pub struct FakeIstiod {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// How many requests were recorded, for waiting on ACKs.
    recorded: Arc<watch::Sender<usize>>,
    changes: broadcast::Sender<Change>,
    tls: IstiodTls,
    listener: std::net::TcpListener,
    serving: Option<Serving>,
}

impl FakeIstiod {
    /// Serves on an ephemeral port of 127.0.0.1 in the calling thread's network namespace.
    pub fn start(tls: IstiodTls) -> FakeIstiod {
        FakeIstiod::start_at(tls, "127.0.0.1:0")
    }

    /// Serves on `addr` (istiod's own port, 15012, where krun derives it from mesh-env's
    /// `IMCON_ADDR`) in the calling thread's network namespace.
    pub fn start_at(tls: IstiodTls, addr: &str) -> FakeIstiod {
        let listener = std::net::TcpListener::bind(addr).expect("bind istiod");
        let addr = listener.local_addr().expect("istiod addr");
        let (changes, _) = broadcast::channel(64);
        let state = Arc::new(Mutex::new(State::default()));
        let mut istiod = FakeIstiod {
            addr,
            state,
            recorded: Arc::new(watch::Sender::new(0)),
            changes,
            tls,
            listener,
            serving: None,
        };
        istiod.up();
        istiod
    }

    /// Lists (or replaces) the workload `name` at `ip` with identity `ns`/`sa`, HBONE-capable
    /// when `hbone`.
    pub fn push_workload(&self, name: &str, ip: IpAddr, ns: &str, sa: &str, hbone: bool) {
        self.push_address(name, AddressType::Workload(workload(ip, ns, sa, hbone)));
    }

    /// Lists (or replaces) the Service `name`.`ns` at `vip`, its hostname
    /// `name.ns.svc.cluster.local`, mapping each `(service port, target port)`.
    pub fn push_service(&self, name: &str, ns: &str, vip: IpAddr, ports: &[(u32, u32)]) {
        let service = MeshService {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: octets(vip),
            }],
            ports: ports
                .iter()
                .map(|(service_port, target_port)| Port {
                    service_port: *service_port,
                    target_port: *target_port,
                })
                .collect(),
            waypoint: None,
        };
        self.push_address(
            &format!("{ns}/{}", service.hostname),
            AddressType::Service(service),
        );
    }

    /// Lists (or replaces) the resource `name` as `address`, and tells every stream.
    pub fn push_address(&self, name: &str, address: AddressType) {
        let address = Address {
            r#type: Some(address),
        };
        self.upsert((ADDRESS_TYPE, name.to_owned()), address.encode_to_vec());
    }

    /// Pushes (or replaces) the authorization policy `policy`, named `namespace/name` as
    /// istiod names it.
    pub fn push_policy(&self, policy: &Authorization) {
        let name = format!("{}/{}", policy.namespace, policy.name);
        self.upsert((AUTHORIZATION_TYPE, name), policy.encode_to_vec());
    }

    fn upsert(&self, key: Key, bytes: Vec<u8>) {
        {
            let mut state = self.lock();
            state.version += 1;
            let version = state.version.to_string();
            state.resources.insert(key.clone(), (version, bytes));
        }
        let _ = self.changes.send(Change::Upsert(key));
    }

    /// Removes the workload or policy `name` from istiod's state and tells every stream.
    pub fn remove(&self, name: &str) {
        let keys: Vec<Key> = {
            let mut state = self.lock();
            let keys: Vec<Key> = state
                .resources
                .keys()
                .filter(|(_, n)| n == name)
                .cloned()
                .collect();
            for key in &keys {
                state.resources.remove(key);
            }
            keys
        };
        for key in keys {
            let _ = self.changes.send(Change::Remove(key));
        }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.lock().requests.clone()
    }

    /// Waits until `count` requests in all were received (e.g. the ACK of a push: one more
    /// than [`FakeIstiod::requests`] held before it).
    pub fn wait_for_requests(&self, count: usize) {
        let mut recorded = self.recorded.subscribe();
        runtime()
            .block_on(recorded.wait_for(|seen| *seen >= count))
            .map(|_| ())
            .expect("istiod's request counter");
    }

    /// Outage: drops every connection and stream and accepts nothing more; returns once the
    /// server is gone.
    pub fn down(&mut self) {
        let _ = self.changes.send(Change::Disconnect);
        if let Some(serving) = self.serving.take() {
            let _ = serving.stop.send(());
            serving.task.abort();
            let _ = runtime().block_on(serving.task);
        }
    }

    /// Serves (again) on the same socket, with the same state.
    pub fn up(&mut self) {
        let listener = self.listener.try_clone().expect("clone the istiod socket");
        self.serving = Some(serve(
            listener,
            Ads {
                state: self.state.clone(),
                changes: self.changes.clone(),
                recorded: self.recorded.clone(),
            },
            &self.tls,
        ));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("istiod state")
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.task.abort();
        }
    }
}

fn serve(listener: std::net::TcpListener, service: Ads, tls: &IstiodTls) -> Serving {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert, &tls.key))
        .client_ca_root(Certificate::from_pem(&tls.root));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = runtime().spawn(async move {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let _ = Server::builder()
            .tls_config(tls)
            .expect("server TLS")
            .serve_with_incoming_shutdown(service, incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    Serving { stop, task }
}

#[derive(Clone)]
struct Ads {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
    recorded: Arc<watch::Sender<usize>>,
}

impl tonic::server::NamedService for Ads {
    const NAME: &'static str = mesh::xds::proto::ADS_SERVICE;
}

type Responses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

impl tonic::server::StreamingService<DeltaDiscoveryRequest> for Ads {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = Responses;
    type Future = BoxFuture<tonic::Response<Responses>, tonic::Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Self::Future {
        let ads = self.clone();
        Box::pin(async move {
            let peer_certs = request.peer_certs();
            if peer_certs.is_none_or(|certs| certs.is_empty()) {
                return Err(tonic::Status::unauthenticated(
                    "no client certificate and no token",
                ));
            }
            let mut requests = request.into_inner();
            let first = requests
                .message()
                .await?
                .ok_or_else(|| tonic::Status::invalid_argument("stream ended before a request"))?;
            if first.node.as_ref().is_none_or(|n| n.id.is_empty()) {
                return Err(tonic::Status::invalid_argument(
                    "first request without a node id",
                ));
            }
            if first.type_url != ADDRESS_TYPE {
                return Err(tonic::Status::invalid_argument(format!(
                    "type {} not served",
                    first.type_url
                )));
            }
            let mut changes = ads.changes.subscribe();
            let initial = ads.initial(&first);
            ads.record(first);
            let subscribed = Arc::new(Mutex::new(HashSet::from([ADDRESS_TYPE])));
            let (tx, rx) = mpsc::channel(16);
            let _ = tx.send(Ok(initial)).await;
            let (recorder, answers, types) = (ads.clone(), tx.clone(), subscribed.clone());
            tokio::spawn(async move {
                while let Ok(Some(request)) = requests.message().await {
                    // A request without a nonce subscribes to its type.
                    if request.response_nonce.is_empty() && request.type_url == AUTHORIZATION_TYPE {
                        types.lock().expect("types").insert(AUTHORIZATION_TYPE);
                        let _ = answers.send(Ok(recorder.initial(&request))).await;
                    }
                    recorder.record(request);
                }
            });
            tokio::spawn(async move {
                while let Ok(change) = changes.recv().await {
                    let answer = match change {
                        Change::Disconnect => {
                            let _ = tx
                                .send(Err(tonic::Status::unavailable("istiod going away")))
                                .await;
                            break;
                        }
                        Change::Upsert((kind, _)) | Change::Remove((kind, _))
                            if !subscribed.lock().expect("types").contains(kind) =>
                        {
                            continue;
                        }
                        change => Ok(ads.delta(&change)),
                    };
                    if tx.send(answer).await.is_err() {
                        break;
                    }
                }
            });
            Ok(tonic::Response::new(
                Box::pin(ReceiverStream::new(rx)) as Responses
            ))
        })
    }
}

impl Ads {
    fn record(&self, request: DeltaDiscoveryRequest) {
        let count = {
            let mut state = self.state.lock().expect("state");
            state.requests.push(request);
            state.requests.len()
        };
        self.recorded.send_replace(count);
    }

    /// Everything of the subscription's type the client lacks or holds at another version,
    /// and removals of what it holds that is gone.
    fn initial(&self, first: &DeltaDiscoveryRequest) -> DeltaDiscoveryResponse {
        let state = self.state.lock().expect("state");
        let kind = if first.type_url == AUTHORIZATION_TYPE {
            AUTHORIZATION_TYPE
        } else {
            ADDRESS_TYPE
        };
        let resources = state
            .resources
            .iter()
            .filter(|((k, name), (version, _))| {
                *k == kind && first.initial_resource_versions.get(name) != Some(version)
            })
            .map(|((k, name), (version, bytes))| resource(k, name, version, bytes))
            .collect();
        let removed_resources = first
            .initial_resource_versions
            .keys()
            .filter(|name| !state.resources.contains_key(&(kind, (*name).clone())))
            .cloned()
            .collect();
        response(kind, state.version, resources, removed_resources)
    }

    fn delta(&self, change: &Change) -> DeltaDiscoveryResponse {
        let state = self.state.lock().expect("state");
        match change {
            Change::Upsert(key) => {
                let resources = state
                    .resources
                    .get(key)
                    .map(|(version, bytes)| resource(key.0, &key.1, version, bytes))
                    .into_iter()
                    .collect();
                response(key.0, state.version, resources, Vec::new())
            }
            Change::Remove((kind, name)) => {
                response(kind, state.version, Vec::new(), vec![name.clone()])
            }
            Change::Disconnect => response(ADDRESS_TYPE, state.version, Vec::new(), Vec::new()),
        }
    }
}

/// The workload at `ip` with identity `ns`/`sa`, HBONE-capable when `hbone`: a test adds what
/// else it needs (`services`, `status`, `waypoint`) and lists it with
/// [`FakeIstiod::push_address`].
pub fn workload(ip: IpAddr, ns: &str, sa: &str, hbone: bool) -> Workload {
    Workload {
        name: format!("{sa}-pod"),
        namespace: ns.to_owned(),
        addresses: vec![octets(ip)],
        tunnel_protocol: if hbone {
            TunnelProtocol::Hbone as i32
        } else {
            TunnelProtocol::None as i32
        },
        service_account: sa.to_owned(),
        ..Default::default()
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn resource(kind: &str, name: &str, version: &str, bytes: &[u8]) -> Resource {
    Resource {
        version: version.to_owned(),
        name: name.to_owned(),
        resource: Some(prost_types::Any {
            type_url: kind.to_owned(),
            value: bytes.to_vec(),
        }),
    }
}

fn response(
    kind: &str,
    version: u64,
    resources: Vec<Resource>,
    removed: Vec<String>,
) -> DeltaDiscoveryResponse {
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    DeltaDiscoveryResponse {
        system_version_info: version.to_string(),
        resources,
        type_url: kind.to_owned(),
        nonce: NONCE
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string(),
        removed_resources: removed,
    }
}

impl Service<http::Request<tonic::body::Body>> for Ads {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let ads = self.clone();
        Box::pin(async move {
            if request.uri().path() != DELTA_ADS {
                return Ok(tonic::Status::unimplemented("only delta ADS is served").into_http());
            }
            let codec =
                tonic_prost::ProstCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.streaming(ads, request).await)
        })
    }
}
