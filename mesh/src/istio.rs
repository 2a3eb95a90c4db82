//! Istio's fixed numbers: the ports of the sidecar contract and the proxy's uid and gid.
//!
//! Envoy, pilot-agent, istiod's generated listeners, `istio-iptables` and krun's own data
//! plane must agree on these, so they are declared once here, in a module that imports
//! nothing: the capture rules, the agent launcher, the data plane and the certificate writer
//! all read them from here. The numbers are Istio's
//! (<https://istio.io/latest/docs/ops/deployment/application-requirements/#ports-used-by-istio>).

/// Envoy's admin port (`config_dump` on a failed start; Traffic Director readiness).
pub const ENVOY_ADMIN_PORT: u16 = 15000;
/// Envoy's (or krun's builtin) outbound capture port: iptables REDIRECTs outbound TCP here.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Envoy's inbound capture port.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// The whitebox HTTP proxy port (`HTTP_PROXY` when iptables is not available).
pub const WHITEBOX_PROXY_PORT: u16 = 15007;
/// Istio HBONE: HTTP/2 CONNECT over mTLS (ztunnel's inbound port).
pub const HBONE_PORT: u16 = 15008;
/// krun's tunnel port: the Cloud Run container port of a meshed service (h2c and HTTP/1.1).
pub const TUNNEL_PORT: u16 = 15009;
/// The DNS proxy port (pilot-agent's, or krun's builtin).
pub const DNS_PORT: u16 = 15053;
/// pilot-agent's STS port for Envoy.
pub const STS_PORT: u16 = 15463;

/// The proxy user of the Istio images: owner of the proxy's directories, Envoy's uid in
/// Traffic Director.
pub const PROXY_UID: u32 = 1337;
/// The group whose traffic iptables never captures: the proxy runs with it, and secrets the
/// proxy must read are group-readable by it.
pub const PROXY_GID: u32 = 1337;

/// How outbound traffic reaches the proxy: decided by the capture layer, passed to the agent
/// (pilot-agent's `ISTIO_META_INTERCEPTION_MODE`) and the data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Interception {
    /// iptables redirects outbound TCP (and DNS) to the proxy.
    Iptables,
    /// No capture: the app uses `HTTP_PROXY` (the proxy listens on 15007).
    #[default]
    Whitebox,
}
