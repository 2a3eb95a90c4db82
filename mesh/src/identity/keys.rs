//! Loads CA private keys in the encodings Istio's tooling and OpenSSL produce. rcgen with ring
//! only reads PKCS#8, while `openssl genrsa` (1.1) writes PKCS#1 and `openssl ecparam` writes
//! SEC1; both are re-wrapped into PKCS#8 here (a few bytes of DER, no key material changes).

use rcgen::KeyPair;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// A key file krun cannot use as a signing key.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what}: expected an RSA (2048-4096 bit) or EC P-256 private key in PEM (PKCS#8, PKCS#1 or SEC1)"
)]
pub struct KeyError {
    what: String,
}

/// DER OID of rsaEncryption.
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// DER OID of id-ecPublicKey.
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER OID of prime256v1 (P-256).
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Parses a PEM private key into a signing key pair; `what` names the file for errors.
pub fn signing_key_from_pem(pem: &[u8], what: &str) -> Result<KeyPair, KeyError> {
    let err = |detail: &str| KeyError {
        what: format!("{what}: {detail}"),
    };
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| err(&e.to_string()))?;
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => pkcs8(
            &[tlv(0x06, OID_RSA), tlv(0x05, &[])].concat(),
            k.secret_pkcs1_der(),
        ),
        PrivateKeyDer::Sec1(k) => {
            let inner = sec1_without_parameters(k.secret_sec1_der())
                .ok_or_else(|| err("malformed SEC1 key"))?;
            pkcs8(&[tlv(0x06, OID_EC), tlv(0x06, OID_P256)].concat(), &inner)
        }
        _ => return Err(err("unsupported key encoding")),
    };
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8);
    KeyPair::try_from(&der).map_err(|e| err(&e.to_string()))
}

/// `PrivateKeyInfo { version 0, AlgorithmIdentifier { alg }, OCTET STRING key }`.
fn pkcs8(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    tlv(
        0x30,
        &[tlv(0x02, &[0]), tlv(0x30, algorithm), tlv(0x04, key)].concat(),
    )
}

/// ring rejects the optional curve parameters inside a PKCS#8-wrapped `ECPrivateKey` (they
/// are in the outer algorithm identifier), so they are dropped and the rest is kept.
fn sec1_without_parameters(der: &[u8]) -> Option<Vec<u8>> {
    let (tag, body, _) = read_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = body;
    let mut kept = Vec::new();
    while !rest.is_empty() {
        let (tag, value, next) = read_tlv(rest)?;
        if tag != 0xa0 {
            kept.extend_from_slice(&tlv(tag, value));
        }
        rest = next;
    }
    Some(tlv(0x30, &kept))
}

/// Encodes one DER tag-length-value.
fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

/// Reads one DER tag-length-value: (tag, value, rest).
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_round_trip() {
        let value = vec![7u8; 300];
        let encoded = tlv(0x04, &value);
        let (tag, body, rest) = read_tlv(&encoded).expect("valid DER");
        assert_eq!((tag, body.len(), rest.len()), (0x04, 300, 0));
    }

    #[test]
    fn pkcs8_keys_load_and_garbage_is_named() {
        let key = KeyPair::generate().expect("keygen");
        let loaded = signing_key_from_pem(key.serialize_pem().as_bytes(), "ca-key.pem")
            .expect("PKCS#8 loads");
        assert_eq!(loaded.public_key_pem(), key.public_key_pem());
        let err = signing_key_from_pem(b"not a key", "ca-key.pem").expect_err("garbage");
        assert!(err.to_string().starts_with("ca-key.pem: "), "{err}");
    }
}
