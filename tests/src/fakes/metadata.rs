//! Fake GCE / Cloud Run metadata server: plain HTTP, `/computeMetadata/v1/...`, strict about
//! `Metadata-Flavor: Google` (403 without it, as the real one) and answering with it.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::server::{FakeServer, Reply, Request};

/// The bearer token the fake hands out; the other fakes require it.
pub const ACCESS_TOKEN: &str = "ya29.fake-metadata-token";

/// What the instance looks like.
#[derive(Clone, Debug)]
pub struct Instance {
    /// `project/project-id`.
    pub project_id: String,
    /// `project/numeric-project-id`.
    pub project_number: String,
    /// `instance/service-accounts/default/email`.
    pub email: String,
    /// Region name; served as `projects/N/regions/REGION`.
    pub region: String,
    /// Extra paths (e.g. `instance/attributes/cluster-name`).
    pub extra: BTreeMap<String, String>,
    /// `expires_in` of the access tokens handed out, in seconds.
    pub token_lifetime: u64,
}

impl Default for Instance {
    fn default() -> Self {
        Instance {
            project_id: "wl-project".into(),
            project_number: "1234567890".into(),
            email: "k8s-fortio@wl-project.iam.gserviceaccount.com".into(),
            region: "us-central1".into(),
            extra: BTreeMap::new(),
            token_lifetime: 3599,
        }
    }
}

/// Starts the fake.
pub fn start(instance: Instance) -> FakeServer {
    let instance = Arc::new(instance);
    FakeServer::http(Arc::new(move |req: &Request| answer(&instance, req)))
}

fn flavored(reply: Reply) -> Reply {
    reply.with_header("metadata-flavor", "Google")
}

fn answer(instance: &Instance, req: &Request) -> Reply {
    if req.header("metadata-flavor") != Some("Google") {
        return flavored(Reply::status(
            403,
            "Missing Metadata-Flavor:Google header.\n",
        ));
    }
    if req.header("x-forwarded-for").is_some() {
        return flavored(Reply::status(403, "X-Forwarded-For is not allowed\n"));
    }
    if req.method != "GET" {
        return flavored(Reply::status(405, "method not allowed\n"));
    }
    if req.path == "/" {
        return flavored(Reply::status(200, "computeMetadata/\n"));
    }
    let Some(path) = req.path.strip_prefix("/computeMetadata/v1/") else {
        return flavored(Reply::status(404, "not found\n"));
    };
    let text = |s: &str| flavored(Reply::status(200, s));
    match path {
        "project/project-id" => text(&instance.project_id),
        "project/numeric-project-id" => text(&instance.project_number),
        "instance/service-accounts/default/email" => text(&instance.email),
        "instance/region" => text(&format!(
            "projects/{}/regions/{}",
            instance.project_number, instance.region
        )),
        "instance/service-accounts/default/token" => flavored(Reply::json(serde_json::json!({
            "access_token": ACCESS_TOKEN,
            "expires_in": instance.token_lifetime,
            "token_type": "Bearer",
        }))),
        "instance/service-accounts/default/identity" => {
            let audience = query_param(req.query.as_deref(), "audience");
            match audience {
                Some(aud) if !aud.is_empty() => text(&id_token(&instance.email, &aud)),
                _ => flavored(Reply::status(
                    400,
                    "non-empty audience parameter required\n",
                )),
            }
        }
        other => match instance.extra.get(other) {
            Some(value) => text(value),
            None => flavored(Reply::status(404, "not found\n")),
        },
    }
}

/// A Google-style ID token (unsigned: the fake's callers only decode it) for `audience`.
pub fn id_token(email: &str, audience: &str) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{}.{}.fake-signature",
        b64(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
        b64(
            serde_json::json!({"aud": audience, "email": email, "iss": "https://accounts.google.com", "exp": now + 3600, "iat": now, "sub": "1"})
        )
    )
}

/// The audience a fake ID token was minted for.
pub fn id_token_audience(token: &str) -> Option<String> {
    id_token_claim(token, "aud")
}

/// The service account a fake ID token was minted for (its `email` claim).
pub fn id_token_email(token: &str) -> Option<String> {
    id_token_claim(token, "email")
}

fn id_token_claim(token: &str, name: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims[name].as_str().map(str::to_owned)
}

/// The percent-decoded value of `name` in a query string.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A metadata server that answers every request with a `size`-byte body (flavored, status
/// 200) streamed in 64 KiB chunks, and counts the bytes it managed to write before the client
/// closed the connection.
pub struct Flood {
    addr: std::net::SocketAddr,
    written: Arc<std::sync::atomic::AtomicU64>,
    finished: tokio::sync::watch::Receiver<u32>,
}

/// How a [`Flood`] frames its body.
#[derive(Clone, Copy, Debug)]
pub enum Framing {
    /// `Content-Length: size` up front.
    Declared,
    /// `Transfer-Encoding: chunked`: the size shows only as the bytes come.
    Chunked,
}

impl Flood {
    /// Starts the flood on the fakes' runtime.
    pub fn start(size: u64, framing: Framing) -> Flood {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind flood");
        listener.set_nonblocking(true).expect("nonblocking flood");
        let addr = listener.local_addr().expect("flood addr");
        let written = Arc::new(AtomicU64::new(0));
        let (done, finished) = tokio::sync::watch::channel(0u32);
        let counter = written.clone();
        super::server::runtime().spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("flood listener");
            while let Ok((mut conn, _)) = listener.accept().await {
                // The request head is small; one read is enough for the client's GET.
                let mut head = [0u8; 4096];
                let _ = conn.read(&mut head).await;
                let framing_header = match framing {
                    Framing::Declared => format!("content-length: {size}"),
                    Framing::Chunked => "transfer-encoding: chunked".to_owned(),
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nmetadata-flavor: Google\r\ncontent-type: text/plain\r\n{framing_header}\r\n\r\n"
                );
                if conn.write_all(head.as_bytes()).await.is_err() {
                    continue;
                }
                const CHUNK: usize = 64 << 10;
                let data = vec![b'x'; CHUNK];
                let mut framed = Vec::with_capacity(CHUNK + 16);
                if let Framing::Chunked = framing {
                    framed.extend_from_slice(format!("{CHUNK:x}\r\n").as_bytes());
                }
                framed.extend_from_slice(&data);
                if let Framing::Chunked = framing {
                    framed.extend_from_slice(b"\r\n");
                }
                let mut sent = 0u64;
                while sent < size {
                    if conn.write_all(&framed).await.is_err() {
                        break;
                    }
                    sent += CHUNK as u64;
                    counter.fetch_add(CHUNK as u64, Ordering::SeqCst);
                }
                done.send_modify(|n| *n += 1);
            }
        });
        Flood {
            addr,
            written,
            finished,
        }
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Waits (up to a minute, a hang guard) until `connections` answers ended, by a write
    /// error or by reaching the size; returns the body bytes written in all.
    pub async fn written_after(&self, connections: u32) -> u64 {
        let mut finished = self.finished.clone();
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            finished.wait_for(|n| *n >= connections),
        )
        .await
        .expect("the flood's connections end within a minute")
        .expect("flood task alive");
        self.written.load(std::sync::atomic::Ordering::SeqCst)
    }
}
