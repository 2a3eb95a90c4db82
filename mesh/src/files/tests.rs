use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("krun-files-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

#[test]
fn modes_are_octal_and_exact() {
    let dir = Scratch::new("modes");
    let file = dir.0.join("a/b/secret.pem");
    write_atomic(&file, b"x", Access::Private).expect("write");
    assert_eq!(std::fs::read(&file).expect("read"), b"x");
    assert_eq!(mode(&file), 0o600);
    ensure_dir(&dir.0.join("c"), 0o700, None).expect("dir");
    assert_eq!(mode(&dir.0.join("c")), 0o700);
}

#[test]
fn an_exact_mode_and_owner_are_set_and_a_rewrite_replaces_a_read_only_file() {
    let dir = Scratch::new("exact");
    let file = dir.0.join("app/password");
    let owner = nix::unistd::geteuid()
        .is_root()
        .then(|| (Uid::from_raw(65534), Gid::from_raw(65534)));
    let access = Access::Exact { mode: 0o440, owner };
    write_atomic(&file, b"one", access).expect("write");
    assert_eq!(mode(&file), 0o440);
    if owner.is_some() {
        let meta = std::fs::metadata(&file).expect("stat");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    }
    // A refresh: the read-only copy is replaced, not opened for writing.
    write_atomic(&file, b"two", access).expect("rewrite");
    assert_eq!(std::fs::read(&file).expect("read"), b"two");
}

/// A workload-like key and a self-signed certificate for it, as PEM.
struct Pair {
    key: String,
    chain: String,
}

fn pair(name: &str) -> Pair {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-sign");
    Pair {
        key: key.serialize_pem(),
        chain: cert.pem(),
    }
}

/// Whether `key` is the private key of the first certificate of `chain`.
fn belong_together(chain: &[u8], key: &[u8]) -> bool {
    let chain = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<Vec<_>, _>>()
        .expect("chain PEM");
    let key = PrivateKeyDer::from_pem_slice(key).expect("key PEM");
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).expect("usable key");
    CertifiedKey::new(chain, signing).keys_match().is_ok()
}

const NAMES: [&str; 3] = ["cert-chain.pem", "key.pem", "root-cert.pem"];

fn write_pair(dir: &Path, p: &Pair) {
    write_generation(
        dir,
        &[
            (NAMES[0], p.chain.as_bytes(), Access::Public),
            (NAMES[1], p.key.as_bytes(), Access::Secret),
            (NAMES[2], p.chain.as_bytes(), Access::Public),
        ],
    )
    .expect("write a generation");
}

/// The `..<timestamp>` directories in `dir`.
fn generations(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("..") && n != DATA_LINK)
        .collect();
    found.sort();
    found
}

#[test]
fn after_a_swap_every_name_resolves_into_the_one_new_generation() {
    let scratch = Scratch::new("swap");
    let dir = scratch.0.join("istio.io");
    let (old, new) = (pair("old"), pair("new"));
    write_pair(&dir, &old);
    let first = generations(&dir);
    write_pair(&dir, &new);
    let current = std::fs::read_link(dir.join(DATA_LINK)).expect("..data is a link");
    assert_eq!(
        generations(&dir),
        [current.to_string_lossy().into_owned()],
        "only the current generation is left (was {first:?})"
    );
    assert!(!first.contains(&current.to_string_lossy().into_owned()));
    let generation = std::fs::canonicalize(dir.join(&current)).expect("generation");
    for name in NAMES {
        let visible = dir.join(name);
        assert_eq!(
            std::fs::read_link(&visible).expect("a link"),
            Path::new(DATA_LINK).join(name)
        );
        assert_eq!(
            std::fs::canonicalize(&visible).expect("resolves"),
            generation.join(name)
        );
    }
    let [chain, key, _] = read_generation(&dir, NAMES).expect("read");
    assert_eq!((chain, key), (new.chain.into_bytes(), new.key.into_bytes()));
    assert!(!dir.join("..data_tmp").exists());
}

#[test]
fn modes_and_group_are_those_of_the_plain_files() {
    let scratch = Scratch::new("gen-modes");
    let dir = scratch.0.join("istio.io");
    write_pair(&dir, &pair("w"));
    let generation = dir.join(std::fs::read_link(dir.join(DATA_LINK)).expect("link"));
    assert_eq!(mode(&generation), 0o755);
    assert_eq!(mode(&dir.join("cert-chain.pem")), 0o644);
    assert_eq!(mode(&dir.join("root-cert.pem")), 0o644);
    let key = std::fs::metadata(dir.join("key.pem")).expect("key");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(key.mode() & 0o7777, 0o640);
        assert_eq!(key.gid(), PROXY_GID);
    } else {
        assert_eq!(key.mode() & 0o7777, 0o600);
    }
}

#[test]
fn plain_files_of_an_older_krun_become_links_into_a_generation() {
    let scratch = Scratch::new("migrate");
    let dir = scratch.0.join("istio.io");
    let old = pair("old");
    write_atomic(&dir.join("key.pem"), old.key.as_bytes(), Access::Secret).expect("old key");
    write_atomic(
        &dir.join("cert-chain.pem"),
        old.chain.as_bytes(),
        Access::Public,
    )
    .expect("old chain");
    let [chain, key] = read_generation(&dir, ["cert-chain.pem", "key.pem"]).expect("plain read");
    assert!(belong_together(&chain, &key));

    let new = pair("new");
    write_pair(&dir, &new);
    for name in NAMES {
        assert!(
            std::fs::symlink_metadata(dir.join(name))
                .expect("exists")
                .file_type()
                .is_symlink(),
            "{name} is a link now"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("key.pem")).expect("key"),
        new.key
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") || n.ends_with(".link"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn a_reader_during_swaps_sees_a_key_and_chain_of_one_generation() {
    let scratch = Scratch::new("race");
    let dir = scratch.0.join("istio.io");
    let pairs: Vec<Pair> = ["a", "b", "c"].into_iter().map(pair).collect();
    write_pair(&dir, &pairs[0]);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, done) = (dir.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut reads, mut mismatched) = (0u32, 0u32);
            // At least one read after the writer is done, so the last swap is seen too.
            loop {
                let finished = done.load(Ordering::Acquire);
                let [chain, key, roots] = read_generation(&dir, NAMES).expect("read");
                reads += 1;
                if !belong_together(&chain, &key) || chain != roots {
                    mismatched += 1;
                }
                if finished {
                    return (reads, mismatched);
                }
            }
        })
    };
    for i in 0..150 {
        write_pair(&dir, &pairs[(i + 1) % pairs.len()]);
    }
    done.store(true, Ordering::Release);
    let (reads, mismatched) = reader.join().expect("reader");
    assert!(reads > 0);
    assert_eq!(
        mismatched, 0,
        "{mismatched} of {reads} reads mixed generations"
    );
    assert_eq!(generations(&dir).len(), 1, "old generations are removed");
}
