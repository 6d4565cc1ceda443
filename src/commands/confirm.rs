//! `tend confirm OPERATION --reason TEXT [--ttl D]`: write the token file that
//! lets exactly that operation's destructive steps run once. The host set
//! comes from the status files of the hosts awaiting it. `tend confirm
//! --pending [--host H]… [--tag T]…` writes one token listing every matching
//! pending operation (SPEC 8.1), each good once.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use super::{exit, state_dir_of};
use crate::cli::Global;
use crate::core::report::AwaitingConfirmation;
use crate::core::token::{self, Scope, TokenDoc};
use crate::store::StateDir;

/// tend.yaml's settings (defaults when unreadable) and the token lifetime
/// `--ttl` asks for, checked against `token_max_ttl`.
fn settings(
    g: &Global,
    reason: &str,
    ttl: Option<&str>,
) -> Result<(crate::core::model::DesiredState, Duration)> {
    if reason.trim().is_empty() {
        bail!("--reason must say why this destructive change is wanted");
    }
    let state = crate::source::read_tree(&g.dir)
        .map(|t| crate::core::model::validate(&t).state)
        .unwrap_or_default();
    let max = state.config.token_max_ttl.0;
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
    Ok((state, ttl))
}

/// Every host's `awaiting_confirmation`, from the status files, by host.
fn awaiting(sd: &StateDir) -> Result<Vec<(String, AwaitingConfirmation)>> {
    let mut out = Vec::new();
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
            {
                out.push((name, a));
            }
        }
    }
    Ok(out)
}

/// Now, in whole seconds, by the clock the kernel stamps files with
/// (`CLOCK_REALTIME_COARSE`, up to a tick behind the precise clock): the
/// token's `expires` is checked against its file's mtime (token_max_ttl),
/// and a precise `now` a tick past a second boundary would make a token
/// with the full TTL look one second too long-lived.
fn now() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one valid timespec for the call's duration.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        return ts.tv_sec;
    }
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64
}

fn by() -> Option<String> {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .ok()
}

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
    let (state, ttl) = settings(g, reason, ttl)?;
    let sd = StateDir::with_confirmers(state_dir_of(g).root(), &state.config.confirmers)?;
    // The exact host set is the operation's: every host awaiting it says so.
    let hosts = awaiting(&sd)?
        .into_iter()
        .find(|(_, a)| a.operation == operation)
        .map(|(_, a)| a.hosts);
    let Some(hosts) = hosts else {
        bail!(
            "no host in {} awaits operation {operation}; run `tend apply` (or look at `tend status`) to see the current one",
            sd.root().display()
        );
    };
    let doc = TokenDoc::single(
        operation.to_string(),
        hosts.clone(),
        token::format_rfc3339(now() + ttl.as_secs() as i64),
        reason.to_string(),
        by(),
    );
    let name = format!("{operation}.yaml");
    let path = write_token(&sd, &name, &doc)?;
    if g.json {
        println!(
            "{}",
            serde_json::json!({"token_file": format!("confirm/{name}"), "operation": operation, "hosts": hosts, "expires": doc.expires})
        );
    } else {
        println!(
            "wrote {} (expires {}, hosts: {})",
            path.display(),
            doc.expires,
            hosts.join(", ")
        );
        println!(
            "the next pass over exactly these hosts that finds the same steps on the same objects runs them, once (`tend apply` with dispatch `canary` or `enforced`, or the controller)"
        );
        print!("{}", who_runs_it(g, &state, &sd, &hosts));
    }
    Ok(exit::OK)
}

/// One host's held destructive steps: (host, resource ids).
type Held = (String, Vec<String>);

/// `tend confirm --pending`: one token for every pending operation whose
/// hosts are all selected (`--host`, `--tag`, `--exclude`, as for `plan`;
/// all hosts when none is given), each listed with its hosts and held steps first (SPEC 8.1).
pub fn pending(
    g: &Global,
    hosts: &[String],
    select: &crate::cli::Select,
    reason: &str,
    ttl: Option<&str>,
) -> Result<u8> {
    let (state, ttl) = settings(g, reason, ttl)?;
    // The selection of `plan` and `apply` (an unknown host or tag is an
    // error); every host when nothing selects or excludes.
    let chosen = crate::reconcile::resolve_targets(&state, hosts, select)?;
    let selected = |host: &str| chosen.iter().any(|c| c == host);
    let sd = StateDir::with_confirmers(state_dir_of(g).root(), &state.config.confirmers)?;
    // Operation -> (its host set, each host's held steps).
    let mut ops: BTreeMap<String, (Vec<String>, Vec<Held>)> = BTreeMap::new();
    for (host, a) in awaiting(&sd)? {
        let entry = ops
            .entry(a.operation.clone())
            .or_insert_with(|| (a.hosts.clone(), Vec::new()));
        entry.1.push((host, a.steps));
    }
    ops.retain(|_, (op_hosts, _)| op_hosts.iter().all(|h| selected(h)));
    if ops.is_empty() {
        bail!(
            "no pending operation in {} matches{}; `tend status` lists what awaits confirmation",
            sd.root().display(),
            if hosts.is_empty() && select.tags.is_empty() && select.exclude.is_empty() {
                String::new()
            } else {
                format!(
                    " --host {hosts:?} --tag {:?} --exclude {:?}",
                    select.tags, select.exclude
                )
            }
        );
    }
    let scopes: Vec<Scope> = ops
        .iter()
        .map(|(op, (h, _))| Scope {
            operation: op.clone(),
            hosts: h.clone(),
        })
        .collect();
    let doc = TokenDoc {
        operation: None,
        hosts: None,
        operations: Some(scopes.clone()),
        expires: token::format_rfc3339(now() + ttl.as_secs() as i64),
        reason: reason.to_string(),
        by: by(),
    };
    let list: Vec<&str> = scopes.iter().map(|s| s.operation.as_str()).collect();
    let id = crate::core::sha256_hex(list.join("\n").as_bytes());
    let name = format!("pending-{}.yaml", &id[..16]);
    let path = write_token(&sd, &name, &doc)?;
    if g.json {
        println!(
            "{}",
            serde_json::json!({"token_file": format!("confirm/{name}"), "operations": scopes, "expires": doc.expires})
        );
    } else {
        for (op, (op_hosts, held)) in &ops {
            println!("operation {op} on {}", op_hosts.join(", "));
            for (host, steps) in held {
                for s in steps {
                    println!("  {host}: {s}");
                }
            }
        }
        println!(
            "wrote {} (expires {}): {} operation(s) on {} host(s), each authorized once",
            path.display(),
            doc.expires,
            scopes.len(),
            scopes
                .iter()
                .flat_map(|s| s.hosts.iter())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        );
    }
    Ok(exit::OK)
}

/// Write a token into `confirm/`: with its final mode from the start (0600,
/// or 0640 with the confirmers group: never group-writable, which is
/// refused), then renamed into place, so it is never half-written.
fn write_token(sd: &StateDir, name: &str, doc: &TokenDoc) -> Result<std::path::PathBuf> {
    let dir = sd.confirm_dir();
    // The first user of a state dir creates it with its modes; a confirmer
    // of a group drops the token into the `confirm/` tend made and touches
    // nothing else (it could not change tend's directories anyway).
    if !dir.exists() {
        sd.ensure()?;
    }
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
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
        f.write_all(token::render(doc).as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(&dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing token {}", path.display()));
    }
    Ok(path)
}

/// What will actually take the token now: a running controller (unless
/// dispatch is off), or nobody until `tend apply` is run.
fn who_runs_it(
    g: &Global,
    state: &crate::core::model::DesiredState,
    sd: &StateDir,
    hosts: &[String],
) -> String {
    let mode = crate::settings::Settings::resolve(g, state.config.clone(), None)
        .map(|s| s.dispatch)
        .ok();
    let apply = format!("{} apply --dispatch enforced {}", "tend", hosts.join(" "));
    match (super::state_dir_holder(sd), mode) {
        (_, Some(crate::core::spec::DispatchMode::Off)) => format!(
            "note: dispatch is off (tend.yaml or TEND_DISPATCH): no controller runs it; `{apply}` does\n"
        ),
        (Some(holder), _) => {
            format!("a running controller ({holder}) takes it at the hosts' next pass\n")
        }
        (None, _) => format!("no controller is running on this state dir: `{apply}` runs it now\n"),
    }
}
