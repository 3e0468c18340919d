//! Running the external tools (ostree, skopeo) with their stderr in the error.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Run `cmd`, fail with its stderr unless it exits 0; returns stdout.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd.output().with_context(|| format!("Running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
