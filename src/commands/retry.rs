//! `tend retry HOST`: ask the controller to reconcile a host now and to
//! forget its backoff and crash loop (the way out of `Degraded`). The request
//! is a file in `<state_dir>/retry/`; a running controller takes it at once,
//! otherwise the next `tend run` does.

use anyhow::Result;

use super::exit;
use crate::cli::Global;

pub fn run(g: &Global, host: &str) -> Result<u8> {
    super::suspend::known_hosts(g, std::slice::from_ref(&host.to_string()))?;
    let sd = super::state_dir_of(g);
    let path = sd.retry_dir().join(host);
    sd.ensure()?;
    crate::store::write_atomic(&path, crate::clock::now_rfc3339().as_bytes())?;
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
