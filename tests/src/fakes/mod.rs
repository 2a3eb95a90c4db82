//! Stand-ins for external programs and services, each speaking the real interface strictly.

pub mod proxy;
