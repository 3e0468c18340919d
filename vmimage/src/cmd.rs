//! Running external tools: every failure names the command and carries its stderr.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `cmd`; returns its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("Starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("Reading output of {shown}"))
}
