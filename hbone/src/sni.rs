//! Reads the server name (SNI) of a TLS ClientHello without terminating TLS, so a gateway can
//! route mesh mTLS by name and forward the untouched bytes.
//!
//! The parser works on whatever bytes have arrived so far: a ClientHello may be split over
//! several TLS records and several TCP segments, so [`parse`] answers
//! [`Parsed::Incomplete`] until the whole handshake message is there. Every length is checked
//! against the bytes it claims and against fixed bounds; malformed input is an error, never a
//! panic (cloud-run-mesh's parser checked an extension's bounds against the wrong offset, so a
//! crafted ClientHello could crash its gateway).

/// The largest ClientHello accepted (handshake bytes). Real ones are under 2 KiB; post-quantum
/// key shares make them up to ~2.5 KiB. 16 KiB leaves room and bounds the peek buffer.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// The largest TLS plaintext record (RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;
const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// The result of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed; `parse` again once more have arrived.
    Incomplete,
    /// The whole ClientHello was read.
    Complete {
        /// The server name, if the client sent one.
        sni: Option<String>,
        /// Bytes of the TLS records holding the ClientHello.
        len: usize,
    },
}

/// Why bytes are not a ClientHello; the message names the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SniError {
    /// The first record is not a TLS handshake record (plaintext, HTTP, ...).
    #[error("not a TLS handshake record (content type {0})")]
    NotHandshake(u8),
    /// A record's protocol version major byte is not 3.
    #[error("record version {0}.x is not TLS")]
    Version(u8),
    /// A record is empty or larger than TLS allows.
    #[error("record length {0} out of range 1..=16384")]
    RecordLength(usize),
    /// The handshake message is not a ClientHello.
    #[error("handshake message type {0} is not ClientHello")]
    NotClientHello(u8),
    /// The ClientHello is larger than [`MAX_CLIENT_HELLO`].
    #[error("ClientHello of {0} bytes exceeds the {MAX_CLIENT_HELLO} byte limit")]
    TooLarge(usize),
    /// A field's length runs past the end of its enclosing structure.
    #[error("ClientHello field {0} is truncated or its length is wrong")]
    Malformed(&'static str),
    /// The server_name extension holds no valid host name.
    #[error("server_name is not a valid host name")]
    BadName,
}

/// Parses the ClientHello at the start of `buf` (the bytes received so far).
pub fn parse(buf: &[u8]) -> Result<Parsed, SniError> {
    let Some(message) = reassemble(buf)? else {
        return Ok(Parsed::Incomplete);
    };
    let (handshake, len) = message;
    let sni = client_hello_sni(&handshake)?;
    Ok(Parsed::Complete { sni, len })
}

/// Joins handshake records until the ClientHello message is whole. Returns the message body
/// and the bytes of records it took, or `None` while incomplete.
fn reassemble(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, SniError> {
    let mut handshake: Vec<u8> = Vec::new();
    let mut offset = 0;
    loop {
        let Some(header) = buf.get(offset..offset + RECORD_HEADER) else {
            // A partial header: check what there is, then wait for the rest.
            if let Some(&content) = buf.get(offset)
                && content != CONTENT_HANDSHAKE
            {
                return Err(SniError::NotHandshake(content));
            }
            if let Some(&major) = buf.get(offset + 1)
                && major != 3
            {
                return Err(SniError::Version(major));
            }
            return Ok(None);
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(SniError::NotHandshake(header[0]));
        }
        if header[1] != 3 {
            return Err(SniError::Version(header[1]));
        }
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if record_len == 0 || record_len > MAX_RECORD {
            return Err(SniError::RecordLength(record_len));
        }
        let start = offset + RECORD_HEADER;
        let available = buf.get(start..).unwrap_or_default();
        let fragment = &available[..record_len.min(available.len())];
        handshake.extend_from_slice(fragment);
        if let Some(&kind) = handshake.first()
            && kind != HANDSHAKE_CLIENT_HELLO
        {
            return Err(SniError::NotClientHello(kind));
        }
        if handshake.len() >= 4 {
            let body_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if body_len > MAX_CLIENT_HELLO {
                return Err(SniError::TooLarge(body_len));
            }
            if handshake.len() >= 4 + body_len {
                // Whole message. Bytes after it in the same record belong to a later message,
                // which a ClientHello never shares a record with in practice; ignore them.
                let consumed = start + fragment.len();
                handshake.truncate(4 + body_len);
                handshake.drain(..4);
                return Ok(Some((handshake, consumed)));
            }
        }
        if fragment.len() < record_len {
            return Ok(None);
        }
        offset = start + record_len;
    }
}

/// A cursor that never reads past its slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], SniError> {
        if n > self.0.len() {
            return Err(SniError::Malformed(field));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, field: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u8(field)?);
        self.take(n, field)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, field: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u16(field)?);
        self.take(n, field)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The server name in a ClientHello body (RFC 8446 §4.1.2, RFC 6066 §3).
fn client_hello_sni(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    if r.vec8("legacy_session_id")?.len() > 32 {
        return Err(SniError::Malformed("legacy_session_id"));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher_suites"));
    }
    if r.vec8("legacy_compression_methods")?.is_empty() {
        return Err(SniError::Malformed("legacy_compression_methods"));
    }
    if r.is_empty() {
        return Ok(None); // TLS 1.2 without extensions.
    }
    let mut extensions = Reader(r.vec16("extensions")?);
    if !r.is_empty() {
        return Err(SniError::Malformed("extensions"));
    }
    let mut sni = None;
    let mut seen = Vec::new();
    while !extensions.is_empty() {
        let kind = extensions.u16("extension type")?;
        let data = extensions.vec16("extension data")?;
        if seen.contains(&kind) {
            return Err(SniError::Malformed("duplicate extension"));
        }
        seen.push(kind);
        if kind == EXT_SERVER_NAME {
            sni = Some(server_name(data)?);
        }
    }
    Ok(sni)
}

/// The host name in a server_name extension.
fn server_name(data: &[u8]) -> Result<String, SniError> {
    let mut outer = Reader(data);
    let mut list = Reader(outer.vec16("server_name_list")?);
    if !outer.is_empty() {
        return Err(SniError::Malformed("server_name extension"));
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8("server name type")?;
        let name = list.vec16("host_name")?;
        if kind == NAME_TYPE_HOST && host.is_none() {
            host = Some(name);
        }
    }
    let name = host.ok_or(SniError::BadName)?;
    if name.is_empty()
        || name.len() > 253
        || !name
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
    {
        return Err(SniError::BadName);
    }
    // Checked ASCII above, so this cannot fail; map rather than unwrap anyway.
    String::from_utf8(name.to_vec()).map_err(|_| SniError::BadName)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid ClientHello with the given SNI, as one record.
    fn hello(sni: &str) -> Vec<u8> {
        let mut ext = Vec::new();
        let name = sni.as_bytes();
        let entry_len = 3 + name.len();
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&((entry_len + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(entry_len as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        ext.extend_from_slice(name);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut message = vec![1, 0];
        message.extend_from_slice(&(body.len() as u16).to_be_bytes());
        message.extend_from_slice(&body);
        records(&message, usize::MAX)
    }

    /// `message` split into handshake records of at most `size` bytes.
    fn records(message: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(size.min(MAX_RECORD)) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn sni_of(buf: &[u8]) -> Option<String> {
        match parse(buf) {
            Ok(Parsed::Complete { sni, .. }) => sni,
            other => panic!("expected a complete ClientHello, got {other:?}"),
        }
    }

    #[test]
    fn reads_the_name_of_a_single_record_hello() {
        let buf = hello("echo.default.svc.cluster.local");
        assert_eq!(
            sni_of(&buf).as_deref(),
            Some("echo.default.svc.cluster.local")
        );
        assert_eq!(
            parse(&buf),
            Ok(Parsed::Complete {
                sni: Some("echo.default.svc.cluster.local".into()),
                len: buf.len()
            })
        );
    }

    #[test]
    fn reads_a_hello_split_over_many_records() {
        let one = hello("outbound_.8080_._.echo.default.svc.cluster.local");
        let message = &one[5..];
        for size in [1, 2, 3, 7, 50] {
            let split = records(message, size);
            assert_eq!(
                sni_of(&split).as_deref(),
                Some("outbound_.8080_._.echo.default.svc.cluster.local"),
                "record size {size}"
            );
        }
    }

    #[test]
    fn every_prefix_is_incomplete_not_an_error() {
        let split = records(&hello("a.b")[5..], 9);
        for cut in 0..split.len() {
            assert_eq!(parse(&split[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_client_hello() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotHandshake(b'G'))
        );
        assert_eq!(parse(&[22, 2]), Err(SniError::Version(2)));
        assert_eq!(parse(&[22, 3, 1, 0, 0]), Err(SniError::RecordLength(0)));
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 1]),
            Err(SniError::RecordLength(16385))
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(SniError::NotClientHello(2))
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 1, 1, 0, 0]),
            Err(SniError::TooLarge(65536))
        );
    }

    #[test]
    fn rejects_names_that_are_not_host_names() {
        for bad in ["", "a b", "a\u{7f}", "é.example"] {
            assert!(
                matches!(parse(&hello(bad)), Err(SniError::BadName)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_lengths_that_overrun_their_structure() {
        let good = hello("a.b");
        // Offsets in the record: 5 header + 4 handshake header + 2 version + 32 random = 43
        // session id length; 44.. cipher suites length.
        let mut bad_session = good.clone();
        bad_session[43] = 200;
        assert!(parse(&bad_session).is_err());
        let mut odd_suites = good.clone();
        odd_suites[45] = 3;
        assert!(parse(&odd_suites).is_err());
        let mut long_extensions = good.clone();
        let at = good.len() - (3 + 2 + 2 + 2 + 2 + 2) - 2;
        long_extensions[at + 1] = long_extensions[at + 1].wrapping_add(1);
        assert!(parse(&long_extensions).is_err());
    }
}
