//! `tend status [HOST]`: read the status files. Exit 0.

use anyhow::{Result, bail};

use super::{exit, state_dir_of};
use crate::cli::Global;
use crate::core::report::ConditionStatus;

pub fn run(g: &Global, host: Option<&str>) -> Result<u8> {
    let sd = state_dir_of(g);
    match host {
        Some(h) => {
            let Some(s) = sd.read_status(h)? else {
                bail!(
                    "no status for host `{h}` in {} (has it been applied?)",
                    sd.root().display()
                );
            };
            if g.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(exit::OK);
            }
            println!("host {}: {:?}", s.host, s.phase);
            println!(
                "  desired revision:   {}",
                s.desired_revision.as_deref().unwrap_or("-")
            );
            println!(
                "  converged revision: {}",
                s.converged_revision.as_deref().unwrap_or("-")
            );
            println!(
                "  last probe:         {}",
                s.last_probe_at.as_deref().unwrap_or("-")
            );
            println!(
                "  last run:           {}",
                s.last_run_id.as_deref().unwrap_or("-")
            );
            println!(
                "  pending:            {} create, {} update, {} delete ({} destructive)",
                s.pending.create, s.pending.update, s.pending.delete, s.pending.destructive
            );
            for c in &s.conditions {
                let mark = match c.status {
                    ConditionStatus::True => "True ",
                    ConditionStatus::False => "False",
                    ConditionStatus::Unknown => "?    ",
                };
                println!(
                    "  {:<22} {mark} {:<18} {}",
                    format!("{:?}", c.kind),
                    c.reason,
                    c.message
                );
            }
            if let Some(a) = &s.awaiting_confirmation {
                println!("  awaiting confirmation of operation {}", a.operation);
                println!("    steps: {}", a.steps.join(", "));
                println!("    token file: {}/{}", sd.root().display(), a.token_file);
                println!("    run: {}", a.command);
            }
        }
        None => {
            let Some(f) = sd.read_fleet()? else {
                bail!(
                    "no fleet status in {} (has anything been applied?)",
                    sd.root().display()
                );
            };
            if g.json {
                println!("{}", serde_json::to_string_pretty(&f)?);
                return Ok(exit::OK);
            }
            println!("fleet status at {}", f.generated_at);
            for h in &f.hosts {
                println!(
                    "  {:<24} {:<18} converged={:<5} pending: {} create, {} update, {} delete ({} destructive)",
                    h.host,
                    format!("{:?}", h.phase),
                    h.converged,
                    h.pending.create,
                    h.pending.update,
                    h.pending.delete,
                    h.pending.destructive
                );
            }
        }
    }
    Ok(exit::OK)
}
