//! Istio's `istio.security.Authorization` (istio/ztunnel `proto/authorization.proto`): the L4
//! form of an AuthorizationPolicy istiod sends to ambient data planes. Written by hand with the
//! upstream package, names and field numbers; only the fields krun evaluates are declared
//! (prost skips the others when decoding).
#![allow(missing_docs)]

/// Resource type of authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// `istio.security.Authorization`: one policy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Authorization {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(enumeration = "Scope", tag = "3")]
    pub scope: i32,
    #[prost(enumeration = "Action", tag = "4")]
    pub action: i32,
    /// Groups (`rules` in newer upstream revisions, same field number) are OR-ed.
    #[prost(message, repeated, tag = "5")]
    pub groups: Vec<Group>,
}

/// `istio.security.Group`: its rules are AND-ed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Group {
    #[prost(message, repeated, tag = "1")]
    pub rules: Vec<Rules>,
}

/// `istio.security.Rules`: its matches are OR-ed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Rules {
    #[prost(message, repeated, tag = "2")]
    pub matches: Vec<Match>,
}

/// `istio.security.Match`: values of one kind are OR-ed, kinds are AND-ed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Match {
    #[prost(message, repeated, tag = "1")]
    pub namespaces: Vec<StringMatch>,
    #[prost(message, repeated, tag = "2")]
    pub not_namespaces: Vec<StringMatch>,
    #[prost(message, repeated, tag = "3")]
    pub principals: Vec<StringMatch>,
    #[prost(message, repeated, tag = "4")]
    pub not_principals: Vec<StringMatch>,
    #[prost(message, repeated, tag = "5")]
    pub source_ips: Vec<Address>,
    #[prost(message, repeated, tag = "6")]
    pub not_source_ips: Vec<Address>,
    #[prost(message, repeated, tag = "7")]
    pub destination_ips: Vec<Address>,
    #[prost(message, repeated, tag = "8")]
    pub not_destination_ips: Vec<Address>,
    #[prost(uint32, repeated, tag = "9")]
    pub destination_ports: Vec<u32>,
    #[prost(uint32, repeated, tag = "10")]
    pub not_destination_ports: Vec<u32>,
}

/// `istio.security.Address`: a prefix (address bytes and length).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(bytes = "vec", tag = "1")]
    pub address: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

/// `istio.security.StringMatch`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StringMatch {
    #[prost(oneof = "MatchType", tags = "1, 2, 3, 4")]
    pub match_type: Option<MatchType>,
}

/// The `match_type` oneof of [`StringMatch`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MatchType {
    #[prost(string, tag = "1")]
    Exact(String),
    #[prost(string, tag = "2")]
    Prefix(String),
    #[prost(string, tag = "3")]
    Suffix(String),
    /// `google.protobuf.Empty`.
    #[prost(message, tag = "4")]
    Presence(()),
}

/// `istio.security.Scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Scope {
    Global = 0,
    Namespace = 1,
    WorkloadSelector = 2,
}

/// `istio.security.Action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Action {
    Allow = 0,
    Deny = 1,
}
