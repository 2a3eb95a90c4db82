//! Files and directories krun writes for the mesh side: always with explicit octal modes
//! (cloud-run-mesh wrote `777` and `755` as decimal numbers, which are other modes entirely)
//! and atomically, so a reader (pilot-agent, a gRPC `file_watcher`) never sees a half-written
//! file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

use crate::istio::PROXY_GID;

/// Who may read a file krun writes; decides its mode and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Secrets the proxy reads (tokens, private keys): 0640 with group [`PROXY_GID`] when krun
    /// is root, else 0600.
    Secret,
    /// Only krun's user (diagnostics that may hold secrets): 0600.
    Private,
    /// Public material (certificates, roots, bootstraps): 0644.
    Public,
}

/// A file that could not be written. `source` names the directory when creating it failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", .path.display())]
pub struct WriteError {
    /// The file krun tried to write.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

impl From<WriteError> for std::io::Error {
    /// `<path>: <cause>`, for callers whose own message already says what failed.
    fn from(e: WriteError) -> Self {
        std::io::Error::new(
            e.source.kind(),
            format!("{}: {}", e.path.display(), e.source),
        )
    }
}

/// The one atomic file writer of krun and hgate: writes `bytes` to `path` through a temporary
/// file in the same directory and a rename, with the mode (and group) of `access` set exactly
/// (whatever the umask) before the rename. Creates missing parent directories (0755).
pub fn write_atomic(path: &Path, bytes: &[u8], access: Access) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| {
            err(std::io::Error::new(
                e.kind(),
                format!("creating {}: {e}", dir.display()),
            ))
        })?;
    let proxy_group = access == Access::Secret && nix::unistd::geteuid().is_root();
    let mode = match access {
        Access::Public => 0o644,
        Access::Secret if proxy_group => 0o640,
        Access::Secret | Access::Private => 0o600,
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if proxy_group {
            nix::unistd::fchown(&file, None, Some(Gid::from_raw(PROXY_GID)))
                .map_err(std::io::Error::from)?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Creates `path` (and its parents) and sets exactly `mode` on it, whatever the umask; when
/// `owner` is given (krun is root) the directory is chowned to it. A directory that exists
/// and belongs to someone else (an image's, as non-root) is left as it is. Errors name the path.
pub fn ensure_dir(path: &Path, mode: u32, owner: Option<(Uid, Gid)>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(named)?;
    let mine = std::fs::metadata(path).map_err(named)?.uid() == nix::unistd::geteuid().as_raw();
    if !mine && owner.is_none() {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(named)?;
    if let Some((uid, gid)) = owner {
        nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| named(e.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_and_exact() {
        let dir = std::env::temp_dir().join(format!("krun-files-{}", std::process::id()));
        let file = dir.join("a/b/secret.pem");
        write_atomic(&file, b"x", Access::Private).expect("write");
        assert_eq!(std::fs::read(&file).expect("read"), b"x");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&file), 0o600);
        ensure_dir(&dir.join("c"), 0o700, None).expect("dir");
        assert_eq!(mode(&dir.join("c")), 0o700);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
