//! Running a tool as a cancellable child process: its own process group (killed as a whole on
//! cancel), stdout read line by line while it runs, stderr collected. The modules that own a
//! tool (`dnf`, `rpm`, `sandbox`, `rpmdb`) build the commands; this one only runs them.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ostree_ext::gio;
use ostree_ext::prelude::*;

/// Cancellation shared by a build and whoever cancels it: a flag the build checks between
/// steps and child processes poll, and a `GCancellable` for ostree.
#[derive(Debug, Clone)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    cancellable: gio::Cancellable,
}

impl Default for Cancel {
    fn default() -> Self {
        Self::new()
    }
}

impl Cancel {
    /// Not cancelled yet.
    pub fn new() -> Self {
        Cancel {
            flag: Arc::new(AtomicBool::new(false)),
            cancellable: gio::Cancellable::new(),
        }
    }

    /// Asks everything holding a clone to stop.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.cancellable.cancel();
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The `GCancellable` to hand to ostree.
    pub fn cancellable(&self) -> &gio::Cancellable {
        &self.cancellable
    }
}

/// What a finished tool left.
#[derive(Debug, Clone)]
pub struct Output {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Output {
    /// stdout and stderr together, for messages.
    pub fn text(&self) -> String {
        let (out, err) = (self.stdout.trim(), self.stderr.trim());
        match (out.is_empty(), err.is_empty()) {
            (true, _) => err.to_string(),
            (false, true) => out.to_string(),
            (false, false) => format!("{out}\n{err}"),
        }
    }
}

/// Why a tool did not run to its end.
#[derive(Debug)]
pub enum RunError {
    /// Cancelled: the process group was killed.
    Cancelled,
    /// It could not be started or waited for.
    Io(String, std::io::Error),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Cancelled => write!(f, "Cancelled"),
            RunError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

const POLL: Duration = Duration::from_millis(50);

/// Runs `cmd` to its end (stdin empty), calling `on_line` with each stdout line as it comes;
/// kills its whole process group when `cancel` is cancelled.
pub fn run(
    mut cmd: Command,
    cancel: &Cancel,
    on_line: &mut dyn FnMut(&str),
) -> Result<Output, RunError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if cancel.is_cancelled() {
        return Err(RunError::Cancelled);
    }
    tracing::debug!("Running {cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| RunError::Io(format!("Starting {program}"), e))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        return Err(RunError::Io(
            format!("Reading the output of {program}"),
            std::io::Error::other("no pipe"),
        ));
    };
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut stderr = stderr;
        // A read error ends what we keep of stderr; the exit status still tells.
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    let pid = rustix::process::Pid::from_child(&child);
    let mut stdout_text = String::new();
    let mut take = |line: String, on_line: &mut dyn FnMut(&str)| {
        on_line(&line);
        stdout_text.push_str(&line);
        stdout_text.push('\n');
    };
    let status = loop {
        match rx.recv_timeout(POLL) {
            Ok(line) => take(line, on_line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if cancel.is_cancelled() {
            if let Err(e) = rustix::process::kill_process_group(pid, rustix::process::Signal::Kill)
            {
                tracing::debug!("Killing {program}, ignoring: {e}");
            }
            if let Err(e) = child.wait() {
                tracing::debug!("Reaping {program}, ignoring: {e}");
            }
            return Err(RunError::Cancelled);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(RunError::Io(format!("Waiting for {program}"), e)),
        }
    };
    if out_thread.join().is_err() {
        tracing::debug!("The stdout reader of {program} panicked");
    }
    for line in rx.try_iter() {
        take(line, on_line);
    }
    let stderr = err_thread.join().unwrap_or_default();
    tracing::debug!("{program} exited with {status}");
    Ok(Output {
        status,
        stdout: stdout_text,
        stderr,
    })
}

/// Runs `cmd` without streaming; see [`run`].
pub fn output(cmd: Command, cancel: &Cancel) -> Result<Output, RunError> {
    run(cmd, cancel, &mut |_| {})
}

/// The first line `program --version` prints, if it runs.
pub fn version_line(program: &str) -> Option<String> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = if text.trim().is_empty() {
        String::from_utf8_lossy(&out.stderr).into_owned()
    } else {
        text.into_owned()
    };
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_stdout_and_collects_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two; echo oops >&2; exit 3"]);
        let mut lines = Vec::new();
        let out = run(cmd, &Cancel::new(), &mut |l| lines.push(l.to_string())).expect("runs");
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(out.stdout, "one\ntwo\n");
        assert_eq!(out.stderr, "oops\n");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.text(), "one\ntwo\noops");
    }

    #[test]
    fn cancel_kills_the_process_group() {
        let cancel = Cancel::new();
        let c = cancel.clone();
        let start = std::time::Instant::now();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.cancel();
        });
        let mut cmd = Command::new("sh");
        // A grandchild holding stdout open would keep a plain kill from ending the read.
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let result = output(cmd, &cancel);
        assert!(matches!(result, Err(RunError::Cancelled)), "{result:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        killer.join().expect("joins");
        assert!(cancel.cancellable().is_cancelled());
    }
}
