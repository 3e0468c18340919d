//! A NoCloud seed: `user-data` and `meta-data` on an ISO 9660 volume labelled `cidata`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

use crate::cmd::run;

#[derive(Args)]
pub struct SeedArgs {
    /// The ISO image to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The user cloud-init creates (passwordless sudo).
    #[arg(long, default_value = "dnfuser")]
    pub user: String,
    /// Its password (for the serial console), if any.
    #[arg(long)]
    pub password: Option<String>,
    /// A public SSH key file authorised for the user.
    #[arg(long)]
    pub ssh_key: Option<PathBuf>,
    /// The instance's hostname.
    #[arg(long, default_value = "dnfimage-vm")]
    pub hostname: String,
}

/// The `user-data` document.
pub fn user_data(user: &str, password: Option<&str>, ssh_key: Option<&str>) -> String {
    let mut s = format!(
        "#cloud-config\nusers:\n  - name: {user}\n    shell: /bin/bash\n    \
         sudo: ALL=(ALL) NOPASSWD:ALL\n    lock_passwd: {}\n",
        password.is_none()
    );
    if let Some(key) = ssh_key {
        s.push_str(&format!(
            "    ssh_authorized_keys:\n      - {}\n",
            key.trim()
        ));
    }
    if let Some(pw) = password {
        s.push_str(&format!(
            "chpasswd:\n  expire: false\n  users:\n    - name: {user}\n      password: {pw}\n      type: text\nssh_pwauth: false\n"
        ));
    }
    s
}

pub fn write(args: &SeedArgs) -> Result<()> {
    let dir = tempfile::tempdir().context("Creating scratch directory")?;
    let key = args
        .ssh_key
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("Reading {}", p.display())))
        .transpose()?;
    std::fs::write(
        dir.path().join("user-data"),
        user_data(&args.user, args.password.as_deref(), key.as_deref()),
    )
    .context("Writing user-data")?;
    std::fs::write(
        dir.path().join("meta-data"),
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            args.hostname, args.hostname
        ),
    )
    .context("Writing meta-data")?;
    run(Command::new("genisoimage")
        .arg("-quiet")
        .arg("-output")
        .arg(&args.out)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(dir.path().join("user-data"))
        .arg(dir.path().join("meta-data")))
    .context("Writing the cidata volume")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::user_data;

    #[test]
    fn documents() {
        let s = user_data("u", Some("pw"), Some("ssh-ed25519 AAAA k\n"));
        assert!(s.starts_with("#cloud-config\n"));
        assert!(s.contains("lock_passwd: false"));
        assert!(s.contains("      - ssh-ed25519 AAAA k\n"));
        assert!(s.contains("password: pw"));
        assert!(user_data("u", None, None).contains("lock_passwd: true"));
    }
}
