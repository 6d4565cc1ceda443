//! `tend schema`: the JSON Schema of every desired-state file.

use std::io::Write;

use anyhow::Result;

use super::exit;

pub fn run() -> Result<u8> {
    let schema = crate::core::spec::schema();
    let mut out = crate::output::stdout();
    serde_json::to_writer_pretty(&mut out, &schema)?;
    writeln!(out)?;
    Ok(exit::OK)
}
