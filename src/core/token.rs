//! Confirmation tokens (SPEC.md section 4): the document an operator drops in
//! `<state_dir>/confirm/` to let exactly one destructive operation run once.
//!
//! A token is checked against everything the shell observed about its file
//! (bytes, mode, mtime, whether its content was used before) and the
//! operation at hand; the result is a verdict with the reason an operator can
//! act on. Checking is pure: the shell passes `now` and the file's facts in.
//!
//! Invariant: a token is valid only if every check passes; anything
//! unreadable, ambiguous or out of scope is refused with its reason.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use super::yaml;

/// The token document.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenDoc {
    /// The operation hash, full lowercase hex.
    pub operation: String,
    /// Must equal the operation's host set exactly.
    pub hosts: Vec<String>,
    /// RFC 3339.
    pub expires: String,
    pub reason: String,
    #[serde(default)]
    pub by: Option<String>,
}

/// What the shell knows about one token file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFile {
    /// Path relative to the state dir, e.g. `confirm/abc.yaml`.
    pub rel_path: String,
    pub bytes: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// The sha256 of these bytes was used by an earlier run.
    pub used_before: bool,
}

impl TokenFile {
    pub fn sha256(&self) -> String {
        super::sha256_hex(&self.bytes)
    }
}

/// The verdict on one token for one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub file: String,
    /// Parsed document (None when malformed).
    pub doc: Option<TokenDoc>,
    /// Operation hash and host set both match.
    pub scope_match: bool,
    /// None when the token is valid for the operation.
    pub refusal: Option<String>,
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        self.refusal.is_none()
    }
}

/// Parse a token's bytes.
pub fn parse(bytes: &[u8]) -> Result<TokenDoc, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let node = yaml::parse(text)
        .map_err(|e| match e.pos {
            Some(p) => format!("{p}: {}", e.msg),
            None => e.msg,
        })?
        .ok_or("empty")?;
    yaml::from_node::<TokenDoc>(&node).map_err(|e| match e.pos {
        Some(p) => format!("{p}: {}", e.msg),
        None => e.msg,
    })
}

/// Check one token file against an operation (`operation`, `hosts`) at `now`
/// (seconds since the epoch).
pub fn check(
    file: &TokenFile,
    operation: &str,
    hosts: &BTreeSet<String>,
    now: i64,
    max_ttl: Duration,
) -> Verdict {
    let mut v = Verdict {
        file: file.rel_path.clone(),
        doc: None,
        scope_match: false,
        refusal: None,
    };
    let doc = match parse(&file.bytes) {
        Ok(d) => d,
        Err(e) => {
            v.refusal = Some(format!("malformed token: {e}"));
            return v;
        }
    };
    let token_hosts: BTreeSet<String> = doc.hosts.iter().cloned().collect();
    v.scope_match = doc.operation == operation && token_hosts == *hosts;
    let refusal = if file.mode & 0o022 != 0 {
        Some(format!(
            "token file is writable by group or others (mode {:04o}); chmod 600 it",
            file.mode & 0o7777
        ))
    } else if doc.reason.trim().is_empty() {
        Some("token has an empty `reason`".into())
    } else if doc.operation != operation {
        Some(format!(
            "token is for operation {}, not {operation}",
            short(&doc.operation)
        ))
    } else if token_hosts != *hosts {
        Some(format!(
            "token names hosts [{}], the operation covers exactly [{}]",
            doc.hosts.join(", "),
            hosts.iter().cloned().collect::<Vec<_>>().join(", ")
        ))
    } else if file.used_before {
        Some("token was already used (a token is good for one run)".into())
    } else {
        match parse_rfc3339(&doc.expires) {
            None => Some(format!(
                "`expires: {}` is not an RFC 3339 time",
                doc.expires
            )),
            Some(exp) if exp <= now => Some(format!("token expired at {}", doc.expires)),
            Some(exp) if exp > file.mtime + max_ttl.as_secs() as i64 => Some(format!(
                "token expires more than token_max_ttl ({}) after its file was written",
                humantime::format_duration(max_ttl)
            )),
            Some(_) => None,
        }
    };
    v.refusal = refusal;
    v.doc = Some(doc);
    v
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// Seconds since the epoch of an RFC 3339 time (`Z` or `±HH:MM` offset,
/// optional fraction, which is dropped).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let o = oh * 3600 + om * 60;
            if rest.starts_with('-') { -o } else { o }
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The RFC 3339 UTC form of seconds since the epoch (the inverse of
/// [`parse_rfc3339`] for `Z` times).
pub fn format_rfc3339(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // Civil from days (Hinnant).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The token document `tend confirm` writes.
pub fn render(doc: &TokenDoc) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("string");
    let mut out = format!(
        "# Confirmation token written by `tend confirm`. Good for one run.\noperation: {}\nhosts: [{}]\nexpires: {}\nreason: {}\n",
        doc.operation,
        doc.hosts
            .iter()
            .map(|h| q(h))
            .collect::<Vec<_>>()
            .join(", "),
        doc.expires,
        q(&doc.reason)
    );
    if let Some(by) = &doc.by {
        out.push_str(&format!("by: {}\n", q(by)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: &str = "9c1f00000000000000000000000000000000000000000000000000000000e2";
    const NOW: i64 = 1_795_000_000;

    fn file(text: &str, mode: u32, used: bool) -> TokenFile {
        TokenFile {
            rel_path: "confirm/t.yaml".into(),
            bytes: text.as_bytes().to_vec(),
            mode,
            mtime: NOW - 60,
            used_before: used,
        }
    }

    fn token(op: &str, hosts: &str, expires: i64) -> String {
        format!(
            "operation: {op}\nhosts: [{hosts}]\nexpires: {}\nreason: retire the old vhost\nby: alice\n",
            format_rfc3339(expires)
        )
    }

    fn verdict(text: &str, mode: u32, used: bool) -> Verdict {
        let hosts: BTreeSet<String> = ["web-1".to_string(), "web-2".to_string()].into();
        check(
            &file(text, mode, used),
            OP,
            &hosts,
            NOW,
            Duration::from_secs(3600),
        )
    }

    #[test]
    fn refusals_table() {
        let good = token(OP, "web-1, web-2", NOW + 600);
        let cases: Vec<(String, u32, bool, Option<&str>, bool)> = vec![
            // text, mode, used before -> refusal contains, scope match
            (good.clone(), 0o600, false, None, true),
            (
                token(OP, "web-2, web-1", NOW + 600),
                0o644,
                false,
                None,
                true,
            ),
            (
                good.clone(),
                0o620,
                false,
                Some("writable by group or others"),
                true,
            ),
            (
                good.clone(),
                0o602,
                false,
                Some("writable by group or others"),
                true,
            ),
            (good.clone(), 0o600, true, Some("already used"), true),
            (
                token(OP, "web-1, web-2", NOW - 1),
                0o600,
                false,
                Some("expired"),
                true,
            ),
            (
                token(OP, "web-1, web-2", NOW + 7200),
                0o600,
                false,
                Some("more than token_max_ttl"),
                true,
            ),
            (
                token("abc", "web-1, web-2", NOW + 600),
                0o600,
                false,
                Some("is for operation abc"),
                false,
            ),
            (
                token(OP, "web-1", NOW + 600),
                0o600,
                false,
                Some("exactly [web-1, web-2]"),
                false,
            ),
            (
                token(OP, "web-1, web-2, web-3", NOW + 600),
                0o600,
                false,
                Some("exactly"),
                false,
            ),
            (
                "operation: x\n".into(),
                0o600,
                false,
                Some("malformed token: 1:1: missing field `hosts`"),
                false,
            ),
            (
                "::: not yaml".into(),
                0o600,
                false,
                Some("malformed token"),
                false,
            ),
            (
                good.replace("by: alice", "by: alice\nextra: 1"),
                0o600,
                false,
                Some("unknown field `extra`"),
                false,
            ),
            (
                good.replace("reason: retire the old vhost", "reason: \"  \""),
                0o600,
                false,
                Some("empty `reason`"),
                true,
            ),
            (
                good.replace(&format_rfc3339(NOW + 600), "tomorrow"),
                0o600,
                false,
                Some("not an RFC 3339 time"),
                true,
            ),
        ];
        for (i, (text, mode, used, want, scope)) in cases.into_iter().enumerate() {
            let v = verdict(&text, mode, used);
            match want {
                None => assert!(v.is_valid(), "case {i}: {v:?}"),
                Some(w) => assert!(
                    v.refusal.as_deref().is_some_and(|r| r.contains(w)),
                    "case {i}: want {w:?}, got {v:?}"
                ),
            }
            assert_eq!(v.scope_match, scope, "case {i}: {v:?}");
        }
    }

    #[test]
    fn rfc3339_round_trips_and_honours_offsets() {
        for t in [0, 951_782_400, NOW, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(
            parse_rfc3339("2026-11-23T12:00:00+01:00"),
            parse_rfc3339("2026-11-23T11:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2026-11-23T12:00:00.5Z"),
            parse_rfc3339("2026-11-23T12:00:00Z")
        );
        for bad in [
            "2026-11-23",
            "2026-13-01T00:00:00Z",
            "2026-11-23T12:00:00",
            "2026-11-23T12:00:00+0100",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rendered_tokens_parse_back() {
        let doc = TokenDoc {
            operation: OP.into(),
            hosts: vec!["web-1".into(), "web-2".into()],
            expires: format_rfc3339(NOW + 60),
            reason: "it's: \"quoted\" # not a comment".into(),
            by: Some("alice".into()),
        };
        assert_eq!(parse(render(&doc).as_bytes()).unwrap(), doc);
    }
}
