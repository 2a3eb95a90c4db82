//! Workload identity scenarios: K8s token → CSR → Istio CA → verified chain on disk,
//! misbehaving and unavailable CAs, rotation, Google token exchange, and the local CA.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use krun_tests::fakes::ca::FakeCa;
use krun_tests::fakes::google::FakeGoogle;
use krun_tests::fakes::kube::{self, FakeKube};
use krun_tests::fakes::pki::{TestCa, jwt};
use krun_tests::{HANG_GUARD, Krun, TempDir, hbone_client};
use mesh::http::HttpClient;
use mesh::identity::google_tokens::GoogleTokens;
use mesh::identity::istio_ca::{self, ISTIOD_SERVER_NAME, IstioCaClient, IstioCaConfig};
use mesh::identity::k8s_token::{K8sTokenSource, TokenFile, istio_token_path};
use mesh::identity::local_ca::{self, LocalCa};
use mesh::identity::roots::mesh_env_roots;
use mesh::identity::token::Token;
use mesh::identity::token_cache::{CacheKey, CachePolicy, TokenCache, TokenKind};
use mesh::identity::{
    CertResolver, Identity, IdentityError, IdentityInputs, RotationPolicy, Signer, SpiffeId,
    WorkloadCert,
};
use rustls::client::ResolvesClientCert;
use tokio::sync::watch;

const TRUST_DOMAIN: &str = "proj.svc.id.goog";
const NAMESPACE: &str = "prod";
const KSA: &str = "reviews";

fn me() -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, NAMESPACE, KSA)
}

/// A fake cluster (K8s API + Istio CA) and a base dir, as krun would see them.
struct World {
    k8s: FakeKube,
    ca: FakeCa,
    base: TempDir,
    /// Another mesh root published in mesh-env (`CAROOT_CAS`), trusted for peers.
    other_root: String,
}

impl World {
    async fn new(rtt: Duration) -> World {
        World {
            k8s: {
                let k8s = kube::start(None);
                k8s.server.set_latency(rtt);
                k8s
            },
            ca: FakeCa::start(TestCa::new("mesh root"), TRUST_DOMAIN, rtt).await,
            base: TempDir::new("identity"),
            other_root: TestCa::new("CAS root").root_pem,
        }
    }

    fn base(&self) -> PathBuf {
        self.base.join("")
    }

    fn ca_config(&self) -> IstioCaConfig {
        IstioCaConfig {
            addr: self.ca.addr.to_string(),
            root_pem: self.ca.root_pem(),
            server_name: ISTIOD_SERVER_NAME.to_owned(),
            cluster_id: "cluster-1".to_owned(),
        }
    }

    fn token_source(&self) -> K8sTokenSource {
        K8sTokenSource::new(
            self.k8s.client(),
            NAMESPACE,
            KSA,
            TRUST_DOMAIN,
            Duration::from_secs(3600),
        )
    }

    /// The launcher's wiring: the istio-token request and the CA handshake run concurrently,
    /// then the first certificate is minted.
    async fn start_identity(
        &self,
        policy: RotationPolicy,
    ) -> Result<(Identity, TokenFile), IdentityError> {
        let config = self.ca_config();
        let (tokens, connection) = tokio::join!(
            TokenFile::start(self.token_source(), istio_token_path(&self.base())),
            istio_ca::connect(&config),
        );
        let tokens = tokens.expect("istio-token");
        let connection = connection.expect("CA connection");
        let identity = Identity::start(IdentityInputs {
            identity: me(),
            signer: Signer::IstioCa(IstioCaClient::new(config, connection, tokens.subscribe())),
            base_dir: self.base(),
            policy,
            trust_bundle: mesh_env_roots([("CAROOT_CAS", self.other_root.as_str())])
                .expect("mesh-env roots"),
        })
        .await?;
        Ok((identity, tokens))
    }
}

fn leaf_uri(cert: &WorkloadCert) -> String {
    hbone::identity::uri_sans(cert.chain[0].as_ref()).join(",")
}

/// Mode and group a secret must have: 0640 group 1337 as root, 0600 otherwise.
fn assert_secret_mode(path: &Path) {
    let meta = std::fs::metadata(path).expect("secret file exists");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o640,
            "{}",
            path.display()
        );
        assert_eq!(meta.gid(), 1337, "{}", path.display());
    } else {
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            path.display()
        );
    }
}

async fn wait_until<T>(rx: &mut watch::Receiver<T>, what: &str, mut done: impl FnMut(&T) -> bool) {
    tokio::time::timeout(HANG_GUARD, rx.wait_for(|v| done(v)))
        .await
        .unwrap_or_else(|_| panic!("hung waiting for {what}"))
        .expect("sender alive");
}

#[tokio::test]
async fn config_to_token_to_csr_to_verified_chain_written_with_the_stated_modes() {
    let world = World::new(Duration::ZERO).await;
    let (identity, _tokens) = world
        .start_identity(RotationPolicy::default())
        .await
        .expect("identity");

    let cert = identity.store().current().expect("a certificate");
    assert_eq!(
        leaf_uri(&cert),
        "spiffe://proj.svc.id.goog/ns/prod/sa/reviews"
    );
    assert_eq!(world.k8s.token_requests(), 1);
    assert_eq!(world.ca.signed(), 1);

    let token = istio_token_path(&world.base());
    assert_secret_mode(&token);
    let out = world.base().join("var/run/secrets/istio.io");
    assert_secret_mode(&out.join("key.pem"));
    for public in ["cert-chain.pem", "root-cert.pem"] {
        let mode = std::fs::metadata(out.join(public))
            .expect(public)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{public}");
    }
    let chain = std::fs::read_to_string(out.join("cert-chain.pem")).expect("chain");
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf and root"
    );
    let bundle = std::fs::read_to_string(out.join("root-cert.pem")).expect("root");
    assert_eq!(
        bundle,
        format!("{}{}", world.ca.root_pem(), world.other_root),
        "one trust bundle: the CA root, then the mesh-env roots"
    );
    assert_eq!(cert.roots.len(), 2);
}

#[tokio::test]
async fn a_ca_that_signs_another_identity_is_rejected_with_both_names() {
    let world = World::new(Duration::ZERO).await;
    world
        .ca
        .issue_for("spiffe://proj.svc.id.goog/ns/prod/sa/admin");
    let err = world
        .start_identity(RotationPolicy::default())
        .await
        .err()
        .expect("rejected");
    let msg = err.to_string();
    assert!(
        msg.contains("spiffe://proj.svc.id.goog/ns/prod/sa/admin"),
        "{msg}"
    );
    assert!(
        msg.contains("requested spiffe://proj.svc.id.goog/ns/prod/sa/reviews"),
        "{msg}"
    );
    assert!(
        !world
            .base()
            .join("var/run/secrets/istio.io/key.pem")
            .exists()
    );
}

#[tokio::test]
async fn ca_unauthenticated_names_the_token_audience_to_check() {
    let world = World::new(Duration::ZERO).await;
    world.ca.reject_all_tokens();
    let err = world
        .start_identity(RotationPolicy::default())
        .await
        .err()
        .expect("rejected");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "Istio CA {} rejected the token (UNAUTHENTICATED: authenticate failed",
            world.ca.addr
        )),
        "{msg}"
    );
    assert!(msg.contains("check the istio-token audience"), "{msg}");
}

#[tokio::test]
async fn a_ca_outage_during_rotation_keeps_the_old_certificate_and_recovers() {
    let mut world = World::new(Duration::ZERO).await;
    let policy = RotationPolicy {
        ttl: Duration::from_secs(4),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(200),
        ..RotationPolicy::default()
    };
    let (identity, _tokens) = world.start_identity(policy).await.expect("identity");
    let store = identity.store().clone();
    let first = store.current().expect("first certificate");
    let mut health = store.health();
    let mut certs = store.subscribe();
    certs.borrow_and_update();

    let failures_before = mesh::identity::ROTATION_FAILURES.get();
    world.ca.down().await;
    wait_until(&mut health, "a failed rotation", |h| {
        h.consecutive_failures >= 2
    })
    .await;
    assert!(
        mesh::identity::ROTATION_FAILURES.get() >= failures_before + 2,
        "each failed attempt is counted"
    );
    let during = store.current().expect("still a certificate");
    assert!(
        Arc::ptr_eq(&first, &during),
        "the old certificate is kept during the outage"
    );
    let error = health.borrow().last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!("Istio CA {}: Unavailable", world.ca.addr)),
        "{error}"
    );

    world.ca.up().await;
    wait_until(&mut certs, "the rotated certificate", |c| {
        c.as_ref().is_some_and(|c| !Arc::ptr_eq(c, &first))
    })
    .await;
    assert_eq!(store.health().borrow().consecutive_failures, 0);
    assert_eq!(leaf_uri(&store.current().expect("new")), me().to_string());
}

#[tokio::test]
async fn an_istio_ca_answering_unavailable_twice_still_yields_the_first_certificate() {
    let world = World::new(Duration::ZERO).await;
    world.ca.unavailable_next(2);
    let policy = RotationPolicy {
        initial_backoff: Duration::from_millis(10),
        ..RotationPolicy::default()
    };
    let (identity, _tokens) = world.start_identity(policy).await.expect("identity");
    assert_eq!(
        leaf_uri(&identity.store().current().expect("cert")),
        me().to_string()
    );
    assert_eq!(
        (world.ca.calls().len(), world.ca.signed()),
        (3, 1),
        "two Unavailable answers retried, then signed"
    );
}

#[tokio::test]
async fn an_unavailable_ca_fails_startup_once_the_budget_is_spent() {
    let world = World::new(Duration::ZERO).await;
    world.ca.unavailable_next(u32::MAX);
    let policy = RotationPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
        startup_budget: Duration::from_millis(200),
        ..RotationPolicy::default()
    };
    let err = world
        .start_identity(policy)
        .await
        .err()
        .expect("startup fails");
    assert!(
        err.to_string()
            .starts_with(&format!("Istio CA {}: Unavailable", world.ca.addr)),
        "{err}"
    );
    assert!(world.ca.calls().len() > 1, "retried before giving up");
    assert_eq!(world.ca.signed(), 0);
}

fn local_ca_dir(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let cacerts = dir.join("cacerts");
    TestCa::new("local root").write_cacerts(&cacerts);
    (dir, cacerts)
}

/// Real time, not tokio's paused clock: rotation deadlines follow the wall clock, which a
/// paused tokio clock does not move.
#[tokio::test]
async fn rotation_happens_at_half_life() {
    let (dir, cacerts) = local_ca_dir("rotate");
    // 80 s plus the local CA's 60 s backdate: half-life 10 s after the mint, the jittered
    // rotation no earlier than 3 s after it.
    let ttl = Duration::from_secs(80);
    let identity = Identity::start(IdentityInputs {
        identity: me(),
        signer: Signer::Local(Box::new(LocalCa::load(&cacerts).expect("local CA"))),
        base_dir: dir.join("base"),
        policy: RotationPolicy {
            ttl,
            ..RotationPolicy::default()
        },
        trust_bundle: Vec::new(),
    })
    .await
    .expect("identity");
    let first = identity.store().current().expect("first");
    let lifetime = first
        .not_after
        .duration_since(first.not_before)
        .expect("validity");
    let mut certs = identity.store().subscribe();
    certs.borrow_and_update();
    // What the data plane's TLS configs use: it follows the store without a restart.
    let resolver = CertResolver::new(identity.store());
    let handshake_chain = || {
        let key = ResolvesClientCert::resolve(&resolver, &[], &[]).expect("a certificate");
        key.keys_match().expect("the signing key matches the leaf");
        key.cert.clone()
    };
    assert_eq!(handshake_chain(), first.chain);

    tokio::time::timeout(HANG_GUARD, certs.changed())
        .await
        .expect("rotated within the hang guard")
        .expect("rotated");
    let rotated_at = std::time::SystemTime::now();
    let second = identity.store().current().expect("second");
    assert_ne!(second.chain, first.chain);
    assert_eq!(
        handshake_chain(),
        second.chain,
        "new handshakes use the new certificate"
    );
    // Rotation is at half-life minus up to 5 % of the lifetime of jitter, never earlier.
    assert!(
        rotated_at >= first.half_life() - lifetime / 20,
        "rotated before its jittered half-life"
    );
}

#[tokio::test]
async fn the_local_ca_accepts_an_rsa_4096_root_and_intermediate() {
    let dir = TempDir::new("rsa");
    let root_key = openssl_rsa_key(&dir, "root", false);
    let inter_key_pem = openssl_rsa_key(&dir, "inter", true);
    let root = TestCa::with_key(
        "rsa root",
        rcgen::KeyPair::from_pem(&root_key).expect("root key"),
    );
    let inter_pkcs8 = dir.join("inter.pem");
    let inter_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(inter_pkcs8).expect("pkcs8"))
        .expect("inter key");
    let inter = root.intermediate("rsa intermediate", inter_key);
    let cacerts = dir.join("cacerts");
    std::fs::create_dir_all(&cacerts).expect("dir");
    std::fs::write(cacerts.join("ca-cert.pem"), &inter).expect("ca-cert");
    std::fs::write(cacerts.join("ca-key.pem"), inter_key_pem).expect("ca-key (PKCS#1)");
    std::fs::write(cacerts.join("root-cert.pem"), &root.root_pem).expect("root");
    std::fs::write(
        cacerts.join("cert-chain.pem"),
        format!("{inter}{}", root.root_pem),
    )
    .expect("chain");

    let identity = Identity::start(IdentityInputs {
        identity: me(),
        signer: Signer::Local(Box::new(
            LocalCa::load(&cacerts).expect("RSA local CA loads"),
        )),
        base_dir: dir.join("base"),
        policy: RotationPolicy::default(),
        trust_bundle: Vec::new(),
    })
    .await
    .expect("RSA-signed chain verifies");
    let cert = identity.store().current().expect("cert");
    assert_eq!(cert.chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(leaf_uri(&cert), me().to_string());
}

/// An RSA 4096 key made by openssl, as Istio's Makefile.selfsigned.mk does. Returns the PEM,
/// PKCS#1 (`RSA PRIVATE KEY`) when `traditional`; `<name>.pem` always holds PKCS#8.
fn openssl_rsa_key(dir: &TempDir, name: &str, traditional: bool) -> String {
    let pkcs8 = dir.join(&format!("{name}.pem"));
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:4096",
            "-out",
        ],
        &pkcs8,
    );
    if !traditional {
        return std::fs::read_to_string(&pkcs8).expect("key");
    }
    let pem = openssl(&["rsa", "-traditional", "-in"], &pkcs8);
    assert!(pem.contains("BEGIN RSA PRIVATE KEY"), "{pem}");
    pem
}

/// Runs openssl with `args` then `path`; returns its stdout.
fn openssl(args: &[&str], path: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .arg(path)
        .stderr(std::process::Stdio::null())
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl {args:?} failed");
    String::from_utf8(out.stdout).expect("PEM output")
}

#[tokio::test]
async fn the_local_ca_accepts_an_ec_p256_key_in_openssl_sec1_form() {
    let dir = TempDir::new("sec1");
    let sec1_path = dir.join("ca-key-sec1.pem");
    let sec1 = openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ],
        &sec1_path,
    );
    assert!(sec1.is_empty());
    let sec1 = std::fs::read_to_string(&sec1_path).expect("SEC1 key");
    assert!(sec1.contains("BEGIN EC PRIVATE KEY"), "{sec1}");
    let pkcs8 = openssl(&["pkcs8", "-topk8", "-nocrypt", "-in"], &sec1_path);
    let root = TestCa::with_key("ec root", rcgen::KeyPair::from_pem(&pkcs8).expect("PKCS#8"));
    let cacerts = dir.join("cacerts");
    root.write_cacerts(&cacerts);
    std::fs::write(cacerts.join("ca-key.pem"), sec1).expect("SEC1 ca-key.pem");

    let identity = Identity::start(IdentityInputs {
        identity: me(),
        signer: Signer::Local(Box::new(
            LocalCa::load(&cacerts).expect("SEC1 CA key loads"),
        )),
        base_dir: dir.join("base"),
        policy: RotationPolicy::default(),
        trust_bundle: Vec::new(),
    })
    .await
    .expect("chain verifies");
    let cert = identity.store().current().expect("cert");
    assert_eq!(leaf_uri(&cert), me().to_string());
}

#[tokio::test]
async fn an_unwritable_token_file_names_the_path() {
    let world = World::new(Duration::ZERO).await;
    // A regular file where the directory should be: unwritable even for root.
    let base = world.base.join("not-a-dir");
    std::fs::write(&base, "x").expect("file");
    let source = world.token_source();
    let path = istio_token_path(&base);
    let err = TokenFile::start(source, path.clone())
        .await
        .err()
        .expect("unwritable");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot write {}", path.display())),
        "{msg}"
    );
    assert!(msg.contains("MESH_BASE_DIR"), "{msg}");
}

#[tokio::test]
async fn the_istio_token_is_refreshed_before_expiry_and_retried_while_the_old_one_is_valid() {
    let world = World::new(Duration::ZERO).await;
    let source = K8sTokenSource::new(
        world.k8s.client(),
        NAMESPACE,
        KSA,
        TRUST_DOMAIN,
        Duration::from_secs(3),
    );
    let path = istio_token_path(&world.base());
    let tokens = TokenFile::start(source, path.clone())
        .await
        .expect("first token");
    let mut rx = tokens.subscribe();
    let first = rx.borrow_and_update().clone();
    assert_eq!(
        std::fs::read_to_string(&path).expect("file"),
        first.secret()
    );

    // The API server is briefly unavailable when the refresh (at ~80 % of 3 s) comes due.
    world.k8s.fail_token_requests(2);
    wait_until(&mut rx, "the refreshed token", |t| *t != first).await;
    let second = rx.borrow().clone();
    assert!(second.expires_at > first.expires_at);
    assert_eq!(
        std::fs::read_to_string(&path).expect("file"),
        second.secret()
    );
    assert_eq!(
        world.k8s.token_requests(),
        2,
        "two tokens issued, the failures in between retried"
    );
    assert_secret_mode(&path);
}

fn google(fake: &FakeGoogle) -> GoogleTokens {
    let subject = jwt(
        "system:serviceaccount:prod:reviews",
        TRUST_DOMAIN,
        Duration::from_secs(3600),
    );
    let (_, rx) = watch::channel(Token::new(
        subject,
        std::time::SystemTime::now() + Duration::from_secs(3600),
    ));
    GoogleTokens::new(
        HttpClient::new(Duration::from_secs(10)).expect("http"),
        &fake.url(),
        &fake.url(),
        rx,
        mesh::identity::google_tokens::sts_audience(
            TRUST_DOMAIN,
            "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c",
        ),
        Some(mesh::identity::google_tokens::mesh_dataplane_gsa("123")),
    )
}

#[tokio::test]
async fn a_hundred_concurrent_id_token_requests_cause_one_exchange() {
    let fake = FakeGoogle::start(Duration::from_millis(20));
    let cache = Arc::new(TokenCache::new(google(&fake), CachePolicy::default()));
    let key = CacheKey {
        kind: TokenKind::Id,
        audience: "https://svc.a.run.app".into(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (cache, key) = (cache.clone(), key.clone());
        tasks.spawn(async move { cache.get(&key).await.map(|t| t.secret().to_owned()) });
    }
    let tokens: Vec<String> = tasks
        .join_all()
        .await
        .into_iter()
        .map(|r| r.expect("token"))
        .collect();
    assert!(tokens.iter().all(|t| *t == tokens[0]));
    assert_eq!(
        (fake.sts_calls(), fake.iam_calls()),
        (1, 1),
        "one STS and one IAM call"
    );
}

#[tokio::test]
async fn sts_400_carries_googles_message() {
    let fake = FakeGoogle::start(Duration::ZERO);
    fake.fail_sts();
    let err = google(&fake).federated().await.expect_err("STS fails");
    let msg = err.to_string();
    assert!(msg.starts_with("STS token exchange"), "{msg}");
    assert!(
        msg.contains(
            "HTTP 400 Bad Request: invalid_grant: The audience in ID Token does not match"
        ),
        "{msg}"
    );
}

#[tokio::test]
async fn iam_403_carries_googles_message() {
    let fake = FakeGoogle::start(Duration::ZERO);
    fake.deny_iam();
    let tokens = google(&fake);
    let fed = tokens.federated().await.expect("federated");
    let err = tokens
        .id_token(&fed, "https://svc.a.run.app")
        .await
        .expect_err("denied");
    let msg = err.to_string();
    assert!(msg.starts_with("IAM generateIdToken"), "{msg}");
    assert!(msg.contains("HTTP 403 Forbidden: PERMISSION_DENIED: Permission 'iam.serviceAccounts.getOpenIdToken' denied"), "{msg}");
    // The access-token path sends lifetime as a duration string, which the strict fake checks.
    let fake_ok = FakeGoogle::start(Duration::ZERO);
    let tokens = google(&fake_ok);
    let fed = tokens.federated().await.expect("federated");
    tokens
        .access_token(&fed)
        .await
        .expect("lifetime accepted as \"3600s\"");
}

/// The fake CA's endpoint, verified with its own root.
fn fake_ca_endpoint(ca: &FakeCa) -> mesh::identity::ca_grpc::CaEndpoint {
    mesh::identity::ca_grpc::CaEndpoint {
        addr: ca.addr.to_string(),
        root_pem: Some(ca.root_pem()),
        server_name: Some(ISTIOD_SERVER_NAME.to_owned()),
    }
}

#[tokio::test]
async fn meshca_signs_with_the_federated_token_and_the_location() {
    use mesh::identity::meshca::{MeshCaClient, MeshCaConfig};
    let google_fake = FakeGoogle::start(Duration::ZERO);
    let ca = FakeCa::start(TestCa::new("mesh root"), TRUST_DOMAIN, Duration::ZERO).await;
    ca.serve_meshca("federated-token");
    let base = TempDir::new("meshca");
    let tokens = Arc::new(TokenCache::new(
        google(&google_fake),
        CachePolicy::default(),
    ));
    let config = MeshCaConfig {
        endpoint: fake_ca_endpoint(&ca),
        location: Some("us-central1".to_owned()),
        mesh_root_pem: ca.root_pem(),
        bearer: TokenKind::Federated,
    };
    let client = MeshCaClient::connect(config, tokens).await.expect("MeshCA");
    let identity = Identity::start(IdentityInputs {
        identity: me(),
        signer: Signer::MeshCa(client),
        base_dir: base.join(""),
        policy: RotationPolicy::default(),
        trust_bundle: Vec::new(),
    })
    .await
    .expect("MeshCA certificate");
    assert_eq!(
        leaf_uri(&identity.store().current().expect("cert")),
        me().to_string()
    );
    assert_eq!(
        ca.meshca_request_params().as_deref(),
        Some("location=locations/us-central1")
    );
    assert_eq!(
        google_fake.sts_calls(),
        1,
        "the federated token, no IAM call"
    );
    assert_eq!(google_fake.iam_calls(), 0);
}

#[tokio::test]
async fn cas_reflects_the_callers_spiffe_identity_and_writes_both_layouts() {
    use mesh::identity::cas::{CasClient, CasConfig};
    const POOL: &str = "projects/p/locations/us-central1/caPools/mesh";
    let google_fake = FakeGoogle::start(Duration::ZERO);
    let ca = FakeCa::start(TestCa::new("CAS root"), TRUST_DOMAIN, Duration::ZERO).await;
    ca.serve_cas("federated-token", POOL, &me().to_string());
    let base = TempDir::new("cas");
    let tokens = Arc::new(TokenCache::new(
        google(&google_fake),
        CachePolicy::default(),
    ));
    let config = CasConfig {
        endpoint: fake_ca_endpoint(&ca),
        pool: POOL.to_owned(),
        pool_root_pem: ca.root_pem(),
    };
    let client = CasClient::connect(config, tokens).await.expect("CAS");
    let identity = Identity::start(IdentityInputs {
        identity: me(),
        signer: Signer::Cas(client),
        base_dir: base.join(""),
        policy: RotationPolicy::default(),
        trust_bundle: Vec::new(),
    })
    .await
    .expect("CAS certificate");
    assert_eq!(
        leaf_uri(&identity.store().current().expect("cert")),
        me().to_string()
    );
    let gke = mesh::identity::workload_spiffe_dir(&base.join(""));
    assert_secret_mode(&gke.join("private_key.pem"));
    let istio = base.join("var/run/secrets/istio.io");
    assert_eq!(
        std::fs::read(gke.join("certificates.pem")).expect("GKE chain"),
        std::fs::read(istio.join("cert-chain.pem")).expect("Istio chain")
    );
    assert_eq!(
        std::fs::read(gke.join("ca_certificates.pem")).expect("GKE roots"),
        std::fs::read(istio.join("root-cert.pem")).expect("Istio roots")
    );
}

#[tokio::test]
async fn id_tokens_from_the_metadata_server_are_cached_per_audience() {
    use krun_tests::fakes::server::{FakeServer, Reply, Request};
    use mesh::metadata::MetadataClient;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    // Strict like the metadata server: the flavor header, an audience, format=full.
    let metadata = FakeServer::http(Arc::new(move |req: &Request| {
        let audience = (req.path
            == "/computeMetadata/v1/instance/service-accounts/default/identity")
            .then_some(req.query.as_deref())
            .flatten()
            .and_then(|q| q.strip_prefix("audience="))
            .and_then(|rest| rest.strip_suffix("&format=full"));
        match (req.header("metadata-flavor"), audience) {
            (Some("Google"), Some(aud)) => {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let aud = aud.replace("%3A", ":").replace("%2F", "/");
                Reply::status(
                    200,
                    jwt(
                        "sa@p.iam.gserviceaccount.com",
                        &aud,
                        Duration::from_secs(3600),
                    ),
                )
                .with_header("metadata-flavor", "Google")
            }
            _ => Reply::json_status(
                403,
                serde_json::json!({"error": "Missing Metadata-Flavor:Google header."}),
            ),
        }
    }));
    let host = metadata.addr().to_string();
    let cache = TokenCache::new(
        MetadataClient::new(&host, Duration::from_secs(10)),
        CachePolicy::default(),
    );
    let key = |aud: &str| CacheKey {
        kind: TokenKind::Id,
        audience: aud.to_owned(),
    };
    let a = cache
        .get(&key("https://a.a.run.app"))
        .await
        .expect("token a");
    let again = cache
        .get(&key("https://a.a.run.app"))
        .await
        .expect("cached a");
    let b = cache
        .get(&key("https://b.a.run.app"))
        .await
        .expect("token b");
    assert_eq!(a, again);
    assert_ne!(a, b);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one call per audience"
    );
    let claims = mesh::identity::jwt::Claims::decode(b.secret()).expect("JWT");
    assert!(claims.aud.contains("https://b.a.run.app"));
}

#[tokio::test]
async fn an_id_token_answer_without_the_flavor_header_is_refused() {
    use krun_tests::fakes::server::{FakeServer, Reply, Request};
    use mesh::metadata::{MetadataClient, MetadataError};
    // A proxy or captive portal that hands out something shaped like a token.
    let portal = FakeServer::http(Arc::new(|_req: &Request| {
        Reply::status(
            200,
            jwt(
                "sa@p.iam.gserviceaccount.com",
                "aud",
                Duration::from_secs(3600),
            ),
        )
    }));
    let client = MetadataClient::new(&portal.addr().to_string(), Duration::from_secs(10));
    let refused = client
        .id_token("https://a.a.run.app")
        .await
        .expect_err("no flavor, no token");
    assert!(
        matches!(refused, MetadataError::NotMetadataServer { .. }),
        "{refused}"
    );
}

#[test]
fn local_ca_mode_works_with_networking_unavailable() {
    let (dir, cacerts) = local_ca_dir("nonet");
    let base = dir.join("base");
    let finished = Krun::wrapped(&["unshare", "--net"])
        .env("CA_ADDR", format!("file://{}", cacerts.display()))
        .env("MESH_BASE_DIR", &base)
        .env("WORKLOAD_NAMESPACE", NAMESPACE)
        .env("WORKLOAD_SERVICE_ACCOUNT", KSA)
        .env("TRUST_DOMAIN", TRUST_DOMAIN)
        .env("PORT_http", "-")
        .args(["/bin/true"])
        .run();
    let output = finished.output.join("\n");
    assert_eq!(finished.code, 0, "{output}");
    assert!(
        output.contains("workload certificate minted and written"),
        "{output}"
    );
    let chain =
        std::fs::read(base.join("var/run/secrets/istio.io/cert-chain.pem")).expect("chain written");
    let first = rustls_pki_types::pem::PemObject::pem_slice_iter(&chain)
        .next()
        .and_then(Result::ok)
        .map(|c: rustls_pki_types::CertificateDer<'static>| hbone::identity::uri_sans(c.as_ref()))
        .expect("a certificate");
    assert_eq!(first, vec![me().to_string()]);
}

/// krun minting `me()` from the CA that `ca` (setting, value) selects and serving it with the
/// builtin data plane in front of an echo app; returns (krun, app port, HBONE port) once the
/// tunnel port is open.
fn builtin_workload(
    (setting, ca): (&str, &str),
    base: &Path,
    krun: Krun,
) -> (krun_tests::Running, u16, u16) {
    use krun_tests::{free_port, testapp};
    let (app, hbone, tunnel) = (free_port(), free_port(), free_port());
    let mut running = krun
        .env(setting, ca)
        .env("TRUST_DOMAIN", TRUST_DOMAIN)
        .env("WORKLOAD_NAMESPACE", NAMESPACE)
        .env("WORKLOAD_SERVICE_ACCOUNT", KSA)
        .env("MESH_BASE_DIR", base)
        .env("KRUN_DATAPLANE", "builtin")
        .env("PORT_http", app.to_string())
        .env("KRUN_HBONE_PORT", hbone.to_string())
        .env("KRUN_TUNNEL_PORT", tunnel.to_string())
        .args(testapp(&["echo", &app.to_string()]))
        .start();
    running.wait_for_line("tunnel port open");
    (running, app, hbone)
}

#[test]
fn the_krun_binary_mints_its_certificate_from_the_cluster_and_serves_hbone_with_it() {
    use krun_tests::fakes::TestWorld;
    use krun_tests::fakes::server::runtime;
    use rustls_pki_types::pem::PemObject;

    // The cluster: mesh-env publishes istiod's root and a second mesh root that peers use;
    // the K8s API mints istio-tokens; istiod's CA signs with the published root.
    let ca = runtime().block_on(FakeCa::start(
        TestCa::new("mesh root"),
        TRUST_DOMAIN,
        Duration::ZERO,
    ));
    let peers = TestCa::new("peer root");
    let world = TestWorld::builder()
        .mesh_env(&[
            ("CAROOT_ISTIOD", &ca.root_pem()),
            ("CAROOT_PEERS", &peers.root_pem),
        ])
        .start();
    let dir = TempDir::new("krun-identity");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, world.kube.kubeconfig()).expect("write kubeconfig");
    let base = dir.join("base");
    let (krun, app, hbone) = builtin_workload(
        ("CA_ADDR", &ca.addr.to_string()),
        &base,
        // This CA accepts the trust domain as audience, as ASM's istiod does (open-source
        // istiod's default is `istio-ca`, krun's default without a managed tenant).
        Krun::new()
            .env("KUBECONFIG", &kubeconfig)
            .env("OSS_ISTIO", "false"),
    );

    // The token went to the TokenRequest API with the trust domain as audience, then the CSR.
    assert_eq!(ca.signed(), 1);
    let token_requests = world
        .kube
        .server
        .seen()
        .into_iter()
        .filter(|s| {
            s.method == "POST"
                && s.path
                    .contains("/namespaces/prod/serviceaccounts/reviews/token")
        })
        .count();
    assert_eq!(token_requests, 1);
    assert_secret_mode(&istio_token_path(&base));
    let out = base.join("var/run/secrets/istio.io");
    assert_secret_mode(&out.join("key.pem"));
    for public in ["cert-chain.pem", "root-cert.pem"] {
        let mode = std::fs::metadata(out.join(public))
            .expect(public)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{public}");
    }
    let chain = std::fs::read_to_string(out.join("cert-chain.pem")).expect("chain");
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()
        .expect("a leaf")
        .expect("PEM");
    assert_eq!(
        hbone::identity::uri_sans(leaf.as_ref()),
        ["spiffe://proj.svc.id.goog/ns/prod/sa/reviews"]
    );
    let bundle = std::fs::read_to_string(out.join("root-cert.pem")).expect("root");
    assert_eq!(bundle, format!("{}{}", ca.root_pem(), peers.root_pem));

    // A peer of the other mesh root reaches the app over HBONE, verifying krun's new leaf
    // against istiod's root.
    let clients = TempDir::new("krun-identity-peer");
    let peer = peers.install_client(
        &clients.join(""),
        "peer",
        "spiffe://proj.svc.id.goog/ns/prod/sa/ratings",
    );
    std::fs::write(&peer.ca, ca.root_pem()).expect("trust istiod's root");
    let reply = hbone_client(&[
        "connect-mtls",
        "127.0.0.1",
        &hbone.to_string(),
        &format!("127.0.0.1:{app}"),
        &peer.cert.to_string_lossy(),
        &peer.key.to_string_lossy(),
        &peer.ca.to_string_lossy(),
        "ping with a cluster-minted certificate",
    ]);
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["data"], "ping with a cluster-minted certificate");
    krun.signal(nix::sys::signal::Signal::SIGTERM);
    let done = krun.finish();
    assert!(
        done.has_line("identity: Istio CA signs with an istio-token from the config cluster"),
        "{}",
        done.text()
    );
}

#[test]
fn an_istio_ca_without_a_cluster_to_mint_the_token_fails_in_one_line() {
    // No MESH, no KUBECONFIG: nothing can mint the istio-token the CA wants.
    let done = Krun::new()
        .env("CA_ADDR", "127.0.0.1:15012")
        .args(["true"])
        .run();
    assert_ne!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line(
            "CA_ADDR=127.0.0.1:15012: the Istio CA needs an istio-token from the config cluster"
        ),
        "{}",
        done.text()
    );
}

#[test]
fn a_google_ca_without_a_cluster_for_the_token_fails_in_one_line() {
    // No MESH, no KUBECONFIG: nothing can mint the K8s token STS exchanges.
    let pool = "projects/p/locations/l/caPools/mesh";
    let done = Krun::new().env("CA_POOL", pool).args(["true"]).run();
    assert_ne!(done.code, 0, "{}", done.text());
    assert!(
        done.has_line(&format!(
            "CA_POOL={pool}: the STS token exchange needs a K8s token from the config cluster"
        )),
        "{}",
        done.text()
    );
}

/// The leaf serial in lowercase hex, as krun logs it.
fn serial_of(leaf: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("an X.509 leaf");
    cert.tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The serial of the certificate krun's HBONE port presents to a new mTLS handshake, as
/// `openssl s_client` (a client krun did not write) receives it.
fn served_serial(port: u16, client: &krun_tests::fakes::pki::ClientFiles) -> String {
    use rustls_pki_types::pem::PemObject;
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(&client.cert)
        .arg("-key")
        .arg(&client.key)
        .arg("-CAfile")
        .arg(&client.ca)
        .args(["-verify_return_error", "-alpn", "h2"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
        .next()
        .unwrap_or_else(|| panic!("s_client printed no certificate: {text}"))
        .expect("PEM");
    serial_of(leaf.as_ref())
}

/// The `serial=` field of a krun log line.
fn logged_serial(line: &str) -> String {
    line.split_once("serial=")
        .map(|(_, rest)| {
            rest.trim_start_matches('"')
                .chars()
                .take_while(char::is_ascii_hexdigit)
                .collect()
        })
        .unwrap_or_else(|| panic!("no serial in {line}"))
}

/// A local CA in `cacerts` under a fresh directory, and a mesh client's files it signed.
fn local_ca_with_client(
    tag: &str,
) -> (
    TempDir,
    PathBuf,
    TestCa,
    krun_tests::fakes::pki::ClientFiles,
) {
    let dir = TempDir::new(tag);
    let cacerts = dir.join("cacerts");
    let ca = TestCa::new("local root");
    ca.write_cacerts(&cacerts);
    let client_id = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, "client").to_string();
    let client = ca.install_client(&dir.join(""), "client", &client_id);
    (dir, cacerts, ca, client)
}

#[test]
fn a_rotation_under_traffic_keeps_the_open_tunnel_and_new_handshakes_get_the_new_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (dir, cacerts, ca, client) = local_ca_with_client("rotate-traffic");
    let base = dir.join("base");
    let out = base.join("var/run/secrets/istio.io");
    let (mut krun, app, hbone) = builtin_workload(
        ("CA_ADDR", &format!("file://{}", cacerts.display())),
        &base,
        // 90 s plus the local CA's 60 s backdate: rotation 7.5 to 15 s after each mint.
        Krun::new().env("SECRET_TTL", "90s"),
    );
    let first_generation = std::fs::read_link(out.join("..data")).expect("..data link");
    let first = served_serial(hbone, &client);

    // A mesh client (the hbone crate's, with the test PKI's certificate) keeps a tunnel open.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let own = hbone::tls::WorkloadCert::from_pem(
        &std::fs::read(&client.cert).expect("client cert"),
        &std::fs::read(&client.key).expect("client key"),
        ca.root_pem.as_bytes(),
    )
    .expect("client identity");
    let hbone_client = hbone::client::HboneClient::new(
        hbone::H2Settings::default(),
        Some(watch::channel(Arc::new(own)).1),
    );
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], hbone));
    let expected = hbone::tls::ExpectedPeer::OneOf(vec![me()]);
    let (mut stream, guard) = runtime.block_on(async {
        let (mut stream, guard) = hbone_client
            .connect(peer, Some(&expected), &format!("127.0.0.1:{app}"))
            .await
            .expect("CONNECT over mTLS");
        stream.write_all(b"before;").await.expect("send");
        let mut echoed = [0u8; 7];
        stream.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"before;");
        (stream, guard)
    });

    // The rotation event: the HBONE listener serves a certificate other than the first.
    let rotated = loop {
        let line = krun.wait_for_line("new handshakes present the rotated certificate");
        if line.contains("hbone") && logged_serial(&line) != first {
            break logged_serial(&line);
        }
    };
    let generation = std::fs::read_link(out.join("..data")).expect("..data link");
    assert_ne!(
        generation, first_generation,
        "the files moved to a new generation"
    );
    assert!(
        !out.join(&first_generation).exists(),
        "the old generation is removed"
    );

    let rest = runtime.block_on(async {
        stream
            .write_all(b"after")
            .await
            .expect("the open tunnel still carries data");
        stream.shutdown().await.expect("half-close");
        let mut rest = String::new();
        stream.read_to_string(&mut rest).await.expect("read");
        rest
    });
    assert_eq!(
        rest, "after",
        "the tunnel opened before the rotation works after it"
    );
    drop(guard);
    let second = served_serial(hbone, &client);
    assert_ne!(second, first, "a new handshake gets the new certificate");
    assert_eq!(second, rotated);

    krun.signal(nix::sys::signal::Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
    assert!(done.has_line("certificate rotated"), "{}", done.text());
}

/// A Google-CA world: the cluster (K8s API with mesh-env), STS and IAM, and one fake CA that
/// serves MeshCA and CAS by the name `localhost`, trusted through `SSL_CERT_FILE`.
struct GoogleWorld {
    world: krun_tests::fakes::TestWorld,
    google: FakeGoogle,
    ca: FakeCa,
    dir: TempDir,
}

const GSA: &str = "mesh-ca@proj.iam.gserviceaccount.com";
const POOL: &str = "projects/proj/locations/us-central1/caPools/mesh";

impl GoogleWorld {
    /// `root_key` is the mesh-env key that publishes the CA's root.
    fn start(root_key: &str) -> GoogleWorld {
        use krun_tests::fakes::server::runtime;
        let ca = runtime().block_on(FakeCa::start(
            TestCa::new("google root"),
            TRUST_DOMAIN,
            Duration::ZERO,
        ));
        let world = krun_tests::fakes::TestWorld::builder()
            .mesh_env(&[(root_key, &ca.root_pem())])
            .start();
        let google = FakeGoogle::start(Duration::ZERO);
        google.expect_audience(&mesh::identity::google_tokens::sts_audience(
            TRUST_DOMAIN,
            &mesh::identity::google_tokens::cluster_url("proj", "us-central1", "istio"),
        ));
        google.with_service_account(GSA);
        let dir = TempDir::new("google-ca");
        std::fs::write(dir.join("kubeconfig"), world.kube.kubeconfig()).expect("kubeconfig");
        std::fs::write(dir.join("roots.pem"), ca.root_pem()).expect("roots");
        GoogleWorld {
            world,
            google,
            ca,
            dir,
        }
    }

    /// krun pointed at this world's cluster, Google APIs and CAs.
    fn krun(&self) -> Krun {
        let endpoint = format!("https://localhost:{}", self.ca.addr.port());
        Krun::new()
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("SSL_CERT_FILE", self.dir.join("roots.pem"))
            .env("STS_ENDPOINT", self.google.url())
            .env("IAM_CREDENTIALS_ENDPOINT", self.google.url())
            .env("MESHCA_ENDPOINT", &endpoint)
            .env("CAS_ENDPOINT", &endpoint)
            .env("PROJECT_ID", "proj")
            .env("CLUSTER_LOCATION", "us-central1")
            .env("CLUSTER_NAME", "istio")
    }

    /// Every hop krun made, in arrival order: TokenRequests, STS, IAM and CA calls.
    fn hops(&self) -> Vec<String> {
        let mut hops: Vec<(std::time::Instant, String)> = Vec::new();
        for seen in self.world.kube.server.seen() {
            if seen.method == "POST" && seen.path.contains("/token") {
                let path = seen.path.split('?').next().unwrap_or_default();
                hops.push((seen.arrived, format!("K8s TokenRequest {path}")));
            }
        }
        for seen in self.google.seen() {
            let hop = if seen.path == "/v1/token" {
                "STS token exchange".to_owned()
            } else {
                format!("IAM {}", seen.path.rsplit(':').next().unwrap_or(""))
            };
            hops.push((seen.arrived, format!("{hop} {}", seen.status)));
        }
        for (arrived, path) in self.ca.calls() {
            hops.push((
                arrived,
                path.rsplit('/').take(2).collect::<Vec<_>>().join(" "),
            ));
        }
        hops.sort_by_key(|(arrived, _)| *arrived);
        hops.into_iter().map(|(_, hop)| hop).collect()
    }
}

/// The leaf of the written chain verified by openssl against `root_pem`; returns its URI SAN.
fn openssl_verified_leaf(chain: &Path, root_pem: &str) -> Vec<String> {
    use rustls_pki_types::pem::PemObject;
    let dir = TempDir::new("verify");
    let (root, leaf) = (dir.join("root.pem"), dir.join("leaf.pem"));
    std::fs::write(&root, root_pem).expect("root");
    let pem = std::fs::read(chain).expect("chain written");
    let first = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a leaf")
        .expect("PEM");
    std::fs::write(&leaf, local_ca::to_pem(&first)).expect("leaf");
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg(&leaf)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr)
    );
    hbone::identity::uri_sans(first.as_ref())
}

#[test]
fn krun_starts_with_meshca_through_k8s_sts_and_iam_and_retries_an_unavailable_ca() {
    let g = GoogleWorld::start("CAROOT_MESHCA");
    // The bearer is the service account's access token that IAM mints from the federated one.
    g.ca.serve_meshca(krun_tests::fakes::google::ACCESS_TOKEN);
    g.ca.unavailable_next(2);
    let base = g.dir.join("base");
    let (krun, _, _) = builtin_workload(
        ("CA_ADDR", "meshca"),
        &base,
        g.krun().env("KRUN_CA_SERVICE_ACCOUNT", GSA),
    );
    let path = "/api/v1/namespaces/prod/serviceaccounts/reviews/token";
    let meshca = "CreateCertificate google.security.meshca.v1.MeshCertificateService";
    assert_eq!(
        g.hops(),
        [
            format!("K8s TokenRequest {path}"),
            "STS token exchange 200".to_owned(),
            "IAM generateAccessToken 200".to_owned(),
            meshca.to_owned(),
            meshca.to_owned(),
            meshca.to_owned(),
        ],
        "one token chain, then the CSR: twice Unavailable, then signed"
    );
    assert_eq!(g.ca.signed(), 1);
    assert_eq!(
        g.ca.meshca_request_params().as_deref(),
        Some("location=locations/us-central1")
    );
    let out = base.join("var/run/secrets/istio.io");
    assert_eq!(
        openssl_verified_leaf(&out.join("cert-chain.pem"), &g.ca.root_pem()),
        [me().to_string()]
    );
    krun.signal(nix::sys::signal::Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(
        done.output
            .iter()
            .filter(|l| l.contains("first certificate: transient CA failure; retrying"))
            .count(),
        2,
        "one warning per retried attempt:\n{}",
        done.text()
    );
}

#[test]
fn krun_starts_with_a_cas_pool_through_k8s_and_sts_and_retries_an_unavailable_ca() {
    let g = GoogleWorld::start("CAROOT_CAS");
    g.ca.serve_cas(
        krun_tests::fakes::google::FEDERATED_TOKEN,
        POOL,
        &me().to_string(),
    );
    g.ca.unavailable_next(2);
    let base = g.dir.join("base");
    let (krun, _, _) = builtin_workload(("CA_POOL", POOL), &base, g.krun());
    let path = "/api/v1/namespaces/prod/serviceaccounts/reviews/token";
    let cas = "CreateCertificate google.cloud.security.privateca.v1.CertificateAuthorityService";
    assert_eq!(
        g.hops(),
        [
            format!("K8s TokenRequest {path}"),
            "STS token exchange 200".to_owned(),
            cas.to_owned(),
            cas.to_owned(),
            cas.to_owned(),
        ],
        "the federated token is CAS's bearer: no IAM hop"
    );
    let gke = mesh::identity::workload_spiffe_dir(&base);
    assert_eq!(
        openssl_verified_leaf(&gke.join("certificates.pem"), &g.ca.root_pem()),
        [me().to_string()]
    );
    assert_eq!(
        std::fs::read(gke.join("certificates.pem")).expect("GKE chain"),
        std::fs::read(base.join("var/run/secrets/istio.io/cert-chain.pem")).expect("Istio chain")
    );
    krun.signal(nix::sys::signal::Signal::SIGTERM);
    krun.finish();
}

#[test]
fn a_missing_iam_permission_fails_startup_naming_the_binding() {
    let g = GoogleWorld::start("CAROOT_MESHCA");
    g.google.deny_iam();
    let done = g
        .krun()
        .env("CA_ADDR", "meshca")
        .env("KRUN_CA_SERVICE_ACCOUNT", GSA)
        .env("TRUST_DOMAIN", TRUST_DOMAIN)
        .env("WORKLOAD_NAMESPACE", NAMESPACE)
        .env("WORKLOAD_SERVICE_ACCOUNT", KSA)
        .env("MESH_BASE_DIR", g.dir.join("base"))
        .args(["true"])
        .run();
    assert_ne!(done.code, 0, "{}", done.text());
    let binding = format!(
        "gcloud iam service-accounts add-iam-policy-binding {GSA} --role=roles/iam.workloadIdentityUser --member='serviceAccount:{TRUST_DOMAIN}[{NAMESPACE}/{KSA}]'"
    );
    let line = &done.output[done.line_index(&binding)];
    assert!(
        line.contains("IAM generateAccessToken") && line.contains("HTTP 403 Forbidden"),
        "{line}"
    );
    assert!(
        line.contains("Permission 'iam.serviceAccounts.getAccessToken' denied"),
        "{line}"
    );
    assert_eq!(g.ca.signed(), 0);
}

/// (serial, notBefore, half-life) of the leaf in a PEM chain file.
fn leaf_times(chain: &Path) -> (String, std::time::SystemTime, std::time::SystemTime) {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(chain).expect("chain file");
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a leaf")
        .expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).expect("X.509");
    let at = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH + Duration::from_secs(t.timestamp().try_into().expect("after 1970"))
    };
    let (from, to) = (
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    );
    let half = from + to.duration_since(from).expect("validity") / 2;
    (serial_of(leaf.as_ref()), from, half)
}

#[test]
fn a_krun_stopped_past_the_rotation_time_serves_the_next_connection_a_fresh_certificate() {
    use nix::sys::signal::Signal;

    let (dir, cacerts, _ca, client) = local_ca_with_client("throttled");
    let base = dir.join("base");
    let (krun, _app, hbone) = builtin_workload(
        ("CA_ADDR", &format!("file://{}", cacerts.display())),
        &base,
        // 100 s plus the local CA's 60 s backdate: half-life 20 s after the mint, and the
        // jittered rotation timer no earlier than 12 s after it.
        Krun::new().env("SECRET_TTL", "100s"),
    );
    // Frozen as Cloud Run freezes an instance between requests: no timer runs.
    krun.signal(Signal::SIGSTOP);
    let chain = base.join("var/run/secrets/istio.io/cert-chain.pem");
    let (stale_serial, stale_from, half_life) = leaf_times(&chain);
    // Wait, by the wall clock, until the certificate is past its rotation time.
    let past = half_life + Duration::from_secs(1);
    while let Ok(left) = past.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
    krun.signal(Signal::SIGCONT);
    // At once: the first connection after the thaw.
    let served = served_serial(hbone, &client);
    if served == stale_serial {
        krun.signal(Signal::SIGTERM);
        panic!(
            "the first connection after the thaw got the certificate past its rotation time:\n{}",
            krun.finish().text()
        );
    }
    let (on_disk, fresh_from, _) = leaf_times(&chain);
    assert_eq!(served, on_disk, "the served certificate is the one written");
    assert!(fresh_from > stale_from, "a newer certificate");
    krun.signal(Signal::SIGTERM);
    let done = krun.finish();
    assert_eq!(done.code, 0, "{}", done.text());
}
