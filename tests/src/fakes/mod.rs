//! Fakes of the services krun talks to, as real servers on 127.0.0.1 speaking the real wire
//! format, strict like the real service. Each records what it was asked so tests can assert.

pub mod ca;
pub mod google;
pub mod http;
pub mod k8s;
pub mod pki;
pub mod proxy;
