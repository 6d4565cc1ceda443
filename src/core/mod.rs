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
static SEAL_KEY: std::sync::RwLock<[u8; 32]> = std::sync::RwLock::new([0; 32]);

/// Set the key [`seal`] uses. The binary sets a random one at start, then
/// the state dir's (`seal.key`) once it knows the state dir, before anything
/// is planned; a unit test that sets none seals with zeros.
pub fn set_seal_key(key: [u8; 32]) {
    if let Ok(mut k) = SEAL_KEY.write() {
        *k = key;
    }
}

/// A keyed digest of a sensitive value (SPEC 8.6): `sealed:` and 24 hex
/// digits of sha256(key ‖ value). Stable for one state dir (tokens and
/// plans agree), useless for guessing a short secret without the key.
pub fn seal(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let key = SEAL_KEY.read().map(|k| *k).unwrap_or([0; 32]);
    let mut h = Sha256::new();
    h.update(key);
    h.update(bytes);
    format!("sealed:{}", &hex(&h.finalize())[..24])
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(bytes))
}
