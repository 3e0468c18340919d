//! Everything that talks to skopeo (through containers-image-proxy) lives here.

use std::ffi::OsString;
use std::path::PathBuf;

use containers_image_proxy::{ImageProxy, ImageProxyConfig, OpenedImage};
use dnfimage_interfaces::fetcher::{FetcherError, SignatureCheck};
use dnfimage_interfaces::reference::ImageRef;

/// How skopeo is started.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// A registries.conf for skopeo (per-registry `insecure = true` for plain-HTTP registries).
    pub registries_conf: Option<PathBuf>,
    /// The auth file (`auth.json`) configured for the fetcher; none: the first of the default
    /// paths that exists (see [`default_authfiles`]).
    pub authfile: Option<PathBuf>,
    /// How long a registry may stay silent: in all, answering for one image's manifest and
    /// configuration; during a fetch, with no byte of any layer arriving (none: as long as
    /// skopeo waits, which is forever for a server that accepts the connection and never
    /// answers).
    pub registry_timeout: Option<std::time::Duration>,
    /// The signature policy (containers-policy.json) images must meet before a fetch.
    pub policy: PathBuf,
    /// The registries.d directory that says where signatures are (lookaside).
    pub registries_d: PathBuf,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            registries_conf: None,
            authfile: None,
            registry_timeout: None,
            policy: DEFAULT_POLICY.into(),
            registries_d: DEFAULT_REGISTRIES_D.into(),
        }
    }
}

/// The host's signature policy, where containers/image looks for it.
pub const DEFAULT_POLICY: &str = "/etc/containers/policy.json";
/// The host's registries.d, where containers/image looks for it.
pub const DEFAULT_REGISTRIES_D: &str = "/etc/containers/registries.d";

/// The destination of the copy that checks the policy: a digest no manifest has, on a port
/// nothing listens on. skopeo compares the source's manifest with a digested destination right
/// after the policy check and before reading anything else, so the copy stops there.
const POLICY_CHECK_DEST: &str = "docker://127.0.0.1:0/dnfimage-policy-check";
/// What `skopeo copy` prints once the policy accepted the source and its manifest matched the
/// destination's digest (containers/image `copy.copyOneImage`), before any layer is read.
const PAST_THE_CHECKS: &str = "Getting image source signatures";

/// An opened image and the proxy that serves it.
pub struct Opened {
    /// The skopeo proxy.
    pub proxy: ImageProxy,
    /// The image handle.
    pub image: OpenedImage,
    /// The skopeo process, killed when this is dropped.
    _skopeo: Skopeo,
    /// The credentials skopeo was given.
    credentials: Credentials,
}

impl Opened {
    /// `error` (from this image's source) naming the credentials used, when the registry
    /// refused them.
    pub fn explain(&self, error: FetcherError) -> FetcherError {
        self.credentials.explain(error)
    }
}

/// The skopeo process behind a proxy (a pidfd), killed when dropped. skopeo notices that its
/// socket closed only between requests: one stuck on a registry that never answers would
/// otherwise outlive the call that gave up on it. A pidfd names that very process, so a
/// skopeo that already exited and was reaped is never mistaken for another.
struct Skopeo(Option<std::os::fd::OwnedFd>);

impl Skopeo {
    /// The process that wrote its pid into `pid_pipe` (see [`tell_pid`]).
    fn from_pipe(mut pid_pipe: std::io::PipeReader) -> Self {
        use std::io::Read;
        let mut bytes = [0u8; 4];
        let pidfd = pid_pipe
            .read_exact(&mut bytes)
            .ok()
            .and_then(|()| rustix::process::Pid::from_raw(i32::from_ne_bytes(bytes)))
            .and_then(|pid| {
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
            });
        if pidfd.is_none() {
            tracing::debug!("No pidfd for skopeo: it is not stopped when a call gives up");
        }
        Skopeo(pidfd)
    }
}

impl Drop for Skopeo {
    fn drop(&mut self) {
        if let Some(pidfd) = &self.0 {
            // ESRCH when it has exited already: nothing to do.
            let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::Kill);
        }
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").finish_non_exhaustive()
    }
}

impl ProxySettings {
    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("skopeo");
        if let Some(conf) = &self.registries_conf {
            cmd.arg("--registries-conf").arg(conf);
        }
        dnfimage_runtime::child::die_with_parent(&mut cmd);
        cmd
    }

    /// Starts skopeo and opens `image`.
    pub async fn open(&self, image: &ImageRef) -> Result<Opened, FetcherError> {
        let spawn_failed = |message: String| FetcherError::Failed {
            message: format!("Starting skopeo: {message}; is skopeo installed?"),
        };
        let (reader, writer) = std::io::pipe().map_err(|e| spawn_failed(e.to_string()))?;
        let mut cmd = self.command();
        // Looked up on every open: credentials written after the service started (a `skopeo
        // login` between two attempts) count.
        let credentials = self.credentials();
        // The proxy library keeps the child to itself: the child tells its pid through a pipe.
        tell_pid(&mut cmd, &writer);
        let config = ImageProxyConfig {
            authfile: credentials.file().map(PathBuf::from),
            skopeo_cmd: Some(cmd),
            ..Default::default()
        };
        let started = ImageProxy::new_with_config(config).await;
        // The child wrote its pid (if it got that far); with the write end closed here, the
        // read ends at once either way.
        drop(writer);
        let skopeo = Skopeo::from_pipe(reader);
        let proxy = started.map_err(|e| spawn_failed(proxy_message(&e)))?;
        let reference = image.to_string();
        let opened = proxy
            .open_image(&reference)
            .await
            .map_err(|e| credentials.explain(classify(&reference, &proxy_message(&e))))?;
        Ok(Opened {
            proxy,
            image: opened,
            _skopeo: skopeo,
            credentials,
        })
    }
}

impl ProxySettings {
    /// Checks that the host's signature policy accepts `image` whose manifest has `digest`,
    /// and says what it required (who signed: [`ProxySettings::signers`]).
    ///
    /// skopeo's image proxy ignores the policy (1.9.3), so this asks `skopeo copy`, which
    /// enforces it, for the image as given (the signatures must name this very reference, as
    /// for `podman pull`) with a destination whose digest is `digest`: containers/image checks
    /// the policy first, then that the manifest it read has `digest`, and only then touches the
    /// destination, which cannot be reached. No layer is read: one manifest request and the
    /// signatures. A tag moved since `digest` was read fails the second check. A policy that
    /// accepts anything is not asked about.
    pub async fn verify(
        &self,
        image: &ImageRef,
        digest: &str,
    ) -> Result<SignatureCheck, FetcherError> {
        let failed = |e: anyhow::Error| FetcherError::Failed {
            message: format!("{e:#}"),
        };
        let policy = crate::policy::Policy::read(&self.policy).map_err(failed)?;
        let requirement = policy.requirement_for(image);
        let unsigned = SignatureCheck {
            checked: true,
            verified: false,
            requirement: Some(requirement.clone()),
            signers: Vec::new(),
        };
        if policy.accepts_anything() {
            tracing::debug!(
                "The policy {} accepts any image: not checking {image}",
                self.policy.display()
            );
            return Ok(unsigned);
        }
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FetcherError::Failed {
                message: format!("{image}: the manifest digest {digest:?} is not a sha256 digest"),
            });
        }
        match self.policy_verdict(&self.policy, image, digest).await? {
            Verdict::Accepted => {}
            Verdict::Rejected(why) => {
                return Err(FetcherError::SignatureRejected {
                    image: image.to_string(),
                    requirement,
                    reason: rejection_reason(&why),
                });
            }
            Verdict::Moved => {
                return Err(FetcherError::Failed {
                    message: format!(
                        "{image}: the image changed while its signatures were being checked (its \
                         manifest is no longer {digest}); nothing was kept, try again"
                    ),
                });
            }
            Verdict::Other(message) => {
                return Err(match classify(&image.to_string(), &message) {
                    FetcherError::Failed { message } => FetcherError::Failed {
                        message: format!("Checking the signature policy: {message}"),
                    },
                    typed => typed,
                });
            }
        }
        tracing::info!("The signature policy accepts {image} ({digest}): {requirement}");
        Ok(SignatureCheck {
            verified: !policy.signed_by(image).is_empty(),
            ..unsigned
        })
    }

    /// The keys that signed `image` at `digest`, which [`ProxySettings::verify`] found
    /// verified: those of each `signedBy` requirement that applies. Naming them runs gpg (and
    /// skopeo again when a requirement trusts several keys), so only a fetch asks, not an update
    /// check. A failure only leaves names out: the image was accepted all the same.
    pub async fn signers(&self, image: &ImageRef, digest: &str) -> Vec<String> {
        let policy = match crate::policy::Policy::read(&self.policy) {
            Ok(policy) => policy,
            Err(e) => {
                tracing::warn!("Naming the keys that signed {image}, skipped: {e:#}");
                return Vec::new();
            }
        };
        let mut signers = Vec::new();
        for req in &policy.signed_by(image) {
            match self.signers_of(req, image, digest).await {
                Ok(found) => signers.extend(found),
                Err(e) => tracing::warn!("Naming the keys that signed {image}, skipped: {e:#}"),
            }
        }
        signers.dedup();
        signers
    }

    /// The keys of the `signedBy` requirement `req` that signed `image` (accepted by the
    /// policy): its only key, or, when it trusts several, each one a policy trusting that key
    /// alone accepts.
    async fn signers_of(
        &self,
        req: &serde_json::Map<String, serde_json::Value>,
        image: &ImageRef,
        digest: &str,
    ) -> anyhow::Result<Vec<String>> {
        use anyhow::Context as _;
        let keyring = crate::signers::Keyring::import(&crate::policy::key_material(req)?).await?;
        if keyring.keys.len() <= 1 {
            return Ok(keyring.keys.iter().map(|k| k.describe()).collect());
        }
        let scratch = tempfile::Builder::new()
            .prefix("dnfimage-policy-")
            .tempdir()
            .context("Creating a scratch directory")?;
        let mut signers = Vec::new();
        for key in &keyring.keys {
            let key_path = scratch.path().join(format!("{}.gpg", key.fingerprint));
            std::fs::write(&key_path, keyring.export(&key.fingerprint).await?)
                .with_context(|| format!("Writing {}", key_path.display()))?;
            let mut alone = req.clone();
            for k in ["keyPath", "keyPaths", "keyData"] {
                alone.remove(k);
            }
            alone.insert("keyPath".into(), key_path.display().to_string().into());
            let policy = serde_json::json!({
                "default": [{"type": "reject"}],
                "transports": {crate::policy::transport_name(image): {"": [alone]}},
            });
            let policy_path = scratch.path().join(format!("{}.json", key.fingerprint));
            std::fs::write(&policy_path, serde_json::to_vec(&policy)?)
                .with_context(|| format!("Writing {}", policy_path.display()))?;
            match self.policy_verdict(&policy_path, image, digest).await {
                Ok(Verdict::Accepted) => signers.push(key.describe()),
                Ok(_) => {}
                Err(e) => anyhow::bail!("Checking the signature of {}: {e:?}", key.fingerprint),
            }
        }
        Ok(signers)
    }

    /// What `skopeo copy` says about `image` at `digest` under the policy at `policy`.
    async fn policy_verdict(
        &self,
        policy: &std::path::Path,
        image: &ImageRef,
        digest: &str,
    ) -> Result<Verdict, FetcherError> {
        let mut cmd = self.command();
        cmd.arg("--policy")
            .arg(policy)
            .arg("--registries.d")
            .arg(&self.registries_d)
            .arg("copy");
        if let Some(authfile) = self.credentials().file() {
            cmd.arg("--src-authfile").arg(authfile);
        }
        cmd.arg(image.to_string())
            .arg(format!("{POLICY_CHECK_DEST}@{digest}"))
            .stdin(std::process::Stdio::null());
        let output = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| FetcherError::Failed {
                message: format!(
                    "Starting skopeo to check the signature policy: {e}; is skopeo installed?"
                ),
            })?;
        Ok(policy_verdict(
            &String::from_utf8_lossy(&output.stdout),
            &String::from_utf8_lossy(&output.stderr),
        ))
    }

    /// The credentials file skopeo is given: the configured one, else the first default one
    /// that exists.
    fn credentials(&self) -> Credentials {
        if let Some(path) = &self.authfile {
            return Credentials::Configured(path.clone());
        }
        let candidates = default_authfiles(
            |name| std::env::var_os(name),
            rustix::process::getuid().as_raw(),
        );
        match candidates.iter().find(|p| p.is_file()) {
            Some(found) => Credentials::Found(found.clone()),
            None => Credentials::None(candidates),
        }
    }
}

/// Where the registry credentials came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credentials {
    /// `--authfile`/`DNFIMAGE_AUTHFILE`.
    Configured(PathBuf),
    /// The first default path that exists.
    Found(PathBuf),
    /// None of these exists (skopeo still reads its home-directory files).
    None(Vec<PathBuf>),
}

impl Credentials {
    fn file(&self) -> Option<&std::path::Path> {
        match self {
            Credentials::Configured(p) | Credentials::Found(p) => Some(p),
            Credentials::None(_) => None,
        }
    }

    /// `error` with the credentials the registry refused named, when it is a refusal.
    fn explain(&self, error: FetcherError) -> FetcherError {
        let FetcherError::AuthenticationRequired { image, message } = error else {
            return error;
        };
        let which = match self {
            Credentials::Configured(p) if !p.is_file() => format!(
                "the configured credentials file {} does not exist",
                p.display()
            ),
            Credentials::Configured(p) => {
                format!("credentials from the configured file {}", p.display())
            }
            Credentials::Found(p) => format!("credentials from {}", p.display()),
            Credentials::None(looked) => format!(
                "no credentials: none of {} exists",
                looked
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        FetcherError::AuthenticationRequired {
            image,
            message: format!("{message} ({which})"),
        }
    }
}

/// The credentials files the fetcher looks for when none is configured, in order; the first
/// that exists is handed to skopeo. `env` reads an environment variable, `uid` is the
/// service's.
///
/// 1. `$REGISTRY_AUTH_FILE`, the containers tools' own override.
/// 2. What containers-image (skopeo 1.9.3, podman) reads first and `skopeo login`/`podman
///    login` write: `$XDG_RUNTIME_DIR/containers/auth.json`, or `/run/containers/<uid>/auth.json`
///    when `XDG_RUNTIME_DIR` is unset (as in a system service).
/// 3. ostree-ext's host files, which bootc and rpm-ostree read: `/run/ostree/auth.json`,
///    `/etc/ostree/auth.json`, `/usr/lib/ostree/auth.json` — the persistent place for a host's
///    credentials, since everything above lives on a tmpfs.
///
/// skopeo itself then also reads `${XDG_CONFIG_HOME:-~/.config}/containers/auth.json`,
/// `~/.docker/config.json` and `~/.dockercfg` for registries the file given lacks; under the
/// unit, the home directories are empty.
pub fn default_authfiles(env: impl Fn(&str) -> Option<OsString>, uid: u32) -> Vec<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut paths = Vec::new();
    paths.extend(set("REGISTRY_AUTH_FILE"));
    paths.push(match set("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("containers/auth.json"),
        None => PathBuf::from(format!("/run/containers/{uid}/auth.json")),
    });
    for dir in ["/run", "/etc", "/usr/lib"] {
        paths.push(PathBuf::from(dir).join("ostree/auth.json"));
    }
    paths
}

/// What a policy-checking `skopeo copy` said.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Past the policy and the digest check.
    Accepted,
    /// The policy rejected the image: skopeo's reason.
    Rejected(String),
    /// The policy accepted a manifest with another digest.
    Moved,
    /// It failed before deciding (source unreachable, unknown image, bad policy): what it said.
    Other(String),
}

/// Reads the outcome of the copy to [`POLICY_CHECK_DEST`] from its output.
fn policy_verdict(stdout: &str, stderr: &str) -> Verdict {
    let message = skopeo_message(stderr);
    if let Some(i) = message.find("Source image rejected: ") {
        Verdict::Rejected(message[i + "Source image rejected: ".len()..].to_string())
    } else if message.contains("would not match destination reference") {
        Verdict::Moved
    } else if stdout.lines().any(|l| l.trim() == PAST_THE_CHECKS) {
        Verdict::Accepted
    } else {
        Verdict::Other(message)
    }
}

/// skopeo's fatal message without the logger's decoration (`time=… level=fatal msg="…"`).
fn skopeo_message(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim();
    match line.find("msg=\"") {
        Some(i) => {
            let quoted = &line[i + 4..];
            serde_json::from_str::<String>(quoted).unwrap_or_else(|_| {
                quoted
                    .trim_start_matches('"')
                    .trim_end_matches('"')
                    .to_string()
            })
        }
        None => line.to_string(),
    }
}

/// Why the policy rejected an image, in words, followed by what skopeo said.
fn rejection_reason(skopeo: &str) -> String {
    let why = if skopeo.contains("no signature exists") {
        "the image is not signed".to_string()
    } else if skopeo.contains("Invalid GPG signature") || skopeo.contains("not signed by") {
        match gpg_fingerprint(skopeo) {
            Some(fpr) => format!("it is signed by a key the policy does not accept ({fpr})"),
            None => "its signature is not by a key the policy accepts".to_string(),
        }
    } else if skopeo.contains("Signature for digest") {
        "its signature is for another image or digest (or the manifest was altered)".to_string()
    } else if skopeo.contains("Signature for identity") {
        "its signature is for another image reference".to_string()
    } else if skopeo.contains("is rejected by policy") {
        "the policy rejects it outright".to_string()
    } else {
        "its signatures do not meet the policy".to_string()
    };
    format!("{why}: {skopeo}")
}

/// The signer's fingerprint in gpgme's description of a signature.
fn gpg_fingerprint(text: &str) -> Option<&str> {
    let start = text.find("Fingerprint:")? + "Fingerprint:".len();
    let rest = text[start..].trim_start().trim_start_matches('"');
    let end = rest.find(|c: char| !c.is_ascii_hexdigit())?;
    (end > 0).then(|| &rest[..end])
}

#[allow(unsafe_code)]
fn tell_pid(cmd: &mut std::process::Command, pipe: &std::io::PipeWriter) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = pipe.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (getpid, write) on a descriptor the parent keeps open until spawn returned.
    unsafe {
        cmd.pre_exec(move || {
            let pid = rustix::process::getpid().as_raw_nonzero().get();
            let pipe = std::os::fd::BorrowedFd::borrow_raw(fd);
            rustix::io::write(pipe, &pid.to_ne_bytes()).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// The text of a proxy error, including what skopeo said (its `Display` hides that).
pub fn proxy_message(e: &containers_image_proxy::Error) -> String {
    use containers_image_proxy::Error as E;
    match e {
        E::RequestReturned(msg) | E::Other(msg) | E::Configuration(msg) => msg.to_string(),
        E::RequestInitiationFailure { method, error } => format!("{method}: {error}"),
        E::SkopeoSpawnError(io) => format!("spawning skopeo: {io}"),
        other => {
            let mut s = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                source = cause.source();
            }
            s
        }
    }
}

/// Maps what skopeo said about `image` to a typed error a person can act on.
pub fn classify(image: &str, message: &str) -> FetcherError {
    let m = message.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| m.contains(n));
    let image = image.to_string();
    let message = message.to_string();
    if has(&[
        "invalid reference format",
        "invalid image name",
        "invalid reference",
    ]) {
        FetcherError::InvalidImageReference { image, message }
    } else if has(&["http response to https client"]) {
        FetcherError::RegistryUnreachable {
            image,
            message: format!(
                "{message} (the registry speaks plain HTTP: mark it insecure in the \
                 registries.conf given to the fetcher)"
            ),
        }
    } else if has(&[
        "connection refused",
        "no such host",
        "network is unreachable",
        "i/o timeout",
        "no route to host",
        "tls handshake",
        "connection reset",
        "certificate",
    ]) {
        FetcherError::RegistryUnreachable { image, message }
    } else if has(&[
        "permission denied",
        "operation not permitted",
        "read-only file system",
    ]) {
        // The service itself cannot read or write something (its sandbox, its files): not a
        // registry's refusal.
        FetcherError::Failed {
            message: format!("{image}: {message}"),
        }
    } else if has(&[
        "unauthorized",
        "authentication required",
        "denied",
        "invalid username/password",
    ]) {
        FetcherError::AuthenticationRequired { image, message }
    } else if has(&[
        "digest did not match",
        "digest mismatch",
        "manifest does not match",
        "corrupted blob",
        "does not match digest",
        "bytes in blob",
    ]) {
        FetcherError::DigestMismatch {
            expected: String::new(),
            actual: None,
            message,
        }
    } else if has(&[
        "manifest unknown",
        "name unknown",
        "not found",
        "no such file or directory",
        "no descriptor found",
        "does not exist",
    ]) {
        FetcherError::ImageNotFound { image, message }
    } else {
        FetcherError::Failed {
            message: format!("{image}: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_credentials_paths_in_order() {
        let env = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, OsString)> = vars
                .iter()
                .map(|(n, v)| (n.to_string(), OsString::from(v)))
                .collect();
            move |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        };
        let ostree = [
            "/run/ostree/auth.json",
            "/etc/ostree/auth.json",
            "/usr/lib/ostree/auth.json",
        ];
        /// The environment, the uid, the paths before ostree's.
        type Case<'a> = (&'a [(&'a str, &'a str)], u32, &'a [&'a str]);
        let cases: &[Case] = &[
            // A system service: no XDG_RUNTIME_DIR.
            (&[], 0, &["/run/containers/0/auth.json"]),
            (
                &[("XDG_RUNTIME_DIR", "")],
                1000,
                &["/run/containers/1000/auth.json"],
            ),
            (
                &[("XDG_RUNTIME_DIR", "/run/user/0")],
                0,
                &["/run/user/0/containers/auth.json"],
            ),
            (
                &[
                    ("REGISTRY_AUTH_FILE", "/srv/auth.json"),
                    ("XDG_RUNTIME_DIR", "/run/user/0"),
                ],
                0,
                &["/srv/auth.json", "/run/user/0/containers/auth.json"],
            ),
        ];
        for (vars, uid, first) in cases {
            let want: Vec<PathBuf> = first
                .iter()
                .chain(ostree.iter())
                .map(PathBuf::from)
                .collect();
            assert_eq!(default_authfiles(env(vars), *uid), want, "{vars:?}");
        }
    }

    #[test]
    fn refusals_name_the_credentials() {
        let refused = || FetcherError::AuthenticationRequired {
            image: "docker://r/x".into(),
            message: "unauthorized: authentication required".into(),
        };
        let message = |e: FetcherError| match e {
            FetcherError::AuthenticationRequired { message, .. } => message,
            other => panic!("{other:?}"),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let present = dir.path().join("auth.json");
        std::fs::write(&present, "{}").expect("write");
        let absent = dir.path().join("none.json");
        let cases = [
            (
                Credentials::Configured(present.clone()),
                format!("credentials from the configured file {}", present.display()),
            ),
            (
                Credentials::Configured(absent.clone()),
                format!(
                    "the configured credentials file {} does not exist",
                    absent.display()
                ),
            ),
            (
                Credentials::Found(present.clone()),
                format!("credentials from {}", present.display()),
            ),
            (
                Credentials::None(vec![absent.clone(), "/etc/ostree/auth.json".into()]),
                format!(
                    "no credentials: none of {}, /etc/ostree/auth.json exists",
                    absent.display()
                ),
            ),
        ];
        for (credentials, want) in cases {
            let got = message(credentials.explain(refused()));
            assert_eq!(
                got,
                format!("unauthorized: authentication required ({want})")
            );
        }
        // Other errors pass unchanged.
        let other = FetcherError::ImageNotFound {
            image: "x".into(),
            message: "manifest unknown".into(),
        };
        assert_eq!(Credentials::Found(present).explain(other.clone()), other);
    }

    #[test]
    fn reads_the_policy_verdict() {
        let fatal = |msg: &str| {
            format!(
                "time=\"2026-12-07T11:53:17Z\" level=fatal msg={}\n",
                serde_json::to_string(msg).expect("a string serializes")
            )
        };
        let cases = [
            (
                "Getting image source signatures\nChecking if image destination supports signatures\n",
                fatal("Can not copy signatures to docker://127.0.0.1:0/x: pinging container registry 127.0.0.1:0: connection refused"),
                Verdict::Accepted,
            ),
            (
                "",
                fatal("Source image rejected: A signature was required, but no signature exists"),
                Verdict::Rejected("A signature was required, but no signature exists".into()),
            ),
            (
                "",
                fatal("Digest of source image's manifest would not match destination reference"),
                Verdict::Moved,
            ),
            (
                "",
                fatal("initializing source docker://127.0.0.1:1/x:y: pinging container registry 127.0.0.1:1: connection refused"),
                Verdict::Other("initializing source docker://127.0.0.1:1/x:y: pinging container registry 127.0.0.1:1: connection refused".into()),
            ),
        ];
        for (stdout, stderr, want) in cases {
            assert_eq!(policy_verdict(stdout, &stderr), want, "{stderr}");
        }
    }

    #[test]
    fn explains_rejections() {
        let cases = [
            (
                "A signature was required, but no signature exists",
                "the image is not signed: ",
            ),
            (
                "Invalid GPG signature: gpgme.Signature{Summary:128, Fingerprint:\"99E5FC88C1633703FEFEA6640D074A16344C5868\", Status:gpgme.Error{err:0x9}}",
                "it is signed by a key the policy does not accept (99E5FC88C1633703FEFEA6640D074A16344C5868): ",
            ),
            (
                "Signature for digest sha256:aa does not match",
                "its signature is for another image or digest",
            ),
            (
                "Signature for identity 127.0.0.1:5000/a:b is not accepted",
                "its signature is for another image reference: ",
            ),
            (
                "Running image docker://x is rejected by policy.",
                "the policy rejects it outright: ",
            ),
        ];
        for (skopeo, want) in cases {
            let got = rejection_reason(skopeo);
            assert!(got.starts_with(want), "{skopeo} -> {got}");
            assert!(got.ends_with(skopeo), "{got}");
        }
    }

    #[test]
    fn classifies_skopeo_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "reading manifest v9 in 127.0.0.1:5000/x: manifest unknown: manifest unknown",
                "ImageNotFound",
            ),
            (
                "pinging container registry 127.0.0.1:1: Get \"https://127.0.0.1:1/v2/\": dial tcp 127.0.0.1:1: connect: connection refused",
                "RegistryUnreachable",
            ),
            (
                "Get \"https://127.0.0.1:5000/v2/\": http: server gave HTTP response to HTTPS client",
                "RegistryUnreachable",
            ),
            (
                "reading manifest latest in quay.io/x: unauthorized: access to the requested resource is not authorized",
                "AuthenticationRequired",
            ),
            ("invalid reference format", "InvalidImageReference"),
            (
                "open /nonexistent/index.json: no such file or directory",
                "ImageNotFound",
            ),
            (
                "Digest did not match, expected sha256:aa, got sha256:bb",
                "DigestMismatch",
            ),
            (
                "GetManifest: failed to invoke method GetManifest: Manifest does not match provided manifest digest sha256:aa",
                "DigestMismatch",
            ),
            (
                "FinishPipe: failed to invoke method FinishPipe: corrupted blob, expecting sha256:aa",
                "DigestMismatch",
            ),
            (
                "FinishPipe: failed to invoke method FinishPipe: expected 152 bytes in blob, got 162",
                "DigestMismatch",
            ),
            ("something odd", "Failed"),
            (
                "lstat /root/.config/containers/registries.conf.d: permission denied",
                "Failed",
            ),
            (
                "requested access to the resource is denied",
                "AuthenticationRequired",
            ),
        ];
        for (message, want) in cases {
            let got = format!("{:?}", classify("docker://x", message));
            assert!(got.starts_with(want), "{message} -> {got}");
        }
    }
}
