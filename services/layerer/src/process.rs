//! Running a tool as a cancellable child process: its own process group (killed as a whole on
//! cancel), stdout and stderr read line by line while it runs, and of each only what a message
//! needs kept (its first and last 64 KiB) unless the output is data to parse. The modules that
//! own a tool (`dnf`, `rpm`, `sandbox`, `rpmdb`) build the commands; this one only runs them.

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

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How much of a stream's output is kept for messages: its first and its last
/// [`MESSAGE_END`] bytes (a scriptlet may print without end; what it printed first and why it
/// stopped are what a person needs).
pub const MESSAGE_END: usize = 64 * 1024;
/// How much stdout of a tool whose output is read as data (package lists, signature checks)
/// is kept: more fails the run rather than being parsed in part.
pub const DATA_LIMIT: usize = 16 << 20;
/// Lines longer than this reach the line callback in pieces of this length.
pub const MAX_LINE: usize = 64 * 1024;

/// What is kept of one output stream: its first `head` bytes and its last `tail` bytes, and
/// how many were left out between them.
#[derive(Debug, Clone)]
pub struct Capture {
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    head_max: usize,
    tail_max: usize,
    omitted: u64,
}

impl Capture {
    /// Keeps the first `head` and the last `tail` bytes.
    pub fn new(head: usize, tail: usize) -> Self {
        Capture {
            head: Vec::new(),
            tail: std::collections::VecDeque::new(),
            head_max: head,
            tail_max: tail,
            omitted: 0,
        }
    }

    /// Appends `bytes`.
    pub fn push(&mut self, bytes: &[u8]) {
        let to_head = bytes.len().min(self.head_max - self.head.len());
        self.head.extend_from_slice(&bytes[..to_head]);
        let rest = &bytes[to_head..];
        // Only the last `tail_max` bytes of `rest` can stay.
        let skipped = rest.len().saturating_sub(self.tail_max);
        self.tail.extend(&rest[skipped..]);
        let excess = self.tail.len().saturating_sub(self.tail_max);
        self.tail.drain(..excess);
        self.omitted += (skipped + excess) as u64;
    }

    /// How many bytes were left out.
    pub fn omitted(&self) -> u64 {
        self.omitted
    }

    /// What was kept, as text (invalid UTF-8 replaced), with a line saying how much was left
    /// out where it was.
    pub fn text(&self) -> String {
        let head = String::from_utf8_lossy(&self.head);
        let (front, back) = self.tail.as_slices();
        let tail = String::from_utf8_lossy(&[front, back].concat()).into_owned();
        if self.omitted == 0 {
            return format!("{head}{tail}");
        }
        let (before, after) = (
            if head.ends_with('\n') { "" } else { "\n" },
            if tail.starts_with('\n') { "" } else { "\n" },
        );
        format!(
            "{head}{before}[… {} bytes omitted …]{after}{tail}",
            self.omitted
        )
    }
}

/// What a finished tool left.
#[derive(Debug, Clone)]
pub struct Output {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it wrote to stdout: everything, or for a tool whose output only makes messages its
    /// first and last [`MESSAGE_END`] bytes (see [`Capture::text`]).
    pub stdout: String,
    /// What it wrote to stderr: its first and last [`MESSAGE_END`] bytes.
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
    /// It printed more than is read of its output (the program, the limit in bytes).
    TooMuchOutput(String, usize),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Cancelled => write!(f, "Cancelled"),
            RunError::Io(what, e) => write!(f, "{what}: {e}"),
            RunError::TooMuchOutput(program, limit) => {
                write!(f, "{program} printed more than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for RunError {}

const POLL: Duration = Duration::from_millis(50);
/// Lines waiting for the loop that takes them: a tool printing faster than that waits.
const QUEUED_LINES: usize = 256;

/// Sends the lines of `pipe` (split at [`MAX_LINE`], newline kept) to `tx` until it closes.
fn read_lines(
    pipe: impl Read,
    stream: Stream,
    tx: &std::sync::mpsc::SyncSender<(Stream, Vec<u8>)>,
) {
    let mut reader = BufReader::new(pipe);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => break,
            Ok(_) => {
                if tx.send((stream, line)).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A read error ends what we keep; the exit status still tells.
            Err(_) => break,
        }
    }
}

/// Runs `cmd` to its end (stdin empty), calling `on_line` with each line of stdout and stderr
/// as it comes (lines longer than [`MAX_LINE`] in pieces, invalid UTF-8 replaced); keeps the
/// first and last [`MESSAGE_END`] bytes of each stream; kills its whole process group when
/// `cancel` is cancelled.
pub fn run(
    cmd: Command,
    cancel: &Cancel,
    on_line: &mut dyn FnMut(Stream, &str),
) -> Result<Output, RunError> {
    run_capturing(cmd, cancel, Capture::new(MESSAGE_END, MESSAGE_END), on_line).map(|(o, _)| o)
}

/// Runs `cmd` without streaming, keeping its stdout whole (up to [`DATA_LIMIT`] bytes, else
/// [`RunError::TooMuchOutput`]) to be read as data; see [`run`].
pub fn output(cmd: Command, cancel: &Cancel) -> Result<Output, RunError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let (out, omitted) = run_capturing(cmd, cancel, Capture::new(DATA_LIMIT, 0), &mut |_, _| {})?;
    if omitted > 0 {
        return Err(RunError::TooMuchOutput(program, DATA_LIMIT));
    }
    Ok(out)
}

/// [`run`] keeping stdout in `stdout`; also returns how many bytes of stdout were left out.
fn run_capturing(
    mut cmd: Command,
    cancel: &Cancel,
    mut stdout_kept: Capture,
    on_line: &mut dyn FnMut(Stream, &str),
) -> Result<(Output, u64), RunError> {
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
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Stream, Vec<u8>)>(QUEUED_LINES);
    let err_tx = tx.clone();
    let out_thread = std::thread::spawn(move || read_lines(stdout, Stream::Stdout, &tx));
    let err_thread = std::thread::spawn(move || read_lines(stderr, Stream::Stderr, &err_tx));
    let pid = rustix::process::Pid::from_child(&child);
    let mut stderr_kept = Capture::new(MESSAGE_END, MESSAGE_END);
    let mut take = |(stream, bytes): (Stream, Vec<u8>)| {
        match stream {
            Stream::Stdout => stdout_kept.push(&bytes),
            Stream::Stderr => stderr_kept.push(&bytes),
        }
        let line = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        on_line(stream, &String::from_utf8_lossy(line));
    };
    let kill = |child: &mut std::process::Child| {
        if let Err(e) = rustix::process::kill_process_group(pid, rustix::process::Signal::Kill) {
            tracing::debug!("Killing {program}, ignoring: {e}");
        }
        if let Err(e) = child.wait() {
            tracing::debug!("Reaping {program}, ignoring: {e}");
        }
    };
    let mut status = None;
    // Until the tool has exited and both pipes are closed (by it and whatever it started).
    loop {
        match rx.recv_timeout(POLL) {
            Ok(line) => take(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if status.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if cancel.is_cancelled() {
            if status.is_none() {
                kill(&mut child);
            } else if let Err(e) =
                rustix::process::kill_process_group(pid, rustix::process::Signal::Kill)
            {
                tracing::debug!("Killing what {program} left, ignoring: {e}");
            }
            return Err(RunError::Cancelled);
        }
        if status.is_none() {
            match child.try_wait() {
                Ok(Some(s)) => status = Some(s),
                Ok(None) => {}
                Err(e) => return Err(RunError::Io(format!("Waiting for {program}"), e)),
            }
        }
    }
    let status = status.expect("the loop ends only once the tool exited");
    for thread in [out_thread, err_thread] {
        if thread.join().is_err() {
            tracing::debug!("An output reader of {program} panicked");
        }
    }
    tracing::debug!("{program} exited with {status}");
    let omitted = stdout_kept.omitted();
    Ok((
        Output {
            status,
            stdout: stdout_kept.text(),
            stderr: stderr_kept.text(),
        },
        omitted,
    ))
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
        let out = run(cmd, &Cancel::new(), &mut |s, l| {
            lines.push((s, l.to_string()))
        })
        .expect("runs");
        let stdout: Vec<&str> = lines
            .iter()
            .filter(|(s, _)| *s == Stream::Stdout)
            .map(|(_, l)| l.as_str())
            .collect();
        assert_eq!(stdout, ["one", "two"]);
        assert!(lines.contains(&(Stream::Stderr, "oops".to_string())));
        assert_eq!(out.stdout, "one\ntwo\n");
        assert_eq!(out.stderr, "oops\n");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.text(), "one\ntwo\noops");
    }

    #[test]
    fn captures_keep_both_ends() {
        let marker = |n: u64| format!("[… {n} bytes omitted …]");
        // (head, tail, pushes, text)
        let xs = "x".repeat(100);
        let cases: Vec<(usize, usize, Vec<&str>, String)> = vec![
            (4, 4, vec![], String::new()),
            (4, 4, vec!["abc"], "abc".into()),
            (4, 4, vec!["abcdefgh"], "abcdefgh".into()),
            (4, 4, vec!["abcd", "efgh"], "abcdefgh".into()),
            (
                4,
                4,
                vec!["abcdefghij"],
                format!("abcd\n{}\nghij", marker(2)),
            ),
            (
                4,
                4,
                vec!["ab", "cdef", "ghij", "kl"],
                format!("abcd\n{}\nijkl", marker(4)),
            ),
            (
                3,
                3,
                vec!["ab\n", &xs, "\nyz"],
                format!("ab\n{}\nyz", marker(100)),
            ),
            (4, 0, vec!["abcdef"], format!("abcd\n{}\n", marker(2))),
            (0, 3, vec!["abcdef"], format!("\n{}\ndef", marker(3))),
        ];
        for (head, tail, pushes, want) in cases {
            let mut c = Capture::new(head, tail);
            for p in &pushes {
                c.push(p.as_bytes());
            }
            assert_eq!(c.text(), want, "{head}/{tail} {pushes:?}");
            let total: usize = pushes.iter().map(|p| p.len()).sum();
            assert_eq!(
                c.omitted(),
                total.saturating_sub(head + tail) as u64,
                "{pushes:?}"
            );
        }
        // A cut inside a character: replaced, never a panic.
        let mut c = Capture::new(1, 1);
        c.push("éé".as_bytes());
        assert_eq!(c.text(), format!("\u{fffd}\n{}\n\u{fffd}", marker(2)));
    }

    #[test]
    fn output_of_a_chatty_tool_is_bounded() {
        let mut cmd = Command::new("sh");
        // 10 MiB on each stream, one line without end on stdout, bytes that are not UTF-8.
        cmd.args([
            "-c",
            "printf 'first\\n'; printf 'err-first\\n' >&2; \
             head -c 10485760 /dev/zero | tr '\\0' x; \
             head -c 10485760 /dev/zero | tr '\\0' '\\377' >&2; \
             printf '\\nlast\\n'; printf '\\nerr-last\\n' >&2; exit 4",
        ]);
        let (mut lines, mut longest) = (0usize, 0usize);
        let out = run(cmd, &Cancel::new(), &mut |_, l| {
            lines += 1;
            longest = longest.max(l.len());
        })
        .expect("runs");
        assert_eq!(out.status.code(), Some(4));
        for (text, first, last) in [
            (&out.stdout, "first\n", "\nlast\n"),
            (&out.stderr, "err-first\n", "\nerr-last\n"),
        ] {
            assert!(text.starts_with(first), "{}", &text[..40]);
            assert!(text.ends_with(last));
            assert!(text.contains(" bytes omitted …]"));
            // Replacement characters take 3 bytes for 1.
            assert!(text.len() < 7 * MESSAGE_END, "{}", text.len());
        }
        // Lines came in pieces of at most MAX_LINE bytes (as replaced text: 3 a byte).
        assert!(lines >= 2 * 10 * 1024 * 1024 / MAX_LINE, "{lines}");
        assert!(longest <= 3 * MAX_LINE, "{longest}");
    }

    #[test]
    fn data_output_is_whole_or_refused() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "seq 1 200000"]);
        let out = output(cmd, &Cancel::new()).expect("runs");
        assert_eq!(out.stdout.lines().count(), 200_000);
        assert!(out.stdout.ends_with("200000\n"));

        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("head -c {} /dev/zero", DATA_LIMIT + 1)]);
        let result = output(cmd, &Cancel::new());
        assert!(
            matches!(result, Err(RunError::TooMuchOutput(ref p, DATA_LIMIT)) if p == "sh"),
            "{result:?}"
        );
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
