//! `tend probe [HOST…]`: the actual state of each host, as a table or JSON.
//! Changes nothing. Exit 0, or 1 if any host failed.

use anyhow::Result;
use serde_json::json;

use super::{Loaded, exit};
use crate::core::actual::Observed;
use crate::reconcile::{self, ProbeOpts};

pub async fn run(loaded: Loaded, hosts: &[String]) -> Result<u8> {
    let targets = hosts.to_vec();
    let opts = ProbeOpts::new(&loaded.state.config, &loaded.settings.dir);
    let (_, probes) = reconcile::probe_fleet(&loaded.state, &targets, &opts).await;
    let failed = probes.values().any(|p| p.result.is_err());
    // A sensitive file's digest is shown sealed (SPEC 8.6).
    let mut probes = probes;
    for (name, p) in probes.iter_mut() {
        let (Ok(a), Some(host)) = (&mut p.result, loaded.state.hosts.get(name)) else {
            continue;
        };
        for r in host.resources.iter().filter(|r| r.sensitive()) {
            if let Some(Observed::File(f)) = a.resources.get_mut(&r.id) {
                f.sha256 = crate::core::seal(f.sha256.as_bytes());
            }
        }
    }
    if loaded.settings.json {
        let hosts: Vec<_> = probes
            .iter()
            .map(|(name, p)| match &p.result {
                Ok(a) => json!({"host": name, "ok": true, "attempts": p.attempts, "at": p.at, "facts": a.facts, "resources": a.resources}),
                Err((class, msg)) => json!({"host": name, "ok": false, "attempts": p.attempts, "at": p.at, "failure_class": class, "message": msg}),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"schema_version": 1, "hosts": hosts}))?
        );
    } else {
        for (name, p) in &probes {
            match &p.result {
                Err((class, msg)) => println!(
                    "{name}: {} after {} attempt(s): {msg}",
                    class.as_str(),
                    p.attempts
                ),
                Ok(a) => {
                    println!(
                        "{name}: {} {} ({} resource(s))",
                        a.facts.kernel.as_deref().unwrap_or("?"),
                        a.facts.os_id.as_deref().unwrap_or("?"),
                        a.resources.len()
                    );
                    for (id, o) in &a.resources {
                        println!("  {id:<50} {}", describe(o));
                    }
                }
            }
        }
    }
    Ok(if failed { exit::ERROR } else { exit::OK })
}

fn describe(o: &Observed) -> String {
    match o {
        Observed::Absent => "absent".into(),
        Observed::File(f) => format!(
            "file {:04o} {}:{} {} bytes {}",
            f.meta.mode,
            f.meta
                .owner
                .clone()
                .unwrap_or_else(|| f.meta.uid.to_string()),
            f.meta
                .group
                .clone()
                .unwrap_or_else(|| f.meta.gid.to_string()),
            f.size,
            match f.sha256.strip_prefix("sealed:") {
                Some(_) => format!("(sensitive) {}", f.sha256),
                None => format!("sha256:{}", &f.sha256[..12.min(f.sha256.len())]),
            }
        ),
        Observed::Directory(m) => format!(
            "directory {:04o} {}:{}",
            m.mode,
            m.owner.clone().unwrap_or_else(|| m.uid.to_string()),
            m.group.clone().unwrap_or_else(|| m.gid.to_string())
        ),
        Observed::Symlink { target } => format!("symlink -> {}", String::from_utf8_lossy(target)),
        Observed::Other { file_type } => format!("other ({file_type})"),
        Observed::NotProbed => "not probed".into(),
        Observed::User(u) => format!(
            "user uid {} group {} home {} shell {} groups {}",
            u.uid,
            u.primary_group,
            u.home,
            u.shell,
            if u.groups.is_empty() {
                "-".into()
            } else {
                u.groups.join(",")
            }
        ),
        Observed::Group(g) => format!("group gid {}", g.gid),
        Observed::Package(p) => match &p.version {
            Some(v) => format!("installed {v}"),
            None => "installed".into(),
        },
        Observed::Guard(g) => {
            if g.will_run {
                "will run".into()
            } else {
                "will not run (guard holds)".into()
            }
        }
        Observed::Service(s) => format!(
            "service {} {} {} {}",
            s.unit,
            s.load_state,
            s.active_state,
            if s.unit_file_state.is_empty() {
                "-"
            } else {
                &s.unit_file_state
            }
        ),
    }
}
