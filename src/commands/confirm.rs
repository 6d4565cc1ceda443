//! `tend confirm OPERATION --reason TEXT [--ttl D]`: write the token file that
//! lets exactly that operation's destructive steps run once. The host set
//! comes from the status files of the hosts awaiting it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use super::{exit, state_dir_of};
use crate::cli::Global;
use crate::core::token::{self, TokenDoc};
use crate::store::StateDir;

pub fn run(g: &Global, operation: &str, reason: &str, ttl: Option<&str>) -> Result<u8> {
    if operation.len() != 64
        || !operation
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bail!(
            "`{operation}` is not an operation hash (64 lowercase hex digits, as `tend status` shows)"
        );
    }
    if reason.trim().is_empty() {
        bail!("--reason must say why this destructive change is wanted");
    }
    let config = crate::source::read_tree(&g.dir)
        .map(|t| crate::core::model::validate(&t).state.config)
        .unwrap_or_default();
    let max = config.token_max_ttl.0;
    let ttl = match ttl {
        None => max,
        Some(t) => {
            let d = humantime::parse_duration(t).with_context(|| format!("--ttl {t}"))?;
            if d > max {
                bail!(
                    "--ttl {t} is above token_max_ttl ({}); a token may live at most that long",
                    humantime::format_duration(max)
                );
            }
            if d.is_zero() {
                bail!("--ttl must be above zero");
            }
            d
        }
    };
    let sd = StateDir::with_confirmers(state_dir_of(g).root(), &config.confirmers)?;
    // The exact host set is the operation's: every host awaiting it says so.
    let mut hosts: Option<Vec<String>> = None;
    if let Ok(entries) = fs::read_dir(sd.root().join("status")) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .filter(|n| n != "fleet")
            .collect();
        names.sort();
        for name in names {
            if let Some(s) = sd.read_status(&name)?
                && let Some(a) = s.awaiting_confirmation
                && a.operation == operation
            {
                hosts = Some(a.hosts);
                break;
            }
        }
    }
    let Some(hosts) = hosts else {
        bail!(
            "no host in {} awaits operation {operation}; run `tend apply` (or look at `tend status`) to see the current one",
            sd.root().display()
        );
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let doc = TokenDoc {
        operation: operation.to_string(),
        hosts,
        expires: token::format_rfc3339(now + ttl.as_secs() as i64),
        reason: reason.to_string(),
        by: std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .ok(),
    };
    let dir = sd.confirm_dir();
    // The first user of a state dir creates it with its modes; a confirmer
    // of a group drops the token into the `confirm/` tend made and touches
    // nothing else (it could not change tend's directories anyway).
    if !dir.exists() {
        sd.ensure()?;
    }
    let path = dir.join(format!("{operation}.yaml"));
    // Written with its final mode from the start (0600, or 0640 with the
    // confirmers group: never group-writable, which is refused), then
    // renamed into place: never half-written.
    let tmp = dir.join(format!(".{operation}.yaml.tmp-{}", std::process::id()));
    let confirmers = sd.confirmers().clone();
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(confirmers.token_mode())
            .open(&tmp)?;
        if let Some(gid) = confirmers.gid() {
            std::os::unix::fs::fchown(&f, None, Some(gid))?;
        }
        // The umask may have taken bits off; the mode is set, not hoped for.
        f.set_permissions(fs::Permissions::from_mode(confirmers.token_mode()))?;
        f.write_all(token::render(&doc).as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(&dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing token {}", path.display()));
    }
    if g.json {
        println!(
            "{}",
            serde_json::json!({"token_file": format!("confirm/{operation}.yaml"), "operation": operation, "hosts": doc.hosts, "expires": doc.expires})
        );
    } else {
        println!(
            "wrote {} (expires {}, hosts: {})",
            path.display(),
            doc.expires,
            doc.hosts.join(", ")
        );
        println!(
            "the next `tend apply` of exactly these hosts runs the confirmed destructive steps, once"
        );
    }
    Ok(exit::OK)
}
