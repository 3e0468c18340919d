//! The end-to-end test harness: starts the real services (as built by cargo) in a scratch
//! directory, next to a real registry and real skopeo, and talks to them as clients do.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

pub mod bench;
pub mod deploy_support;
pub mod fleet;
pub mod host;
pub mod importer_support;
pub mod layout;
pub mod proxy;
pub mod rpm_support;
pub mod sysroot;
pub mod systemd;
pub mod vm;

/// The directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary has a path");
    // target/debug/deps/<test> → target/debug; target/release/<bin> → target/release
    let dir = exe.parent().expect("binaries live in target/<profile>");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps/ has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A built binary of the workspace.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

/// systemd 257's `varlinkctl` on this machine: a script in `../shared/tools` beside the
/// repository.
pub fn varlinkctl() -> PathBuf {
    repo_root().join("../shared/tools/varlinkctl")
}

/// A scratch directory for one test: runtime dir (sockets), state dir, logs. World-readable so
/// tests can also call the services as an unprivileged user.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A new scratch directory.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dnfimage-test-")
            .tempdir_in(std::env::temp_dir())
            .context("Creating a scratch directory")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        for sub in ["run", "state", "logs"] {
            let p = dir.path().join(sub);
            std::fs::create_dir_all(&p)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(Self { dir })
    }

    /// The scratch root.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the sockets are.
    pub fn runtime_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    /// The services' state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    /// A service's socket.
    pub fn socket(&self, interface: &str) -> PathBuf {
        self.runtime_dir().join(interface)
    }

    /// Writes a registries.conf marking `addr` insecure (plain HTTP), returns its path.
    pub fn registries_conf(&self, addr: &str) -> Result<PathBuf> {
        let path = self.path().join("registries.conf");
        std::fs::write(
            &path,
            format!("[[registry]]\nlocation = \"{addr}\"\ninsecure = true\n"),
        )?;
        Ok(path)
    }

    /// Runs the CLI against this scratch's services.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(bin("dnf-image"));
        cmd.env("DNFIMAGE_RUNTIME_DIR", self.runtime_dir())
            .stdin(Stdio::null());
        cmd
    }
}

/// A running service process; killed when dropped.
pub struct ServiceProcess {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

/// How to start the fetcher.
#[derive(Debug, Default, Clone)]
pub struct FetcherOptions {
    /// registries.conf for skopeo.
    pub registries_conf: Option<PathBuf>,
    /// Idle timeout in seconds (default: never).
    pub idle_timeout: Option<u64>,
    /// Socket mode (default 0600).
    pub socket_mode: Option<&'static str>,
    /// A state directory other than the scratch one.
    pub state_dir: Option<PathBuf>,
    /// `--registry-timeout` in seconds (default: the service's).
    pub registry_timeout: Option<u64>,
    /// `--authfile` (default: the service's default paths).
    pub authfile: Option<PathBuf>,
    /// Environment variables set for the service (e.g. `XDG_RUNTIME_DIR`, which decides one
    /// of its default credentials paths).
    pub env: Vec<(&'static str, std::ffi::OsString)>,
    /// `--policy`: the signature policy (default: the host's).
    pub policy: Option<PathBuf>,
    /// `--registries-d`: where signatures are (default: the host's).
    pub registries_d: Option<PathBuf>,
}

impl ServiceProcess {
    /// Starts `dnfimage-fetcher` bound to its socket in `scratch`, and waits until it answers.
    pub fn fetcher(scratch: &Scratch, opts: &FetcherOptions) -> Result<Self> {
        let mut cmd = Command::new(bin("dnfimage-fetcher"));
        cmd.arg("--runtime-dir")
            .arg(scratch.runtime_dir())
            .arg("--state-dir")
            .arg(
                opts.state_dir
                    .clone()
                    .unwrap_or_else(|| scratch.state_dir()),
            )
            .arg("--idle-timeout")
            .arg(opts.idle_timeout.unwrap_or(0).to_string())
            .arg("--socket-mode")
            .arg(opts.socket_mode.unwrap_or("600"));
        if let Some(conf) = &opts.registries_conf {
            cmd.arg("--registries-conf").arg(conf);
        }
        if let Some(secs) = opts.registry_timeout {
            cmd.arg("--registry-timeout").arg(secs.to_string());
        }
        if let Some(authfile) = &opts.authfile {
            cmd.arg("--authfile").arg(authfile);
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        if let Some(policy) = &opts.policy {
            cmd.arg("--policy").arg(policy);
        }
        if let Some(dir) = &opts.registries_d {
            cmd.arg("--registries-d").arg(dir);
        }
        Self::spawn(
            cmd,
            scratch.socket(dnfimage_interfaces::fetcher::INTERFACE),
            scratch.path().join("logs/fetcher.log"),
        )
    }

    /// Starts the service binary `dnfimage-<name>` serving `interface`, bound to its socket in
    /// `scratch`, with `--runtime-dir`, `--idle-timeout 0` and `args`, and waits until it
    /// answers. Its log goes to `logs/<name>.log`.
    pub fn start(
        scratch: &Scratch,
        name: &str,
        interface: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<Self> {
        Self::launch(
            scratch,
            name,
            interface,
            Command::new(bin(&format!("dnfimage-{name}"))),
            args,
        )
    }

    /// Like [`start`](Self::start), in a network namespace of its own with no network at all:
    /// for tests that send it arbitrary input (an image reference made up by a fuzzer must
    /// never reach a real host).
    pub fn start_offline(
        scratch: &Scratch,
        name: &str,
        interface: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<Self> {
        Self::start_wrapped(scratch, name, interface, &["unshare", "--net", "--"], args)
    }

    /// Like [`start`](Self::start), run through `wrapper` (a command line that ends by
    /// executing the service, e.g. `prlimit --nofile=64 --`).
    pub fn start_wrapped(
        scratch: &Scratch,
        name: &str,
        interface: &str,
        wrapper: &[&str],
        args: &[&std::ffi::OsStr],
    ) -> Result<Self> {
        let (program, wrapper_args) = wrapper.split_first().context("an empty wrapper")?;
        let mut cmd = Command::new(program);
        cmd.args(wrapper_args).arg(bin(&format!("dnfimage-{name}")));
        Self::launch(scratch, name, interface, cmd, args)
    }

    /// Runs `cmd` (the service binary, maybe behind a wrapper) with `--runtime-dir`,
    /// `--idle-timeout 0` and `args`, logging to `logs/<name>.log`, until it answers.
    fn launch(
        scratch: &Scratch,
        name: &str,
        interface: &str,
        mut cmd: Command,
        args: &[&std::ffi::OsStr],
    ) -> Result<Self> {
        cmd.arg("--runtime-dir")
            .arg(scratch.runtime_dir())
            .args(["--idle-timeout", "0"])
            .args(args);
        Self::spawn(
            cmd,
            scratch.socket(interface),
            scratch.path().join(format!("logs/{name}.log")),
        )
    }

    /// Starts the service binary `dnfimage-<name>` as systemd starts it for a socket unit:
    /// `listener`, which the caller keeps open (bound to the service's socket in `scratch`), is
    /// its fd 3 with `LISTEN_FDS=1`. While no service runs, clients still connect and wait in the
    /// listener's queue; a service started again on it answers them.
    pub fn activated(
        scratch: &Scratch,
        name: &str,
        interface: &str,
        listener: &std::os::unix::net::UnixListener,
        args: &[&std::ffi::OsStr],
    ) -> Result<Self> {
        use std::os::fd::AsRawFd;
        // `LISTEN_PID` must be the service's pid: a shell sets it and execs the service.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#])
            .arg(bin(&format!("dnfimage-{name}")))
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "varlink");
        pass_as_fd3(&mut cmd, listener.as_raw_fd());
        Self::launch(scratch, name, interface, cmd, args)
    }

    fn spawn(mut cmd: Command, socket: PathBuf, log: PathBuf) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("DNFIMAGE_LOG", "debug");
        let child = cmd.spawn().context("Starting the service")?;
        let mut service = Self {
            child: Some(child),
            socket,
            log,
        };
        service.wait_ready(Duration::from_secs(20))?;
        Ok(service)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                anyhow::bail!(
                    "The service exited with {status} before serving; log:\n{}",
                    self.log_text()
                );
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "The service did not serve {} within {timeout:?}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The service's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends a signal to the service.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    /// Kills the service at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the service to exit by itself, up to `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Makes `fd` the command's fd 3, inherited across exec.
#[allow(unsafe_code)]
pub fn pass_as_fd3(cmd: &mut Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls on descriptors the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One raw varlink exchange on a fresh connection: sends `call` (a JSON object) and returns the
/// replies until one without `"continues": true`. For protocol tests that must see exactly
/// what is on the wire.
pub fn raw_call(socket: &Path, call: &Value) -> Result<Vec<Value>> {
    RawConnection::open(socket)?.call(call)
}

/// A varlink connection for raw exchanges ([`raw_call`]) one after another.
pub struct RawConnection {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl RawConnection {
    /// Connects to `socket`.
    pub fn open(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("Connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends `call` (a JSON object) and returns the replies until one without
    /// `"continues": true`.
    pub fn call(&mut self, call: &Value) -> Result<Vec<Value>> {
        let mut bytes = serde_json::to_vec(call)?;
        bytes.push(0);
        self.stream.write_all(&bytes)?;
        let mut replies = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            while let Some(reply) = take_message(&mut self.buf)? {
                let more = reply.get("continues").and_then(Value::as_bool) == Some(true);
                replies.push(reply);
                if !more {
                    return Ok(replies);
                }
            }
            // A signal to the test process (a child's exit) interrupts the read: read again.
            let n = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.context("Reading replies")?,
            };
            anyhow::ensure!(
                n > 0,
                "The service closed the connection after {} replies (no error reply)",
                replies.len()
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The first whole message in `buf` (a varlink message ends with a NUL byte), taken out of it.
pub(crate) fn take_message(buf: &mut Vec<u8>) -> Result<Option<Value>> {
    let Some(end) = buf.iter().position(|b| *b == 0) else {
        return Ok(None);
    };
    let message: Vec<u8> = buf.drain(..=end).collect();
    serde_json::from_slice(&message[..message.len() - 1])
        .context("Parsing a reply")
        .map(Some)
}

/// Fails when the description `interface`'s service serves on `socket` is not, in canonical
/// form, the committed `interfaces/<interface>.varlink`.
pub fn assert_served_idl_matches(socket: &Path, interface: &str) -> Result<()> {
    let replies = raw_call(
        socket,
        &serde_json::json!({
            "method": "org.varlink.service.GetInterfaceDescription",
            "parameters": {"interface": interface},
        }),
    )?;
    let served = replies[0]["parameters"]["description"]
        .as_str()
        .context("no description in the reply")?;
    let served = dnfimage_interfaces::idl::canonical(served).map_err(anyhow::Error::msg)?;
    let file = repo_root().join(format!("interfaces/{interface}.varlink"));
    let committed = std::fs::read_to_string(&file)?;
    anyhow::ensure!(
        served == committed,
        "the service's interface drifted from {} (scripts/regen-idl.sh rewrites it):\n{served}",
        file.display()
    );
    Ok(())
}

/// The error name of a reply, if it is an error.
pub fn error_name(reply: &Value) -> Option<&str> {
    reply.get("error").and_then(Value::as_str)
}

/// Runs a command, returning its output; fails with its stderr when it cannot start.
pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("Running {:?}", cmd.get_program()))
}

/// stdout of a successful command, or an error with its stderr.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed with {}:\nstdout: {}\nstderr: {}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every blob file in an OCI layout hashes to its name (nothing half-written looks complete).
pub fn assert_blobs_intact(layout: &Path) -> Result<usize> {
    use sha2::Digest;
    let dir = layout.join("blobs/sha256");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("Listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let bytes = std::fs::read(entry.path())?;
        let actual = hex::encode(sha2::Sha256::digest(&bytes));
        anyhow::ensure!(
            actual == name,
            "blob {name} holds content hashing to {actual}"
        );
        n += 1;
    }
    Ok(n)
}
