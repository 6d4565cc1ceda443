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
    crate::store::write_atomic(&path, crate::clock::now_rfc3339().as_bytes())?;
    println!(
        "retry of host `{host}` requested ({}): the running controller reconciles it now, or the next `tend run` will",
        path.display()
    );
    Ok(exit::OK)
}
