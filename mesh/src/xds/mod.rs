//! Workload discovery from istiod, as ztunnel does it: the delta ADS [`client`] keeps the
//! [`store`] in step with istiod's `istio.workload.Address` pushes (and the
//! [`authorization`] policies with its `istio.security.Authorization` ones); the data plane asks the
//! store, per connection, whether a destination is a mesh workload and whose identity it must
//! prove. [`proto`] holds the messages, written by hand with their upstream field numbers.

pub mod authorization;
pub mod client;
pub mod proto;
pub mod store;

pub use authorization::{MeshAuthorizer, PolicyStore};
pub use client::{Stores, XdsConfig, run};
pub use store::{KnownWorkload, WorkloadStore};
