//! Outbound TCP for tunnels: one connect with a deadline and `TCP_NODELAY`, shared by the
//! server's upstream dials and both clients, so a stuck dial fails the same way everywhere.

use std::time::Duration;

use tokio::net::{TcpStream, ToSocketAddrs};

/// Connects to `addr` within `timeout`; on failure returns why, in words for an error message.
pub async fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "timed out after {timeout:?} (a firewall or NetworkPolicy may drop it)"
        )),
    }
}
