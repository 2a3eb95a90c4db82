//! Where the mesh files live: Istio's paths (`/etc/istio/proxy`, `/var/run/secrets/...`), as
//! cloud-run-mesh uses them, under `MESH_BASE_DIR` (`/` as root). pilot-agent resolves its
//! relative defaults (`./etc/istio/proxy`, `./var/run/secrets/tokens/istio-token`) against its
//! working directory, which krun sets to the same base, so krun, the agent and the app agree on
//! every path (cloud-run-mesh mixed `./etc/...` and `/etc/...`, so when not root the agent and
//! the app looked in different places).

use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

use mesh::files::ensure_dir;
use mesh::istio::{PROXY_GID, PROXY_UID};

/// The absolute mesh file layout under one base directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    base: PathBuf,
}

impl Layout {
    /// The layout under `base`, made absolute against the working directory.
    pub fn new(base: &Path) -> std::io::Result<Layout> {
        let base = if base.is_absolute() {
            base.to_path_buf()
        } else {
            std::env::current_dir()?.join(base)
        };
        // `./x` and `/a/./b` print badly in env values; drop `.` components.
        let base = base.components().collect::<PathBuf>();
        Ok(Layout { base })
    }

    /// The base directory (the agent's working directory).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// `etc/istio/proxy`: agent state and bootstraps.
    pub fn proxy_dir(&self) -> PathBuf {
        self.base.join("etc/istio/proxy")
    }

    /// The gRPC xDS bootstrap, the same absolute path for the agent and the app.
    pub fn grpc_bootstrap(&self) -> PathBuf {
        self.proxy_dir().join("grpc_bootstrap.json")
    }

    /// `etc/istio/pod/labels`: the pod labels pilot-agent reports to istiod.
    pub fn pod_labels(&self) -> PathBuf {
        self.base.join("etc/istio/pod/labels")
    }

    /// `var/run/secrets/istio.io/`: krun's workload certificates.
    pub fn output_certs(&self) -> PathBuf {
        self.base.join("var/run/secrets/istio.io")
    }

    /// `var/run/secrets/istio-agent/`: pilot-agent's own certificates (`OUTPUT_CERTS`), apart
    /// from krun's so each set of files has one writer.
    pub fn agent_certs(&self) -> PathBuf {
        self.base.join("var/run/secrets/istio-agent")
    }

    /// `var/run/secrets/istio/root-cert.pem`: istiod's root, where pilot-agent reads it to
    /// verify istiod for XDS and CA.
    pub fn istiod_root(&self) -> PathBuf {
        self.base.join("var/run/secrets/istio/root-cert.pem")
    }

    /// `var/lib/istio/envoy`: Envoy's bootstrap template and state.
    pub fn envoy_dir(&self) -> PathBuf {
        self.base.join("var/lib/istio/envoy")
    }

    /// Where Envoy's `config_dump` is saved when the proxy is never ready.
    pub fn config_dump(&self) -> PathBuf {
        self.envoy_dir().join("config_dump.json")
    }

    /// The rendered Traffic Director Envoy bootstrap.
    pub fn td_bootstrap(&self) -> PathBuf {
        self.proxy_dir().join("td_bootstrap.yaml")
    }

    /// Creates the directories the agent writes to, with octal modes (cloud-run-mesh passed
    /// decimal literals such as `777` to `MkdirAll`): 0755, Envoy's state dir 0700, owned by the
    /// proxy user when krun is root.
    pub fn prepare(&self, root: bool) -> std::io::Result<()> {
        let owner = root.then(|| (Uid::from_raw(PROXY_UID), Gid::from_raw(PROXY_GID)));
        for dir in [
            self.proxy_dir(),
            self.base.join("var/run/secrets/istio"),
            self.base.join("var/run/secrets/mesh"),
            self.output_certs(),
            self.agent_certs(),
            self.base.join("etc/istio/pod"),
        ] {
            ensure_dir(&dir, 0o755, owner)?;
        }
        ensure_dir(&self.envoy_dir(), 0o700, owner)
    }
}
