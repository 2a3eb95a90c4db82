//! What `--print-config` (and the admin `/config_dump`) shows: the settings with their sources,
//! every mesh-env key krun may act on, and the values krun computes from them, each with the
//! reason, so an operator sees what krun will do before it does it.

use std::collections::BTreeMap;

use mesh::config::{Printer, Source};
use serde_json::{Value, json};

use super::mode::{self, Plan};
use super::workload::tenant;
use super::xds::{self, Xds};
use crate::config::Config;

/// The configuration as one JSON object: [`Config::printable`], plus the mesh-env keys no
/// setting already shows (source `mesh-env`), plus the derived values: `derived.xds_addr`,
/// `derived.dataplane`, `derived.interception` (each with `why`) and `derived.app_port`. Secrets redacted throughout.
pub fn render(config: &Config, mesh_env: &BTreeMap<String, String>) -> BTreeMap<String, Value> {
    let mut out = config.printable();
    let mut extra = Printer::default();
    for (name, value) in mesh_env {
        if !out.contains_key(name) {
            extra.value(name, json!(value), Source::MeshEnv);
        }
    }
    out.extend(extra.finish());
    let mut derived = |name: &str, value: Value, why: String| {
        out.insert(
            name.to_owned(),
            json!({ "value": value, "source": Source::Derived, "why": why }),
        );
    };
    let xds = xds::select(
        config.proxy_config.as_ref().map(|s| s.value.as_str()),
        config.xds_addr.as_ref().map(|s| s.value.as_str()),
        None,
        mesh_env,
        tenant(config, mesh_env).as_deref(),
    );
    match &xds {
        Ok(Xds::Address { addr, from }) => derived("derived.xds_addr", json!(addr), format!("from {from}")),
        Ok(Xds::Disabled) => derived("derived.xds_addr", json!("-"), "XDS_ADDR=- disables the agent".into()),
        Ok(Xds::Unknown) => derived("derived.xds_addr", Value::Null, "no XDS_ADDR, PROXY_CONFIG discoveryAddress, mesh-env XDS_ADDR/IMCON_ADDR or MESH_TENANT".into()),
        Err(e) => derived("derived.xds_addr", Value::Null, e.to_string()),
    }
    if let Ok(xds) = &xds {
        let choice = mode::choose(
            config.launcher.dataplane.value,
            config.mesh.as_ref().map(|s| s.value.as_str()),
            xds,
            &config.launcher.pilot_agent_path.value,
            &config.launcher.envoy_path.value,
        );
        match choice {
            Ok(choice) => {
                let plane = match choice.plan {
                    Plan::Agent { .. } | Plan::TrafficDirector(_) => "envoy",
                    Plan::Builtin { .. } => "builtin",
                    Plan::None => "none",
                };
                derived("derived.dataplane", json!(plane), choice.why);
            }
            Err(e) => derived("derived.dataplane", Value::Null, e.to_string()),
        }
    }
    let (interception, why) = match crate::capture::rung(config) {
        crate::capture::ladder::Rung::Whitebox(why) => ("whitebox", why.to_owned()),
        crate::capture::ladder::Rung::Capture => (
            "iptables",
            "krun is root with CAP_NET_ADMIN outside gVisor; at startup it falls back to whitebox if iptables-restore fails".to_owned(),
        ),
    };
    derived("derived.interception", json!(interception), why);
    let (port, why) = match config.app_port() {
        Some(port) => (
            json!(port),
            "PORT_http (the PORT the app is given)".to_owned(),
        ),
        None => (
            Value::Null,
            "PORT_http is disabled or not a local port".to_owned(),
        ),
    };
    derived("derived.app_port", port, why);
    out
}
