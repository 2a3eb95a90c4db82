//! The open-file limit: every connection is a file descriptor (two for a tunnel), and the
//! default soft limit (often 1024) is far below the connection caps krun and hgate allow. Like
//! Go's runtime (<https://github.com/golang/go/issues/46279>), each raises its soft limit to
//! the hard limit at startup, so the caps are what bounds connections, not `EMFILE`.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs the outcome in one line; returns
/// the soft limit now in force. A failure leaves the limit as it was: the process still runs,
/// with room for fewer connections.
pub fn raise_open_files() -> u64 {
    let raised = getrlimit(Resource::RLIMIT_NOFILE).and_then(|(soft, hard)| {
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        }
        Ok((soft, hard))
    });
    match raised {
        Ok((was, limit)) => {
            tracing::info!(
                limit,
                was,
                "open-file limit (RLIMIT_NOFILE) at its hard limit"
            );
            limit
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit; fewer connections will fit");
            getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
        }
    }
}
