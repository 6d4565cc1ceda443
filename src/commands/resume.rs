//! `tend resume --reason TEXT`: ask that a halted rollout continue (SPEC
//! 8.2). The request is a file in `<state_dir>/resume/`; the next pass of
//! `tend apply` or `tend run` takes it and records it.

use anyhow::{Result, bail};

use super::exit;
use crate::cli::Global;

pub fn run(g: &Global, reason: &str) -> Result<u8> {
    if reason.trim().is_empty() {
        bail!("--reason must say why the rollout may continue");
    }
    let sd = super::state_dir_of(g);
    let Some(r) = crate::pass::current_rollout(&sd)? else {
        bail!(
            "no rollout is recorded in {}: nothing to resume",
            sd.root().display()
        );
    };
    if !r.rollout.halted {
        bail!(
            "the rollout of {} is not halted ({:?}): nothing to resume",
            r.revision,
            r.rollout.state()
        );
    }
    let requested_by = crate::settings::requested_by();
    let req = crate::rollout::ResumeRequest {
        reason: reason.to_string(),
        requested_by,
        requested_at: crate::clock::now_rfc3339(),
    };
    let path = crate::rollout::request_resume(&sd, &req)?;
    println!(
        "resume of the rollout of {} requested ({}): halted because {}; the next pass of `tend apply` or `tend run` continues it from its halted wave with a fresh budget",
        r.revision,
        path.display(),
        r.halted_reason
            .as_deref()
            .unwrap_or("its failure budget was spent")
    );
    Ok(exit::OK)
}
