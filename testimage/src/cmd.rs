//! Running the external tools (ostree, skopeo) with their stderr in the error.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Stops the gpg-agent of the GNUPGHOME `home` (`what` names it in the message when that fails:
/// a test's key or keyring is dropped, nothing is left to fail).
pub(crate) fn stop_gpg_agent(home: &std::path::Path, what: &str) {
    let stopped = Command::new("gpgconf")
        .arg("--homedir")
        .arg(home)
        .args(["--kill", "gpg-agent"])
        .stdin(std::process::Stdio::null())
        .output();
    if let Err(e) = stopped {
        eprintln!("Stopping the gpg-agent of {what}, ignoring: {e}");
    }
}

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
