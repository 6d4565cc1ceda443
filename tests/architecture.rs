//! Keeps the core honest: nothing under `src/core/` may do I/O, read the
//! clock or the environment, or know about tokio, SSH or SQL.

use std::fs;
use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "std::fs",
    "std::io",
    "std::net",
    "std::process",
    "std::env",
    "std::thread",
    "SystemTime",
    "Instant::now",
    "tokio",
    "rusqlite",
    "ssh2",
    "notify",
    "tracing",
    "crate::store",
    "crate::transport",
    "crate::dispatch",
    "crate::reconcile",
    "crate::clock",
];

#[test]
fn core_is_pure() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut checked = 0;
    let mut offences = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        // Test modules may use the file system (fixtures); stop at them.
        let body = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in body.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for f in FORBIDDEN {
                if code.contains(f) {
                    offences.push(format!("{}:{}: uses `{f}`", path.display(), n + 1));
                }
            }
        }
        checked += 1;
    }
    assert!(checked >= 8, "expected the core modules, found {checked}");
    assert!(
        offences.is_empty(),
        "the core must stay pure:\n{}",
        offences.join("\n")
    );
}
