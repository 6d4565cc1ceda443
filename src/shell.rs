//! The one place where a value becomes a POSIX `sh` word.
//!
//! Every path, name and value that tend puts into a shell script goes through
//! [`quote`] (or [`quote_bytes`], the same implementation over bytes). The
//! result is a single-quoted word: inside single quotes `sh` interprets
//! nothing at all (no `$`, no backquotes, no backslashes, no globbing, no
//! tilde), so the only character that needs care is the quote itself, which is
//! written as `'\''` (close the quote, an escaped quote, reopen). The empty
//! string becomes `''`, a word of its own rather than nothing.
//!
//! Invariant: pure. File content never goes through here: it travels on stdin.
//! NUL is the one byte no shell word (or argv element) can hold; tend's paths
//! never contain it, and the transport refuses a script that does.

/// Quote `s` as one POSIX `sh` word that expands to exactly `s`.
pub fn quote(s: &str) -> String {
    // Only ASCII quote bytes are inserted, at ASCII boundaries, so valid
    // UTF-8 in gives valid UTF-8 out.
    String::from_utf8(quote_bytes(s.as_bytes())).expect("quoting keeps UTF-8 valid")
}

/// Quote arbitrary bytes (any byte but NUL) as one POSIX `sh` word.
pub fn quote_bytes(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'\'');
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::process::Command;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn examples() {
        for (input, want) in [
            ("", "''"),
            ("abc", "'abc'"),
            ("it's", "'it'\\''s'"),
            ("'", "''\\'''"),
            ("$(x) `y` *", "'$(x) `y` *'"),
            ("a\nb", "'a\nb'"),
        ] {
            assert_eq!(quote(input), want, "{input:?}");
        }
    }

    /// The reference reading of a quoted word, as `sh` performs it: text
    /// between single quotes is literal, `\'` outside quotes is a quote.
    fn unquote(word: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < word.len() {
            match word[i] {
                b'\'' => {
                    let end = word[i + 1..].iter().position(|&b| b == b'\'')? + i + 1;
                    out.extend_from_slice(&word[i + 1..end]);
                    i = end + 1;
                }
                b'\\' if word.get(i + 1) == Some(&b'\'') => {
                    out.push(b'\'');
                    i += 2;
                }
                // Anything else outside quotes would be interpreted by sh.
                _ => return None,
            }
        }
        Some(out)
    }

    /// Runs `printf '%s' WORD` in `sh` inside `cwd` and returns its stdout.
    fn sh_printf(word: &[u8], cwd: &Path) -> Vec<u8> {
        let mut script = b"printf '%s' ".to_vec();
        script.extend_from_slice(word);
        let out = Command::new("sh")
            .arg("-c")
            .arg(OsStr::from_bytes(&script))
            .current_dir(cwd)
            .output()
            .expect("run sh");
        assert!(
            out.status.success(),
            "sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Byte strings made of shell-significant fragments and arbitrary
    /// non-NUL bytes, with `marker` named in every command-injection attempt.
    fn nasty(marker: &str) -> impl Strategy<Value = Vec<u8>> {
        let fragments: Vec<Vec<u8>> = [
            "'".to_string(),
            "\"".into(),
            "\\".into(),
            "'\\''".into(),
            format!("$(touch {marker})"),
            format!("`touch {marker}`"),
            format!("; touch {marker}; "),
            format!("' ; touch {marker} ; '"),
            format!("\ntouch {marker}\n"),
            format!("| touch {marker}"),
            "${HOME}".into(),
            "$1".into(),
            "-n".into(),
            "--".into(),
            " ".into(),
            "\t".into(),
            "\n".into(),
            "*".into(),
            "?[a-z]".into(),
            "~".into(),
            "~root".into(),
            "{a,b}".into(),
            "é✓".into(),
            "%s%d".into(),
            "!".into(),
            "#".into(),
        ]
        .into_iter()
        .map(String::into_bytes)
        .collect();
        let piece = prop_oneof![
            proptest::sample::select(fragments),
            proptest::collection::vec(1u8..=255, 0..8),
        ];
        proptest::collection::vec(piece, 0..8).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn quoted_word_reads_back_exactly(s in proptest::collection::vec(1u8..=255, 0..64)) {
            let q = quote_bytes(&s);
            prop_assert_eq!(unquote(&q), Some(s));
        }

        #[test]
        fn str_and_bytes_agree(s in ".*") {
            prop_assert_eq!(quote(&s).into_bytes(), quote_bytes(s.as_bytes()));
        }
    }

    #[test]
    fn sh_prints_exactly_the_bytes_and_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pwned");
        let marker_s = marker.to_str().unwrap().to_string();
        // A glob in the payload would match this file if sh expanded it.
        std::fs::write(dir.path().join("a"), b"").unwrap();
        let config = ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        };
        proptest!(config, |(s in nasty(&marker_s))| {
            let out = sh_printf(&quote_bytes(&s), dir.path());
            prop_assert_eq!(out, s);
            prop_assert!(!marker.exists(), "a payload was executed");
        });
        assert!(!marker.exists());
    }

    #[test]
    fn empty_string_is_one_empty_word() {
        let dir = tempfile::tempdir().unwrap();
        // Two positional parameters: the empty word survives as a word.
        let script = format!("set -- {} x; printf '%s' \"$#\"", quote(""));
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"2");
    }
}
