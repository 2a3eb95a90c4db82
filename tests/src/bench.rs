//! What the benchmarks share: the stand-in servers at the far end of a measured path and the
//! median they report.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Reads and discards everything; answers with the byte count when the writer half-closes
/// (a throughput run's far end).
pub async fn sink(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 256 << 10];
            let mut total = 0u64;
            while let Ok(n) = stream.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = stream.write_all(&total.to_le_bytes()).await;
        });
    }
}

/// Echoes every byte back, without Nagle's delay (a round-trip run's far end).
pub async fn echo(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// The benchmarks' runtime: one worker, so the client side takes one core and krun the other.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The middle sample (the upper one of an even count); `samples` must not be empty.
pub fn median<T: PartialOrd + Copy>(mut samples: Vec<T>) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    samples[samples.len() / 2]
}
