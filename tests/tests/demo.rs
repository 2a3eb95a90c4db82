//! `make demo` runs samples/local/demo.sh: the mesh on one machine (local CA, two workloads
//! under krun, hgate, a mesh client). This runs the same script against the binaries this
//! test run built, and checks that the three paths succeed, everything drains with the
//! expected exit codes and the script leaves nothing behind.

use std::path::Path;

use krun_tests::{Krun, binary};

#[test]
fn make_demo_shows_the_three_mesh_paths_and_cleans_up() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/local/demo.sh");
    // target/debug/krun -> target: the script finds its binaries under $CARGO_TARGET_DIR/debug.
    let krun = binary("krun");
    let target = krun
        .parent()
        .and_then(Path::parent)
        .expect("the target dir above debug/");
    binary("hgate");
    let done = Krun::program(&script)
        .env("CARGO_TARGET_DIR", target)
        .env("KRUN_DEMO_NO_BUILD", "1")
        .run();
    assert_eq!(done.code, 0, "{}", done.text());
    for path in [
        "ok (a) mesh client",
        "ok (b) app B",
        "ok (c) a client without",
    ] {
        assert!(
            done.output.iter().any(|l| l.starts_with(path)),
            "no {path:?} line:\n{}",
            done.text()
        );
    }
    // Each path shows its hops, the identities on both sides among them.
    for hop in [
        "peer=spiffe://cluster.local/ns/demo/sa/client",
        "peer=Some(\"spiffe://cluster.local/ns/demo/sa/caller\")",
        "verified=spiffe://cluster.local/ns/demo/sa/echo",
        "error=invalid peer certificate: UnknownIssuer",
    ] {
        assert!(done.has_line(hop), "no hop with {hop:?}:\n{}", done.text());
    }
    for process in ["krun-b", "krun-a", "hgate"] {
        assert!(
            done.has_line(&format!("{process} exited with 0")),
            "{process} did not drain cleanly:\n{}",
            done.text()
        );
    }
    let order: Vec<usize> = ["krun-b exited", "krun-a exited", "hgate exited"]
        .iter()
        .map(|l| done.line_index(l))
        .collect();
    assert!(order.is_sorted(), "drain order: {}", done.text());
    // The script names its temporary directory when it writes the CA there; it is gone.
    let ca_line = &done.output[done.line_index("== local CA")];
    let work = ca_line
        .rsplit_once(" in ")
        .map(|(_, dir)| Path::new(dir.trim_end_matches("/ca")))
        .expect("the CA line names its directory");
    assert!(
        !work.exists(),
        "{} is left behind:\n{}",
        work.display(),
        done.text()
    );
}
