//! Bidirectional copy between a tunnel stream and a TCP connection, with half-close: when one
//! side finishes writing, the other side's write half is shut down and the reverse direction
//! keeps flowing until it finishes too.

use tokio::io::{AsyncRead, AsyncWrite};

/// Copies both ways until both directions are done; returns the bytes sent each way.
/// `buffer` is the per-direction buffer; large buffers mean fewer, larger HTTP/2 DATA frames.
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    buffer: usize,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, buffer, buffer).await
}
