//! Builds the `Command`s krun starts: the app (exec'd directly, PATH lookup, no shell, stdio
//! inherited), optionally under another user, and the extra processes.

use std::process::Command;

use nix::unistd::{Gid, Uid, User};

/// The user the app runs as when krun is root and `K8S_UID` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The uid (`K8S_UID`).
    pub uid: Uid,
    /// The primary gid: `K8S_GID`, else the user's from /etc/passwd, else the uid's number.
    pub gid: Gid,
    /// Supplementary groups: the user's from /etc/group; none for an unnamed uid.
    pub groups: Vec<Gid>,
}

impl RunAs {
    /// Decides the app's identity, or `None` to keep krun's. Never keeps root's supplementary
    /// groups for a non-root app (cloud-run-mesh changed only the uid for `K8S_UID`, so the app
    /// kept root's gid and groups).
    pub fn resolve(uid: Option<u32>, gid: Option<u32>) -> Option<RunAs> {
        let uid = Uid::from_raw(uid?);
        if !nix::unistd::geteuid().is_root() {
            tracing::warn!(
                uid = uid.as_raw(),
                "K8S_UID ignored: krun is not root, so the app keeps krun's user"
            );
            return None;
        }
        let user = User::from_uid(uid).ok().flatten();
        let gid = gid
            .map(Gid::from_raw)
            .or(user.as_ref().map(|u| u.gid))
            .unwrap_or(Gid::from_raw(uid.as_raw()));
        let groups = match &user {
            Some(u) => supplementary_groups(u, gid),
            None => Vec::new(),
        };
        let run_as = RunAs { uid, gid, groups };
        tracing::info!(
            uid = uid.as_raw(),
            gid = gid.as_raw(),
            groups = ?run_as.groups.iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
            user = user.as_ref().map_or("(no passwd entry)", |u| u.name.as_str()),
            "app runs as K8S_UID"
        );
        Some(run_as)
    }

    /// Switches user in the child between fork and exec: groups first, then gid, then uid
    /// (after setuid the process could no longer change its groups).
    pub fn apply(&self, command: &mut Command) {
        let RunAs { uid, gid, groups } = self.clone();
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // async-signal-safe setgroups/setgid/setuid system calls on pre-built data.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(command, move || {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
                Ok(())
            });
        }
    }
}

fn supplementary_groups(user: &User, gid: Gid) -> Vec<Gid> {
    let Ok(name) = std::ffi::CString::new(user.name.as_bytes()) else {
        return vec![gid];
    };
    nix::unistd::getgrouplist(&name, gid).unwrap_or_else(|_| vec![gid])
}

/// A command for `argv`, or `None` when `argv` is empty.
pub fn command(argv: &[String]) -> Option<Command> {
    let (program, args) = argv.split_first()?;
    let mut command = Command::new(program);
    command.args(args);
    Some(command)
}

/// True when `path` is a regular file someone may execute: the check before krun decides
/// to start a program (pilot-agent, Envoy, iptables) rather than fail at spawn time.
pub fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
