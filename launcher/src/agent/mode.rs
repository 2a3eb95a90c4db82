//! Which data plane runs (`KRUN_DATAPLANE`), decided once, with one log line saying which and
//! why. `auto` makes cloud-run-mesh's choice: Envoy alone for a `MESH=td:` locator, pilot-agent
//! when an XDS address is known and pilot-agent is installed (as a gRPC agent when Envoy is
//! not); where cloud-run-mesh ran the app alone, krun runs its builtin data plane.

use std::path::Path;

use super::td::{TdMesh, TdMeshError};
use super::xds::Xds;
use crate::config::DataPlane;
use crate::processes::is_executable;

/// The data plane krun sets up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// pilot-agent (with Envoy, or in grpc-agent mode without it) talking to `xds`.
    Agent {
        /// The XDS address.
        xds: String,
    },
    /// Envoy started directly with a Traffic Director bootstrap.
    TrafficDirector(TdMesh),
    /// No agent: krun's built-in data plane. With an XDS address, proxyless gRPC apps get a
    /// bootstrap that points at it.
    Builtin {
        /// The XDS address for the proxyless bootstrap, if one is known.
        proxyless_xds: Option<String>,
    },
    /// App and tunnel only.
    None,
}

/// The decision and its reason, for the one log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// What runs.
    pub plan: Plan,
    /// Why, in words an operator can act on.
    pub why: String,
}

/// An explicit choice that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    /// `KRUN_DATAPLANE=envoy` without what Envoy needs.
    #[error(
        "KRUN_DATAPLANE=envoy: {0}; install it in the image, fix the path, or use KRUN_DATAPLANE=auto"
    )]
    EnvoyImpossible(String),
    /// A bad `MESH=td:` locator.
    #[error(transparent)]
    Td(#[from] TdMeshError),
}

/// Decides the data plane from the configured choice, the mesh locator, the XDS selection and
/// the installed binaries.
pub fn choose(
    dataplane: DataPlane,
    mesh: Option<&str>,
    xds: &Xds,
    pilot_agent: &Path,
    envoy: &Path,
) -> Result<Choice, ModeError> {
    let choice = |plan, why: String| Ok(Choice { plan, why });
    match dataplane {
        DataPlane::None => return choice(Plan::None, "KRUN_DATAPLANE=none".into()),
        DataPlane::Builtin => {
            return choice(
                Plan::Builtin {
                    proxyless_xds: proxyless(xds),
                },
                "KRUN_DATAPLANE=builtin".into(),
            );
        }
        DataPlane::Auto | DataPlane::Envoy => {}
    }
    let explicit = dataplane == DataPlane::Envoy;
    if let Some(td) = mesh.and_then(TdMesh::parse) {
        let td = td?;
        if !is_executable(envoy) {
            return Err(ModeError::EnvoyImpossible(format!(
                "MESH=td: needs Envoy, and KRUN_ENVOY_PATH={} is not an executable file",
                envoy.display()
            )));
        }
        let why = format!(
            "MESH is a Traffic Director locator; Envoy {} with network {}",
            envoy.display(),
            td.network
        );
        return choice(Plan::TrafficDirector(td), why);
    }
    let builtin = |why: String| {
        choice(
            Plan::Builtin {
                proxyless_xds: proxyless(xds),
            },
            why,
        )
    };
    let address = match xds {
        Xds::Disabled if explicit => {
            return Err(ModeError::EnvoyImpossible(
                "XDS_ADDR=- disables the agent".into(),
            ));
        }
        Xds::Disabled => return builtin("XDS_ADDR=- disables the agent".into()),
        Xds::Unknown if explicit => {
            return Err(ModeError::EnvoyImpossible(
                "no XDS address is known (set XDS_ADDR, PROXY_CONFIG discoveryAddress, mesh-env XDS_ADDR/IMCON_ADDR or MESH_TENANT)".into(),
            ));
        }
        Xds::Unknown => {
            return builtin(
                "no XDS address is known (no XDS_ADDR, PROXY_CONFIG discoveryAddress, mesh-env XDS_ADDR/IMCON_ADDR or MESH_TENANT)".into(),
            );
        }
        Xds::Address { addr, from } => (addr, from),
    };
    if !is_executable(pilot_agent) {
        let why = format!(
            "pilot-agent is not installed at KRUN_PILOT_AGENT_PATH={}",
            pilot_agent.display()
        );
        return if explicit {
            Err(ModeError::EnvoyImpossible(why))
        } else {
            builtin(why)
        };
    }
    let (addr, from) = address;
    let envoy_note = if is_executable(envoy) {
        String::new()
    } else {
        format!(
            "; Envoy is not installed at KRUN_ENVOY_PATH={}, so pilot-agent runs as a gRPC agent (DISABLE_ENVOY)",
            envoy.display()
        )
    };
    let why = format!(
        "pilot-agent {} with XDS {addr} from {from}{envoy_note}",
        pilot_agent.display()
    );
    choice(Plan::Agent { xds: addr.clone() }, why)
}

fn proxyless(xds: &Xds) -> Option<String> {
    match xds {
        Xds::Address { addr, .. } => Some(addr.clone()),
        Xds::Disabled | Xds::Unknown => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MISSING: &str = "/nonexistent/pilot-agent";

    fn addr() -> Xds {
        Xds::Address {
            addr: "10.0.0.1:15012".into(),
            from: "XDS_ADDR",
        }
    }

    #[test]
    fn auto_falls_back_to_builtin_and_says_why() {
        let exe = Path::new("/bin/sh");
        let missing = Path::new(MISSING);
        let c = choose(DataPlane::Auto, None, &addr(), missing, missing).expect("auto");
        assert_eq!(
            c.plan,
            Plan::Builtin {
                proxyless_xds: Some("10.0.0.1:15012".into())
            }
        );
        assert!(
            c.why
                .contains("KRUN_PILOT_AGENT_PATH=/nonexistent/pilot-agent"),
            "{}",
            c.why
        );
        let c = choose(DataPlane::Auto, None, &Xds::Disabled, exe, exe).expect("auto");
        assert_eq!(
            c.plan,
            Plan::Builtin {
                proxyless_xds: None
            }
        );
        assert_eq!(c.why, "XDS_ADDR=- disables the agent");
        let c = choose(DataPlane::Auto, None, &addr(), exe, exe).expect("auto");
        assert_eq!(
            c.plan,
            Plan::Agent {
                xds: "10.0.0.1:15012".into()
            }
        );
        let c = choose(DataPlane::Auto, None, &addr(), exe, missing).expect("auto");
        assert!(c.why.contains("DISABLE_ENVOY"), "{}", c.why);
        let c = choose(
            DataPlane::Auto,
            Some("td:mesh_name=m"),
            &Xds::Unknown,
            exe,
            exe,
        )
        .expect("td");
        assert!(matches!(c.plan, Plan::TrafficDirector(_)));
    }

    #[test]
    fn an_explicit_envoy_that_cannot_run_is_an_error() {
        let missing = Path::new(MISSING);
        let e = choose(DataPlane::Envoy, None, &addr(), missing, missing)
            .expect_err("no agent")
            .to_string();
        assert!(
            e.starts_with("KRUN_DATAPLANE=envoy: pilot-agent is not installed"),
            "{e}"
        );
        let e = choose(
            DataPlane::Auto,
            Some("td:"),
            &Xds::Unknown,
            missing,
            missing,
        )
        .expect_err("no envoy")
        .to_string();
        assert!(e.contains("MESH=td: needs Envoy"), "{e}");
    }
}
