//! Bidirectional copy between a tunnel stream and a TCP connection, with half-close: when one
//! side finishes writing, the other side's write half is shut down and the reverse direction
//! keeps flowing until it finishes too.
//!
//! Buffers adapt, as ztunnel's do (<https://github.com/istio/ztunnel/blob/master/src/copy.rs>):
//! each direction starts at 1 KiB, so an idle tunnel costs
//! little memory, and grows fourfold whenever a read fills the buffer, up to the configured
//! maximum, so a bulk transfer moves large chunks (fewer, fuller HTTP/2 DATA frames). Writes are
//! flushed only when the reader has nothing more at hand, not after every write.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First buffer of each direction.
const INITIAL_BUFFER: usize = 1024;

/// Copies both ways until both directions are done; returns the bytes sent each way
/// (`a` to `b`, then `b` to `a`). `max_buffer` bounds each direction's buffer.
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    max_buffer: usize,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    tokio::try_join!(
        copy_one_way(&mut a_read, &mut b_write, max_buffer),
        copy_one_way(&mut b_read, &mut a_write, max_buffer)
    )
}

async fn copy_one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    max_buffer: usize,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buffer = vec![0u8; INITIAL_BUFFER.min(max_buffer.max(1))];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buffer).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buffer[..n]).await?;
        total += n as u64;
        if n == buffer.len() {
            if buffer.len() < max_buffer {
                buffer.resize((buffer.len() * 4).min(max_buffer), 0);
            }
        } else {
            writer.flush().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, mut near) = tokio::io::duplex(64);
        let (mut far, mut server) = tokio::io::duplex(64);
        let relay =
            tokio::spawn(async move { copy_bidirectional(&mut near, &mut far, 4096).await });
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let echo = tokio::spawn(async move {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.expect("read");
            server.write_all(&received).await.expect("echo");
            server.shutdown().await.expect("close");
            received.len()
        });
        client.write_all(&payload).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read back");
        assert_eq!(back, expected);
        assert_eq!(echo.await.expect("echo task"), 100_000);
        assert_eq!(
            relay.await.expect("relay").expect("copy"),
            (100_000, 100_000)
        );
    }
}
