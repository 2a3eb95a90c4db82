//! krun: the mesh launcher. It runs as the entrypoint (PID 1) of a container on Cloud Run,
//! docker or a VM, supervises the app and its helper processes, and (in later layers) joins
//! the workload to an Istio mesh.
//!
//! [`launch::run`] is the startup graph; each module below owns one job.

pub mod agent;
pub mod capture;
pub mod config;
pub mod dataplane;
pub mod launch;
pub mod probe;
pub mod processes;
pub mod startup;
pub mod supervisor;
