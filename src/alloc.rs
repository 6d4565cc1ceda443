//! The process's use of glibc's allocator: fewer arenas, and memory handed
//! back when idle. A controller runs a pass per host, many at once, each on
//! a blocking thread; glibc gives threads arenas of their own (up to 8 per
//! core), and freed memory stays in them. At 50 hosts that was 15 arenas
//! holding 28-48 MiB, most of it free (README "Performance").
//!
//! Invariant: tuning only; nothing here changes what tend does.

/// At most this many malloc arenas (glibc's default is 8 per core).
const ARENAS: i32 = 2;

/// Limit the arenas; call once, first thing in `main`, before threads start.
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Give free memory at the top of every arena back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
