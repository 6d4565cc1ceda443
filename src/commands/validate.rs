//! `tend validate`: every problem of the desired state, one
//! `file:line:col: message` per line; exit 0 when valid, 1 when not.

use anyhow::Result;

use super::exit;
use crate::cli::Global;
use crate::core::model;

pub fn run(global: &Global) -> Result<u8> {
    let tree = crate::source::read_tree(&global.dir)?;
    let validated = model::validate(&tree);
    if validated.is_valid() {
        if global.json {
            println!("{}", serde_json::json!({"valid": true, "problems": []}));
        } else {
            let hosts = validated.state.hosts.len();
            let resources: usize = validated
                .state
                .hosts
                .values()
                .map(|h| h.resources.len())
                .sum();
            println!(
                "{}: valid ({hosts} host(s), {resources} resource(s))",
                global.dir.display()
            );
        }
        return Ok(exit::OK);
    }
    print_problems(global, &validated.problems);
    Ok(exit::ERROR)
}

/// Print problems with the file path as the operator can open it.
pub fn print_problems(global: &Global, problems: &[model::Diagnostic]) {
    if global.json {
        let list: Vec<_> = problems
            .iter()
            .map(|p| {
                serde_json::json!({
                    "file": global.dir.join(&p.file).display().to_string(),
                    "line": p.pos.line,
                    "column": p.pos.col,
                    "message": p.message,
                })
            })
            .collect();
        println!("{}", serde_json::json!({"valid": false, "problems": list}));
    } else {
        for p in problems {
            println!(
                "{}:{}: {}",
                global.dir.join(&p.file).display(),
                p.pos,
                p.message
            );
        }
        eprintln!("{} problem(s) in {}", problems.len(), global.dir.display());
    }
}
