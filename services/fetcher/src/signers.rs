//! The keys in a signature policy's keyring, named as people know them: fingerprint and user id,
//! read by gpg (the program containers/image's GPG mechanism drives too) from a scratch home
//! directory that is removed afterwards. Nothing here decides whether an image is accepted:
//! that stays skopeo's verdict.

use std::process::Stdio;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;

/// One public key of a keyring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The primary key's fingerprint (40 hex digits for OpenPGP v4).
    pub fingerprint: String,
    /// Its first user id, when it has one.
    pub user_id: Option<String>,
}

impl Key {
    /// "FINGERPRINT (USER ID)", or the fingerprint alone.
    pub fn describe(&self) -> String {
        match &self.user_id {
            Some(uid) => format!("{} ({uid})", self.fingerprint),
            None => self.fingerprint.clone(),
        }
    }
}

/// A scratch gpg home holding the keys of some keyrings.
pub struct Keyring {
    home: tempfile::TempDir,
    /// The keys, in the order gpg lists them.
    pub keys: Vec<Key>,
}

impl Keyring {
    /// Imports `keyrings` (binary or armored OpenPGP public keys) into a new scratch home.
    pub async fn import(keyrings: &[Vec<u8>]) -> Result<Keyring> {
        let home = tempfile::Builder::new()
            .prefix("dnfimage-gpg-")
            .tempdir()
            .context("Creating a scratch GnuPG home")?;
        let mut keyring = Keyring {
            home,
            keys: Vec::new(),
        };
        for bytes in keyrings {
            keyring
                .gpg(&["--import"], Some(bytes))
                .await
                .context("Importing the policy's keys")?;
        }
        let listing = keyring
            .gpg(&["--with-colons", "--fixed-list-mode", "--list-keys"], None)
            .await
            .context("Listing the policy's keys")?;
        keyring.keys = parse_listing(&String::from_utf8_lossy(&listing));
        Ok(keyring)
    }

    /// The public key `fingerprint` alone, binary.
    pub async fn export(&self, fingerprint: &str) -> Result<Vec<u8>> {
        let bytes = self
            .gpg(&["--export", fingerprint], None)
            .await
            .with_context(|| format!("Exporting the key {fingerprint}"))?;
        anyhow::ensure!(!bytes.is_empty(), "gpg exported nothing for {fingerprint}");
        Ok(bytes)
    }

    /// Runs gpg on this home with `args`, `input` on its standard input; its standard output.
    async fn gpg(&self, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut child = tokio::process::Command::new("gpg")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--batch", "--no-tty", "--no-autostart", "--quiet"])
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("Starting gpg; is gnupg installed?")?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input).await.context("Writing to gpg")?;
        }
        let output = child.wait_with_output().await.context("Waiting for gpg")?;
        anyhow::ensure!(
            output.status.success(),
            "gpg {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(output.stdout)
    }
}

/// The keys of a `gpg --with-colons --list-keys` listing: each `pub` record, the `fpr` record
/// that follows it, and its first `uid`.
fn parse_listing(listing: &str) -> Vec<Key> {
    let mut keys: Vec<Key> = Vec::new();
    let mut wants_fingerprint = false;
    for line in listing.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.first().copied() {
            Some("pub") => wants_fingerprint = true,
            Some("fpr") if wants_fingerprint => {
                wants_fingerprint = false;
                if let Some(fpr) = fields.get(9).filter(|f| !f.is_empty()) {
                    keys.push(Key {
                        fingerprint: fpr.to_string(),
                        user_id: None,
                    });
                }
            }
            Some("sub") => wants_fingerprint = false,
            Some("uid") => {
                if let Some(key) = keys.last_mut()
                    && key.user_id.is_none()
                    && let Some(uid) = fields.get(9).filter(|u| !u.is_empty())
                {
                    key.user_id = Some(unescape(uid));
                }
            }
            _ => {}
        }
    }
    keys
}

/// A `--with-colons` field with gpg's `\xNN` escapes (for ':' and control characters) decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && bytes.get(i + 1) == Some(&b'x')
            && let Some(b) = field
                .get(i + 2..i + 4)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_colon_listing() {
        let listing = "\
tru::1:1700000000:0:3:1:5
pub:u:2048:1:AAAA:1700000000:::u:::scESC:::::::23::0:
fpr:::::::::0123456789ABCDEF0123456789ABCDEF01234567:
uid:u::::1700000000::HASH::OS builders <os\\x3abuild@example.org>::::::::::0:
uid:u::::1700000000::HASH::second id::::::::::0:
sub:u:2048:1:BBBB:1700000000::::::e:::::::23:
fpr:::::::::FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF:
pub:u:2048:1:CCCC:1700000000:::u:::scESC:::::::23::0:
fpr:::::::::89ABCDEF0123456789ABCDEF0123456789ABCDEF:
";
        assert_eq!(
            parse_listing(listing),
            vec![
                Key {
                    fingerprint: "0123456789ABCDEF0123456789ABCDEF01234567".into(),
                    user_id: Some("OS builders <os:build@example.org>".into()),
                },
                Key {
                    fingerprint: "89ABCDEF0123456789ABCDEF0123456789ABCDEF".into(),
                    user_id: None,
                },
            ]
        );
        assert_eq!(
            parse_listing(listing)[1].describe(),
            "89ABCDEF0123456789ABCDEF0123456789ABCDEF"
        );
    }
}
