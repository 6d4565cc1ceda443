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

/// The token document: one operation (`operation` and `hosts`), or
/// several (`operations`, SPEC 8.1 fleet-scale confirmation), never both.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenDoc {
    /// The operation hash, full lowercase hex.
    #[serde(default)]
    pub operation: Option<String>,
    /// Must equal the operation's host set exactly.
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    /// Several operations, each authorized as a single token would, each
    /// used once.
    #[serde(default)]
    pub operations: Option<Vec<Scope>>,
    /// RFC 3339.
    pub expires: String,
    pub reason: String,
    #[serde(default)]
    pub by: Option<String>,
}

/// One operation a token authorizes: its hash and exact host set.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    pub operation: String,
    pub hosts: Vec<String>,
}

impl TokenDoc {
    /// A token for one operation.
    pub fn single(
        operation: String,
        hosts: Vec<String>,
        expires: String,
        reason: String,
        by: Option<String>,
    ) -> Self {
        TokenDoc {
            operation: Some(operation),
            hosts: Some(hosts),
            operations: None,
            expires,
            reason,
            by,
        }
    }

    /// Lists several operations (`operations:`).
    pub fn is_multi(&self) -> bool {
        self.operations.is_some()
    }

    /// Every operation the token names, with its host set.
    pub fn scopes(&self) -> Vec<Scope> {
        match (&self.operations, &self.operation, &self.hosts) {
            (Some(list), _, _) => list.clone(),
            (None, Some(op), Some(hosts)) => vec![Scope {
                operation: op.clone(),
                hosts: hosts.clone(),
            }],
            _ => vec![],
        }
    }

    /// The scope the token gives `operation`, if it names it.
    pub fn scope_of(&self, operation: &str) -> Option<Scope> {
        self.scopes().into_iter().find(|s| s.operation == operation)
    }
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
    /// When tend first saw this file with these bytes (seconds since the
    /// epoch, recorded in SQLite). `expires` is bounded from the earlier of
    /// this and `mtime`, so a file given a future mtime cannot stretch
    /// `token_max_ttl`.
    pub first_seen: i64,
    /// The sha256 of these bytes was used by an earlier run (a token for one
    /// operation).
    pub used_before: bool,
    /// The operations of a token that lists several that earlier runs used.
    pub used_operations: BTreeSet<String>,
    /// Why the shell refused the file before reading it as a token (not a
    /// regular file, an owner outside `confirmers`, an unsafe `confirm/`);
    /// `None` when its bytes were read.
    pub refused: Option<String>,
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
    let doc = yaml::from_node::<TokenDoc>(&node).map_err(|e| match e.pos {
        Some(p) => format!("{p}: {}", e.msg),
        None => e.msg,
    })?;
    let at = node.pos;
    match (&doc.operations, &doc.operation, &doc.hosts) {
        (None, Some(_), Some(_)) => Ok(doc),
        (Some(list), None, None) if !list.is_empty() => {
            let mut seen = BTreeSet::new();
            for s in list {
                if !seen.insert(s.operation.as_str()) {
                    return Err(format!(
                        "{at}: operation {} is listed twice in `operations`",
                        short(&s.operation)
                    ));
                }
            }
            Ok(doc)
        }
        (Some(_), None, None) => Err(format!("{at}: `operations` is empty")),
        (Some(_), _, _) => Err(format!(
            "{at}: a token has either `operation` and `hosts`, or `operations`, not both"
        )),
        (None, None, _) => Err(format!("{at}: missing field `operation`")),
        (None, Some(_), None) => Err(format!("{at}: missing field `hosts`")),
    }
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
    if let Some(why) = &file.refused {
        v.refusal = Some(format!("token file refused: {why}"));
        return v;
    }
    let doc = match parse(&file.bytes) {
        Ok(d) => d,
        Err(e) => {
            v.refusal = Some(format!("malformed token: {e}"));
            return v;
        }
    };
    let scope = doc.scope_of(operation);
    let token_hosts: BTreeSet<String> = scope
        .as_ref()
        .map(|s| s.hosts.iter().cloned().collect())
        .unwrap_or_default();
    v.scope_match = scope.is_some() && token_hosts == *hosts;
    let used = if doc.is_multi() {
        file.used_operations.contains(operation)
    } else {
        file.used_before
    };
    let refusal = if file.mode & 0o022 != 0 {
        Some(format!(
            "token file is writable by group or others (mode {:04o}); chmod 600 it",
            file.mode & 0o7777
        ))
    } else if doc.reason.trim().is_empty() {
        Some("token has an empty `reason`".into())
    } else if scope.is_none() {
        let named: Vec<String> = doc.scopes().iter().map(|s| short(&s.operation)).collect();
        Some(format!(
            "token is for operation {}, not {operation}: the destructive steps, or the objects they act on as probed now, are not those it approved (stale)",
            named.join(", ")
        ))
    } else if token_hosts != *hosts {
        Some(format!(
            "token names hosts [{}], the operation covers exactly [{}]",
            token_hosts.iter().cloned().collect::<Vec<_>>().join(", "),
            hosts.iter().cloned().collect::<Vec<_>>().join(", ")
        ))
    } else if used {
        Some(if doc.is_multi() {
            "token was already used for this operation (a token is good once per operation)".into()
        } else {
            "token was already used (a token is good for one run)".into()
        })
    } else {
        match parse_rfc3339(&doc.expires) {
            None => Some(format!(
                "`expires: {}` is not an RFC 3339 time",
                doc.expires
            )),
            Some(exp) if exp <= now => Some(format!("token expired at {}", doc.expires)),
            Some(exp)
                if exp
                    > file
                        .mtime
                        .min(file.first_seen)
                        .saturating_add(i64::try_from(max_ttl.as_secs()).unwrap_or(i64::MAX)) =>
            {
                Some(format!(
                    "token expires more than token_max_ttl ({}) after its file was written or first seen",
                    humantime::format_duration(max_ttl)
                ))
            }
            Some(_) => None,
        }
    };
    v.refusal = refusal;
    v.doc = Some(doc);
    v
}

/// The first twelve characters of an operation hash, for messages. Counted
/// in characters, not bytes: the hash comes from a file anyone in
/// `confirmers` may write, and slicing a multi-byte character would panic.
fn short(h: &str) -> String {
    h.chars().take(12).collect()
}

/// Seconds since the epoch of an RFC 3339 time (`Z` or `±HH:MM` offset,
/// optional fraction, which is dropped). `None` for anything else, including
/// times outside what an `i64` of seconds and the `time` crate can hold.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// The RFC 3339 UTC form of seconds since the epoch (the inverse of
/// [`parse_rfc3339`] for `Z` times). A time outside the years 1..=9999
/// cannot be written in RFC 3339 and is clamped to the nearest end, which
/// only `tend confirm` with an absurd clock could ask for.
pub fn format_rfc3339(t: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    // 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
    let t = t.clamp(-62_135_596_800, 253_402_300_799);
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// The token document `tend confirm` writes.
pub fn render(doc: &TokenDoc) -> String {
    let q = |s: &str| yaml::double_quoted(s);
    let list = |hosts: &[String]| hosts.iter().map(|h| q(h)).collect::<Vec<_>>().join(", ");
    let mut out = if doc.is_multi() {
        let mut out = String::from(
            "# Confirmation token written by `tend confirm --pending`. Good once per operation.\noperations:\n",
        );
        for s in doc.scopes() {
            out.push_str(&format!(
                "  - operation: {}\n    hosts: [{}]\n",
                q(&s.operation),
                list(&s.hosts)
            ));
        }
        out
    } else {
        let s = doc.scopes().into_iter().next().unwrap_or(Scope {
            operation: String::new(),
            hosts: vec![],
        });
        format!(
            "# Confirmation token written by `tend confirm`. Good for one run.\noperation: {}\nhosts: [{}]\n",
            q(&s.operation),
            list(&s.hosts)
        )
    };
    out.push_str(&format!(
        "expires: {}\nreason: {}\n",
        q(&doc.expires),
        q(&doc.reason)
    ));
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
            first_seen: NOW - 60,
            used_before: used,
            used_operations: BTreeSet::new(),
            refused: None,
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
                Some("malformed token: 1:1: missing field `expires`"),
                false,
            ),
            (
                format!(
                    "operation: x\nexpires: {}\nreason: r\n",
                    format_rfc3339(NOW + 60)
                ),
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
        let doc = TokenDoc::single(
            OP.into(),
            vec!["web-1".into(), "web-2".into()],
            format_rfc3339(NOW + 60),
            "it's: \"quoted\" # not a comment".into(),
            Some("alice".into()),
        );
        assert_eq!(parse(render(&doc).as_bytes()).unwrap(), doc);
        let multi = TokenDoc {
            operation: None,
            hosts: None,
            operations: Some(vec![
                Scope {
                    operation: OP.into(),
                    hosts: vec!["web-1".into()],
                },
                Scope {
                    operation: OP2.into(),
                    hosts: vec!["web-2".into()],
                },
            ]),
            ..doc
        };
        assert_eq!(parse(render(&multi).as_bytes()).unwrap(), multi);
    }

    const OP2: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn multi_token(expires: i64) -> String {
        format!(
            "operations:\n  - operation: {OP}\n    hosts: [web-1]\n  - operation: {OP2}\n    hosts: [web-2, web-3]\nexpires: {}\nreason: prune on the fleet\n",
            format_rfc3339(expires)
        )
    }

    #[test]
    fn a_multi_operation_token_authorizes_each_listed_operation_once() {
        let set = |hs: &[&str]| -> BTreeSet<String> { hs.iter().map(|h| h.to_string()).collect() };
        let ttl = Duration::from_secs(3600);
        let mut f = file(&multi_token(NOW + 600), 0o600, false);
        for (op, hosts) in [(OP, set(&["web-1"])), (OP2, set(&["web-2", "web-3"]))] {
            let v = check(&f, op, &hosts, NOW, ttl);
            assert!(v.is_valid() && v.scope_match, "{op}: {v:?}");
        }
        // Each operation exactly with its own host set.
        let v = check(&f, OP2, &set(&["web-2"]), NOW, ttl);
        assert!(v.refusal.unwrap().contains("exactly [web-2]"));
        let v = check(&f, OP, &set(&["web-1", "web-2"]), NOW, ttl);
        assert!(!v.scope_match);
        // An operation it does not list: stale.
        let other = "2".repeat(64);
        let v = check(&f, &other, &set(&["web-1"]), NOW, ttl);
        assert!(v.refusal.unwrap().contains("stale"));
        // Used for one operation: refused for it, still good for the other.
        f.used_operations.insert(OP.into());
        let v = check(&f, OP, &set(&["web-1"]), NOW, ttl);
        assert!(
            v.refusal
                .unwrap()
                .contains("already used for this operation")
        );
        assert!(check(&f, OP2, &set(&["web-2", "web-3"]), NOW, ttl).is_valid());
        // `used_before` (the single-operation record) does not apply to it.
        f.used_operations.clear();
        f.used_before = true;
        assert!(check(&f, OP, &set(&["web-1"]), NOW, ttl).is_valid());
    }

    #[test]
    fn a_token_has_one_form_or_the_other() {
        let e = format_rfc3339(NOW + 60);
        for (text, want) in [
            (
                format!(
                    "operation: {OP}\nhosts: [a]\noperations:\n  - operation: {OP}\n    hosts: [a]\nexpires: {e}\nreason: r\n"
                ),
                "not both",
            ),
            (
                format!("operations: []\nexpires: {e}\nreason: r\n"),
                "is empty",
            ),
            (
                format!(
                    "operations:\n  - operation: {OP}\n    hosts: [a]\n  - operation: {OP}\n    hosts: [b]\nexpires: {e}\nreason: r\n"
                ),
                "listed twice",
            ),
            (
                format!("hosts: [a]\nexpires: {e}\nreason: r\n"),
                "missing field `operation`",
            ),
            (
                format!("operations:\n  - operation: {OP}\nexpires: {e}\nreason: r\n"),
                "missing field `hosts`",
            ),
        ] {
            let err = parse(text.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    /// Inputs that made the former hand-written parser slice inside a
    /// multi-byte character: each is a refusal with a reason now.
    #[test]
    fn non_ascii_and_odd_offsets_are_refusals_not_panics() {
        let good = token(OP, "web-1, web-2", NOW + 600);
        let exp = format_rfc3339(NOW + 600);
        for text in [
            good.replace(OP, "aééééééééééééé"),
            good.replace(&exp, "2026-11-23T12:00:00+0é:0"),
            good.replace(&exp, "2026-11-23T12:00:00+é:00"),
            good.replace(&exp, "2026-11-23T12:00:00é"),
            good.replace(&exp, "2026-11-23T12:00:00.é"),
            good.replace(&exp, "2026-11-23T12:00:00+01:0é"),
            good.replace(&exp, "2026-11-23T12:00:00+1:00"),
            good.replace(&exp, "２026-11-23T12:00:00Z"),
            good.replace(&exp, "9999-12-31T23:59:60-23:59"),
        ] {
            let v = verdict(&text, 0o600, false);
            assert!(v.refusal.is_some(), "{text}: {v:?}");
        }
        assert_eq!(parse_rfc3339("2026-11-23T12:00:00+é:00"), None);
    }

    #[test]
    fn a_future_mtime_does_not_stretch_the_ttl() {
        let mut f = file(&token(OP, "web-1, web-2", NOW + 7000), 0o600, false);
        f.mtime = NOW + 365 * 86400;
        f.first_seen = NOW - 60;
        let hosts: BTreeSet<String> = ["web-1".to_string(), "web-2".to_string()].into();
        let v = check(&f, OP, &hosts, NOW, Duration::from_secs(3600));
        assert!(
            v.refusal
                .as_deref()
                .is_some_and(|r| r.contains("token_max_ttl")),
            "{v:?}"
        );
        // Seen first after it was written: the mtime bounds it.
        f.mtime = NOW - 60;
        f.first_seen = NOW + 365 * 86400;
        let v = check(&f, OP, &hosts, NOW, Duration::from_secs(3600));
        assert!(v.refusal.is_some(), "{v:?}");
    }

    #[test]
    fn a_file_the_shell_refused_is_refused_with_its_reason() {
        let mut f = file(&token(OP, "web-1, web-2", NOW + 600), 0o600, false);
        f.refused = Some("a FIFO, not a regular file".into());
        let hosts: BTreeSet<String> = ["web-1".to_string(), "web-2".to_string()].into();
        let v = check(&f, OP, &hosts, NOW, Duration::from_secs(3600));
        assert_eq!(
            v.refusal.as_deref(),
            Some("token file refused: a FIFO, not a regular file")
        );
    }

    #[test]
    fn formatting_clamps_to_what_rfc3339_can_say() {
        assert_eq!(format_rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(i64::MIN), "0001-01-01T00:00:00Z");
    }

    mod no_panic {
        use proptest::prelude::*;

        use super::*;

        fn check_bytes(bytes: Vec<u8>, mtime: i64, first_seen: i64, now: i64, ttl: u64) {
            let f = TokenFile {
                rel_path: "confirm/x.yaml".into(),
                bytes,
                mode: 0o600,
                mtime,
                first_seen,
                used_before: false,
                used_operations: BTreeSet::new(),
                refused: None,
            };
            let hosts: BTreeSet<String> = ["web-1".to_string()].into();
            let _ = check(&f, OP, &hosts, now, Duration::from_secs(ttl));
        }

        /// A scalar as a token field could hold it: any text, or text built
        /// from the pieces of a time with multi-byte characters in between.
        fn scalar() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[0-9é:+TZz.\\-]{0,40}",
                "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9é]{0,4})?([Zz]|[+-][0-9é]{1,2}:[0-9é]{1,2})?",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                               mtime in any::<i64>(), seen in any::<i64>(),
                               now in any::<i64>(), ttl in any::<u64>()) {
                check_bytes(bytes, mtime, seen, now, ttl);
            }

            #[test]
            fn arbitrary_yaml_documents(op in scalar(), hosts in proptest::collection::vec(scalar(), 0..4),
                                        expires in scalar(), reason in scalar(),
                                        mtime in any::<i64>(), now in any::<i64>(), ttl in any::<u64>()) {
                let q = |s: &str| serde_json::to_string(s).unwrap();
                let hosts: Vec<String> = hosts.iter().map(|h| q(h)).collect();
                let yaml = format!(
                    "operation: {}\nhosts: [{}]\nexpires: {}\nreason: {}\n",
                    q(&op), hosts.join(", "), q(&expires), q(&reason)
                );
                check_bytes(yaml.into_bytes(), mtime, mtime, now, ttl);
                // The same fields unquoted, where YAML reads them as it will.
                let raw = format!("operation: {op}\nexpires: {expires}\nhosts: []\nreason: r\n");
                check_bytes(raw.into_bytes(), mtime, now, now, ttl);
                let _ = parse_rfc3339(&expires);
            }

            #[test]
            fn arbitrary_json_documents(op in scalar(), expires in scalar(), n in any::<i64>(), now in any::<i64>()) {
                // JSON is YAML 1.2: a token written as JSON is read the same way.
                let json = serde_json::json!({"operation": op, "hosts": ["web-1"], "expires": expires, "reason": "r"});
                check_bytes(json.to_string().into_bytes(), n, n, now, 3600);
                let json = serde_json::json!({"operation": n, "hosts": [n], "expires": n, "reason": [op]});
                check_bytes(json.to_string().into_bytes(), n, n, now, 3600);
            }

            #[test]
            fn formatted_times_parse_back(t in -62_135_596_800i64..=253_402_300_799) {
                prop_assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
            }
        }
    }
}
