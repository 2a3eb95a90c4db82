//! Which XDS server the agent talks to, in cloud-run-mesh's order (its `FindXDSAddr`):
//! `PROXY_CONFIG`'s `discoveryAddress`, `XDS_ADDR`, the discovered address, mesh-env `XDS_ADDR`,
//! then `meshconfig.googleapis.com:443` for a managed control plane tenant (`MESH_TENANT`) or
//! hgate's internal address (`IMCON_ADDR:15012`) for in-cluster istiod.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The managed control plane (MCP) XDS address.
pub const MCP_ADDR: &str = "meshconfig.googleapis.com:443";
/// The istiod XDS port behind hgate.
pub const ISTIOD_PORT: u16 = 15012;

/// The outcome of the XDS address selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Xds {
    /// `XDS_ADDR=-`: no agent at all.
    Disabled,
    /// An address, and where it came from (for the mode log line).
    Address {
        /// `host:port`.
        addr: String,
        /// Which input gave it.
        from: &'static str,
    },
    /// Nothing says where XDS is.
    Unknown,
}

/// `PROXY_CONFIG` that is not a YAML or JSON map.
#[derive(Debug, thiserror::Error)]
#[error(
    "PROXY_CONFIG={value}: expected an Istio ProxyConfig as YAML or JSON, e.g. {{\"discoveryAddress\": \"istiod.istio-system.svc:15012\"}} ({detail})"
)]
pub struct ProxyConfigError {
    value: String,
    detail: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfig {
    discovery_address: Option<String>,
}

/// The `discoveryAddress` of a user-supplied `PROXY_CONFIG`, if it has one.
pub fn discovery_address(proxy_config: &str) -> Result<Option<String>, ProxyConfigError> {
    let parsed: ProxyConfig =
        serde_saphyr::from_str(proxy_config).map_err(|e| ProxyConfigError {
            value: proxy_config.to_owned(),
            detail: e.to_string().lines().next().unwrap_or_default().to_owned(),
        })?;
    Ok(parsed.discovery_address.filter(|a| !a.trim().is_empty()))
}

/// Applies the order above. `env_xds` is `XDS_ADDR` from the environment, `discovered` what
/// discovery found, `tenant` the MCP tenant (`-` = in-cluster istiod).
pub fn select(
    proxy_config: Option<&str>,
    env_xds: Option<&str>,
    discovered: Option<&str>,
    mesh_env: &BTreeMap<String, String>,
    tenant: Option<&str>,
) -> Result<Xds, ProxyConfigError> {
    if let Some(addr) = proxy_config.map(discovery_address).transpose()?.flatten() {
        return Ok(Xds::Address {
            addr,
            from: "PROXY_CONFIG discoveryAddress",
        });
    }
    let no_tenant = tenant.is_none_or(|t| t.is_empty() || t == "-");
    let explicit = [
        (env_xds, "XDS_ADDR"),
        (discovered, "discovery"),
        (
            mesh_env.get("XDS_ADDR").map(String::as_str),
            "mesh-env XDS_ADDR",
        ),
    ];
    for (value, from) in explicit {
        let Some(addr) = value.map(str::trim).filter(|a| !a.is_empty()) else {
            continue;
        };
        if addr == "-" {
            return Ok(Xds::Disabled);
        }
        if addr.contains("googleapis.com") && addr.contains("meshconfig") && no_tenant {
            tracing::warn!(%addr, from, "MCP XDS address ignored: no MESH_TENANT is known");
            continue;
        }
        return Ok(Xds::Address {
            addr: addr.to_owned(),
            from,
        });
    }
    if !no_tenant {
        return Ok(Xds::Address {
            addr: MCP_ADDR.to_owned(),
            from: "MESH_TENANT (managed control plane)",
        });
    }
    Ok(match mesh_env.get("IMCON_ADDR").filter(|a| !a.is_empty()) {
        Some(ip) => Xds::Address {
            addr: format!("{ip}:{ISTIOD_PORT}"),
            from: "mesh-env IMCON_ADDR (in-cluster istiod through hgate)",
        },
        None => Xds::Unknown,
    })
}

/// The istiod the builtin data plane's workload discovery streams from, picked from the same
/// selection as the agent's ([`select`]: `XDS_ADDR`, mesh-env `IMCON_ADDR:15012`, ...), with
/// where it came from; or why discovery is off. The managed control plane is refused: it is
/// reached with Google credentials and system roots, while the discovery client speaks to
/// istiod with the workload certificate and the mesh roots.
pub fn discovery_istiod(
    selected: Result<Xds, ProxyConfigError>,
) -> Result<(String, &'static str), String> {
    match selected {
        Ok(Xds::Address { addr, .. }) if addr.contains("meshconfig.googleapis.com") => {
            Err(format!(
                "the XDS address is the managed control plane ({addr}), which the builtin data plane's workload discovery does not speak to (it needs istiod: XDS_ADDR or mesh-env IMCON_ADDR)"
            ))
        }
        Ok(Xds::Address { addr, from }) => Ok((addr, from)),
        Ok(Xds::Disabled) => Err("XDS_ADDR=- disables it".to_owned()),
        Ok(Xds::Unknown) => {
            Err("no istiod address: set XDS_ADDR, or publish IMCON_ADDR in mesh-env".to_owned())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// True for istiod's port (`ISTIOD_SAN`); anything else is a public endpoint with system roots.
pub fn is_istiod(addr: &str) -> bool {
    addr.ends_with(&format!(":{ISTIOD_PORT}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh_env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn addr(xds: Xds) -> String {
        match xds {
            Xds::Address { addr, .. } => addr,
            other => panic!("expected an address, got {other:?}"),
        }
    }

    #[test]
    fn proxy_config_wins_then_xds_addr_then_mesh_env() {
        let env = mesh_env(&[("XDS_ADDR", "mesh:15012"), ("IMCON_ADDR", "10.1.2.3")]);
        let pc = r#"{"discoveryAddress": "pc:15012"}"#;
        let pick = |pc, x| addr(select(pc, x, None, &env, None).expect("valid"));
        assert_eq!(pick(Some(pc), Some("env:15012")), "pc:15012");
        assert_eq!(pick(Some("meshId: m\n"), Some("env:15012")), "env:15012");
        assert_eq!(pick(None, None), "mesh:15012");
        let only_imcon = mesh_env(&[("IMCON_ADDR", "10.1.2.3")]);
        assert_eq!(
            addr(select(None, None, None, &only_imcon, Some("-")).expect("valid")),
            "10.1.2.3:15012"
        );
    }

    #[test]
    fn tenant_selects_mcp_and_dash_disables() {
        let none = BTreeMap::new();
        assert_eq!(
            addr(select(None, None, None, &none, Some("tenant-1")).expect("valid")),
            MCP_ADDR
        );
        assert_eq!(
            select(None, Some("-"), None, &none, None).expect("valid"),
            Xds::Disabled
        );
        assert_eq!(
            select(None, None, None, &none, None).expect("valid"),
            Xds::Unknown
        );
        // An MCP address without a tenant is ignored, as cloud-run-mesh does.
        assert_eq!(
            select(None, Some(MCP_ADDR), None, &none, Some("-")).expect("valid"),
            Xds::Unknown
        );
    }

    #[test]
    fn a_bad_proxy_config_is_named() {
        let e = select(Some("[unclosed"), None, None, &BTreeMap::new(), None)
            .expect_err("rejected")
            .to_string();
        assert!(
            e.starts_with("PROXY_CONFIG=[unclosed: expected an Istio ProxyConfig"),
            "{e}"
        );
    }

    /// Workload discovery follows the agent's selection (XDS_ADDR, then mesh-env IMCON_ADDR
    /// on 15012) and names the source; the managed control plane, `-` and nothing known turn
    /// it off with the reason.
    #[test]
    fn discovery_uses_istiod_from_xds_addr_or_imcon_addr() {
        let imcon = mesh_env(&[("IMCON_ADDR", "10.128.0.9")]);
        let pick = |env_xds: Option<&str>, tenant: Option<&str>, mesh_env| {
            discovery_istiod(select(None, env_xds, None, mesh_env, tenant))
        };
        assert_eq!(
            pick(Some("10.0.0.1:15012"), None, &imcon),
            Ok(("10.0.0.1:15012".to_owned(), "XDS_ADDR"))
        );
        let (addr, from) = pick(None, None, &imcon).expect("IMCON_ADDR");
        assert_eq!(addr, "10.128.0.9:15012");
        assert!(from.contains("IMCON_ADDR"), "{from}");
        let mcp = pick(None, Some("projects/p/tenant"), &imcon).expect_err("MCP is refused");
        assert!(mcp.contains("managed control plane"), "{mcp}");
        let off = pick(Some("-"), None, &imcon).expect_err("disabled");
        assert!(off.contains("XDS_ADDR=-"), "{off}");
        let none = pick(None, None, &BTreeMap::new()).expect_err("unknown");
        assert!(none.contains("IMCON_ADDR"), "{none}");
    }
}
