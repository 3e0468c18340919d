//! The units under a real systemd: `scripts/install.sh` into a staging root, `systemd-analyze`
//! against that root, and a throwaway `systemd-nspawn` container that boots the host's own
//! systemd with the staged install laid over its `/usr`.
//!
//! The container is cheap: `--volatile=yes` boots the host's `/usr` on an empty tmpfs root, an
//! overlay puts the staged `/usr` (binaries, units, IDL files) on top, and `/etc` is a directory
//! the test fills before boot (presets, drop-ins, configuration). It shares the host's network,
//! so services inside reach a registry the test runs on 127.0.0.1. Nothing is registered with
//! machined (the host runs no systemd); commands run inside through `nsenter`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{bin_dir, repo_root, run, run_ok};

/// Writes a line to the test's real stderr, past the test harness's capture, so that skips and
/// measurements show in a passing run too.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The cargo profile the tests were built with ("debug" or "release").
pub fn profile() -> String {
    bin_dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "debug".into())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

/// Runs `scripts/install.sh` into `destdir` with the tests' profile; returns what it printed.
pub fn install(destdir: &Path) -> Result<String> {
    let target = bin_dir()
        .parent()
        .context("the binaries' directory has a parent")?
        .to_path_buf();
    let out = run(Command::new(repo_root().join("scripts/install.sh"))
        .env("DESTDIR", destdir)
        .env("PROFILE", profile())
        .env("CARGO_TARGET_DIR", target)
        .env_remove("PREFIX")
        .env_remove("SYSCONFDIR"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "install.sh failed with {}: {stderr}",
        out.status
    );
    Ok(stderr)
}

/// Where installed units live under a staging root.
pub const UNIT_DIR: &str = "usr/lib/systemd/system";

/// The dnfimage unit files installed under `destdir`, sorted by name.
pub fn installed_units(destdir: &Path) -> Result<Vec<String>> {
    let dir = destdir.join(UNIT_DIR);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("Listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dnfimage-"))
        .collect();
    names.sort();
    Ok(names)
}

/// A unit file as (section, key, value) triples in file order, comments and blanks dropped.
pub fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    entries
}

/// The first value of `key` in `section` of a unit file's text.
pub fn unit_value(text: &str, section: &str, key: &str) -> Option<String> {
    parse_unit(text)
        .into_iter()
        .find(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v)
}

/// The service a unit runs: itself for a service, `<name>.service` for a socket or timer.
pub fn service_of(unit: &str) -> String {
    match unit.rsplit_once('.') {
        Some((stem, "socket" | "timer")) => format!("{stem}.service"),
        _ => unit.to_string(),
    }
}

/// The program the service behind `unit` starts (its `ExecStart=` without prefixes or
/// arguments).
pub fn exec_binary(destdir: &Path, unit: &str) -> Result<String> {
    let service = service_of(unit);
    let path = destdir.join(UNIT_DIR).join(&service);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("Reading {}", path.display()))?;
    let exec = unit_value(&text, "Service", "ExecStart")
        .with_context(|| format!("{service} has no ExecStart="))?;
    let program = exec
        .trim_start_matches(['-', '@', ':', '+', '!'])
        .split_whitespace()
        .next()
        .context("empty ExecStart=")?;
    Ok(program.to_string())
}

/// Whether `program` (an absolute path) exists in the staging root or, failing that, on the
/// host, i.e. in the root `analyze` and `Container` see.
pub fn program_installed(destdir: &Path, program: &str) -> bool {
    destdir.join(program.trim_start_matches('/')).exists() || Path::new(program).exists()
}

/// Runs `systemd-analyze ARGS --root=ROOT` where ROOT's `/usr` is the staging root's `/usr`
/// over the host's (an overlay mounted in a private mount namespace), so units see the host's
/// targets and the installed binaries at their installed paths. `scratch` is an empty
/// directory to build ROOT in.
pub fn analyze(destdir: &Path, scratch: &Path, args: &[&str]) -> Result<Output> {
    let root = scratch.join("root");
    std::fs::create_dir_all(root.join("usr"))?;
    std::fs::create_dir_all(root.join("etc"))?;
    let mut cmd = Command::new("unshare");
    if !is_root() {
        cmd.arg("--map-root-user");
    }
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            r#"mount -t overlay overlay -o "lowerdir=$1/usr:/usr" "$2/usr" || exit 125
r="$2"; shift 2; exec systemd-analyze "$@" --root="$r""#,
        )
        .arg("sh")
        .arg(destdir)
        .arg(&root)
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "");
    let out = run(&mut cmd)?;
    anyhow::ensure!(
        out.status.code() != Some(125),
        "Mounting the overlay root for systemd-analyze failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Parses "Overall exposure level for X: 1.6 OK" from `systemd-analyze security`.
pub fn exposure_score(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for "))
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(v) = check()? {
            return Ok((v, start.elapsed()));
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "Timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Why a container cannot be started here, if it cannot.
pub fn container_unavailable() -> Option<String> {
    if !is_root() {
        return Some("booting a systemd-nspawn container needs root".into());
    }
    for tool in ["systemd-nspawn", "nsenter", "setpriv"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (apt package {}; scripts/setup.sh installs it)",
                if tool == "systemd-nspawn" {
                    "systemd-container"
                } else {
                    "util-linux"
                }
            ));
        }
    }
    if !Path::new("/usr/lib/systemd/systemd").exists() {
        return Some("the host has no /usr/lib/systemd/systemd to boot".into());
    }
    None
}

/// How to build the container.
#[derive(Debug, Clone)]
pub struct ContainerOptions {
    /// Directories laid over the host's `/usr`, lowest first (each holds the `usr/` contents).
    pub usr_layers: Vec<PathBuf>,
    /// The container's `/etc` (writable; systemd's first boot fills it further).
    pub etc: PathBuf,
    /// Host paths bound read-only, with the path inside.
    pub binds_ro: Vec<(PathBuf, String)>,
    /// Host paths bound writable, with the path inside.
    pub binds: Vec<(PathBuf, String)>,
    /// Where nspawn's own output goes.
    pub log: PathBuf,
    /// How long booting may take.
    pub boot_timeout: Duration,
}

/// A booted container; halted (then killed if it must be) when dropped.
pub struct Container {
    nspawn: Option<Child>,
    leader: u32,
    machine: String,
    log: PathBuf,
    /// How long `boot` took until systemd reported running or degraded.
    pub boot_time: Duration,
}

/// The longest any one command inside the container may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin";

impl Container {
    /// Boots `systemd-nspawn --boot` on the host's `/usr` and waits until systemd is up.
    pub fn boot(machine: &str, opts: &ContainerOptions) -> Result<Self> {
        let start = Instant::now();
        let mut usr = String::from("/usr");
        for layer in &opts.usr_layers {
            let s = layer.to_str().context("a non-UTF-8 layer path")?;
            anyhow::ensure!(!s.contains([':', ',']), "layer paths must not hold : or ,");
            usr.push(':');
            usr.push_str(s);
        }
        let log = std::fs::File::create(&opts.log)?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args([
            "--quiet",
            "--boot",
            "--directory=/",
            "--volatile=yes",
            // No machined on this host: nothing to register with, stay in our own cgroup.
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
        ])
        .arg(format!("--machine={machine}"))
        .arg(format!("--overlay-ro={usr}:/usr"))
        .arg(format!("--bind={}:/etc", opts.etc.display()));
        for (path, inside) in &opts.binds_ro {
            cmd.arg(format!("--bind-ro={}:{inside}", path.display()));
        }
        for (path, inside) in &opts.binds {
            cmd.arg(format!("--bind={}:{inside}", path.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        halt_when_parent_dies(&mut cmd);
        let child = cmd.spawn().context("Starting systemd-nspawn")?;
        let mut container = Self {
            nspawn: Some(child),
            leader: 0,
            machine: machine.to_string(),
            log: opts.log.clone(),
            boot_time: Duration::ZERO,
        };
        let nspawn_pid = container.nspawn.as_ref().map(Child::id).unwrap_or(0);
        let (leader, _) = wait_for("the container's init", opts.boot_timeout, || {
            container.ensure_nspawn_alive()?;
            Ok(systemd_child(nspawn_pid))
        })?;
        container.leader = leader;
        let remaining = opts.boot_timeout.saturating_sub(start.elapsed());
        wait_for(
            "systemd in the container to finish booting",
            remaining,
            || {
                container.ensure_nspawn_alive()?;
                let out = run(container.command("systemctl").arg("is-system-running"))?;
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok(matches!(state.as_str(), "running" | "degraded").then_some(()))
            },
        )?;
        container.boot_time = start.elapsed();
        Ok(container)
    }

    fn ensure_nspawn_alive(&mut self) -> Result<()> {
        if let Some(status) = self
            .nspawn
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            self.nspawn = None;
            anyhow::bail!(
                "systemd-nspawn exited with {status}; its output:\n{}",
                self.log_text()
            );
        }
        Ok(())
    }

    /// systemd-nspawn's own output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The container's PID 1, as the host sees it.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// `program` run inside the container (its mount, PID, IPC, UTS and cgroup namespaces) as
    /// root, with a clean environment, killed if it runs longer than [`COMMAND_TIMEOUT`].
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.leader))
            .args(["--mount", "--uts", "--ipc", "--pid", "--cgroup", "--"])
            .args(["timeout", "--kill-after=5"])
            .arg(COMMAND_TIMEOUT.as_secs().to_string())
            .args(["env", "-i"])
            .arg(format!("PATH={PATH}"))
            .args([
                "LANG=C.UTF-8",
                "SYSTEMD_COLORS=0",
                "SYSTEMD_PAGER=",
                "TERM=dumb",
            ])
            .arg(program)
            .stdin(Stdio::null());
        cmd
    }

    /// `program` run inside the container as `uid`:`uid` with no supplementary groups.
    pub fn command_as(&self, uid: u32, program: &str) -> Command {
        let mut cmd = self.command("setpriv");
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(program);
        cmd
    }

    /// stdout of `program ARGS` run inside as root; an error with its output if it fails.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> Result<String> {
        run_ok(self.command(program).args(args))
    }

    /// One property of a unit (`systemctl show -P`).
    pub fn show(&self, unit: &str, property: &str) -> Result<String> {
        Ok(self
            .run_ok("systemctl", &["show", "-P", property, unit])?
            .trim()
            .to_string())
    }

    /// A unit's ActiveState.
    pub fn active_state(&self, unit: &str) -> Result<String> {
        self.show(unit, "ActiveState")
    }

    /// Waits until `unit`'s ActiveState is `state`.
    pub fn wait_state(&self, unit: &str, state: &str, timeout: Duration) -> Result<Duration> {
        let (_, took) = wait_for(&format!("{unit} to be {state}"), timeout, || {
            Ok((self.active_state(unit)? == state).then_some(()))
        })?;
        Ok(took)
    }

    /// The journal entries of `unit` (`journalctl -u UNIT -o json`), oldest first.
    pub fn journal(&self, unit: &str) -> Result<Vec<Value>> {
        let out = self.run_ok(
            "journalctl",
            &["--no-pager", "--output=json", "--unit", unit],
        )?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("Parsing {l}")))
            .collect()
    }

    /// A path inside the container, as the host reaches it (`/proc/<leader>/root/...`).
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(inside.trim_start_matches('/'))
    }

    /// Halts the container (SIGTERM to nspawn: systemd shuts down), waiting at most `timeout`,
    /// then kills what is left. Returns how long the halt took, if it finished in time.
    pub fn halt(&mut self, timeout: Duration) -> Option<Duration> {
        let mut child = self.nspawn.take()?;
        let start = Instant::now();
        // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let mut took = None;
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = child.try_wait() {
                took = Some(start.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if took.is_none() {
            // The container's PID 1 dying kills every process in its PID namespace.
            if self.leader > 0 {
                // SAFETY: as above; the leader is a process of the container we started.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(self.leader as libc::pid_t, libc::SIGKILL);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // nspawn refuses to remove this directory when /run is not a tmpfs (as on this kind of
        // machine, whose init is not systemd) and says so; it is empty and ours.
        let propagate = Path::new("/run/systemd/nspawn/propagate").join(&self.machine);
        if propagate.exists()
            && let Err(e) = std::fs::remove_dir_all(&propagate)
        {
            report(&format!("Removing {}, ignoring: {e}", propagate.display()));
        }
        took
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.halt(Duration::from_secs(20));
    }
}

/// Has the kernel send SIGTERM (nspawn: halt the container) to the command when the thread that
/// started it dies, so a test process that is killed leaves no container behind.
#[allow(unsafe_code)]
fn halt_when_parent_dies(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes one async-signal-safe
    // system call.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The child of `parent` that runs systemd (nspawn's container init), if it has started.
fn systemd_child(parent: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{parent}/task")).ok()?;
    for task in tasks.filter_map(|t| t.ok()) {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "systemd" {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let text = "# c\n[Unit]\nDescription=x y\n\n[Service]\nExecStart=-/usr/bin/a --b\n";
        assert_eq!(
            unit_value(text, "Unit", "Description").as_deref(),
            Some("x y")
        );
        assert_eq!(
            unit_value(text, "Service", "ExecStart").as_deref(),
            Some("-/usr/bin/a --b")
        );
        assert_eq!(unit_value(text, "Unit", "ExecStart"), None);
        let cases = [
            ("a.socket", "a.service"),
            ("a.timer", "a.service"),
            ("a.service", "a.service"),
        ];
        for (unit, service) in cases {
            assert_eq!(service_of(unit), service);
        }
        assert_eq!(
            exposure_score("x\n→ Overall exposure level for a.service: 1.6 OK 🙂\n"),
            Some(1.6)
        );
    }
}
