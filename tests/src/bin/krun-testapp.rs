//! A stand-in app and helper process for krun's end-to-end tests. Each mode acts out one
//! behaviour a real app has (ignores SIGTERM, leaves orphans, listens late, ...) and reports
//! what it saw on stdout or in a log file, so tests synchronize on its output, never on time.
//!
//! Modes:
//! - `exit CODE`
//! - `kill-self SIGNAL`: dies of SIGNAL (e.g. TERM)
//! - `signals N`: prints `got SIGX` for each forwarded signal, exits 0 after N of each
//! - `wait-term`: prints `READY`, exits 0 on SIGTERM
//! - `ignore-term`: prints `READY`, ignores SIGTERM forever
//! - `orphans N`: makes N orphans that exit, waits until krun has reaped them all (exit 0) or
//!   sees a zombie left (exit 1)
//! - `stray PIDFILE`: starts a process in a new session (out of krun's process groups), writes
//!   its pid, prints `READY`, exits 0 on SIGTERM
//! - `grandchild PIDFILE`: starts a child in its own process group that ignores SIGTERM,
//!   writes its pid, prints `READY`, exits 0 on SIGTERM
//! - `serve NAME LOG PORT [DELAY_MS]`: appends `NAME start` to LOG, waits DELAY_MS (being slow
//!   on purpose), appends `NAME listening`, listens on 127.0.0.1:PORT, appends `NAME stop` and
//!   exits 0 on SIGTERM
//! - `listen PORT [PORT...] --late PORT`: listens on the first ports at once; prints
//!   `binding PORT` before listening on the late port, after a pause
//! - `echo PORT`: TCP echo server on 127.0.0.1:PORT (each connection echoes until EOF, then
//!   half-closes); prints `READY`; on SIGTERM stops accepting, finishes open connections, exits 0
//! - `id`: prints `uid=U gid=G groups=A,B`
//! - `env NAME`: prints the value of NAME

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigHandler, SigSet, Signal, signal};
use nix::unistd::{ForkResult, Pid, fork, getpid, setsid};

// The app handles what krun says it forwards; the test that sends them spells its own list
// out, so a signal dropped from krun's list still fails it.
use krun::supervisor::FORWARDED;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(0).as_str() {
        "exit" => ExitCode::from(arg(1).parse::<u8>().unwrap_or(2)),
        "kill-self" => {
            let sig: Signal = format!("SIG{}", arg(1)).parse().unwrap_or(Signal::SIGKILL);
            let _ = nix::sys::signal::kill(getpid(), sig);
            std::thread::park();
            ExitCode::from(2)
        }
        "signals" => signals(arg(1).parse().unwrap_or(1)),
        "wait-term" => {
            let term = block_term();
            say("READY");
            wait_term(term);
            ExitCode::SUCCESS
        }
        "ignore-term" => {
            // SAFETY: SIG_IGN installs no handler code.
            let _ = unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) };
            say("READY");
            loop {
                std::thread::park();
            }
        }
        "orphans" => orphans(arg(1).parse().unwrap_or(3)),
        "stray" => stray(&arg(1), true),
        "grandchild" => stray(&arg(1), false),
        "serve" => serve(&arg(1), &arg(2), &arg(3), arg(4).parse().unwrap_or(0)),
        "listen" => listen(&args[1..]),
        "echo" => echo(&arg(1)),
        "id" => {
            let groups: Vec<String> = nix::unistd::getgroups()
                .unwrap_or_default()
                .iter()
                .map(|g| g.to_string())
                .collect();
            say(&format!(
                "uid={} gid={} groups={}",
                nix::unistd::getuid(),
                nix::unistd::getgid(),
                groups.join(",")
            ));
            ExitCode::SUCCESS
        }
        "env" => {
            say(&std::env::var(arg(1)).unwrap_or_else(|_| "<unset>".into()));
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("krun-testapp: unknown mode {other:?}");
            ExitCode::from(2)
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Blocks SIGTERM so it queues until [`wait_term`]; call it before saying `READY`, or a
/// SIGTERM sent right after `READY` could kill the process with the default action.
fn block_term() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    let _ = set.thread_block();
    set
}

/// Waits for the blocked SIGTERM (no handler, so no async-signal-safety issues).
fn wait_term(set: SigSet) {
    let _ = set.wait();
}

fn signals(times: usize) -> ExitCode {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    let _ = set.thread_block();
    say("READY");
    let mut counts = [0usize; FORWARDED.len()];
    while counts.iter().any(|&c| c < times) {
        let Ok(sig) = set.wait() else {
            return ExitCode::from(1);
        };
        if let Some(i) = FORWARDED.iter().position(|&s| s == sig) {
            counts[i] += 1;
        }
        say(&format!("got {}", sig.as_str()));
    }
    ExitCode::SUCCESS
}

/// Forks; the child runs `child` and exits. Returns the child's pid in the parent.
fn spawn(child: impl FnOnce()) -> Pid {
    // SAFETY: single-threaded program; the child only makes system calls and exits.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => child,
        Ok(ForkResult::Child) => {
            child();
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("fork: {e}");
            std::process::exit(3)
        }
    }
}

fn orphans(n: usize) -> ExitCode {
    let (reader, mut writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(_) => return ExitCode::from(3),
    };
    for _ in 0..n {
        // The middle process reports its child's pid and exits at once, so the grandchild is
        // re-parented to krun; the grandchild then exits and needs krun to reap it.
        let middle = spawn(|| {
            let grandchild = spawn(|| std::thread::sleep(Duration::from_millis(20)));
            let _ = writeln!(writer, "{grandchild}");
        });
        let _ = nix::sys::wait::waitpid(middle, None);
    }
    drop(writer);
    let pids: Vec<String> = std::io::read_to_string(reader)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    say(&format!("orphans {}", pids.join(" ")));
    // Hang guard only: a reaped pid vanishes from /proc; a zombie stays forever.
    let give_up = Instant::now() + Duration::from_secs(20);
    while Instant::now() < give_up {
        let left: Vec<&String> = pids
            .iter()
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect();
        if left.is_empty() {
            say("all reaped");
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    say("zombies left");
    ExitCode::from(1)
}

fn stray(pidfile: &str, new_session: bool) -> ExitCode {
    let pid = spawn(|| {
        if new_session {
            let _ = setsid();
        } else {
            let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
        }
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) };
        loop {
            std::thread::park();
        }
    });
    if std::fs::write(pidfile, pid.to_string()).is_err() {
        return ExitCode::from(3);
    }
    let term = block_term();
    say("READY");
    wait_term(term);
    ExitCode::SUCCESS
}

fn append(log: &str, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{line}");
    }
}

fn serve(name: &str, log: &str, port: &str, delay_ms: u64) -> ExitCode {
    let term = block_term();
    append(log, &format!("{name} start"));
    std::thread::sleep(Duration::from_millis(delay_ms));
    append(log, &format!("{name} listening"));
    let listener = match TcpListener::bind(format!("127.0.0.1:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{name}: cannot listen on {port}: {e}");
            return ExitCode::from(3);
        }
    };
    wait_term(term);
    drop(listener);
    append(log, &format!("{name} stop"));
    ExitCode::SUCCESS
}

fn listen(args: &[String]) -> ExitCode {
    let term = block_term();
    let late_at = args.iter().position(|a| a == "--late");
    let (now, late) = match late_at {
        Some(i) => (&args[..i], args.get(i + 1)),
        None => (args, None),
    };
    let mut listeners = Vec::new();
    for port in now {
        match TcpListener::bind(format!("127.0.0.1:{port}")) {
            Ok(l) => listeners.push(l),
            Err(_) => return ExitCode::from(3),
        }
    }
    if let Some(port) = late {
        std::thread::sleep(Duration::from_millis(300));
        say(&format!("binding {port}"));
        match TcpListener::bind(format!("127.0.0.1:{port}")) {
            Ok(l) => listeners.push(l),
            Err(_) => return ExitCode::from(3),
        }
    }
    wait_term(term);
    ExitCode::SUCCESS
}

fn echo(port: &str) -> ExitCode {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    let term = block_term(); // before spawning threads, so they inherit the mask
    let Ok(listener) = TcpListener::bind(format!("127.0.0.1:{port}")) else {
        return ExitCode::from(3);
    };
    let open = Arc::new((Mutex::new(0usize), Condvar::new()));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (open_in, accepted_in) = (open.clone(), accepted.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            accepted_in.fetch_add(1, Ordering::Relaxed);
            let open = open_in.clone();
            if let Ok(mut count) = open.0.lock() {
                *count += 1;
            }
            std::thread::spawn(move || {
                let mut reader = &stream;
                let mut writer = &stream;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let (count, done) = &*open;
                if let Ok(mut count) = count.lock() {
                    *count -= 1;
                    done.notify_all();
                }
            });
        }
    });
    say("READY");
    wait_term(term);
    let (count, done) = &*open;
    let mut count = count
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while *count > 0 {
        count = done
            .wait(count)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    say(&format!(
        "echo served {} connections",
        accepted.load(Ordering::Relaxed)
    ));
    ExitCode::SUCCESS
}
