//! Signed images: a GPG key made at test time, a signature store ("lookaside") with the
//! registries.d configuration that names it, policies, and pushes of the fixture images
//! signed, unsigned, signed by another key, or carrying a signature made for another image.
//!
//! Debian's skopeo 1.9.3 signs with GPG "simple signing" only (sigstore is disabled in its
//! build): `skopeo --registries.d D copy --sign-by FPR` writes `REPO@sha256=HEX/signature-N`
//! under the `lookaside-staging` directory of the registry's entry in D; readers fetch it from
//! its `lookaside` URL (here the same directory as `file://`, or served over HTTP on
//! 127.0.0.1 by [`RepoServer`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};

use crate::cmd::run;
use crate::http::RepoServer;
use crate::registry::Registry;

/// A GPG signing key without passphrase in a GNUPGHOME of its own; its agent is stopped when
/// dropped.
#[derive(Debug)]
pub struct SigningKey {
    home: PathBuf,
    /// The key's fingerprint (40 upper-case hex digits), what `--sign-by` takes.
    pub fingerprint: String,
    /// The public key, binary, for a policy's `keyPath`.
    pub public_key: PathBuf,
}

impl SigningKey {
    /// Makes a new key for `user_id` in the GNUPGHOME `home` (created, mode 0700), exporting
    /// its public key next to it as `<home>.pub.gpg`.
    pub fn generate(home: &Path, user_id: &str) -> Result<SigningKey> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(home).with_context(|| format!("Creating {}", home.display()))?;
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("Setting the mode of {}", home.display()))?;
        let gpg = |args: &[&str]| {
            let mut cmd = Command::new("gpg");
            cmd.arg("--homedir")
                .arg(home)
                .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
                .args(args)
                .stdin(Stdio::null());
            cmd
        };
        run(&mut gpg(&[
            "--quick-gen-key",
            user_id,
            "rsa2048",
            "sign",
            "never",
        ]))
        .with_context(|| format!("Generating a GPG key for {user_id}"))?;
        let listing = run(&mut gpg(&["--with-colons", "--list-keys", user_id]))?;
        let fingerprint = listing
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .and_then(|rest| rest.split(':').find(|f| !f.is_empty()))
            .ok_or_else(|| anyhow!("No fingerprint for {user_id} in {listing}"))?
            .to_string();
        let public_key = home.with_extension("pub.gpg");
        let exported = gpg(&["--export", &fingerprint])
            .output()
            .context("Running gpg --export")?;
        if !exported.status.success() || exported.stdout.is_empty() {
            bail!(
                "Exporting the key {fingerprint}: {}",
                String::from_utf8_lossy(&exported.stderr)
            );
        }
        std::fs::write(&public_key, &exported.stdout)
            .with_context(|| format!("Writing {}", public_key.display()))?;
        Ok(SigningKey {
            home: home.to_path_buf(),
            fingerprint,
            public_key,
        })
    }

    /// The GNUPGHOME holding the secret key.
    pub fn home(&self) -> &Path {
        &self.home
    }
}

impl Drop for SigningKey {
    fn drop(&mut self) {
        crate::cmd::stop_gpg_agent(&self.home, "the test key");
    }
}

/// Where signatures for one registry are written and read, and the registries.d saying so.
#[derive(Debug)]
pub struct Lookaside {
    store: PathBuf,
    registries_d: PathBuf,
    registry_addr: String,
    _server: Option<RepoServer>,
}

impl Lookaside {
    /// A signature store in `<dir>/sigs` for `registry`, read as `file://` (`served`: false) or
    /// over HTTP from a server on 127.0.0.1 (`served`: true); the registries.d directory is
    /// `<dir>/registries.d`.
    pub fn new(dir: &Path, registry: &Registry, served: bool) -> Result<Lookaside> {
        let dir = std::path::absolute(dir).context("Resolving the lookaside directory")?;
        let store = dir.join("sigs");
        let registries_d = dir.join("registries.d");
        for d in [&store, &registries_d] {
            std::fs::create_dir_all(d).with_context(|| format!("Creating {}", d.display()))?;
        }
        let server = served.then(|| RepoServer::serve(&store)).transpose()?;
        let read_url = match &server {
            Some(server) => server.url(),
            None => format!("file://{}", store.display()),
        };
        let yaml = format!(
            "docker:\n  {addr}:\n    lookaside: {read_url}\n    lookaside-staging: file://{store}\n",
            addr = registry.addr(),
            store = store.display()
        );
        std::fs::write(registries_d.join("dnfimage-test.yaml"), yaml)
            .context("Writing the registries.d configuration")?;
        Ok(Lookaside {
            store,
            registries_d,
            registry_addr: registry.addr(),
            _server: server,
        })
    }

    /// The registries.d directory to give skopeo (and the fetcher).
    pub fn registries_d(&self) -> &Path {
        &self.registries_d
    }

    /// The directory holding the signatures of `repo` (e.g. `dnfimage/base`) at `digest`.
    pub fn signature_dir(&self, repo: &str, digest: &str) -> PathBuf {
        self.store
            .join(format!("{repo}@{}", digest.replacen(':', "=", 1)))
    }

    /// Copies `src` (any transport) to `docker://ADDR/<name_and_tag>`, signed by `key` unless
    /// it is None; returns the docker reference.
    pub fn push(&self, src: &str, name_and_tag: &str, key: Option<&SigningKey>) -> Result<String> {
        let dest = format!("docker://{}/{name_and_tag}", self.registry_addr);
        let mut cmd = Command::new("skopeo");
        cmd.arg("--insecure-policy")
            .arg("--registries.d")
            .arg(&self.registries_d)
            .args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
            ]);
        if let Some(key) = key {
            cmd.env("GNUPGHOME", key.home())
                .args(["--sign-by", &key.fingerprint]);
        }
        cmd.arg(src).arg(&dest).stdin(Stdio::null());
        run(&mut cmd).with_context(|| format!("Pushing {src} to {dest}"))?;
        Ok(dest)
    }

    /// Makes the signatures of `repo` at `from` the signatures of `to_repo` at `to`: a
    /// signature made for another image (or digest) than the one it is found with.
    pub fn copy_signatures(&self, repo: &str, from: &str, to_repo: &str, to: &str) -> Result<()> {
        let (src, dest) = (
            self.signature_dir(repo, from),
            self.signature_dir(to_repo, to),
        );
        std::fs::create_dir_all(&dest).with_context(|| format!("Creating {}", dest.display()))?;
        let mut copied = 0;
        for entry in
            std::fs::read_dir(&src).with_context(|| format!("Reading {}", src.display()))?
        {
            let entry = entry?;
            std::fs::copy(entry.path(), dest.join(entry.file_name()))
                .with_context(|| format!("Copying {}", entry.path().display()))?;
            copied += 1;
        }
        if copied == 0 {
            bail!("No signatures in {}", src.display());
        }
        Ok(())
    }
}

/// Writes a policy to `path` that rejects everything but images from `registry_addr` signed
/// by `key_path`, and (`oci_signed`) `oci:`/`oci-archive:` layouts signed by the same key;
/// returns `path`.
pub fn write_signed_by_policy(
    path: &Path,
    registry_addr: &str,
    key_path: &Path,
    oci_signed: bool,
) -> Result<PathBuf> {
    let signed = serde_json::json!([{
        "type": "signedBy",
        "keyType": "GPGKeys",
        "keyPath": key_path,
    }]);
    let local = if oci_signed {
        signed.clone()
    } else {
        serde_json::json!([{"type": "insecureAcceptAnything"}])
    };
    let policy = serde_json::json!({
        "default": [{"type": "reject"}],
        "transports": {
            "docker": {registry_addr: signed},
            "oci": {"": local.clone()},
            "oci-archive": {"": local},
        }
    });
    write_policy(path, &policy)
}

/// Writes a policy to `path` that accepts any image (Debian's default); returns `path`.
pub fn write_accept_anything_policy(path: &Path) -> Result<PathBuf> {
    write_policy(
        path,
        &serde_json::json!({"default": [{"type": "insecureAcceptAnything"}]}),
    )
}

fn write_policy(path: &Path, policy: &serde_json::Value) -> Result<PathBuf> {
    std::fs::write(path, serde_json::to_vec_pretty(policy)?)
        .with_context(|| format!("Writing {}", path.display()))?;
    Ok(path.to_path_buf())
}
