//! Files and directories krun writes for the mesh side: always with explicit octal modes
//! (cloud-run-mesh wrote `777` and `755` as decimal numbers, which are other modes entirely)
//! and atomically, so a reader (pilot-agent, a gRPC `file_watcher`) never sees a half-written
//! file. Files that must change together (a key and its certificate) are written as one
//! generation with [`write_generation`] and read back with [`read_generation`].

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
    /// Files the operator declared for the app (`files:` in `KRUN_PROCESSES`): exactly this
    /// mode, and this owner when given (krun must be root to give a file away).
    Exact {
        /// Permission bits, e.g. `0o400`.
        mode: u32,
        /// Owner and group; `None` keeps krun's.
        owner: Option<(Uid, Gid)>,
    },
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
    create_dir(dir).map_err(err)?;
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = write_file(&tmp, bytes, access).and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Creates `dir` and its missing parents with mode 0755 (as umask allows); the error names it.
fn create_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))
}

/// Writes and syncs `path` with the mode (and group) of `access` set exactly, whatever the
/// umask.
fn write_file(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<()> {
    let proxy_group = access == Access::Secret && nix::unistd::geteuid().is_root();
    let mode = match access {
        Access::Public => 0o644,
        Access::Secret if proxy_group => 0o640,
        Access::Secret | Access::Private => 0o600,
        Access::Exact { mode, .. } => mode,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // The mode given to open() is filtered by the umask; set it exactly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if proxy_group {
        nix::unistd::fchown(&file, None, Some(Gid::from_raw(PROXY_GID)))
            .map_err(std::io::Error::from)?;
    }
    if let Access::Exact {
        owner: Some((uid, gid)),
        ..
    } = access
    {
        nix::unistd::fchown(&file, Some(uid), Some(gid)).map_err(std::io::Error::from)?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

/// The link to the current generation in a directory written by [`write_generation`]; each
/// visible name is a symlink `name -> ..data/name`.
pub const DATA_LINK: &str = "..data";

/// The new [`DATA_LINK`] before it is renamed over the old one.
const DATA_LINK_TMP: &str = "..data_tmp";

/// How often [`read_generation`] starts over because the generation it resolved was replaced
/// while it read, before it gives up: each retry means a whole new generation was written
/// meanwhile, which for certificates happens once every few hours.
const GENERATION_READ_ATTEMPTS: usize = 100;

/// Writes `files` (name, content, access) into `dir` so that a reader sees all of them change
/// at once, as Kubernetes' AtomicWriter does for Secret volumes
/// (<https://github.com/kubernetes/kubernetes/blob/master/pkg/volume/util/atomic_writer.go>):
/// the files go into a fresh directory `..<timestamp>` (0755), a symlink `..data_tmp` to it is
/// renamed over `..data`, each visible `name` is a symlink `..data/name` (created once; a
/// plain file left by an older krun is replaced by the link, atomically), and the previous
/// generations are removed. Modes and group are [`write_atomic`]'s.
pub fn write_generation(dir: &Path, files: &[(&str, &[u8], Access)]) -> Result<(), WriteError> {
    let at = |path: PathBuf| move |source| WriteError { path, source };
    create_dir(dir).map_err(at(dir.to_owned()))?;
    let generation = new_generation_dir(dir).map_err(at(dir.to_owned()))?;
    let generation_path = dir.join(&generation);
    let filled = files
        .iter()
        .try_for_each(|(name, bytes, access)| {
            let path = generation_path.join(name);
            write_file(&path, bytes, *access).map_err(at(dir.join(name)))
        })
        .and_then(|()| sync_dir(&generation_path).map_err(at(generation_path.clone())));
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&generation_path);
        return Err(e);
    }
    let link_tmp = dir.join(DATA_LINK_TMP);
    let swapped = remove_if_present(&link_tmp)
        .and_then(|()| std::os::unix::fs::symlink(&generation, &link_tmp))
        .and_then(|()| std::fs::rename(&link_tmp, dir.join(DATA_LINK)));
    if let Err(e) = swapped {
        let _ = std::fs::remove_dir_all(&generation_path);
        return Err(at(dir.join(DATA_LINK))(e));
    }
    for (name, _, _) in files {
        link_visible(dir, name).map_err(at(dir.join(name)))?;
    }
    sync_dir(dir).map_err(at(dir.to_owned()))?;
    remove_old_generations(dir, &generation);
    Ok(())
}

/// Creates `..<UTC timestamp>` in `dir` (Kubernetes' naming) with mode 0755 exactly; returns
/// its name.
fn new_generation_dir(dir: &Path) -> std::io::Result<String> {
    // 2024-05-01T12:00:00.123456789Z -> ..2024_05_01_12_00_00.123456789
    let stamp: String = humantime::format_rfc3339_nanos(std::time::SystemTime::now())
        .to_string()
        .trim_end_matches('Z')
        .chars()
        .map(|c| if matches!(c, '-' | ':' | 'T') { '_' } else { c })
        .collect();
    let mut suffix = 0u32;
    loop {
        let name = match suffix {
            0 => format!("..{stamp}"),
            n => format!("..{stamp}_{n}"),
        };
        let path = dir.join(&name);
        match std::fs::DirBuilder::new().mode(0o755).create(&path) {
            Ok(()) => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
                return Ok(name);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => suffix += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Makes `dir/name` the symlink `..data/name` unless it already is.
fn link_visible(dir: &Path, name: &str) -> std::io::Result<()> {
    let visible = dir.join(name);
    let target = Path::new(DATA_LINK).join(name);
    if std::fs::read_link(&visible).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{name}.{}.link", std::process::id()));
    remove_if_present(&tmp)?;
    std::os::unix::fs::symlink(&target, &tmp)?;
    std::fs::rename(&tmp, &visible).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Removes every generation directory in `dir` but `current`. A failure only leaves a stale
/// directory behind (the next write retries), so it is logged, not returned.
fn remove_old_generations(dir: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let generation = name.starts_with("..")
            && name != DATA_LINK
            && name != DATA_LINK_TMP
            && name != current
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if generation && let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove an old file generation; the next write retries");
        }
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A set of files that could not be read as one generation.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", .path.display())]
pub struct ReadError {
    /// The file (or `..data` link) at fault.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

/// Reads `names` from `dir` as one generation: when `dir` has a [`DATA_LINK`] (written by
/// [`write_generation`], or a Kubernetes Secret or ConfigMap volume) it is resolved once and
/// every file is read from that directory, so the contents belong together; when the
/// generation is replaced mid-read (a file is gone and `..data` points elsewhere) the read
/// starts over. Without `..data` (plain files, as older krun wrote them or an operator
/// mounts them) the files are read as they are, and belonging together is the caller's check.
pub fn read_generation<const N: usize>(
    dir: &Path,
    names: [&str; N],
) -> Result<[Vec<u8>; N], ReadError> {
    let at = |path: PathBuf| move |source| ReadError { path, source };
    let link = dir.join(DATA_LINK);
    for _ in 0..GENERATION_READ_ATTEMPTS {
        let generation = match std::fs::read_link(&link) {
            Ok(target) => dir.join(target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir.to_owned(),
            Err(e) => return Err(at(link)(e)),
        };
        let mut contents = Vec::with_capacity(N);
        for name in names {
            match std::fs::read(generation.join(name)) {
                Ok(bytes) => contents.push(bytes),
                Err(e) => {
                    let replaced = e.kind() == std::io::ErrorKind::NotFound
                        && generation != dir
                        && std::fs::read_link(&link).is_ok_and(|t| dir.join(t) != generation);
                    if replaced {
                        break;
                    }
                    return Err(at(dir.join(name))(e));
                }
            }
        }
        if let Ok(all) = <[Vec<u8>; N]>::try_from(contents) {
            return Ok(all);
        }
    }
    Err(at(link)(std::io::Error::other(format!(
        "replaced {GENERATION_READ_ATTEMPTS} times while being read; is more than one writer using the directory?"
    ))))
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
mod tests;
