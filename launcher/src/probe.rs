//! Readiness probes: how krun learns that a process (or the app) is ready to serve.
//!
//! A probe is retried with a short, growing backoff (5 ms doubling up to its period), so a
//! process that is ready after 30 ms is seen after ~35 ms, not after a fixed poll interval.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::reaper::Reaper;

/// First retry delay of a probe.
const FIRST_RETRY: Duration = Duration::from_millis(5);
/// Default upper bound of the retry delay.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(250);
/// Default time one attempt may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// What a probe checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A TCP connect to `host:port` succeeds.
    Tcp(String),
    /// An HTTP/1.1 GET answers 200-399 (Cloud Run's rule).
    Http(String),
    /// An HTTP/1.1 GET answers 200 with a body holding each of these lines (Envoy's admin
    /// `/stats`: `server.state: 0` means LIVE).
    HttpLines(String, Vec<String>),
    /// A command exits 0.
    Exec(Vec<String>),
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Tcp(addr) => write!(f, "tcp {addr}"),
            Check::Http(url) => write!(f, "http {url}"),
            Check::HttpLines(url, lines) => write!(f, "http {url} with {}", lines.join(", ")),
            Check::Exec(cmd) => write!(f, "exec {}", cmd.join(" ")),
        }
    }
}

/// A check and its pacing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// What is checked.
    pub check: Check,
    /// Upper bound of the delay between attempts.
    pub period: Duration,
    /// Time one attempt may take.
    pub timeout: Duration,
}

impl Probe {
    /// A probe with the default pacing.
    pub fn new(check: Check) -> Self {
        Probe {
            check,
            period: DEFAULT_PERIOD,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Retries until the check passes or `deadline` passes; on failure returns the last reason.
    pub async fn wait(&self, reaper: &Reaper, deadline: Instant) -> Result<(), String> {
        let mut delay = FIRST_RETRY;
        loop {
            let outcome = match timeout(self.timeout, self.attempt(reaper)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                )),
            };
            let last_error = match outcome {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() + delay >= deadline {
                return Err(last_error);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.period);
        }
    }

    async fn attempt(&self, reaper: &Reaper) -> Result<(), String> {
        match &self.check {
            Check::Tcp(addr) => TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Check::Http(url) => {
                let (status, _) = http_get(url, 0).await?;
                if (200..400).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}"))
                }
            }
            Check::HttpLines(url, expected) => {
                let (status, body) = http_get(url, MAX_BODY).await?;
                let body = String::from_utf8_lossy(&body);
                let missing: Vec<&String> = expected
                    .iter()
                    .filter(|want| !body.lines().any(|line| line.trim() == want.as_str()))
                    .collect();
                match (status, missing.is_empty()) {
                    (200, true) => Ok(()),
                    (200, false) => Err(format!("no line {missing:?} in {:?}", body.trim())),
                    _ => Err(format!("HTTP {status}")),
                }
            }
            Check::Exec(argv) => exec(reaper, argv, self.timeout).await,
        }
    }
}

/// Largest body a probe or [`http_get`] reads; Envoy's config_dump of a big mesh fits.
const MAX_BODY: usize = 64 << 20;

/// GETs `url` over HTTP/1.1 and returns the status and up to `limit` bytes of the body.
pub async fn http_get(url: &str, limit: usize) -> Result<(u16, Bytes), String> {
    http_request(hyper::Method::GET, url, limit).await
}

/// POSTs an empty body to `url` (Envoy admin commands such as `/drain_listeners`) and returns
/// the status.
pub async fn http_post(url: &str) -> Result<u16, String> {
    http_request(hyper::Method::POST, url, 0)
        .await
        .map(|(status, _)| status)
}

async fn http_request(
    method: hyper::Method,
    url: &str,
    limit: usize,
) -> Result<(u16, Bytes), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let authority = uri.authority().ok_or("URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::USER_AGENT, "krun-probe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        if limit == 0 {
            return Ok((status, Bytes::new()));
        }
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok((status, body.to_bytes()))
    }
    .await;
    connection.abort();
    result
}

async fn exec(reaper: &Reaper, argv: &[String], limit: Duration) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut command = std::process::Command::new(program);
    command.args(args).stdin(std::process::Stdio::null());
    let mut child = reaper
        .spawn(&mut command)
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    match timeout(limit, &mut child.exit).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} ended with {status}")),
        Ok(Err(_)) => Err("reaper stopped".into()),
        Err(_) => {
            child.kill_group(nix::sys::signal::Signal::SIGKILL);
            Err(format!(
                "{program} did not finish within {}",
                humantime::format_duration(limit)
            ))
        }
    }
}
