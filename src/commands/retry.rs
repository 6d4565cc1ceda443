//! `tend retry HOST`: ask the controller to reconcile a host now and to
//! forget its backoff and crash loop (the way out of `Degraded`). The request
//! is a file in `<state_dir>/retry/`; a running controller takes it at once,
//! otherwise the next `tend run` does.

use anyhow::{Result, bail};

use super::exit;
use crate::cli::Global;
use crate::core::model;

pub fn run(g: &Global, host: &str) -> Result<u8> {
    let valid_name = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !host.starts_with('-');
    if !valid_name {
        bail!("`{host}` is not a host name ([a-z0-9][a-z0-9-]*)");
    }
    if let Ok(tree) = crate::source::read_tree(&g.dir) {
        let v = model::validate(&tree);
        if v.is_valid() && !v.state.hosts.contains_key(host) {
            bail!("host `{host}` is not in {}/inventory.yaml", g.dir.display());
        }
    }
    let sd = super::state_dir_of(g);
    let path = sd.retry_dir().join(host);
    crate::store::write_atomic(&path, crate::clock::now_rfc3339().as_bytes())?;
    println!(
        "retry of host `{host}` requested ({}): the running controller reconciles it now, or the next `tend run` will",
        path.display()
    );
    Ok(exit::OK)
}
