//! How a child ended, and the exit code krun reports for it.

use std::fmt;

use nix::sys::signal::Signal;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit(code)`.
    Code(i32),
    /// It was killed by a signal.
    Signal(i32),
}

impl ExitStatus {
    /// True for `exit(0)`.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The shell convention (tini's too): the code itself, or 128+N for signal N.
    pub fn exit_code(self) -> u8 {
        match self {
            ExitStatus::Code(code) => (code & 0xff) as u8,
            ExitStatus::Signal(signal) => 128u8.saturating_add((signal & 0x7f) as u8),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(n) => match Signal::try_from(n) {
                Ok(signal) => write!(f, "signal {n} ({})", signal.as_str()),
                Err(_) => write!(f, "signal {n}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(ExitStatus::Code(7).exit_code(), 7);
        assert_eq!(ExitStatus::Signal(15).exit_code(), 143);
        assert_eq!(ExitStatus::Signal(9).exit_code(), 137);
        assert_eq!(ExitStatus::Signal(9).to_string(), "signal 9 (SIGKILL)");
        assert_eq!(ExitStatus::Code(3).to_string(), "exit code 3");
    }
}
