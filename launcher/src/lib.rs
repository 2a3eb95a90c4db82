//! krun: the mesh launcher. It runs as the entrypoint (PID 1) of a container on Cloud Run,
//! docker or a VM, supervises the app and its helper processes, and joins the workload to an
//! Istio mesh: traffic capture, a data plane (pilot-agent with Envoy, Envoy for Traffic
//! Director, or krun's builtin one) and the HBONE tunnel port.
//!
//! [`launch::run`] is the startup graph; each module below owns one job. Configuration,
//! discovery, identity, logging and Istio's port and uid constants live in the `mesh` crate,
//! which hgate shares.

pub mod admin;
pub mod agent;
pub mod capture;
pub mod config;
pub mod dataplane;
pub mod footprint;
pub mod launch;
pub mod probe;
pub mod processes;
pub mod reaper;
pub mod run_discovery;
pub mod startup;
pub mod supervisor;
pub mod telemetry;
