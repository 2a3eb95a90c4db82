//! The signals krun passes on to the app. As PID 1 the kernel drops any signal without a
//! handler, so each one needs a handler here, and each is forwarded every time it arrives.

use std::io;
use std::task::Poll;

use nix::sys::signal::Signal;
use tokio::signal::unix::{self, SignalKind};

/// Signals forwarded to the app. SIGTERM also starts the drain.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Handlers for [`FORWARDED`], read as one stream.
pub struct ForwardedSignals(Vec<(Signal, unix::Signal)>);

impl ForwardedSignals {
    /// Installs the handlers. Must run inside the tokio runtime.
    pub fn install() -> io::Result<Self> {
        FORWARDED
            .iter()
            .map(|&s| Ok((s, unix::signal(SignalKind::from_raw(s as i32))?)))
            .collect::<io::Result<_>>()
            .map(ForwardedSignals)
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> Signal {
        std::future::poll_fn(|cx| {
            for (signal, stream) in &mut self.0 {
                if let Poll::Ready(Some(())) = stream.poll_recv(cx) {
                    return Poll::Ready(*signal);
                }
            }
            Poll::Pending
        })
        .await
    }
}
