//! The only place in krun that calls `waitpid`.
//!
//! As PID 1 (or as a child subreaper) krun inherits every orphan in the container and must reap
//! them, but a blanket `waitpid(-1)` would also steal the exit status of the children krun
//! waits for. So children are spawned through [`Reaper::spawn`], which records their pid under
//! the same lock the reaping loop takes: a child that exits at once is still matched with its
//! waiter, and every other pid reaped is an orphan.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{oneshot, watch};

mod exit;

pub use exit::ExitStatus;

type Waiters = HashMap<Pid, oneshot::Sender<ExitStatus>>;

/// Spawns children and reaps every process that ends below krun.
#[derive(Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
    /// True once `waitpid` reports that krun has no children left at all.
    no_children: Arc<watch::Sender<bool>>,
}

/// A child spawned through the reaper.
#[derive(Debug)]
pub struct Child {
    /// Its pid, which is also its process group id.
    pub pid: Pid,
    /// Resolves with its exit status once reaped.
    pub exit: oneshot::Receiver<ExitStatus>,
}

impl Child {
    /// Signals the child's whole process group (it and whatever it started that stayed there).
    pub fn kill_group(&self, signal: Signal) {
        signal_group(self.pid, signal);
    }
}

/// Signals a process group, ignoring groups that are already gone.
pub fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw(), signal = signal.as_str(), error = %e, "cannot signal process group")
        }
    }
}

impl Reaper {
    /// Makes krun a child subreaper (orphans of its descendants come to it even when it is not
    /// PID 1) and starts the reaping task. Must run inside the tokio runtime, before anything
    /// is spawned, so no SIGCHLD is missed.
    pub fn start() -> io::Result<Reaper> {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper; orphans of the app go to the host's init");
        }
        let mut sigchld = signal(SignalKind::child())?;
        let waiters = Arc::new(Mutex::new(Waiters::new()));
        let no_children = Arc::new(watch::Sender::new(false));
        let reaper = Reaper {
            waiters: waiters.clone(),
            no_children: no_children.clone(),
        };
        tokio::spawn(async move {
            loop {
                reap_all(&waiters, &no_children);
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `command` in a process group of its own and registers it for reaping.
    pub fn spawn(&self, command: &mut Command) -> io::Result<Child> {
        command.process_group(0);
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        let child = command.spawn()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).map_err(io::Error::other)?);
        let (tx, exit) = oneshot::channel();
        waiters.insert(pid, tx);
        self.no_children.send_replace(false);
        // The std handle never waits: dropping it leaves the reaping to us.
        drop(child);
        Ok(Child { pid, exit })
    }

    /// Resolves once krun has no child processes left (every descendant reaped).
    pub async fn all_reaped(&self) {
        let mut no_children = self.no_children.subscribe();
        let _ = no_children.wait_for(|none| *none).await;
    }

    /// False once `waitpid` has reported that krun has no children at all.
    pub fn has_children(&self) -> bool {
        !*self.no_children.borrow()
    }

    /// SIGKILLs every living child of krun, including orphans it inherited and never spawned
    /// (e.g. a daemon that escaped into its own session). Returns how many it found.
    pub fn kill_children(&self) -> usize {
        let children = living_children();
        for &pid in &children {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
        children.len()
    }
}

/// Pids whose parent is krun: from each thread's `/proc/self/task/<tid>/children` when the
/// kernel offers it (cheap), else by scanning every process's stat. Works for PID 1 and for a
/// subreaper alike.
fn living_children() -> Vec<Pid> {
    children_by_task().unwrap_or_else(children_by_scan)
}

fn children_by_task() -> Option<Vec<Pid>> {
    let mut children = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let list = std::fs::read_to_string(task.ok()?.path().join("children")).ok()?;
        children.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(Pid::from_raw),
        );
    }
    Some(children)
}

fn children_by_scan() -> Vec<Pid> {
    let me = nix::unistd::getpid().as_raw();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?;
            let ppid: i32 = fields.next()?.parse().ok()?;
            (ppid == me && state != "Z").then_some(Pid::from_raw(pid))
        })
        .collect()
}

/// Reaps every child that has ended, delivering statuses to their waiters.
fn reap_all(waiters: &Mutex<Waiters>, no_children: &watch::Sender<bool>) {
    let mut waiters = waiters.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, ExitStatus::Signal(signal as i32)),
            Ok(WaitStatus::StillAlive) => {
                no_children.send_replace(false);
                return;
            }
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => {
                no_children.send_replace(true);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "waitpid failed");
                return;
            }
        };
        match waiters.remove(&pid) {
            Some(waiter) => {
                let _ = waiter.send(status);
            }
            None => tracing::debug!(pid = pid.as_raw(), %status, "reaped orphan"),
        }
    }
}
