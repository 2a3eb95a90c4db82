//! Atomic secret files: a reader (pilot-agent, Envoy, the app) sees the old file or the new
//! one, never a half-written one, and never a key with looser permissions than intended.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Group of the Istio proxy (`istio-proxy`, gid 1337): it must read tokens and keys when krun
/// runs as root and the proxy does not.
pub const PROXY_GID: u32 = 1337;

/// Who may read a file krun writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Secrets (tokens, private keys): 0600, or 0640 with group 1337 when krun is root.
    Secret,
    /// Public material (certificates, roots): 0644.
    Public,
}

/// A secret file that could not be written; the message names the path and the likely fix.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}; check that MESH_BASE_DIR points to a writable directory")]
pub struct WriteError {
    /// The file krun tried to write.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

/// Writes `contents` to `path` through a temporary file in the same directory and a rename,
/// creating parent directories (0755) as needed.
pub fn write_atomic(path: &Path, contents: &[u8], access: Access) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let as_root = nix::unistd::geteuid().is_root();
    let mode = match (access, as_root) {
        (Access::Public, _) => 0o644,
        (Access::Secret, true) => 0o640,
        (Access::Secret, false) => 0o600,
    };
    let file_name = path
        .file_name()
        .map_or_else(|| "secret".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if access == Access::Secret && as_root {
            nix::unistd::fchown(&file, None, Some(nix::unistd::Gid::from_raw(PROXY_GID)))
                .map_err(std::io::Error::from)?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })
}
