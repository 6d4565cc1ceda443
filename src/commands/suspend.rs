//! `tend suspend HOST… --reason TEXT` and `tend unsuspend HOST…` (SPEC
//! 8.6): a file per host under `<state_dir>/suspend/` holds it the way the
//! KILL file holds all. Every pass reads them (a running controller too);
//! a host suspended mid-pass stops before its next step.

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::exit;
use crate::cli::Global;
use crate::core::model;

/// The hosts named, checked against the inventory when the desired state
/// can be read (a typo must not suspend or retry nothing).
pub fn known_hosts<'a>(g: &Global, hosts: &'a [String]) -> Result<&'a [String]> {
    for h in hosts {
        let valid = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !h.starts_with('-');
        if !valid {
            bail!("`{h}` is not a host name ([a-z0-9][a-z0-9-]*)");
        }
    }
    if let Ok(tree) = crate::source::read_tree(&g.dir) {
        let v = model::validate(&tree);
        if v.is_valid()
            && let Some(h) = hosts.iter().find(|h| !v.state.hosts.contains_key(*h))
        {
            bail!("host `{h}` is not in {}/inventory.yaml", g.dir.display());
        }
    }
    Ok(hosts)
}

pub fn suspend(g: &Global, hosts: &[String], reason: &str) -> Result<u8> {
    if reason.trim().is_empty() {
        bail!("--reason must say why the hosts are held");
    }
    let hosts = known_hosts(g, hosts)?;
    let sd = super::state_dir_of(g);
    sd.ensure()?;
    let dir = sd.suspend_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let doc = json!({
        "reason": reason,
        "requested_by": crate::settings::requested_by(),
        "at": crate::clock::now_rfc3339(),
    });
    for h in hosts {
        crate::store::write_atomic(&dir.join(h), doc.to_string().as_bytes())?;
        println!(
            "host `{h}` suspended ({reason}): probed and reported, never dispatched, until `tend unsuspend {h}`"
        );
    }
    Ok(exit::OK)
}

pub fn unsuspend(g: &Global, hosts: &[String]) -> Result<u8> {
    let hosts = known_hosts(g, hosts)?;
    let sd = super::state_dir_of(g);
    for h in hosts {
        let path = sd.suspend_dir().join(h);
        match std::fs::remove_file(&path) {
            Ok(()) => println!("host `{h}` unsuspended: its next pass may dispatch"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("host `{h}` was not suspended")
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(exit::OK)
}
