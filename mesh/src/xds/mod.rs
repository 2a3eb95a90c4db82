//! Workload discovery from istiod, as ztunnel does it: the delta ADS [`client`] keeps the
//! [`store`] in step with istiod's `istio.workload.Address` pushes; the data plane asks the
//! store, per connection, whether a destination is a mesh workload and whose identity it must
//! prove. [`proto`] holds the messages, written by hand with their upstream field numbers.

pub mod client;
pub mod proto;
pub mod store;

pub use client::{XdsConfig, run};
pub use store::{KnownWorkload, WorkloadStore};
