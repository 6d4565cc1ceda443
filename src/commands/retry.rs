//! `tend retry HOST`: ask the controller to reconcile a host now and to
//! forget its backoff and crash loop (the way out of `Degraded`). The request
//! is a file in `<state_dir>/retry/`; a running controller takes it at once,
//! otherwise the next `tend run` does.

use anyhow::Result;

use super::exit;
use crate::cli::Global;

pub fn run(g: &Global, host: &str, reason: &str) -> Result<u8> {
    if reason.trim().is_empty() {
        anyhow::bail!("--reason must say why the host's backoff and crash loop are overridden");
    }
    super::suspend::known_hosts(g, std::slice::from_ref(&host.to_string()))?;
    let sd = super::state_dir_of(g);
    let path = sd.retry_dir().join(host);
    sd.ensure()?;
    let doc = serde_json::json!({
        "reason": reason,
        "requested_by": crate::settings::requested_by(),
        "requested_at": crate::clock::now_rfc3339(),
    });
    crate::store::write_atomic(&path, doc.to_string().as_bytes())?;
    let holder = super::state_dir_holder(&sd);
    if g.json {
        println!(
            "{}",
            serde_json::json!({
                "host": host,
                "request": path.display().to_string(),
                "controller_pid": holder,
            })
        );
        return Ok(exit::OK);
    }
    match holder {
        Some(pid) => println!(
            "retry of host `{host}` requested ({}): the tend process holding the state dir (pid {pid}) takes it now",
            path.display()
        ),
        None => println!(
            "retry of host `{host}` requested ({}): no controller runs on this state dir now; the next `tend run` takes it",
            path.display()
        ),
    }
    Ok(exit::OK)
}

/// Take a retry request (the controller, when it sees one): it moves to
/// `retry/used/<host>-<nanos>.json`, the record of the override; false when
/// it is gone already (another event took it). Logs who asked and why.
pub fn take(path: &std::path::Path) -> bool {
    let (Some(dir), Some(host)) = (path.parent(), path.file_name()) else {
        return false;
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let used = dir.join("used");
    let _ = std::fs::create_dir_all(&used);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let to = used.join(format!("{}-{nanos}.json", host.to_string_lossy()));
    if std::fs::rename(path, &to).is_err() {
        return false;
    }
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    tracing::info!(
        host = %host.to_string_lossy(),
        reason = doc["reason"].as_str().unwrap_or("(none given)"),
        requested_by = doc["requested_by"].as_str().unwrap_or("unknown"),
        record = %to.display(),
        "retry request taken"
    );
    true
}
