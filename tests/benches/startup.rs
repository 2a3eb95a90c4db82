//! Startup and footprint of krun as a supervisor, against baselines measured in the same run:
//! `true` alone, and `tini -- true` (Debian's tini) when installed.
//!
//! Run: `make bench` (builds the release binaries first). `KRUN_BENCH_BASELINE=/path/to/krun`
//! measures another build (e.g. main's) in the same run. Every command runs once per round, in
//! turn, so a load change on the shared machine moves all of them alike; the figures are
//! medians over the rounds.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use krun_tests::bench::median;
use krun_tests::binary;

const ROUNDS: usize = 201;
/// How long an idle krun runs before its memory is read, at most: krun unmaps its startup code
/// a second after the app is ready (`krun::footprint::SETTLE`) and logs it, which ends the wait.
const SETTLED: Duration = Duration::from_secs(5);

/// One run of `argv` with a plain environment (no mesh, no app port), timed.
fn timed_run(argv: &[String]) -> Duration {
    let start = Instant::now();
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PORT_http", "-")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run");
    assert!(status.success(), "{argv:?} failed");
    start.elapsed()
}

/// The median time of each command, run alternately for [`ROUNDS`] rounds.
fn interleaved_medians(commands: &[Vec<String>]) -> Vec<Duration> {
    let mut samples = vec![Vec::with_capacity(ROUNDS); commands.len()];
    for _ in 0..ROUNDS {
        for (argv, times) in commands.iter().zip(&mut samples) {
            times.push(timed_run(argv));
        }
    }
    samples.into_iter().map(median).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `VmRSS`, `RssAnon` and `RssFile` (KiB) of an idle krun supervising `sleep`: anonymous
/// memory is what krun allocated, file pages are mostly its own executable's text.
fn idle_rss_kib(krun: &str) -> [u64; 3] {
    let mut child = Command::new(krun)
        .args(["--", "sleep", "1000"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PORT_http", "-")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start krun");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Idle means settled: krun unmaps its startup code a second after the app is ready and
    // says so; a build that does not (a baseline from before) is measured after SETTLED.
    let deadline = Instant::now() + SETTLED;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("startup code unmapped") => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    let rss = ["VmRSS:", "RssAnon:", "RssFile:"].map(|field| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("memory figure")
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    rss
}

/// Added startup time and idle memory of one krun binary.
fn report(
    label: &str,
    krun: &str,
    with_krun: Duration,
    baseline: Duration,
    tini: Option<Duration>,
) {
    let size = std::fs::metadata(krun).map(|m| m.len()).unwrap_or(0);
    println!(
        "  {label}: krun -- true {:.3} ms, added {:.3} ms (goal <= 2 ms), ratio to true {:.2}{}",
        ms(with_krun),
        ms(with_krun.saturating_sub(baseline)),
        ms(with_krun) / ms(baseline),
        tini.map(|t| format!(", to tini {:.2}", ms(with_krun) / ms(t)))
            .unwrap_or_default()
    );
    let [rss, anon, file] = idle_rss_kib(krun);
    println!(
        "  {label}: idle, supervising sleep: RSS {rss} KiB = {anon} anon + {file} file \
         (goal <= 5120 KiB); binary {size} bytes"
    );
}

fn main() {
    let krun = binary("krun").display().to_string();
    // A second krun binary (e.g. built from main) to compare in the same run.
    let before = std::env::var("KRUN_BENCH_BASELINE").ok();
    let tini = ["/usr/bin/tini", "/usr/sbin/tini"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let argv = |prefix: &[&str]| -> Vec<String> {
        prefix
            .iter()
            .chain(&["--", "/bin/true"])
            .map(|s| s.to_string())
            .collect()
    };
    let mut commands = vec![vec!["/bin/true".to_owned()], argv(&[&krun])];
    commands.extend(tini.map(|t| argv(&[t])));
    commands.extend(before.as_deref().map(|b| argv(&[b])));
    let medians = interleaved_medians(&commands);
    let baseline = medians[0];
    let tini_time = tini.map(|_| medians[2]);
    println!("startup, median of {ROUNDS} interleaved rounds:");
    println!("  true: {:.3} ms", ms(baseline));
    match tini_time {
        Some(t) => println!(
            "  tini -- true: {:.3} ms, added {:.3} ms",
            ms(t),
            ms(t.saturating_sub(baseline))
        ),
        None => println!("  tini -- true: not installed (apt-get install tini)"),
    }
    if let (Some(before), Some(time)) = (&before, medians.last()) {
        report("KRUN_BENCH_BASELINE", before, *time, baseline, tini_time);
    }
    report("this build", &krun, medians[1], baseline, tini_time);
}
