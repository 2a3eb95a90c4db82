//! The SNI parser against real ClientHellos: captured from openssl s_client, curl and Python's
//! ssl (`tests/corpus/*.bin`, recorded by `tests/corpus/capture.py`) and produced by rustls at
//! test time. Every one must parse; every truncation and corruption must be rejected (or at
//! least never yield the original name from broken bytes) without panicking.
//!
//! `mutations_never_panic` is a deterministic mutation run over the corpus that every `cargo
//! test` repeats; the coverage-guided fuzz target with the same seeds is `hbone/fuzz`
//! (`scripts/fuzz.sh`, part of `make test`).

use std::sync::Arc;

use hbone::sni::{self, Parsed};

const MESH_SNI: &str = "outbound_.8080_._.echo.default.svc.cluster.local";

struct Sample {
    name: String,
    bytes: Vec<u8>,
    sni: &'static str,
}

fn corpus() -> Vec<Sample> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut samples: Vec<Sample> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Files record which name their client sent: see capture.py.
            let sni = if name.contains("tls12") || name.starts_with("curl") {
                "echo.default.svc.cluster.local"
            } else {
                MESH_SNI
            };
            Sample {
                bytes: std::fs::read(&p).expect("corpus file"),
                name,
                sni,
            }
        })
        .collect();
    assert!(samples.len() >= 4, "corpus missing in {}", dir.display());
    for (alpn, label) in [(vec![], "rustls"), (vec![b"h2".to_vec()], "rustls-alpn")] {
        samples.push(Sample {
            name: label.into(),
            bytes: rustls_hello(alpn),
            sni: MESH_SNI,
        });
    }
    samples
}

/// The first flight of a rustls client (ring provider).
fn rustls_hello(alpn: Vec<Vec<u8>>) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    let name = rustls_pki_types::ServerName::try_from(MESH_SNI).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("write");
    out
}

fn parsed_sni(bytes: &[u8]) -> Option<String> {
    match sni::parse(bytes) {
        Ok(Parsed::Complete { sni, .. }) => sni,
        _ => None,
    }
}

#[test]
fn every_client_hello_in_the_corpus_parses() {
    for s in corpus() {
        assert_eq!(
            sni::parse(&s.bytes),
            Ok(Parsed::Complete {
                sni: Some(s.sni.to_owned()),
                len: s.bytes.len()
            }),
            "{}",
            s.name
        );
    }
}

#[test]
fn a_hello_arriving_byte_by_byte_is_incomplete_until_the_last_byte() {
    for s in corpus() {
        for cut in 0..s.bytes.len() {
            assert_eq!(
                sni::parse(&s.bytes[..cut]),
                Ok(Parsed::Incomplete),
                "{} cut {cut}",
                s.name
            );
        }
    }
}

/// Re-frames a handshake message into records of `size` bytes.
fn reframe(message: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&u16::try_from(chunk.len()).expect("small").to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn every_hello_split_over_records_parses() {
    for s in corpus() {
        for size in [1, 5, 64, 300] {
            let split = reframe(&s.bytes[5..], size);
            assert_eq!(
                parsed_sni(&split).as_deref(),
                Some(s.sni),
                "{} size {size}",
                s.name
            );
        }
    }
}

#[test]
fn truncated_messages_with_consistent_framing_are_rejected() {
    for s in corpus() {
        let message = &s.bytes[5..];
        for cut in 4..message.len() {
            // Cut the ClientHello body and fix the handshake length so the framing is
            // self-consistent: the inner fields now overrun.
            let body_len = cut - 4;
            let mut truncated = message[..cut].to_vec();
            truncated[1] = 0;
            truncated[2] = u8::try_from(body_len >> 8).expect("small");
            truncated[3] = u8::try_from(body_len & 0xff).expect("small");
            let result = sni::parse(&reframe(&truncated, 16384));
            assert!(
                !matches!(&result, Ok(Parsed::Complete { sni: Some(n), .. }) if n == s.sni),
                "{} cut at {cut}: {result:?}",
                s.name
            );
        }
    }
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).expect("fits")).expect("fits")
    }
}

#[test]
fn mutations_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut complete = 0;
    for s in corpus() {
        for _ in 0..20_000 {
            let mut bytes = s.bytes.clone();
            for _ in 0..=rng.below(4) {
                match rng.below(4) {
                    0 => {
                        let i = rng.below(bytes.len());
                        bytes[i] = u8::try_from(rng.next() & 0xff).expect("byte");
                    }
                    1 => {
                        let i = rng.below(bytes.len());
                        bytes[i] ^= 1 << rng.below(8);
                    }
                    2 => {
                        let i = rng.below(bytes.len());
                        bytes.truncate(i);
                    }
                    _ => {
                        let i = rng.below(bytes.len());
                        bytes.insert(i, u8::try_from(rng.next() & 0xff).expect("byte"));
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            if let Ok(Parsed::Complete {
                sni: Some(name),
                len,
            }) = sni::parse(&bytes)
            {
                complete += 1;
                assert!(len <= bytes.len());
                assert!(
                    name.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-._".contains(&c))
                );
            }
        }
    }
    // Most single-byte changes land in random or key material, so many mutants still parse:
    // this shows the run exercised the accepting path, not only the error paths.
    assert!(complete > 0);
}
