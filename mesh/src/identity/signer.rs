//! Who signs the workload's CSR, chosen by the caller from `CA_ADDR` and `CA_POOL`: an
//! in-process local CA, Istio's CA, Google's MeshCA or Google CAS.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::ca_grpc::CaError;
use super::cas::CasClient;
use super::istio_ca::IstioCaClient;
use super::local_ca::{LocalCa, LocalCaError};
use super::meshca::MeshCaClient;

/// A CA krun can get certificates from.
pub enum Signer {
    /// `CA_ADDR=file:///dir`: signs in-process.
    Local(Box<LocalCa>),
    /// `CA_ADDR=host:port`: istiod (or any Istio CA) over gRPC.
    IstioCa(IstioCaClient),
    /// Google's MeshCA with the STS federated token.
    MeshCa(MeshCaClient),
    /// `CA_POOL`: Google CAS with the STS federated token (reflected SPIFFE identity).
    Cas(CasClient),
}

/// The signer failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Local CA failure.
    #[error(transparent)]
    Local(#[from] LocalCaError),
    /// Istio CA, MeshCA or CAS failure.
    #[error(transparent)]
    Grpc(#[from] CaError),
}

impl Signer {
    /// Gets `csr_pem` signed for `ttl`; the chain is leaf first.
    pub async fn sign(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, SignError> {
        match self {
            Signer::Local(ca) => Ok(ca.sign(csr_pem, ttl)?),
            Signer::IstioCa(ca) => Ok(ca.sign(csr_pem, ttl).await?),
            Signer::MeshCa(ca) => Ok(ca.sign(csr_pem, ttl).await?),
            Signer::Cas(ca) => Ok(ca.sign(csr_pem, ttl).await?),
        }
    }

    /// The roots a returned chain must lead to.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        match self {
            Signer::Local(ca) => ca.roots().to_vec(),
            Signer::IstioCa(ca) => parse_pems(ca.root_pem()),
            Signer::MeshCa(ca) => parse_pems(ca.mesh_root_pem()),
            Signer::Cas(ca) => parse_pems(ca.pool_root_pem()),
        }
    }

    /// For logs: which CA and where.
    pub fn describe(&self) -> String {
        match self {
            Signer::Local(ca) => format!("local CA in {}", ca.dir().display()),
            Signer::IstioCa(ca) => format!("Istio CA at {}", ca.addr()),
            Signer::MeshCa(ca) => format!("MeshCA at {}", ca.addr()),
            Signer::Cas(ca) => format!("CAS pool {}", ca.pool()),
        }
    }
}

fn parse_pems(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}
