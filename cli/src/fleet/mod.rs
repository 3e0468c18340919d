//! `[upgrade] policy = "apply"`: stage the update, then reboot into it inside the maintenance
//! window after taking a reboot slot from the fleet's coordination backend (etcd or a
//! FleetLock server), and give the slot back once the host is up on the new deployment.
//!
//! The slot and the deployment it is for are kept in a small state file, so the run after the
//! reboot (`dnf-image fleet release` from dnfimage-fleet-release.service, or the next
//! `upgrade --auto`) knows what to check and what to release.

mod config;
mod etcd;
mod fleetlock;
mod http;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use dnfimage_interfaces::deployer::StatusReply;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::{self, UpgradeOptions};
use crate::{Cli, Output};
use config::Backend;
pub use config::Config;

/// Where the state is kept (`DNFIMAGE_FLEET_STATE` overrides it).
const STATE_PATH: &str = "/var/lib/dnfimage/fleet.json";
/// The machine id (`DNFIMAGE_MACHINE_ID_FILE` overrides it).
const MACHINE_ID_PATH: &str = "/etc/machine-id";

/// A slot as the backend handed it out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Held {
    /// etcd: the slot's number.
    pub slot: Option<u64>,
    /// etcd: the lease the slot's keys live under.
    pub lease: Option<String>,
}

/// What this host remembers between runs and across the reboot.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The deployment (commit) staged to reboot into.
    deployment: Option<String>,
    /// When it was staged (Unix seconds), from which the rollout wave's delay counts.
    staged_at: Option<u64>,
    /// The slot held for the reboot into it, and which backend gave it.
    slot: Option<Slot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Slot {
    backend: String,
    group: String,
    held: Held,
}

fn state_path() -> PathBuf {
    std::env::var_os("DNFIMAGE_FLEET_STATE").map_or_else(|| STATE_PATH.into(), PathBuf::from)
}

impl State {
    fn load() -> Result<Self> {
        let path = state_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("Reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("Reading {}", path.display())),
        }
    }

    /// Writes the state whole (a temporary file renamed over the old one).
    fn save(&self) -> Result<()> {
        let path = state_path();
        let write = || -> Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        };
        write().with_context(|| format!("Writing {}", path.display()))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The id this host has in the fleet: derived from /etc/machine-id (as systemd's
/// application-specific ids are) so the machine id itself never leaves the host.
fn host_id() -> Result<String> {
    let path = std::env::var("DNFIMAGE_MACHINE_ID_FILE").unwrap_or_else(|_| MACHINE_ID_PATH.into());
    let text = std::fs::read_to_string(&path).with_context(|| format!("Reading {path}"))?;
    let id = text.trim();
    anyhow::ensure!(
        id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{path} does not hold a machine id (32 hexadecimal digits)"
    );
    Ok(derived_id(id))
}

fn derived_id(machine_id: &str) -> String {
    let digest = Sha256::digest(format!(
        "dnfimage-fleet:{}",
        machine_id.to_ascii_lowercase()
    ));
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The rollout wave of host `id` among `waves`.
fn wave(id: &str, waves: u64) -> u64 {
    let digest = Sha256::digest(id.as_bytes());
    let mut n = [0u8; 8];
    n.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(n) % waves.max(1)
}

/// Asks the backend for a slot: the slot, or why there is none now.
fn take(config: &Config, id: &str) -> Result<std::result::Result<Held, String>> {
    match &config.backend {
        Backend::None => Ok(Ok(Held::default())),
        Backend::Etcd(etcd) => {
            let e = etcd::Etcd {
                config: etcd,
                group: &config.group,
            };
            Ok(e.take(id)?.ok_or_else(|| {
                format!(
                    "all {} slots of group {:?} are held",
                    etcd.max_rebooting, config.group
                )
            }))
        }
        Backend::FleetLock(url) => Ok(fleetlock::FleetLock {
            url,
            group: &config.group,
        }
        .take(id)?
        .map(|()| Held::default())),
    }
}

/// Gives `slot` back to the backend that handed it out.
fn give_back(config: &Config, id: &str, slot: &Slot) -> Result<()> {
    anyhow::ensure!(
        slot.backend == config.backend.name(),
        "The slot held was taken from the {} backend, but [fleet] backend is now {:?}: \
         release it there by hand, then remove {}",
        slot.backend,
        config.backend.name(),
        state_path().display()
    );
    match &config.backend {
        Backend::None => Ok(()),
        Backend::Etcd(etcd) => etcd::Etcd {
            config: etcd,
            group: &slot.group,
        }
        .release(&slot.held),
        Backend::FleetLock(url) => fleetlock::FleetLock {
            url,
            group: &slot.group,
        }
        .release(id),
    }
}

/// Runs blocking network I/O off the async runtime's thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("Running the coordination request")?
}

fn slot_text(slot: &Slot) -> String {
    match slot.held.slot {
        Some(n) => format!("slot {n} of group {:?} ({})", slot.group, slot.backend),
        None => format!("a slot of group {:?} ({})", slot.group, slot.backend),
    }
}

/// Where the host stands with the deployment a held slot is for.
enum Boot {
    /// Up on it: the reboot is done.
    OnIt,
    /// It still waits to be booted.
    Pending,
    /// Neither: it was rolled back or removed.
    Gone,
}

fn boot_state(status: &StatusReply, deployment: Option<&str>) -> Boot {
    let commit =
        |d: Option<&dnfimage_interfaces::deployer::Deployment>| d.map(|d| d.commit.clone());
    if deployment.is_some() && commit(host::booted_or_default(status)).as_deref() == deployment {
        Boot::OnIt
    } else if deployment.is_some() && commit(host::next_boot(status)).as_deref() == deployment {
        Boot::Pending
    } else {
        Boot::Gone
    }
}

/// Releases the held slot when the host is up on the deployment it was taken for (or that
/// deployment is gone); `false` when it still waits to be booted.
async fn release_if_done(
    cli: &Cli,
    out: &Output,
    config: &Config,
    id: &str,
    state: &mut State,
) -> Result<bool> {
    let Some(slot) = state.slot.clone() else {
        return Ok(true);
    };
    // The deployer answering is the steady state this waits for.
    let (_, status) = host::status_of(cli).await?;
    let deployment = state.deployment.clone().unwrap_or_default();
    match boot_state(&status, state.deployment.as_deref()) {
        Boot::Pending => return Ok(false),
        Boot::OnIt => out.note(&format!(
            "Up on deployment {}: releasing {}",
            short(&deployment),
            slot_text(&slot)
        )),
        Boot::Gone => out.warn(&format!(
            "Deployment {} is neither booted nor pending (rolled back or removed): releasing {}",
            short(&deployment),
            slot_text(&slot)
        )),
    }
    let (c, i, s) = (config.clone(), id.to_string(), slot.clone());
    blocking(move || give_back(&c, &i, &s))
        .await
        .with_context(|| format!("Releasing {}", slot_text(&slot)))?;
    *state = State::default();
    state.save()?;
    Ok(true)
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// `upgrade --auto` with `policy = "apply"`.
pub(crate) async fn apply(cli: &Cli, out: &Output, opts: &UpgradeOptions) -> Result<u8> {
    let config = Config::load()?;
    let id = host_id()?;
    let mut state = State::load()?;
    if state.slot.is_some() && !release_if_done(cli, out, &config, &id, &mut state).await? {
        out.note("The reboot this host holds a slot for has not happened yet: rebooting again");
        return reboot(out, &config, &state).map(|()| 0);
    }

    let (_, before) = host::status_of(cli).await?;
    let previous = host::next_boot(&before).map(|d| d.commit.clone());
    let code = host::upgrade(cli, out, opts).await?;
    let (_, status) = host::status_of(cli).await?;
    let Some(next) = host::next_boot(&status) else {
        return Ok(code);
    };
    if Some(&next.commit) != previous.as_ref() {
        state.deployment = Some(next.commit.clone());
        state.staged_at = Some(now());
        state.save()?;
    }
    let pending = if status.booted {
        !next.booted
    } else {
        // A sysroot that is not booted: what this policy staged and has not rebooted into.
        state.deployment.as_deref() == Some(next.commit.as_str())
    };
    if !pending {
        return Ok(code);
    }
    if state.deployment.as_deref() != Some(next.commit.as_str()) {
        // Staged by someone else (`dnf-image upgrade`): the waves count from now.
        state.deployment = Some(next.commit.clone());
        state.staged_at = Some(now());
        state.save()?;
    }

    let my_wave = wave(&id, config.rollout_waves);
    let due = state.staged_at.unwrap_or(0) + my_wave * config.wave_delay;
    if now() < due {
        out.note(&format!(
            "Staged; this host is in rollout wave {my_wave} of {}, which may reboot {} s after \
             staging, in {} s",
            config.rollout_waves,
            my_wave * config.wave_delay,
            due - now()
        ));
        return Ok(0);
    }

    loop {
        if !config.window.contains(now()) {
            out.note(&format!(
                "Staged; the maintenance window is {}: the reboot waits for it",
                config.window
            ));
            return Ok(0);
        }
        let (c, i) = (config.clone(), id.clone());
        match blocking(move || take(&c, &i)).await? {
            Ok(held) => {
                state.slot = Some(Slot {
                    backend: config.backend.name().to_string(),
                    group: config.group.clone(),
                    held,
                });
                state.save()?;
                break;
            }
            Err(why) => {
                out.note(&format!(
                    "Waiting for a reboot slot: {why}; asking again in {} s",
                    config.retry_interval
                ));
                tokio::time::sleep(Duration::from_secs(config.retry_interval)).await;
            }
        }
    }
    if let Err(e) = reboot(out, &config, &state) {
        let slot = state.slot.take();
        if let Some(slot) = slot {
            let (c, i) = (config.clone(), id.clone());
            if let Err(r) = blocking(move || give_back(&c, &i, &slot)).await {
                out.warn(&format!(
                    "Releasing the slot after the failed reboot: {r:#}"
                ));
            }
        }
        state.save()?;
        return Err(e);
    }
    Ok(0)
}

/// Runs the reboot command (`sh -c`).
fn reboot(out: &Output, config: &Config, state: &State) -> Result<()> {
    let slot = state.slot.as_ref().map(slot_text).unwrap_or_default();
    out.note(&format!(
        "Rebooting into deployment {} ({slot}): {}",
        short(state.deployment.as_deref().unwrap_or_default()),
        config.reboot_command
    ));
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&config.reboot_command)
        .stdin(std::process::Stdio::null())
        .status()
        .with_context(|| format!("Running {:?}", config.reboot_command))?;
    anyhow::ensure!(
        status.success(),
        "The reboot command {:?} failed ({status}); the slot is released and nothing rebooted",
        config.reboot_command
    );
    Ok(())
}

/// `dnf-image fleet release`: after boot, gives the slot back once up on the deployment.
pub(crate) async fn release(cli: &Cli, out: &Output) -> Result<u8> {
    let config = Config::load()?;
    let mut state = State::load()?;
    if state.slot.is_none() {
        out.note("This host holds no reboot slot");
        return Ok(0);
    }
    let id = host_id()?;
    if !release_if_done(cli, out, &config, &id, &mut state).await? {
        anyhow::bail!(
            "Deployment {} is staged but not booted yet: the slot stays held until the host \
             runs it",
            short(state.deployment.as_deref().unwrap_or_default())
        );
    }
    Ok(0)
}

/// The line `status` adds for a host under `policy = "apply"` or holding a slot: the
/// policy, the coordination backend and the slot held. `None` for the other policies.
pub(crate) fn summary() -> Option<String> {
    let policy = host::Policy::load().ok()?;
    let state = State::load().ok().unwrap_or_default();
    if policy != host::Policy::Apply && state.slot.is_none() {
        return None;
    }
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => return Some(format!("Automatic upgrades: {e:#}")),
    };
    let backend = match &config.backend {
        Backend::None => "rebooting alone".to_string(),
        b => format!("reboot slots from {} (group {:?})", b.name(), config.group),
    };
    let held = match &state.slot {
        Some(slot) => format!("; holding {}", slot_text(slot)),
        None => String::new(),
    };
    Some(format!(
        "Automatic upgrades: {}, {backend}, window {}{held}",
        policy.name(),
        config.window
    ))
}

/// `dnf-image fleet status`: the policy, the backend, the window, the wave and the slot held.
pub(crate) async fn status(out: &Output, json: bool) -> Result<u8> {
    let policy = host::Policy::load()?;
    let config = Config::load()?;
    let state = State::load()?;
    let id = host_id().ok();
    let waves = id
        .as_deref()
        .map(|id| wave(id, config.rollout_waves))
        .unwrap_or(0);
    let backend = match &config.backend {
        Backend::None => "none (reboots alone)".to_string(),
        Backend::Etcd(e) => format!(
            "etcd at {}, group {:?}, at most {} rebooting, slot lease {} s",
            e.endpoints
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            config.group,
            e.max_rebooting,
            e.slot_ttl
        ),
        Backend::FleetLock(url) => format!("FleetLock server {url}, group {:?}", config.group),
    };
    // Who holds the slots now, as the store says.
    let holders = match &config.backend {
        Backend::Etcd(e) => {
            let (e, group) = (e.clone(), config.group.clone());
            let listed = blocking(move || {
                etcd::Etcd {
                    config: &e,
                    group: &group,
                }
                .holders()
            })
            .await;
            match listed {
                Ok(h) => Some(h),
                Err(e) => {
                    out.warn(&format!("Asking etcd who holds the slots: {e:#}"));
                    None
                }
            }
        }
        _ => None,
    };
    if json {
        let doc = serde_json::json!({
            "apiVersion": "dnfimage/v1",
            "kind": "FleetStatus",
            "policy": policy.name(),
            "backend": config.backend.name(),
            "group": config.group,
            "window": config.window.to_string(),
            "id": id,
            "wave": waves,
            "waves": config.rollout_waves,
            "deployment": state.deployment,
            "slot": state.slot,
            "holders": holders,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    println!("Policy: {}", policy.name());
    println!("Coordination: {backend}");
    println!("Window: {}", config.window);
    println!("Rollout wave: {waves} of {}", config.rollout_waves);
    if let Some(d) = &state.deployment {
        println!("Staged to reboot into: {}", short(d));
    }
    match &state.slot {
        Some(slot) => println!("Holding: {}", slot_text(slot)),
        None => println!("Holding: no reboot slot"),
    }
    if let Some(h) = holders {
        let me = id.unwrap_or_default();
        println!(
            "Slots held in the group: {}{}",
            h.len(),
            if h.contains(&me) {
                " (one by this host)"
            } else {
                ""
            }
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_waves_are_stable() {
        let id = derived_id("0123456789abcdef0123456789abcdef");
        assert_eq!(id.len(), 32);
        assert_eq!(id, derived_id("0123456789ABCDEF0123456789ABCDEF"));
        assert_ne!(id, derived_id("1123456789abcdef0123456789abcdef"));
        assert_eq!(wave(&id, 1), 0);
        // Spread over the waves: 64 ids fill all four.
        let mut seen = [false; 4];
        for n in 0..64u32 {
            seen[wave(&derived_id(&format!("{n:032x}")), 4) as usize] = true;
        }
        assert_eq!(seen, [true; 4]);
    }
}
