//! Standard output and standard error for every command, through one place.
//!
//! `std::println!` panics when stdout is a closed pipe (`tend status | head
//! -0`), and a command that writes through `std::io::stdout()` with `?` fails
//! with "Broken pipe" and exit 1. SPEC 8.6 asks instead that writing to a
//! closed pipe end the command's output quietly, with the command's normal
//! exit code. So every write of the crate goes through [`Stdout`] and
//! [`Stderr`] here: the crate-level `print!`/`println!`/`eprint!`/`eprintln!`
//! macros (defined below, in scope for every module of the crate) shadow the
//! standard ones, and code that needs an `io::Write` takes [`stdout()`].
//!
//! The first `EPIPE` on stdout marks it closed: nothing more is written to it
//! for the rest of the process, and the command goes on to its normal end and
//! exit code (a run `tend apply` records is recorded whether or not anyone
//! reads its summary). Any other error writing to stdout (a full disk behind a
//! redirection) also stops output, and is kept so that `main` can report it
//! and exit 1: output that was lost must not look like success. Errors on
//! stderr are dropped: there is nowhere left to report them.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
static STDERR_CLOSED: AtomicBool = AtomicBool::new(false);
/// The first stdout error that was not a closed pipe.
static STDOUT_FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// The process's stdout, never failing: see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stdout;

/// The process's stderr, never failing: errors are dropped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

/// A writer over stdout for code that needs `io::Write` (serde_json, `write!`).
pub fn stdout() -> Stdout {
    Stdout
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if STDOUT_CLOSED.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        match io::stdout().lock().write_all(buf) {
            Ok(()) => Ok(buf.len()),
            Err(e) => {
                stdout_failed(e);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if !STDOUT_CLOSED.load(Ordering::Relaxed)
            && let Err(e) = io::stdout().lock().flush()
        {
            stdout_failed(e);
        }
        Ok(())
    }
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !STDERR_CLOSED.load(Ordering::Relaxed) && io::stderr().lock().write_all(buf).is_err() {
            STDERR_CLOSED.store(true, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn stdout_failed(e: io::Error) {
    STDOUT_CLOSED.store(true, Ordering::Relaxed);
    if e.kind() != io::ErrorKind::BrokenPipe {
        let mut failure = STDOUT_FAILURE.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert_with(|| e.to_string());
    }
}

/// Flush stdout (through [`Stdout`], so a closed pipe stays quiet), and
/// return the first stdout error that was not a closed pipe, if any: the
/// command's output was lost, which `main` reports as an error.
pub fn finish() -> Option<String> {
    let _ = Stdout.flush();
    STDOUT_FAILURE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Flush stdout (a closed pipe stays quiet).
pub fn flush() {
    let _ = Stdout.flush();
}

/// Whether stdout is closed: a write found it so, or (for a pipe whose
/// reader went away) `poll` says so without writing.
pub fn stdout_closed() -> bool {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return true;
    }
    let mut fd = libc::pollfd {
        fd: 1,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
}

/// What `print!` and `println!` expand to.
pub fn print_fmt(args: fmt::Arguments<'_>) {
    // Unit tests keep the standard macro, whose output the test harness
    // captures; the harness's stdout is never a closed pipe.
    if cfg!(test) {
        std::print!("{args}");
    } else {
        let _ = Stdout.write_fmt(args);
    }
}

/// What `eprint!` and `eprintln!` expand to.
pub fn eprint_fmt(args: fmt::Arguments<'_>) {
    if cfg!(test) {
        std::eprint!("{args}");
    } else {
        let _ = Stderr.write_fmt(args);
    }
}

// The crate's printing macros. Defined with `macro_rules!` before every other
// module (see lib.rs), they are in textual scope everywhere in the crate and
// take precedence over the standard prelude's macros of the same names.
// Each carries `allow(unused_macros)`: a macro no module uses today still
// exists so that no future module falls back to the panicking standard one.

#[allow(unused_macros)]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::output::print_fmt(format_args!($($arg)*))
    };
}

#[allow(unused_macros)]
macro_rules! println {
    () => {
        $crate::output::print_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[allow(unused_macros)]
macro_rules! eprint {
    ($($arg:tt)*) => {
        $crate::output::eprint_fmt(format_args!($($arg)*))
    };
}

#[allow(unused_macros)]
macro_rules! eprintln {
    () => {
        $crate::output::eprint_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::eprint_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// ANSI colour for output for people, or none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paint {
    pub on: bool,
}

impl Paint {
    /// Colour when asked, or (`auto`) when stdout is a terminal and
    /// `NO_COLOR` is unset or empty.
    pub fn for_stdout(arg: crate::cli::ColorArg) -> Paint {
        use crate::cli::ColorArg;
        use std::io::IsTerminal;
        let on = match arg {
            ColorArg::Always => true,
            ColorArg::Never => false,
            ColorArg::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && io::stdout().is_terminal()
            }
        };
        Paint { on }
    }

    fn wrap(self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    pub fn green(self, s: &str) -> String {
        self.wrap("32", s)
    }
    pub fn red(self, s: &str) -> String {
        self.wrap("31", s)
    }
    pub fn yellow(self, s: &str) -> String {
        self.wrap("33", s)
    }
    pub fn cyan(self, s: &str) -> String {
        self.wrap("36", s)
    }
    pub fn bold(self, s: &str) -> String {
        self.wrap("1", s)
    }
    pub fn dim(self, s: &str) -> String {
        self.wrap("2", s)
    }
}

/// The word an enum value is written as in tend's documents (its serde
/// name, e.g. `Running`); empty for a value that is not a word.
pub fn word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}
