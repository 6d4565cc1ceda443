//! Pure decisions over data: no I/O, no clock, no tokio, no ssh2, no rusqlite.

pub mod actual;
pub mod diff;
pub mod fingerprint;
pub mod model;
pub mod outcome;
pub mod plan;
pub mod policy;
pub mod prune;
pub mod report;
pub mod retry;
pub mod rollout;
pub mod spec;
pub mod token;
pub mod yaml;

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

/// Lowercase hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(bytes))
}
