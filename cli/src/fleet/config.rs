//! The fleet part of the configuration: the maintenance window, the reboot command, the rollout
//! waves (`[upgrade]`) and the coordination backend (`[fleet]`). Parsed strictly: a value that
//! does not mean one thing is an error that names the key.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

/// The days of the week as the window names them, Monday first.
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// The file as far as the fleet reads it; other tables and `[upgrade] policy` are read elsewhere.
#[derive(Debug, Default, Deserialize)]
struct File {
    #[serde(default)]
    upgrade: UpgradeTable,
    #[serde(default)]
    fleet: FleetTable,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct UpgradeTable {
    #[serde(default)]
    window: String,
    #[serde(default = "default_reboot_command")]
    reboot_command: String,
    #[serde(default = "one")]
    rollout_waves: u64,
    #[serde(default)]
    wave_delay: u64,
}

impl Default for UpgradeTable {
    fn default() -> Self {
        Self {
            window: String::new(),
            reboot_command: default_reboot_command(),
            rollout_waves: 1,
            wave_delay: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FleetTable {
    #[serde(default = "default_backend")]
    backend: String,
    #[serde(default = "default_group")]
    group: String,
    #[serde(default = "one")]
    max_rebooting: u64,
    #[serde(default = "default_slot_ttl")]
    slot_ttl: u64,
    #[serde(default = "default_retry_interval")]
    retry_interval: u64,
    #[serde(default)]
    etcd_endpoints: Vec<String>,
    #[serde(default)]
    etcd_ca_file: String,
    #[serde(default)]
    etcd_cert_file: String,
    #[serde(default)]
    etcd_key_file: String,
    #[serde(default)]
    etcd_username: String,
    #[serde(default)]
    etcd_password_file: String,
    #[serde(default)]
    fleetlock_url: String,
}

impl Default for FleetTable {
    fn default() -> Self {
        toml::from_str("").expect("every key has a default")
    }
}

fn default_reboot_command() -> String {
    "systemctl reboot".into()
}
fn default_backend() -> String {
    "none".into()
}
fn default_group() -> String {
    "default".into()
}
fn one() -> u64 {
    1
}
fn default_slot_ttl() -> u64 {
    1800
}
fn default_retry_interval() -> u64 {
    60
}

/// What `policy = "apply"` needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub window: Window,
    pub reboot_command: String,
    /// How many waves the fleet is split in (1: none).
    pub rollout_waves: u64,
    /// Seconds a wave waits after the one before it, counted from when the host staged.
    pub wave_delay: u64,
    pub group: String,
    /// Seconds between attempts to take a slot while the window is open.
    pub retry_interval: u64,
    pub backend: Backend,
}

/// Who hands out the reboot slots.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// Nobody: the host reboots alone, inside its window.
    None,
    Etcd(EtcdConfig),
    /// A FleetLock server (airlock) at this base URL.
    FleetLock(Url),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Etcd(_) => "etcd",
            Self::FleetLock(_) => "fleetlock",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// Tried in order; the next one when one does not answer.
    pub endpoints: Vec<Url>,
    pub max_rebooting: u64,
    /// The lease of a slot, in seconds.
    pub slot_ttl: u64,
    pub tls: TlsFiles,
    /// User name and the file holding the password.
    pub auth: Option<(String, PathBuf)>,
}

/// Client TLS settings; empty ones use the system's trust store and no client certificate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// An `http://` or `https://` URL: host, port and a path prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// "" or "/prefix", no trailing slash.
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Self> {
        let (tls, rest) = if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else {
            anyhow::bail!("{text:?} is not an http:// or https:// URL");
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        // An IPv6 address is in brackets: `[::1]:2379`.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .with_context(|| format!("{text:?} has an unclosed ["))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .with_context(|| format!("{text:?} has no valid port"))?,
            None if tls => 443,
            None => 80,
        };
        anyhow::ensure!(!host.is_empty(), "{text:?} names no host");
        anyhow::ensure!(
            !text.contains(['?', '#', '@', ' ']),
            "{text:?} must be a plain URL (no user, query or fragment)"
        );
        let path = path.trim_end_matches('/');
        Ok(Self {
            tls,
            host: host.to_string(),
            port,
            path: if path.is_empty() {
                String::new()
            } else {
                format!("/{path}")
            },
        })
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
    }
}

fn optional_path(value: &str) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}

impl Config {
    /// Reads the configuration file (`DNFIMAGE_CONFIG` overrides the path); a missing file
    /// means the defaults.
    pub fn load() -> Result<Self> {
        let path = std::env::var("DNFIMAGE_CONFIG")
            .unwrap_or_else(|_| crate::host::CONFIG_PATH.to_string());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("Reading {path}")),
        };
        Self::parse(&text).with_context(|| format!("Reading {path}"))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let file: File = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        let (u, f) = (file.upgrade, file.fleet);
        let window = Window::parse(&u.window).context("[upgrade] window")?;
        anyhow::ensure!(
            !u.reboot_command.trim().is_empty(),
            "[upgrade] reboot-command is empty; the default is \"systemctl reboot\""
        );
        anyhow::ensure!(
            u.rollout_waves >= 1,
            "[upgrade] rollout-waves is 0; it must be 1 (no waves) or more"
        );
        anyhow::ensure!(
            !f.group.is_empty()
                && f.group.len() <= 64
                && f.group
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'),
            "[fleet] group is {:?}; it must be 1 to 64 of a-z, 0-9, - and _",
            f.group
        );
        anyhow::ensure!(
            f.retry_interval >= 1,
            "[fleet] retry-interval is 0; it must be at least 1 second"
        );
        let backend = match f.backend.as_str() {
            "none" => Backend::None,
            "etcd" => {
                anyhow::ensure!(
                    !f.etcd_endpoints.is_empty(),
                    "[fleet] backend is \"etcd\" but etcd-endpoints is empty"
                );
                anyhow::ensure!(
                    f.max_rebooting >= 1,
                    "[fleet] max-rebooting is 0; no host could ever reboot"
                );
                anyhow::ensure!(
                    f.slot_ttl >= 2,
                    "[fleet] slot-ttl is {}; it must be at least 2 seconds",
                    f.slot_ttl
                );
                let endpoints = f
                    .etcd_endpoints
                    .iter()
                    .map(|e| Url::parse(e))
                    .collect::<Result<Vec<_>>>()
                    .context("[fleet] etcd-endpoints")?;
                let tls = TlsFiles {
                    ca_file: optional_path(&f.etcd_ca_file),
                    cert_file: optional_path(&f.etcd_cert_file),
                    key_file: optional_path(&f.etcd_key_file),
                };
                anyhow::ensure!(
                    tls.cert_file.is_some() == tls.key_file.is_some(),
                    "[fleet] etcd-cert-file and etcd-key-file go together: set both or neither"
                );
                let auth = match (
                    f.etcd_username.as_str(),
                    optional_path(&f.etcd_password_file),
                ) {
                    ("", None) => None,
                    (user, Some(file)) if !user.is_empty() => Some((user.to_string(), file)),
                    _ => anyhow::bail!(
                        "[fleet] etcd-username and etcd-password-file go together: set both or \
                         neither"
                    ),
                };
                Backend::Etcd(EtcdConfig {
                    endpoints,
                    max_rebooting: f.max_rebooting,
                    slot_ttl: f.slot_ttl,
                    tls,
                    auth,
                })
            }
            "fleetlock" => {
                anyhow::ensure!(
                    !f.fleetlock_url.is_empty(),
                    "[fleet] backend is \"fleetlock\" but fleetlock-url is empty"
                );
                Backend::FleetLock(Url::parse(&f.fleetlock_url).context("[fleet] fleetlock-url")?)
            }
            other => anyhow::bail!(
                "[fleet] backend is {other:?}; it must be \"none\", \"etcd\" or \"fleetlock\""
            ),
        };
        Ok(Self {
            window,
            reboot_command: u.reboot_command,
            rollout_waves: u.rollout_waves,
            wave_delay: u.wave_delay,
            group: f.group,
            retry_interval: f.retry_interval,
            backend,
        })
    }
}

/// When reboots may happen: spans of the week in UTC; none means at any time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    spans: Vec<Span>,
    text: String,
}

/// `DAYS HH:MM-HH:MM`: from the start on each of the days to the end (on the next day when
/// the end is not after the start).
#[derive(Debug, Clone, PartialEq)]
struct Span {
    days: [bool; 7],
    start: u32,
    end: u32,
}

fn day(name: &str) -> Result<usize> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(name))
        .with_context(|| format!("{name:?} is not a day: use Mon, Tue, Wed, Thu, Fri, Sat or Sun"))
}

fn minutes(text: &str) -> Result<u32> {
    let bad = || format!("{text:?} is not a time: use HH:MM, 00:00 to 24:00");
    let (h, m) = text.split_once(':').with_context(bad)?;
    anyhow::ensure!(h.len() == 2 && m.len() == 2, bad());
    let (h, m): (u32, u32) = (
        h.parse().ok().with_context(bad)?,
        m.parse().ok().with_context(bad)?,
    );
    anyhow::ensure!(m < 60 && (h < 24 || (h == 24 && m == 0)), bad());
    Ok(h * 60 + m)
}

impl Window {
    /// `""` (any time) or spans separated by `;`, each `DAYS HH:MM-HH:MM` where DAYS is `*`
    /// or a comma-separated list of days (`Sat`) and ranges (`Mon..Fri`, `Fri..Mon`).
    pub fn parse(text: &str) -> Result<Self> {
        let mut spans = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        for part in text.split(';') {
            let part = part.trim();
            let (days_text, times) = part.split_once(' ').with_context(|| {
                format!("{part:?} is not DAYS HH:MM-HH:MM (e.g. \"Mon..Fri 02:00-04:00\")")
            })?;
            let mut days = [false; 7];
            for item in days_text.split(',') {
                if item == "*" {
                    days = [true; 7];
                } else if let Some((a, b)) = item.split_once("..") {
                    let (a, b) = (day(a)?, day(b)?);
                    let mut d = a;
                    loop {
                        days[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                } else {
                    days[day(item)?] = true;
                }
            }
            let (start, end) = times.trim().split_once('-').with_context(|| {
                format!("{times:?} is not a time range HH:MM-HH:MM (e.g. \"02:00-04:00\")")
            })?;
            let (start, end) = (minutes(start)?, minutes(end)?);
            anyhow::ensure!(start != end, "{times:?} is empty: the start is the end");
            spans.push(Span { days, start, end });
        }
        Ok(Self {
            spans,
            text: text.trim().to_string(),
        })
    }

    /// Whether the window is open at `unix` seconds (UTC).
    pub fn contains(&self, unix: u64) -> bool {
        if self.spans.is_empty() {
            return true;
        }
        let today = weekday(unix);
        let yesterday = (today + 6) % 7;
        let now = ((unix % 86_400) / 60) as u32;
        self.spans.iter().any(|s| {
            if s.start < s.end {
                s.days[today] && s.start <= now && now < s.end
            } else {
                (s.days[today] && now >= s.start) || (s.days[yesterday] && now < s.end)
            }
        })
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.spans.is_empty() {
            f.write_str("any time")
        } else {
            write!(f, "{} (UTC)", self.text)
        }
    }
}

/// The weekday (Monday 0) of `unix` seconds, UTC: 1970-01-01 was a Thursday.
fn weekday(unix: u64) -> usize {
    ((unix / 86_400 + 3) % 7) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-07 is a Monday; this is 00:00 UTC that day.
    const MONDAY: u64 = 1_796_601_600;

    fn at(day: u64, h: u64, m: u64) -> u64 {
        MONDAY + day * 86_400 + h * 3600 + m * 60
    }

    #[test]
    fn monday_is_monday() {
        assert_eq!(weekday(MONDAY), 0);
        assert_eq!(DAYS[weekday(at(6, 12, 0))], "Sun");
    }

    #[test]
    fn windows_open_and_close() {
        // (window, time, open)
        let cases = [
            ("", at(2, 13, 0), true),
            ("Mon..Fri 02:00-04:00", at(0, 2, 0), true),
            ("Mon..Fri 02:00-04:00", at(0, 3, 59), true),
            ("Mon..Fri 02:00-04:00", at(0, 4, 0), false),
            ("Mon..Fri 02:00-04:00", at(0, 1, 59), false),
            ("Mon..Fri 02:00-04:00", at(5, 3, 0), false),
            ("Fri..Mon 02:00-04:00", at(5, 3, 0), true),
            ("Fri..Mon 02:00-04:00", at(1, 3, 0), false),
            ("Sat,Sun 22:00-02:00", at(5, 23, 0), true),
            // Sunday 22:00 to Monday 02:00.
            ("Sat,Sun 22:00-02:00", at(7, 1, 0), true),
            ("Sat,Sun 22:00-02:00", at(1, 1, 0), false),
            ("* 00:00-24:00", at(3, 23, 59), true),
            ("Tue 10:00-11:00; thu 10:00-11:00", at(3, 10, 30), true),
            ("Tue 10:00-11:00; thu 10:00-11:00", at(2, 10, 30), false),
        ];
        for (text, time, open) in cases {
            let w = Window::parse(text).unwrap();
            assert_eq!(w.contains(time), open, "{text:?} at {time}");
        }
    }

    #[test]
    fn refuses_windows_that_do_not_mean_one_thing() {
        let cases = [
            ("Mon", "is not DAYS HH:MM-HH:MM"),
            ("Mon 2:00-04:00", "\"2:00\" is not a time"),
            ("Mon 02:00-24:01", "\"24:01\" is not a time"),
            ("Mon 02:00", "is not a time range"),
            ("Mo 02:00-03:00", "\"Mo\" is not a day"),
            ("Mon..Fry 02:00-03:00", "\"Fry\" is not a day"),
            ("Mon 02:00-02:00", "is empty"),
            ("Mon 02:60-03:00", "is not a time"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", Window::parse(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn reads_the_fleet_configuration() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.backend, Backend::None);
        assert_eq!(c.reboot_command, "systemctl reboot");
        assert_eq!(c.group, "default");

        let c = Config::parse(
            "[upgrade]\npolicy = \"apply\"\nwindow = \"Mon..Fri 02:00-04:00\"\n\
             [fleet]\nbackend = \"etcd\"\ngroup = \"web\"\nmax-rebooting = 2\n\
             etcd-endpoints = [\"http://127.0.0.1:2379\", \"https://[::1]:2380/x/\"]\n\
             etcd-ca-file = \"/ca.pem\"\netcd-username = \"u\"\netcd-password-file = \"/pw\"\n",
        )
        .unwrap();
        let Backend::Etcd(etcd) = &c.backend else {
            panic!("{c:?}")
        };
        assert_eq!(etcd.max_rebooting, 2);
        assert_eq!(etcd.endpoints[0].to_string(), "http://127.0.0.1:2379");
        assert_eq!(etcd.endpoints[1].to_string(), "https://::1:2380/x");
        assert_eq!(
            etcd.tls.ca_file.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(etcd.auth, Some(("u".into(), PathBuf::from("/pw"))));
        assert_eq!(c.window.to_string(), "Mon..Fri 02:00-04:00 (UTC)");

        let c = Config::parse(
            "[fleet]\nbackend = \"fleetlock\"\nfleetlock-url = \"http://127.0.0.1:3333\"\n",
        )
        .unwrap();
        assert_eq!(c.backend.name(), "fleetlock");
        // (URL, as shown)
        let urls = [
            ("http://127.0.0.1", "http://127.0.0.1:80"),
            ("https://etcd.example.com", "https://etcd.example.com:443"),
            ("http://[::1]", "http://::1:80"),
            ("http://[::1]:2379/", "http://::1:2379"),
            ("https://h:8443/lock/base", "https://h:8443/lock/base"),
        ];
        for (text, shown) in urls {
            assert_eq!(Url::parse(text).unwrap().to_string(), shown, "{text}");
        }
    }

    #[test]
    fn refuses_fleet_settings_that_do_not_work() {
        let cases = [
            (
                "[fleet]\nbackend = \"zookeeper\"\n",
                "it must be \"none\", \"etcd\"",
            ),
            ("[fleet]\nbackend = \"etcd\"\n", "etcd-endpoints is empty"),
            (
                "[fleet]\nbackend = \"etcd\"\netcd-endpoints = [\"127.0.0.1:2379\"]\n",
                "is not an http:// or https:// URL",
            ),
            (
                "[fleet]\nbackend = \"etcd\"\netcd-endpoints = [\"http://h:99999\"]\n",
                "has no valid port",
            ),
            (
                "[fleet]\nbackend = \"etcd\"\nmax-rebooting = 0\netcd-endpoints = [\"http://h\"]\n",
                "max-rebooting is 0",
            ),
            (
                "[fleet]\nbackend = \"etcd\"\netcd-cert-file = \"/c\"\netcd-endpoints = [\"http://h\"]\n",
                "go together",
            ),
            (
                "[fleet]\nbackend = \"fleetlock\"\n",
                "fleetlock-url is empty",
            ),
            (
                "[fleet]\nbackend = \"fleetlock\"\nfleetlock-url = \"http://[::1\"\n",
                "has an unclosed [",
            ),
            (
                "[fleet]\nbackend = \"fleetlock\"\nfleetlock-url = \"http://h:1:2\"\n",
                "has no valid port",
            ),
            (
                "[fleet]\nbackend = \"fleetlock\"\nfleetlock-url = \"http://:80\"\n",
                "names no host",
            ),
            ("[fleet]\ngroup = \"Web Servers\"\n", "[fleet] group is"),
            ("[fleet]\nmax-rebooting = -1\n", "invalid value"),
            ("[fleet]\nmax-rebooting = \"2\"\n", "invalid type"),
            (
                "[fleet]\nmax-reboting = 2\n",
                "unknown field `max-reboting`",
            ),
            (
                "[upgrade]\nwindow = \"Mon 25:00-26:00\"\n",
                "[upgrade] window",
            ),
            (
                "[upgrade]\nreboot-command = \" \"\n",
                "reboot-command is empty",
            ),
            ("[upgrade]\nrollout-waves = 0\n", "rollout-waves is 0"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
