//! HTTP/2 settings for tunnels, stated explicitly (ztunnel's values,
//! <https://github.com/istio/ztunnel/tree/master/src/proxy/h2>): large windows so one
//! stream can fill a fast link, and keepalive pings so dead peers are noticed.

use std::time::Duration;

/// Largest HTTP/1.1 request head (request line and headers) a server accepts: 64 KiB, as
/// [`H2Settings::max_header_list_size`] on HTTP/2; beyond it hyper answers 431.
pub const MAX_HTTP1_HEAD_BYTES: usize = 64 << 10;

/// Most header fields in one HTTP/1.1 request a server accepts (hyper's default, stated).
pub const MAX_HTTP1_HEADERS: usize = 100;

/// Flow control, framing and keepalive of every HBONE connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2Settings {
    /// Initial window of each stream (4 MiB).
    pub stream_window: u32,
    /// Window of the whole connection (16 MiB: 4x the stream window, so one stalled stream
    /// cannot starve the others).
    pub connection_window: u32,
    /// Largest frame (1 MiB).
    pub max_frame_size: u32,
    /// Streams a server accepts on one connection (200; krun sets its own from
    /// `KRUN_MAX_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Largest request header block a server accepts, uncompressed (64 KiB, a little above
    /// Envoy's 60 KiB default, so whatever Envoy forwards fits; HPACK-decoded size as
    /// HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE defines it).
    pub max_header_list_size: u32,
    /// Streams a client opens on one pooled connection before opening another (100).
    pub max_streams_per_connection: usize,
    /// Peers (keys) a client pool keeps connections for, least recently used evicted first
    /// (1024): hgate's peers follow the SNI a client chooses, so the pool must be bounded.
    pub max_pooled_peers: usize,
    /// Interval of HTTP/2 PINGs (10 s).
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped (20 s).
    pub keepalive_timeout: Duration,
    /// TCP connect timeout for upstream dials (10 s).
    pub connect_timeout: Duration,
    /// Copy buffer per direction of a tunnel (256 KiB).
    pub copy_buffer: usize,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            max_concurrent_streams: 200,
            max_header_list_size: 64 << 10,
            max_streams_per_connection: 100,
            max_pooled_peers: 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            copy_buffer: 256 << 10,
        }
    }
}
