//! Everything that talks to skopeo (through containers-image-proxy) lives here.

use std::ffi::OsString;
use std::path::PathBuf;

use containers_image_proxy::{ImageProxy, ImageProxyConfig, OpenedImage};
use dnfimage_interfaces::fetcher::FetcherError;
use dnfimage_interfaces::reference::ImageRef;

/// How skopeo is started.
#[derive(Debug, Clone, Default)]
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
}

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
