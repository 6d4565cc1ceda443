//! The shell's clock: read once per use, formatted as RFC 3339 UTC. The core
//! never reads it; callers pass `now` in.

use std::hash::{BuildHasher, Hasher};
use std::time::SystemTime;

/// Now, RFC 3339 UTC with milliseconds, e.g. `2026-11-23T06:24:11.123Z`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A run id `r-YYYYMMDDTHHMMSSZ-xxxx` (4 lowercase alphanumerics).
pub fn new_run_id(now: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_seconds(now).to_string();
    let compact: String = stamp.chars().filter(|c| *c != '-' && *c != ':').collect();
    // RandomState is seeded from the OS per process; mixing in the time and
    // the pid keeps two runs in one second apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    let mut n = h.finish();
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut suffix = String::with_capacity(4);
    for _ in 0..4 {
        suffix.push(ALPHA[(n % 36) as usize] as char);
        n /= 36;
    }
    format!("r-{compact}-{suffix}")
}

/// A fresh 64-bit value, different on every call (seeded from the OS,
/// mixed with the time and a counter): names, not secrets.
pub fn nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Exactly the shape of `new_run_id`: `r-YYYYMMDDTHHMMSSZ-` and 4
/// lowercase alphanumerics. What a run id from outside (a URL) must be
/// before it names a directory.
pub fn is_run_id(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 23
        && b.starts_with(b"r-")
        && digits(2..10)
        && b[10] == b'T'
        && digits(11..17)
        && b[17] == b'Z'
        && b[18] == b'-'
        && b[19..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_recognised_exactly() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert!(is_run_id(&new_run_id(t)));
        assert!(is_run_id("r-20261203T100000Z-a1b2"));
        for bad in [
            "",
            "r-20261203T100000Z-a1b",
            "r-20261203T100000Z-a1b2c",
            "r-20261203T100000Z-A1B2",
            "r-2026120xT100000Z-a1b2",
            "x-20261203T100000Z-a1b2",
            "r-20261203t100000Z-a1b2",
            "r-20261203T100000Z_a1b2",
            "../../../etc/passwd",
            "r-20261203T100000Z-../",
            "r-20261203T100000Z-a/b2",
            "r-20261203T100000Z-a\u{0}b",
            "r-20261203T100000Z-\u{e9}b",
        ] {
            assert!(!is_run_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn run_id_shape() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        let id = new_run_id(t);
        assert!(id.starts_with("r-20261118T"), "{id}");
        let (head, suffix) = id.rsplit_once('-').unwrap();
        assert_eq!(head.len(), "r-YYYYMMDDTHHMMSSZ".len(), "{id}");
        assert!(head.ends_with('Z'));
        assert_eq!(suffix.len(), 4);
        assert!(
            suffix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
    }

    #[test]
    fn now_is_utc_rfc3339() {
        let n = now_rfc3339();
        assert!(n.ends_with('Z') && n.contains('T'), "{n}");
        assert!(humantime::parse_rfc3339(&n).is_ok());
    }
}
