//! A qemu guest driven over its serial console (software emulation: `-accel tcg -cpu max`; KVM
//! here is PVM and hangs stock kernels). A thread reads the console until qemu exits, so a full
//! pipe never stalls the guest; everything it read goes to a log file too, and errors carry the
//! console's tail.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The firmware a guest boots with: OVMF (UEFI), which starts the disk's own bootloader.
pub struct Firmware {
    /// `OVMF_CODE*.fd`, read-only.
    pub code: PathBuf,
    /// A writable copy of `OVMF_VARS*.fd`: the machine's NVRAM, kept across its boots.
    pub vars: PathBuf,
}

/// A disk attached as virtio.
pub struct Drive {
    pub path: PathBuf,
    pub format: &'static str,
    pub read_only: bool,
}

/// A running guest.
pub struct Vm {
    name: String,
    child: Child,
    stdin: ChildStdin,
    console: Arc<Mutex<Vec<u8>>>,
    /// Bytes of `console` already consumed by `wait_for`.
    seen: usize,
    log: PathBuf,
    started: Instant,
}

impl Vm {
    /// Starts qemu with `firmware` and `drives`, logging the console to `log`; `extra`: more
    /// qemu arguments (a network device, say; none gives the guest no network).
    pub fn start(
        name: &str,
        firmware: &Firmware,
        drives: &[Drive],
        memory_mib: u32,
        log: &Path,
        extra: &[String],
    ) -> Result<Self> {
        // setpriv: qemu dies with the test process, even when that is killed.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "qemu-system-x86_64"]);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m"])
            .arg(memory_mib.to_string())
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .args(["-device", "virtio-rng-pci"]);
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,readonly=on,file={}",
            firmware.code.display()
        ));
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,file={}",
            firmware.vars.display()
        ));
        for d in drives {
            cmd.arg("-drive").arg(format!(
                "file={},if=virtio,format={}{}",
                d.path.display(),
                d.format,
                if d.read_only { ",readonly=on" } else { "" }
            ));
        }
        cmd.args(extra);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .context("Starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("qemu has no stdin"))?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut logfile =
            std::fs::File::create(log).with_context(|| format!("Creating {}", log.display()))?;
        for (stream, prefix) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                "",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                "[qemu] ",
            ),
        ] {
            let Some(mut stream) = stream else { continue };
            let console = Arc::clone(&console);
            let mut logfile = logfile.try_clone().context("Cloning the log file")?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let _ = logfile.write_all(prefix.as_bytes());
                            let _ = logfile.write_all(&buf[..n]);
                            if let Ok(mut c) = console.lock() {
                                c.extend_from_slice(prefix.as_bytes());
                                c.extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                }
            });
        }
        logfile.flush().ok();
        Ok(Vm {
            name: name.to_string(),
            child,
            stdin,
            console,
            seen: 0,
            log: log.to_path_buf(),
            started: Instant::now(),
        })
    }

    /// Seconds since qemu started.
    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The console's last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn text(&self) -> String {
        self.console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default()
    }

    fn fail(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "{}: {what} (after {:.0} s; console log {}); console tail:\n{}",
            self.name,
            self.uptime(),
            self.log.display(),
            self.tail(40)
        )
    }

    /// Waits until the console, after what earlier waits consumed, contains `needle`; returns
    /// the text before it and consumes through it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_any(&[needle], timeout).map(|(_, before)| before)
    }

    /// Types `line` and Enter.
    pub fn send(&mut self, line: &str) -> Result<()> {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| self.fail(&format!("writing to the console: {e}")))
    }

    /// Waits for the first of `needles`; returns its index and the text before it.
    pub fn wait_any(&mut self, needles: &[&str], timeout: Duration) -> Result<(usize, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let c = self
                    .console
                    .lock()
                    .map_err(|_| anyhow!("console lock poisoned"))?;
                let hay = &c[self.seen.min(c.len())..];
                let first = needles
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| find(hay, n.as_bytes()).map(|pos| (pos, i)))
                    .min();
                if let Some((pos, i)) = first {
                    let before = String::from_utf8_lossy(&hay[..pos]).into_owned();
                    self.seen += pos + needles[i].len();
                    return Ok((i, before));
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.fail(&format!(
                    "qemu exited ({status}) while waiting for {needles:?}"
                )));
            }
            if Instant::now() > deadline {
                return Err(self.fail(&format!(
                    "timed out after {timeout:?} waiting for {needles:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Logs in on the serial console and becomes root with `sudo -i`; the shell then prints no
    /// prompt and no echo, for `sh`. The getty may ask before cloud-init has set the password:
    /// "Login incorrect" is retried until `timeout`.
    pub fn login(&mut self, user: &str, password: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        self.wait_for("login: ", left())?;
        loop {
            self.send(user)?;
            self.wait_for("Password: ", Duration::from_secs(60).min(left()))?;
            self.send(password)?;
            let (i, _) = self.wait_any(
                &["$ ", "Login incorrect"],
                Duration::from_secs(120).min(left()),
            )?;
            if i == 0 {
                break;
            }
            self.wait_for("login: ", left())?;
            std::thread::sleep(Duration::from_secs(10));
        }
        self.send("sudo -i")?;
        self.wait_for("# ", Duration::from_secs(60))?;
        self.send(
            "stty -echo; dmesg -n 1; export PS1= SYSTEMD_PAGER= SYSTEMD_COLORS=0 TERM=dumb COLUMNS=200",
        )?;
        self.sh("true", Duration::from_secs(60))?;
        Ok(())
    }

    /// Runs `command` in the root shell; returns its exit code and output.
    pub fn sh_status(&mut self, command: &str, timeout: Duration) -> Result<(i32, String)> {
        // The marker is split in the command so that an echo of it never matches.
        // Through a pipe, so that programs see no terminal (no progress bars); bash's PIPESTATUS
        // keeps the command's own exit code.
        self.send(&format!(
            "{{ {command} ; }} </dev/null 2>&1 | cat; echo \"@@RC\"\"=${{PIPESTATUS[0]}}@@\""
        ))?;
        let out = self.wait_for("@@RC=", timeout)?;
        let rest = self.wait_for("@@", Duration::from_secs(10))?;
        let rc = rest
            .trim()
            .parse()
            .map_err(|_| self.fail(&format!("bad exit code marker {rest:?}")))?;
        Ok((rc, out.trim_start_matches(['\r', '\n']).replace('\r', "")))
    }

    /// Runs `command`; fails unless it exits 0.
    pub fn sh(&mut self, command: &str, timeout: Duration) -> Result<String> {
        let (rc, out) = self.sh_status(command, timeout)?;
        if rc != 0 {
            bail!(
                "{}: `{command}` exited {rc}:\n{out}\n(console log {})",
                self.name,
                self.log.display()
            );
        }
        Ok(out)
    }

    /// Waits for qemu to exit (after `systemctl reboot` or `poweroff`; qemu runs with
    /// `-no-reboot`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("Waiting for qemu")? {
                if !status.success() {
                    return Err(self.fail(&format!("qemu exited with {status}")));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.fail(&format!("guest did not shut down within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds() {
        assert_eq!(super::find(b"abc@@RC=0@@", b"@@RC="), Some(3));
        assert_eq!(super::find(b"abc", b"x"), None);
    }
}
