//! The xDS messages krun reads and writes, as prost structs with the field numbers of their
//! upstream definitions: envoy's `envoy.service.discovery.v3` delta ADS messages and Istio's
//! `istio.workload` Address (istio/ztunnel `proto/xds.proto`, `proto/workload.proto`). Only
//! the fields krun uses are declared; prost skips the others when decoding.
#![allow(missing_docs)]

/// gRPC path of the delta ADS stream.
pub const DELTA_ADS: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// gRPC service name of ADS.
pub const ADS_SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
/// Resource type of workloads and services (`istio.workload.Address`).
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";

/// `envoy.config.core.v3.Node`: who is asking.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<prost_types::Struct>,
}

/// `google.rpc.Status`, sent with a NACK.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `DeltaDiscoveryRequest`: a subscription, an ACK (nonce) or a NACK (nonce and error).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryRequest {
    #[prost(message, optional, tag = "1")]
    pub node: Option<Node>,
    #[prost(string, tag = "2")]
    pub type_url: String,
    #[prost(string, repeated, tag = "3")]
    pub resource_names_subscribe: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub resource_names_unsubscribe: Vec<String>,
    #[prost(map = "string, string", tag = "5")]
    pub initial_resource_versions: std::collections::HashMap<String, String>,
    #[prost(string, tag = "6")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<Status>,
}

/// `DeltaDiscoveryResponse`: resources added or changed, and names removed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryResponse {
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Resource>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// `envoy.service.discovery.v3.Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(message, optional, tag = "2")]
    pub resource: Option<prost_types::Any>,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `istio.workload.Address`: a workload or a service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(oneof = "AddressType", tags = "1, 2")]
    pub r#type: Option<AddressType>,
}

/// The `type` oneof of [`Address`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum AddressType {
    #[prost(message, tag = "1")]
    Workload(Workload),
    #[prost(message, tag = "2")]
    Service(Service),
}

/// `istio.workload.Workload`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Workload {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub addresses: Vec<Vec<u8>>,
    #[prost(enumeration = "TunnelProtocol", tag = "5")]
    pub tunnel_protocol: i32,
    #[prost(string, tag = "6")]
    pub trust_domain: String,
    #[prost(string, tag = "7")]
    pub service_account: String,
    /// The waypoint every connection to this workload goes through.
    #[prost(message, optional, tag = "8")]
    pub waypoint: Option<GatewayAddress>,
    /// `namespace/name` of the WORKLOAD_SELECTOR authorization policies selecting it.
    #[prost(string, repeated, tag = "16")]
    pub authorization_policies: Vec<String>,
    #[prost(enumeration = "WorkloadStatus", tag = "17")]
    pub status: i32,
    /// The services this workload is an endpoint of, keyed `namespace/hostname`, with its own
    /// service port -> target port mapping.
    #[prost(map = "string, message", tag = "22")]
    pub services: std::collections::HashMap<String, PortList>,
}

/// `istio.workload.Service`: a VIP (or several) and the ports it maps; its endpoints are the
/// workloads whose `services` name it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub hostname: String,
    #[prost(message, repeated, tag = "4")]
    pub addresses: Vec<NetworkAddress>,
    #[prost(message, repeated, tag = "5")]
    pub ports: Vec<Port>,
    /// The waypoint every connection to this service goes through.
    #[prost(message, optional, tag = "7")]
    pub waypoint: Option<GatewayAddress>,
}

/// `istio.workload.NetworkAddress`: an IP (4 or 16 bytes) on a network.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NetworkAddress {
    #[prost(string, tag = "1")]
    pub network: String,
    #[prost(bytes = "vec", tag = "2")]
    pub address: Vec<u8>,
}

/// `istio.workload.PortList`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PortList {
    #[prost(message, repeated, tag = "1")]
    pub ports: Vec<Port>,
}

/// `istio.workload.Port`: a service port and the port it forwards to.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Port {
    #[prost(uint32, tag = "1")]
    pub service_port: u32,
    #[prost(uint32, tag = "2")]
    pub target_port: u32,
}

/// `istio.workload.GatewayAddress`: a waypoint, by address or by service hostname, and its
/// HBONE port.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GatewayAddress {
    #[prost(oneof = "GatewayDestination", tags = "1, 2")]
    pub destination: Option<GatewayDestination>,
    #[prost(uint32, tag = "3")]
    pub hbone_mtls_port: u32,
}

/// The `destination` oneof of [`GatewayAddress`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum GatewayDestination {
    #[prost(message, tag = "1")]
    Hostname(NamespacedHostname),
    #[prost(message, tag = "2")]
    Address(NetworkAddress),
}

/// `istio.workload.NamespacedHostname`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespacedHostname {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub hostname: String,
}

/// `istio.workload.WorkloadStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WorkloadStatus {
    Healthy = 0,
    Unhealthy = 1,
}

/// `istio.workload.TunnelProtocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TunnelProtocol {
    None = 0,
    Hbone = 1,
}
