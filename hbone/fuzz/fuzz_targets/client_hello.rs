//! Fuzzes the ClientHello/SNI parser (`hbone::sni::parse`), which hgate runs on the first bytes
//! of every connection before anything is authenticated: whatever arrives must be answered with
//! `Incomplete`, `Complete` or an error, never a panic; what it accepts must be a plausible host
//! name taken from the bytes it says it consumed; and the answer must not depend on how the
//! bytes were split into reads.
//!
//! The input is the byte stream a client sends, so the seeds (the real ClientHellos in
//! `hbone/tests/corpus`) are valid inputs as they are. The read boundaries come from the
//! stream's last bytes rather than a leading control byte: a ClientHello's first byte is always
//! 22 (handshake), its last ones are key material the parser never looks at.

#![no_main]

use hbone::sni::{self, Parsed, SniError};
use libfuzzer_sys::fuzz_target;

/// The longest host name DNS allows; the parser must refuse longer ones.
const MAX_NAME: usize = 253;

fuzz_target!(|stream: &[u8]| {
    let whole = sni::parse(stream);
    check_answer(stream, &whole);

    // The same bytes arriving in several reads, parsed after each one as hgate does: the first
    // answer that is not `Incomplete` must be the answer for the whole stream.
    for end in read_ends(stream) {
        let so_far = sni::parse(&stream[..end]);
        if so_far == Ok(Parsed::Incomplete) {
            continue;
        }
        assert!(
            same_decision(&so_far, &whole),
            "after {end} of {} bytes: {so_far:?}, whole stream: {whole:?}",
            stream.len()
        );
        break;
    }
});

/// Checks one answer against the bytes it was given.
fn check_answer(stream: &[u8], answer: &Result<Parsed, SniError>) {
    match answer {
        Ok(Parsed::Incomplete) => {}
        Ok(Parsed::Complete { sni, len }) => {
            assert!(
                *len > 0 && *len <= stream.len(),
                "consumed {len} of {} bytes",
                stream.len()
            );
            if let Some(name) = sni {
                assert!(
                    !name.is_empty() && name.len() <= MAX_NAME,
                    "name of {} bytes",
                    name.len()
                );
                assert!(
                    name.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_')),
                    "not a host name: {name:?}"
                );
            }
            // The answer is decided by the bytes it claims to have consumed, and no others.
            assert_eq!(
                sni::parse(&stream[..*len]),
                *answer,
                "the first {len} bytes alone"
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Whether an answer from a prefix of the stream agrees with the answer for the whole stream.
/// A prefix may see less of the last record, so it may report fewer consumed bytes.
fn same_decision(prefix: &Result<Parsed, SniError>, whole: &Result<Parsed, SniError>) -> bool {
    match (prefix, whole) {
        (Ok(Parsed::Complete { sni: a, len: la }), Ok(Parsed::Complete { sni: b, len: lb })) => {
            a == b && la <= lb
        }
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

/// Where the reads end: up to three cut points spread over the stream by its last three bytes,
/// then the end of the stream.
fn read_ends(stream: &[u8]) -> Vec<usize> {
    let mut ends: Vec<usize> = stream
        .iter()
        .rev()
        .take(3)
        .map(|&b| usize::from(b) * stream.len() / 256)
        .collect();
    ends.push(stream.len());
    ends.sort_unstable();
    ends.dedup();
    ends
}
