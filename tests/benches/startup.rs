//! Startup and footprint of krun as a supervisor, against baselines measured in the same run:
//! `true` alone, and `tini -- true` (Debian's tini) when installed.
//!
//! Run: `make bench` (builds the release binaries first).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use krun_tests::binary;

const RUNS: usize = 101;

fn median_run(argv: &[&str]) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let status = Command::new(argv[0])
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
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn idle_rss_kib(krun: &str) -> u64 {
    let mut child = Command::new(krun)
        .args(["--", "sleep", "1000"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PORT_http", "-")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start krun");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    while let Some(Ok(line)) = lines.next() {
        if line.contains("app-ready") {
            break;
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    rss
}

fn main() {
    let krun = binary("krun").display().to_string();
    let baseline = median_run(&["/bin/true"]);
    let with_krun = median_run(&[&krun, "--", "/bin/true"]);
    println!("startup, median of {RUNS} runs:");
    println!("  true                 {:8.3} ms", ms(baseline));
    println!(
        "  krun -- true         {:8.3} ms   added {:.3} ms (goal <= 5 ms), ratio {:.2}",
        ms(with_krun),
        ms(with_krun - baseline),
        ms(with_krun) / ms(baseline)
    );
    match ["/usr/bin/tini", "/usr/sbin/tini"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    {
        Some(tini) => {
            let with_tini = median_run(&[tini, "--", "/bin/true"]);
            println!(
                "  tini -- true         {:8.3} ms   added {:.3} ms; krun/tini ratio {:.2}",
                ms(with_tini),
                ms(with_tini.saturating_sub(baseline)),
                ms(with_krun) / ms(with_tini)
            );
        }
        None => println!("  tini -- true         not installed (apt-get install tini)"),
    }
    println!(
        "idle krun supervising sleep: RSS {} KiB (goal <= 5120 KiB)",
        idle_rss_kib(&krun)
    );
}
