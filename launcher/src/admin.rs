//! krun's admin endpoint on `KRUN_ADMIN_ADDR` (loopback by default), served by
//! [`mesh::admin`], which adds `/metrics` and `/logging`:
//!
//! - `/healthz/ready`: 200 once the app (or, in sidecar mode, every process) is ready; 503
//!   with what is not ready and why while starting or draining;
//! - `/config_dump`: the configuration as `--print-config` prints it (secrets redacted), and
//!   the live state: certificate, token, data plane, listeners, processes and restarts;
//! - `/quitquitquit` (POST): drains krun exactly as SIGTERM does, by sending krun SIGTERM, so
//!   the supervisor's one signal path handles both.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use hbone::listen::Bounds;
use hbone::tls::WorkloadCert;
use http::{Method, StatusCode};
use mesh::admin::{AdminRequest, Answer, Paths, text};
use mesh::identity::token::Token;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::supervisor::{Phase, UnitStatus};

/// What krun's admin paths read: watches of the live state, and the configuration.
pub struct KrunAdmin {
    /// The workload's phase.
    pub phase: watch::Receiver<Phase>,
    /// The processes and the app.
    pub units: watch::Receiver<Vec<UnitStatus>>,
    /// The resolved configuration (`Config::printable`, the `--print-config` rendering).
    pub config: BTreeMap<String, Value>,
    /// The data plane and the interception mode, as decided.
    pub dataplane: Value,
    /// The workload certificate feed, when there is one.
    pub certs: Option<watch::Receiver<Arc<WorkloadCert>>>,
    /// The istio-token krun keeps fresh, when it does.
    pub token: Option<watch::Receiver<Token>>,
}

impl KrunAdmin {
    /// Binds `addr` and serves the admin paths under `bounds`' connection cap.
    pub async fn start(self, addr: SocketAddr, bounds: Bounds) -> anyhow::Result<()> {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("KRUN_ADMIN_ADDR={addr}: cannot listen; pick a free address, or off")
        })?;
        let bound = listener.local_addr()?;
        crate::dataplane::record_listener(crate::config::names::KRUN_ADMIN_ADDR, &listener);
        tokio::spawn(mesh::admin::serve(
            listener,
            bounds.limit("admin"),
            Arc::new(self),
        ));
        tracing::info!(addr = %bound, "admin endpoint listening");
        Ok(())
    }

    fn ready(&self) -> Answer {
        let phase = *self.phase.borrow();
        match phase {
            Phase::Ready => text(StatusCode::OK, "ready\n"),
            Phase::Draining => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: draining (SIGTERM, /quitquitquit, the app exited or a required process failed)\n",
            ),
            Phase::Starting => {
                let mut body = String::from("not ready: starting\n");
                for unit in self.units.borrow().iter().filter(|u| !u.ready) {
                    let why = match unit.pid {
                        Some(pid) => {
                            format!("running (pid {pid}), readiness checks not passed yet")
                        }
                        None => match unit.hook {
                            Some(hook) => format!("not started: its {hook} hook is running"),
                            None => "not started: waiting for its dependencies".to_owned(),
                        },
                    };
                    body.push_str(&format!("{}: {why}\n", unit.name));
                }
                text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
    }

    fn config_dump(&self) -> Value {
        let certificate = self.certs.as_ref().map(|certs| {
            let cert = certs.borrow();
            json!({
                "san": cert.identity().map(|id| id.to_string()),
                "expires": crate::telemetry::expiry(&cert).map(rfc3339),
            })
        });
        let token = self
            .token
            .as_ref()
            .map(|token| json!({ "expires": rfc3339(token.borrow().expires_at) }));
        json!({
            "config": self.config,
            "live": {
                "phase": format!("{:?}", *self.phase.borrow()).to_lowercase(),
                "dataplane": self.dataplane,
                "certificate": certificate,
                "token": token,
                "listeners": crate::dataplane::listening(),
                "processes": *self.units.borrow(),
            },
        })
    }
}

impl Paths for KrunAdmin {
    fn answer(&self, request: &AdminRequest) -> Option<Answer> {
        Some(match request.path.as_str() {
            "/healthz/ready" => self.ready(),
            "/config_dump" => mesh::admin::json(&self.config_dump()),
            "/quitquitquit" if request.method == Method::POST => {
                tracing::info!("/quitquitquit: draining as on SIGTERM");
                match kill(Pid::this(), Signal::SIGTERM) {
                    Ok(()) => text(StatusCode::OK, "draining\n"),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                }
            }
            "/quitquitquit" => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST /quitquitquit drains krun\n",
            ),
            _ => return None,
        })
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}
