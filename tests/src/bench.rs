//! What the benchmarks share: the stand-in servers at the far end of a measured path, the
//! connection-setup measurement and the median they report.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::netns::Netns;

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

/// A listener on every address of the calling thread's namespace, with SO_REUSEADDR.
fn listen(port: u16) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket
        .bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .expect("bind");
    socket.listen(1024).expect("listen")
}

/// A bench's server app: a sink on `sink_port` and an echo server on `echo_port`, on every
/// address of the server namespace (so
/// both krun's delivery on loopback and the direct path reach them), on a thread inside it.
pub fn serve_in(ns: &Netns, sink_port: u16, echo_port: u16) {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn({
        let enter = ns.entry();
        move || {
            enter();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let sink_listener = listen(sink_port);
                let echo_listener = listen(echo_port);
                ready_tx.send(()).expect("ready");
                tokio::join!(sink(sink_listener), echo(echo_listener));
            });
        }
    });
    ready.recv().expect("server app ready");
}

/// A connection without Nagle's delay.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// p50 of connect + one 1-byte round trip + close, over `count` connections.
pub async fn connect_round_trip_close(addr: SocketAddr, count: usize) -> Duration {
    let mut samples = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for _ in 0..count {
        let start = Instant::now();
        let mut stream = connect(addr).await;
        stream.write_all(b"x").await.expect("ping");
        stream.read_exact(&mut byte).await.expect("pong");
        stream.shutdown().await.expect("close");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("peer close");
        samples.push(start.elapsed());
    }
    median(samples)
}
