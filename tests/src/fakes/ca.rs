//! A fake CA server for every gRPC CA krun speaks, over TLS with istiod's serving certificate:
//! - Istio CA (`istio.v1.auth.IstioCertificateService/CreateCertificate`): like istiod it
//!   authenticates the bearer token (audience, and a subject that must match the CSR's SPIFFE
//!   SAN) and signs with the mesh root;
//! - MeshCA (`google.security.meshca.v1.MeshCertificateService/CreateCertificate`): the STS
//!   federated token is the credential;
//! - CAS (`google.cloud.security.privateca.v1.CertificateAuthorityService/CreateCertificate`):
//!   reflects the caller's SPIFFE identity into the leaf.
//!
//! Requests are decoded with the fake's own message definitions ([`super::ca_wire`]), never
//! krun's. Tests can make it sign another identity, reject every token, answer `Unavailable`
//! to the next N calls, or go down (the listener and every connection close) and come back on
//! the same address. It serves TLS for istiod's name and for `localhost` (how tests reach the
//! Google CAs by name).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::ca_wire::cas;
use super::ca_wire::istio::{
    CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse, SERVICE,
};
use super::ca_wire::meshca::{self, MeshCertificateRequest, MeshCertificateResponse};
use mesh::identity::jwt::Claims;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::transport::{Identity, Server, ServerTlsConfig};

use super::pki::TestCa;

/// What the fake CA does with the next requests.
#[derive(Default)]
struct Behaviour {
    issue_for: Option<String>,
    reject_all: bool,
}

struct State {
    ca: TestCa,
    /// The federated token MeshCA calls must carry.
    meshca_bearer: Mutex<Option<String>>,
    /// `x-goog-request-params` of the last MeshCA call.
    meshca_params: Mutex<Option<String>>,
    /// CAS: (federated token, pool, the SPIFFE identity that token stands for).
    cas: Mutex<Option<(String, String, String)>>,
    audience: String,
    behaviour: Mutex<Behaviour>,
    signed: AtomicUsize,
    delay: Duration,
    /// Calls still to be answered `Unavailable`.
    unavailable: AtomicU32,
    /// Every call: when it arrived and its gRPC path.
    calls: Mutex<Vec<(Instant, String)>>,
}

/// A serving instance: its shutdown trigger and task.
struct Serving {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// The running fake.
pub struct FakeCa {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<State>,
    tls: (String, String),
    serving: Option<Serving>,
}

impl Drop for FakeCa {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.task.abort();
        }
    }
}

impl FakeCa {
    /// Starts a CA signing with `ca` and accepting tokens for `audience`; each answer is
    /// delayed by `delay` (a network round trip).
    pub async fn start(ca: TestCa, audience: &str, delay: Duration) -> FakeCa {
        let tls = ca.server_cert(&[mesh::identity::istio_ca::ISTIOD_SERVER_NAME, "localhost"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind CA");
        let addr = listener.local_addr().expect("CA addr");
        let state = Arc::new(State {
            ca,
            meshca_bearer: Mutex::default(),
            meshca_params: Mutex::default(),
            cas: Mutex::default(),
            audience: audience.to_owned(),
            behaviour: Mutex::default(),
            signed: AtomicUsize::new(0),
            delay,
            unavailable: AtomicU32::new(0),
            calls: Mutex::default(),
        });
        let serving = Some(serve(listener, state.clone(), &tls));
        FakeCa {
            addr,
            state,
            tls,
            serving,
        }
    }

    /// The root that signs leaves and istiod's serving certificate (`CAROOT_ISTIOD`).
    pub fn root_pem(&self) -> String {
        self.state.ca.root_pem.clone()
    }

    /// Certificates signed so far.
    pub fn signed(&self) -> usize {
        self.state.signed.load(Ordering::SeqCst)
    }

    /// From now on, sign leaves for `uri` whatever the CSR asks (a misbehaving CA).
    pub fn issue_for(&self, uri: &str) {
        self.lock().issue_for = Some(uri.to_owned());
    }

    /// The next `n` calls (any CA) are answered `Unavailable`, as an overloaded or restarting
    /// CA answers.
    pub fn unavailable_next(&self, n: u32) {
        self.state.unavailable.store(n, Ordering::SeqCst);
    }

    /// Every call so far: when it arrived and its gRPC path (the hop log).
    pub fn calls(&self) -> Vec<(Instant, String)> {
        self.state.calls.lock().expect("lock").clone()
    }

    /// From now on, answer UNAUTHENTICATED to everything.
    pub fn reject_all_tokens(&self) {
        self.lock().reject_all = true;
    }

    /// Outage: stops listening and closes every connection (gracefully, as a restarting
    /// istiod does); returns once the server is gone.
    pub async fn down(&mut self) {
        if let Some(serving) = self.serving.take() {
            let _ = serving.stop.send(());
            tokio::time::timeout(crate::HANG_GUARD, serving.task)
                .await
                .expect("CA shut down in time")
                .expect("CA task");
        }
    }

    /// Ends the outage: serves again on the same address.
    pub async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind CA");
        self.serving = Some(serve(listener, self.state.clone(), &self.tls));
    }

    /// Also serve MeshCA, accepting `bearer` (the federated token) as its credential.
    pub fn serve_meshca(&self, bearer: &str) {
        *self.state.meshca_bearer.lock().expect("lock") = Some(bearer.to_owned());
    }

    /// Also serve CAS for `pool`: callers presenting `bearer` are `identity` (what CAS
    /// reflects into the leaf).
    pub fn serve_cas(&self, bearer: &str, pool: &str, identity: &str) {
        *self.state.cas.lock().expect("lock") =
            Some((bearer.to_owned(), pool.to_owned(), identity.to_owned()));
    }

    /// `x-goog-request-params` of the last MeshCA call.
    pub fn meshca_request_params(&self) -> Option<String> {
        self.state.meshca_params.lock().expect("lock").clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Behaviour> {
        self.state.behaviour.lock().expect("behaviour lock")
    }
}

impl State {
    fn create(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, tonic::Status> {
        let behaviour = self.behaviour.lock().expect("behaviour lock");
        if behaviour.reject_all {
            return Err(tonic::Status::unauthenticated(
                "authenticate failed: token audience mismatch",
            ));
        }
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| tonic::Status::unauthenticated("no bearer token"))?;
        if request.metadata().get("clusterid").is_none() {
            return Err(tonic::Status::invalid_argument("no ClusterID metadata"));
        }
        let claims =
            Claims::decode(bearer).map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
        if !claims.aud.contains(&self.audience) {
            return Err(tonic::Status::unauthenticated(format!(
                "token audience is not {}",
                self.audience
            )));
        }
        let msg = request.into_inner();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&msg.csr)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad CSR: {e}")))?;
        let san = csr
            .params
            .subject_alt_names
            .iter()
            .find_map(|s| match s {
                rcgen::SanType::URI(uri) => Some(uri.as_str().to_owned()),
                _ => None,
            })
            .ok_or_else(|| tonic::Status::invalid_argument("CSR has no URI SAN"))?;
        let mut parts = san.rsplit('/');
        let (sa, ns) = (parts.next().unwrap_or(""), parts.nth(1).unwrap_or(""));
        if claims.sub != format!("system:serviceaccount:{ns}:{sa}") {
            return Err(tonic::Status::unauthenticated(format!(
                "token subject {} cannot request {san}",
                claims.sub
            )));
        }
        let ttl = Duration::from_secs(u64::try_from(msg.validity_duration).unwrap_or(3600));
        let leaf = self
            .ca
            .sign_csr(&msg.csr, ttl, behaviour.issue_for.as_deref());
        self.signed.fetch_add(1, Ordering::SeqCst);
        Ok(IstioCertificateResponse {
            cert_chain: vec![leaf, self.ca.root_pem.clone()],
        })
    }
}

fn serve(listener: tokio::net::TcpListener, state: Arc<State>, tls: &(String, String)) -> Serving {
    let identity = Identity::from_pem(&tls.0, &tls.1);
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .expect("server TLS");
    // Go servers (istiod) set TCP_NODELAY; without it Nagle and delayed ACKs add ~40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = server
            .serve_with_incoming_shutdown(CaService(state), incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    Serving { stop, task }
}

impl State {
    fn create_meshca(
        &self,
        request: tonic::Request<MeshCertificateRequest>,
    ) -> Result<MeshCertificateResponse, tonic::Status> {
        let expected = self.meshca_bearer.lock().expect("lock").clone();
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if expected.is_none() || bearer != expected.as_deref() {
            return Err(tonic::Status::unauthenticated("invalid federated token"));
        }
        *self.meshca_params.lock().expect("lock") = request
            .metadata()
            .get("x-goog-request-params")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let msg = request.into_inner();
        if msg.request_id.len() != 36 {
            return Err(tonic::Status::invalid_argument("request_id must be a UUID"));
        }
        let ttl = msg
            .validity
            .and_then(|v| u64::try_from(v.seconds).ok())
            .ok_or_else(|| tonic::Status::invalid_argument("validity required"))?;
        valid_csr(&msg.csr)?;
        let leaf = self.ca.sign_csr(&msg.csr, Duration::from_secs(ttl), None);
        self.signed.fetch_add(1, Ordering::SeqCst);
        Ok(MeshCertificateResponse {
            cert_chain: vec![leaf, self.ca.root_pem.clone()],
        })
    }
}

impl State {
    fn create_cas(
        &self,
        request: tonic::Request<cas::CreateCertificateRequest>,
    ) -> Result<cas::Certificate, tonic::Status> {
        let Some((token, pool, identity)) = self.cas.lock().expect("lock").clone() else {
            return Err(tonic::Status::unimplemented("CAS not served"));
        };
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if header("authorization") != Some(format!("Bearer {token}")) {
            return Err(tonic::Status::unauthenticated("invalid federated token"));
        }
        if header("x-goog-request-params") != Some(format!("parent={pool}")) {
            return Err(tonic::Status::invalid_argument("missing routing header"));
        }
        let msg = request.into_inner();
        if msg.request_id.len() != 36 || msg.certificate_id.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "request_id must be a UUID and certificate_id set",
            ));
        }
        if msg.parent != pool {
            return Err(tonic::Status::not_found(format!(
                "pool {} not found",
                msg.parent
            )));
        }
        let cert = msg
            .certificate
            .ok_or_else(|| tonic::Status::invalid_argument("certificate required"))?;
        if cert.subject_mode != cas::REFLECTED_SPIFFE {
            return Err(tonic::Status::invalid_argument(
                "subject_mode must be REFLECTED_SPIFFE",
            ));
        }
        let key = cert
            .config
            .and_then(|c| c.public_key)
            .filter(|k| k.format == cas::PEM)
            .ok_or_else(|| tonic::Status::invalid_argument("a PEM public key is required"))?;
        let csr = String::from_utf8(key.key)
            .map_err(|_| tonic::Status::invalid_argument("public key is not PEM"))?;
        let ttl = cert
            .lifetime
            .and_then(|l| u64::try_from(l.seconds).ok())
            .ok_or_else(|| tonic::Status::invalid_argument("lifetime required"))?;
        valid_csr(&csr)?;
        let leaf = self
            .ca
            .sign_csr(&csr, Duration::from_secs(ttl), Some(&identity));
        self.signed.fetch_add(1, Ordering::SeqCst);
        Ok(cas::Certificate {
            pem_certificate: leaf,
            pem_certificate_chain: vec![self.ca.root_pem.clone()],
            ..Default::default()
        })
    }
}

/// A CSR a CA can sign, or the `InvalidArgument` a real CA answers (an empty or misplaced
/// field decodes to an empty string).
fn valid_csr(pem: &str) -> Result<(), tonic::Status> {
    rcgen::CertificateSigningRequestParams::from_pem(pem)
        .map(drop)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad CSR: {e}")))
}

#[derive(Clone)]
struct CaService(Arc<State>);

impl tonic::server::NamedService for CaService {
    const NAME: &'static str = SERVICE;
}

struct Create(Arc<State>);
struct MeshCreate(Arc<State>);
struct CasCreate(Arc<State>);

impl tonic::server::UnaryService<cas::CreateCertificateRequest> for CasCreate {
    type Response = cas::Certificate;
    type Future = BoxFuture<tonic::Response<cas::Certificate>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<cas::CreateCertificateRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            tokio::time::sleep(state.delay).await;
            state.create_cas(request).map(tonic::Response::new)
        })
    }
}

impl tonic::server::UnaryService<MeshCertificateRequest> for MeshCreate {
    type Response = MeshCertificateResponse;
    type Future = BoxFuture<tonic::Response<MeshCertificateResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<MeshCertificateRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            tokio::time::sleep(state.delay).await;
            state.create_meshca(request).map(tonic::Response::new)
        })
    }
}

impl tonic::server::UnaryService<IstioCertificateRequest> for Create {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<tonic::Response<IstioCertificateResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            tokio::time::sleep(state.delay).await;
            state.create(request).map(tonic::Response::new)
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for CaService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            state
                .calls
                .lock()
                .expect("lock")
                .push((Instant::now(), path.clone()));
            let unavailable = state
                .unavailable
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if unavailable {
                return Ok(
                    tonic::Status::unavailable("the CA is overloaded; try again").into_http(),
                );
            }
            if path == cas::CREATE_CERTIFICATE {
                let codec = tonic_prost::ProstCodec::<
                    cas::Certificate,
                    cas::CreateCertificateRequest,
                >::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                return Ok(grpc.unary(CasCreate(state), request).await);
            }
            if path == meshca::CREATE_CERTIFICATE {
                let codec = tonic_prost::ProstCodec::<
                    MeshCertificateResponse,
                    MeshCertificateRequest,
                >::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                return Ok(grpc.unary(MeshCreate(state), request).await);
            }
            if path != CREATE_CERTIFICATE {
                return Ok(tonic::Status::unimplemented("unknown method").into_http());
            }
            let codec = tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(Create(state), request).await)
        })
    }
}
