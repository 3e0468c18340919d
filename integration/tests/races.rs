//! Changes that meet, through `dnf-image`: two commands changing the deployments at once (the
//! lost update of issue 10: an `upgrade` and an `install` started together), the upgrade timer
//! losing such a race, and the deployer going away in the middle of a call. Real services, a
//! real registry, package repository and sysroot. The order of events is the test's, not the
//! clock's: a service is stopped (SIGSTOP) so that a command waits on it, and the test acts
//! on a line the command prints; services are killed with SIGKILL.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use dnfimage_integration::host::Host;
use dnfimage_integration::sysroot::{STATEROOT, TestSysroot};
use dnfimage_integration::{Scratch, ServiceProcess, deploy_support, raw_call};
use dnfimage_interfaces::deployer::{self, StatusReply};
use dnfimage_testimage::rpms::packages;
use dnfimage_testimage::{Fixtures, tags};
use serde_json::{Value, json};

/// What a refused change says (`StateChanged`, as the CLI words it).
const STATE_CHANGED: &str = "The deployments changed while this command ran";
/// What a change refused because another one runs says (`AlreadyInProgress`).
const BUSY: &str = "Busy: ";
/// Only a guard against a test that would hang for ever; nothing waits on it.
const HANG: Duration = Duration::from_secs(600);

/// Which output a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// A `dnf-image` command running in the background, its output read line by line as it comes.
struct Running {
    child: Child,
    lines: mpsc::Receiver<(Stream, String)>,
    stdout: String,
    stderr: String,
}

/// How a command ended.
#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    stderr: String,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("Starting dnf-image")?;
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        for (stream, pipe) in [
            (Stream::Stdout, Box::new(out) as Box<dyn Read + Send>),
            (Stream::Stderr, Box::new(err)),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send((stream, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            child,
            lines,
            stdout: String::new(),
            stderr: String::new(),
        })
    }

    /// Waits for the first line on `stream` that contains `text`; returns it.
    fn wait_line(&mut self, stream: Stream, text: &str) -> Result<String> {
        loop {
            let (from, line) = self.lines.recv_timeout(HANG).with_context(|| {
                format!(
                    "no {stream:?} line with {text:?}; stdout:\n{}\nstderr:\n{}",
                    self.stdout, self.stderr
                )
            })?;
            self.keep(from, &line);
            if from == stream && line.contains(text) {
                return Ok(line);
            }
        }
    }

    fn keep(&mut self, from: Stream, line: &str) {
        let all = match from {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        all.push_str(line);
        all.push('\n');
    }

    /// Waits for the command to end; its whole output.
    fn finish(mut self) -> Result<Finished> {
        let status = self.child.wait()?;
        // The readers end with the pipes; every line is in the channel by then.
        while let Ok((from, line)) = self.lines.recv_timeout(HANG) {
            self.keep(from, &line);
        }
        Ok(Finished {
            status,
            stderr: self.stderr,
        })
    }
}

fn packages_of(d: &Value) -> Vec<String> {
    d["layering"]["packages"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// (version, layered packages) of the deployment that boots next.
fn next_boot(host: &Host) -> Result<(String, Vec<String>)> {
    let deps = host.deployments()?;
    let d = deps.first().context("no deployment")?;
    Ok((
        d["version"].as_str().unwrap_or_default().to_string(),
        packages_of(d),
    ))
}

/// The race of issue 10, as it happens: `upgrade` (v1 → v2) and `install dnfimage-hello`
/// started together on a v1 sysroot. Both may succeed only if the second built on the first's
/// result (v2 with the package); otherwise exactly one is refused, saying so, and the other's
/// result boots next. Never both "succeeded" with one of them missing.
#[test]
fn upgrade_and_install_started_together_lose_nothing_silently() -> Result<()> {
    let host = Host::with_layerer()?;
    host.ok(&["rebase", &host.latest])?;
    host.publish(tags::BASE_V2)?;

    let upgrade = Running::spawn(host.cli().arg("upgrade"))?;
    let install = Running::spawn(host.cli().args(["install", packages::HELLO]))?;
    let (upgrade, install) = (upgrade.finish()?, install.finish()?);
    let (version, packages) = next_boot(&host)?;
    let hello = vec![packages::HELLO.to_string()];
    let refused = |f: &Finished| f.stderr.contains(STATE_CHANGED) || f.stderr.contains(BUSY);
    match (upgrade.status.success(), install.status.success()) {
        (true, true) => {
            eprintln!("both applied, one after the other");
            assert_eq!((version.as_str(), packages), ("2", hello));
        }
        (true, false) => {
            eprintln!("the install was refused:\n{}", install.stderr);
            assert!(refused(&install), "{install:?}");
            assert_eq!((version.as_str(), packages), ("2", vec![]));
        }
        (false, true) => {
            eprintln!("the upgrade was refused:\n{}", upgrade.stderr);
            assert!(refused(&upgrade), "{upgrade:?}");
            assert_eq!((version.as_str(), packages), ("1", hello));
        }
        (false, false) => anyhow::bail!("both failed:\n{upgrade:?}\n{install:?}"),
    }
    host.sysroot.fsck()?;
    Ok(())
}

/// The same race with its order fixed: the importer is stopped (SIGSTOP), so an upgrade that
/// has read the deployments and fetched v2 waits on it, while a user's command that needs no
/// importer runs to its end; then the importer goes on. The upgrade, prepared on the old
/// deployments, is refused with `StateChanged` and changes nothing: run by the timer it exits
/// with 75 and says the timer tries again, run by a user it says to run it again, and run again
/// it applies on the new state.
#[test]
fn the_change_prepared_on_old_deployments_is_refused_and_the_timer_retries() -> Result<()> {
    let host = Host::with_layerer()?;
    host.ok(&["rebase", &host.latest])?;
    host.publish(tags::BASE_V2)?;
    let config = host.scratch.path().join("dnfimage.conf");
    std::fs::write(&config, "[upgrade]\npolicy = \"stage\"\n")?;
    let importer = &host.services[1];

    // The timer has read the deployments and fetched v2 when a user installs a package.
    importer.signal(libc::SIGSTOP);
    let mut timer = Running::spawn(
        host.cli()
            .args(["upgrade", "--auto"])
            .env("DNFIMAGE_CONFIG", &config),
    )?;
    timer.wait_line(Stream::Stderr, "Fetched ")?;
    host.ok(&["install", packages::HELLO])?;
    let installed = host.deployments()?;
    importer.signal(libc::SIGCONT);
    let out = timer.finish()?;
    eprintln!("the timer said:\n{}", out.stderr);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(out.stderr.contains(STATE_CHANGED), "{}", out.stderr);
    // What changed: the deployment it would now start from has the package.
    assert!(
        out.stderr.contains(&format!("with {}", packages::HELLO)),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("dnfimage-upgrade.timer tries again at its next run"),
        "{}",
        out.stderr
    );
    assert_eq!(host.deployments()?, installed, "the refused upgrade wrote");
    assert_eq!(
        next_boot(&host)?,
        ("1".to_string(), vec![packages::HELLO.to_string()])
    );

    // A user's upgrade, the same way, while the package is uninstalled.
    importer.signal(libc::SIGSTOP);
    let mut upgrade = Running::spawn(host.cli().arg("upgrade"))?;
    upgrade.wait_line(Stream::Stderr, "Fetched ")?;
    host.ok(&["uninstall", packages::HELLO])?;
    let uninstalled = host.deployments()?;
    importer.signal(libc::SIGCONT);
    let out = upgrade.finish()?;
    eprintln!("the upgrade said:\n{}", out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains(STATE_CHANGED), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("Nothing was changed; run the command again."),
        "{}",
        out.stderr
    );
    assert_eq!(
        host.deployments()?,
        uninstalled,
        "the refused upgrade wrote"
    );
    assert_eq!(next_boot(&host)?, ("1".to_string(), vec![]));

    // Run again, it applies on what is there now: both changes are in.
    host.ok(&["upgrade"])?;
    assert_eq!(next_boot(&host)?, ("2".to_string(), vec![]));
    host.sysroot.fsck()?;
    Ok(())
}

/// A sysroot with one deployment of a commit slow to check out (so that `kargs`, which deploys
/// it again, is still checking it out when the test acts), served by a deployer.
struct SlowSysroot {
    deployer: ServiceProcess,
    sysroot: TestSysroot,
    scratch: Scratch,
}

impl SlowSysroot {
    /// With `listener`, the deployer is socket-activated on it (see
    /// [`ServiceProcess::activated`]); else it binds its socket itself.
    fn new(scratch: Scratch, listener: Option<&std::os::unix::net::UnixListener>) -> Result<Self> {
        let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
        let args = [OsStr::new("--sysroot"), sysroot.path().as_os_str()];
        let deployer = match listener {
            Some(l) => {
                ServiceProcess::activated(&scratch, "deployer", deployer::INTERFACE, l, &args)?
            }
            None => ServiceProcess::start(&scratch, "deployer", deployer::INTERFACE, &args)?,
        };
        let s = Self {
            deployer,
            sysroot,
            scratch,
        };
        let v1 = deploy_support::import(
            &s.sysroot.repo(),
            &Fixtures::shared()?.oci_ref(tags::BASE_V1),
        )?;
        let slow = deploy_support::commit_with_many_files(
            &s.sysroot.repo(),
            s.scratch.path(),
            &v1.commit,
            60,
            50,
        )?;
        let replies = raw_call(
            &s.scratch.socket(deployer::INTERFACE),
            &json!({"method": "org.dnfimage.Deployer.Deploy", "more": true, "parameters": {
                "commit": slow, "image": "docker://registry.example/dnfimage/base:v1",
                "stateroot": STATEROOT}}),
        )?;
        let last = replies.last().context("no reply")?;
        anyhow::ensure!(last.get("error").is_none(), "{replies:?}");
        Ok(s)
    }

    fn status(&self) -> Result<StatusReply> {
        let replies = raw_call(
            &self.scratch.socket(deployer::INTERFACE),
            &json!({"method": "org.dnfimage.Deployer.Status"}),
        )?;
        Ok(serde_json::from_value(replies[0]["parameters"].clone())?)
    }

    /// `dnf-image kargs --append …`, running.
    fn kargs(&self) -> Result<Running> {
        Running::spawn(
            self.scratch
                .cli()
                .arg("--sysroot")
                .arg(self.sysroot.path())
                .args(["kargs", "--append", "dnfimage.test=1"]),
        )
    }

    fn start_deployer(&mut self) -> Result<()> {
        self.deployer = ServiceProcess::start(
            &self.scratch,
            "deployer",
            deployer::INTERFACE,
            &[OsStr::new("--sysroot"), self.sysroot.path().as_os_str()],
        )?;
        Ok(())
    }
}

/// Waits until every thread of process `pid` is stopped (SIGSTOP took effect).
fn wait_stopped(pid: u32) -> Result<()> {
    let deadline = std::time::Instant::now() + HANG;
    loop {
        let mut all = true;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
            // "PID (COMM) STATE …": the state follows the last ')'.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            all &= state.is_some_and(|s| s.starts_with(['T', 't']));
        }
        if all {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{pid} never stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
}

const STOPPED: &str =
    "The deployer (org.dnfimage.Deployer) stopped while changing the kernel arguments: ";

/// The deployer is killed in the middle of a change and started again, as systemd does on the
/// next connection to its socket: the CLI says which service stopped, reads the deployments
/// again and says whether they changed, and to run the command again. What it says is true.
#[test]
fn cli_says_the_deployer_stopped_and_whether_the_deployments_changed() -> Result<()> {
    let scratch = Scratch::new()?;
    let listener = std::os::unix::net::UnixListener::bind(scratch.socket(deployer::INTERFACE))?;
    let mut s = SlowSysroot::new(scratch, Some(&listener))?;
    let before = s.status()?;

    let mut kargs = s.kargs()?;
    // The deploy has started: it streamed its first progress record.
    kargs.wait_line(Stream::Stderr, "Deploying: ")?;
    s.deployer.kill();
    s.deployer = ServiceProcess::activated(
        &s.scratch,
        "deployer",
        deployer::INTERFACE,
        &listener,
        &[OsStr::new("--sysroot"), s.sysroot.path().as_os_str()],
    )?;
    let out = kargs.finish()?;
    assert!(!out.status.success(), "{out:?}");
    let stderr = out.stderr;
    eprintln!("dnf-image said:\n{stderr}");
    assert!(stderr.contains(STOPPED), "{stderr}");
    assert!(stderr.contains("Run the command again."), "{stderr}");
    assert!(!stderr.contains("Reading progress"), "{stderr}");
    let after = s.status()?;
    if stderr.contains(&format!("{STOPPED}the deployments were not changed.")) {
        assert_eq!(after.deployments, before.deployments);
    } else {
        assert!(
            stderr.contains(&format!("{STOPPED}the deployments changed: ")),
            "{stderr}"
        );
        assert_ne!(after.deployments, before.deployments);
        // The new one, named "STATEROOT/COMMIT.SERIAL" with the commit shortened.
        let new = &after.deployments[0];
        let short = format!("{}/{}.{}", new.stateroot, &new.commit[..12], new.serial);
        assert!(stderr.contains(&format!("{short} (")), "{stderr}");
    }
    // The command run again completes.
    let again = s.kargs()?.finish()?;
    assert!(again.status.success(), "{again:?}");
    assert!(
        s.status()?.deployments[0]
            .kernel_arguments
            .contains(&"dnfimage.test=1".to_string())
    );
    s.sysroot.fsck()?;
    Ok(())
}

/// The deployer is killed in the middle of a change and does not come back: the CLI says which
/// service stopped, that the deployments were not changed when it had not reported writing the
/// boot entries, and to run the command again.
#[test]
fn cli_says_the_deployer_stopped_before_writing_when_it_does_not_come_back() -> Result<()> {
    let mut s = SlowSysroot::new(Scratch::new()?, None)?;
    let before = s.status()?;

    let log_start = s.deployer.log_text().len();
    let mut kargs = s.kargs()?;
    kargs.wait_line(Stream::Stderr, "Deploying: ")?;
    // Stopped first, to read how far it got: its log has every progress record it sent.
    s.deployer.signal(libc::SIGSTOP);
    wait_stopped(s.deployer.pid())?;
    let reached_writing = s.deployer.log_text()[log_start..].contains("Writing the boot entries");
    s.deployer.kill();
    let out = kargs.finish()?;
    assert!(!out.status.success(), "{out:?}");
    let stderr = out.stderr;
    eprintln!("dnf-image said:\n{stderr}");
    assert!(stderr.contains(STOPPED), "{stderr}");
    assert!(stderr.contains("Run the command again."), "{stderr}");
    assert!(!stderr.contains("Reading progress"), "{stderr}");

    s.start_deployer()?;
    if reached_writing {
        // The deploy outran the test: the CLI may or may not have seen that record.
        eprintln!("the deployer had started writing the boot entries when it was stopped");
    } else {
        assert!(
            stderr.contains(&format!(
                "{STOPPED}it had not started writing the boot entries, so the deployments were \
                 not changed"
            )),
            "{stderr}"
        );
        assert_eq!(s.status()?.deployments, before.deployments);
    }
    let again = s.kargs()?.finish()?;
    assert!(again.status.success(), "{again:?}");
    s.sysroot.fsck()?;
    Ok(())
}
