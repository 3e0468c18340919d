//! Fleets: hosts under `[upgrade] policy = "apply"` reboot a few at a time, coordinated
//! through a real etcd cluster on 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_integration::fleet::{EtcdCluster, EtcdTls, FleetHost, PullThroughMirror};
use dnfimage_integration::{Scratch, run_ok};
use dnfimage_testimage::{Fixtures, Lookaside, Registry, SigningKey, tags, write_signed_by_policy};

const GROUP: &str = "test";
const MAX_REBOOTING: usize = 2;
/// The victim's slot lease: short, so the test sees it end, and long enough for the other
/// hosts to stage and find one slot taken by it.
const VICTIM_TTL: u64 = 10;
/// Everyone else's: far longer than the test takes, so only a release frees their slots.
const TTL: u64 = 900;
/// A guard against a hang, not a measurement.
const GIVE_UP: Duration = Duration::from_secs(1200);

fn hosts_wanted() -> usize {
    std::env::var("DNFIMAGE_FLEET_HOSTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(12)
}

/// The configuration of host `i`: the endpoints rotated by `i`, so that some hosts ask the
/// member stopped later first and must go on to the next one.
fn config(i: usize, endpoints: &[String], reboots: &std::path::Path, victim: bool) -> String {
    let mut rotated = endpoints.to_vec();
    rotated.rotate_left(i % endpoints.len());
    let list: Vec<String> = rotated.iter().map(|e| format!("{e:?}")).collect();
    // The hook records which host reboots and how many slot keys etcd holds at that moment.
    let count = format!(
        "ETCDCTL_API=3 etcdctl --endpoints={} get --prefix --keys-only /dnfimage/fleet/{GROUP}/slots/ | grep -c slots",
        endpoints.join(",")
    );
    let hook = if victim {
        // Holds its slot and never comes back: the test kills it.
        format!(
            "echo \"h{i} $({count})\" >> {}; exec sleep 100000",
            reboots.display()
        )
    } else {
        format!("echo \"h{i} $({count})\" >> {}", reboots.display())
    };
    format!(
        "[upgrade]\npolicy = \"apply\"\nwindow = \"\"\nreboot-command = {hook:?}\n\
         [fleet]\nbackend = \"etcd\"\ngroup = \"{GROUP}\"\nmax-rebooting = {MAX_REBOOTING}\n\
         slot-ttl = {}\nretry-interval = 1\netcd-endpoints = [{}]\n",
        if victim { VICTIM_TTL } else { TTL },
        list.join(", ")
    )
}

fn waits(host: &FleetHost) -> usize {
    std::fs::read_to_string(host.cli_log())
        .unwrap_or_default()
        .matches("Waiting for a reboot slot")
        .count()
}

/// 12 hosts (`DNFIMAGE_FLEET_HOSTS`), one update, at most 2 rebooting: no third host ever
/// reboots while two hold a slot, every host ends on the new image, the victim killed while
/// holding its slot frees it when its lease ends, and the rollout goes on after one of the
/// three etcd members stops half-way.
#[test]
fn rollout_reboots_at_most_two_hosts_at_a_time() -> Result<()> {
    let started = Instant::now();
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let f = Fixtures::shared()?;
    let latest = f.push_as(&registry, tags::BASE_V1, "dnfimage/os:latest")?;
    let v2 = f.image(tags::BASE_V2)?;
    let mut etcd = EtcdCluster::start(&scratch.path().join("etcd"), 3)?;
    let endpoints = etcd.endpoints();
    let reboots = scratch.path().join("reboots");
    std::fs::write(&reboots, "")?;

    let n = hosts_wanted();
    let victim = 0;
    let mut hosts = Vec::new();
    for i in 0..n {
        let host = FleetHost::new(
            &format!("h{i}"),
            &format!("{:032x}", 0xd1f0 + i),
            &registry.addr(),
        )?;
        std::fs::write(
            host.config_path(),
            config(i, &endpoints, &reboots, i == victim),
        )?;
        host.ok(&["rebase", &latest])?;
        hosts.push(host);
    }
    eprintln!("fleet: {n} hosts on v1 after {:?}", started.elapsed());
    f.push_as(&registry, tags::BASE_V2, "dnfimage/os:latest")?;
    let rollout_started = Instant::now();

    // The victim goes first: it takes a slot and dies holding it; then the others start.
    let mut running: BTreeMap<usize, Child> = BTreeMap::new();
    running.insert(victim, hosts[victim].spawn_cli(&["upgrade", "--auto"])?);
    let mut others_started = false;
    let mut most_after_victim = 0;

    // Hosts that rebooted and were not "booted" (released) yet; the victim stays in it until
    // its lease ends.
    let mut held: BTreeSet<usize> = BTreeSet::new();
    let mut released: BTreeSet<usize> = BTreeSet::new();
    let mut seen_lines = 0;
    let mut most = 0;
    let mut victim_id = None;
    let mut victim_gone = false;
    let mut member_stopped = false;
    // Waiting lines of each host when the last reboot was seen.
    let mut waits_at_last_reboot: Vec<usize> = hosts.iter().map(waits).collect();
    let slots_prefix = format!("/dnfimage/fleet/{GROUP}/slots/");
    let holders_prefix = format!("/dnfimage/fleet/{GROUP}/holders/");
    while released.len() + usize::from(victim_gone) < n {
        anyhow::ensure!(
            started.elapsed() < GIVE_UP,
            "the rollout is stuck: held {held:?}, released {released:?}, reboots:\n{}",
            std::fs::read_to_string(&reboots)?
        );
        // A non-victim upgrade that failed is a failure of the test.
        for (i, child) in running.iter_mut() {
            if let Some(status) = child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "h{i}: upgrade --auto failed ({status}):\n{}",
                    std::fs::read_to_string(hosts[*i].cli_log())?
                );
            }
        }
        let text = std::fs::read_to_string(&reboots)?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() > seen_lines {
            for line in &lines[seen_lines..] {
                let (who, count) = line.split_once(' ').context("a hook line")?;
                let i: usize = who.trim_start_matches('h').parse()?;
                let count: usize = count.trim().parse()?;
                anyhow::ensure!(
                    count <= MAX_REBOOTING,
                    "{who} rebooted while etcd held {count} slot keys"
                );
                anyhow::ensure!(held.insert(i), "{who} rebooted twice");
                anyhow::ensure!(
                    held.len() <= MAX_REBOOTING,
                    "{who} rebooted while {held:?} were rebooting"
                );
                most = most.max(held.len());
                if victim_gone {
                    most_after_victim = most_after_victim.max(held.len());
                }
                eprintln!("fleet: {who} reboots (slot keys: {count}, rebooting: {held:?})");
                if i == victim {
                    // Its id, to watch its keys; then the host dies holding its slot.
                    let status: serde_json::Value =
                        serde_json::from_str(&hosts[victim].ok(&["--json", "fleet", "status"])?)?;
                    assert_eq!(status["slot"]["backend"], "etcd", "{status}");
                    victim_id = status["id"].as_str().map(str::to_string);
                    let mut child = running.remove(&victim).context("the victim runs")?;
                    run_ok(std::process::Command::new("kill").args([
                        "-KILL",
                        "--",
                        &format!("-{}", child.id()),
                    ]))?;
                    child.wait()?;
                    hosts[victim].services.clear();
                }
                if !others_started {
                    for (j, host) in hosts.iter().enumerate().filter(|(j, _)| *j != victim) {
                        running.insert(j, host.spawn_cli(&["upgrade", "--auto"])?);
                    }
                    others_started = true;
                }
            }
            seen_lines = lines.len();
            waits_at_last_reboot = hosts.iter().map(waits).collect();
        }

        // The victim's slot ends with its lease, without anyone releasing it.
        if let (Some(id), false) = (&victim_id, victim_gone) {
            let keys = etcd.keys(&holders_prefix)?;
            if !keys.iter().any(|k| k.ends_with(id.as_str())) {
                eprintln!("fleet: the victim's lease ended; its slot is free");
                held.remove(&victim);
                victim_gone = true;
                // Refusals before now were for want of the victim's slot.
                waits_at_last_reboot = hosts.iter().map(waits).collect();
            }
        }

        // Release ("boot") a rebooted host when the maximum is reached — after a waiting host
        // was refused once more, which shows a third could not get in — or when every host
        // still upgrading waits and so no more can reboot now.
        let waiting: Vec<usize> = running
            .keys()
            .copied()
            .filter(|i| !held.contains(i) && !released.contains(i))
            .collect();
        let refused_since = |i: &usize| waits(&hosts[*i]) > waits_at_last_reboot[*i];
        let full = held.len() == MAX_REBOOTING;
        let release_now = if full {
            waiting.is_empty() || waiting.iter().any(refused_since)
        } else {
            !held.iter().any(|i| *i != victim) || waiting.iter().all(refused_since)
        };
        // Until the victim's lease ends, keep enough hosts back to show its slot is used
        // again afterwards.
        let release_now = release_now && (victim_gone || n - 1 - released.len() > MAX_REBOOTING);
        let oldest = lines
            .iter()
            .filter_map(|l| {
                l.split_once(' ')?
                    .0
                    .trim_start_matches('h')
                    .parse::<usize>()
                    .ok()
            })
            .find(|i| held.contains(i) && *i != victim);
        if let (true, Some(i)) = (release_now, oldest) {
            let mut child = running.remove(&i).context("the host's upgrade ran")?;
            let status = child.wait()?;
            anyhow::ensure!(status.success(), "h{i}: upgrade --auto exited {status}");
            let out = run_ok(hosts[i].cli().args(["fleet", "release"]))?;
            let _ = out;
            held.remove(&i);
            released.insert(i);
            eprintln!("fleet: h{i} is up on the new image and released its slot");
            if !member_stopped && released.len() >= n / 2 {
                etcd.stop(1)?;
                member_stopped = true;
            }
            continue;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "fleet-bench: {n} hosts rolled out in {:?} with at most {MAX_REBOOTING} rebooting (most seen: {most}; \
         one host dead holding a slot for {VICTIM_TTL} s, one etcd member stopped half-way)",
        rollout_started.elapsed()
    );
    assert_eq!(most, MAX_REBOOTING, "the maximum was never used");
    if n > 3 {
        assert_eq!(
            most_after_victim, MAX_REBOOTING,
            "the victim's slot was not used again after its lease ended"
        );
    }
    assert!(member_stopped);
    assert!(etcd.keys(&slots_prefix)?.is_empty(), "slots left held");

    // Every host ends on v2; the victim too once it comes back: its staged deployment boots
    // and the release finds its slot already gone.
    hosts[victim].start_services()?;
    let out = run_ok(hosts[victim].cli().args(["fleet", "release"]))?;
    let _ = out;
    for host in &hosts {
        assert_eq!(host.next_boot_digest()?, v2.digest, "{}", host.name);
        let status: serde_json::Value =
            serde_json::from_str(&host.ok(&["--json", "fleet", "status"])?)?;
        assert!(status["slot"].is_null(), "{}: {status}", host.name);
    }
    Ok(())
}

/// A day of the week (`Mon`…) three days away from today (UTC): neither today, yesterday
/// nor tomorrow, so a window on it is closed now whatever the hour.
fn a_closed_day() -> &'static str {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        / 86_400;
    // 1970-01-01 was a Thursday; Monday first.
    ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][((days + 3 + 3) % 7) as usize]
}

fn one_config(window: &str, backend: &str, endpoints: &[String], reboot: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[upgrade]\npolicy = \"apply\"\nwindow = {window:?}\nreboot-command = {reboot:?}\n\
         [fleet]\nbackend = {backend:?}\ngroup = \"{GROUP}\"\nmax-rebooting = 1\n\
         slot-ttl = {TTL}\nretry-interval = 1\netcd-endpoints = [{}]\n",
        list.join(", ")
    )
}

/// What `dnf-image ARGS` printed and whether it succeeded.
fn try_cli(host: &FleetHost, args: &[&str]) -> Result<(bool, String)> {
    let out = host.cli().args(args).output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// One host through what goes wrong: a configuration that does not parse changes nothing, a
/// closed window stages without a reboot, a later rollout wave waits, an etcd that does not answer takes no slot, a
/// failed reboot command gives the slot back, a host that came up on another deployment
/// gives it back too, and with no backend the host reboots alone.
#[test]
fn apply_keeps_to_its_window_and_gives_slots_back_on_failure() -> Result<()> {
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let f = Fixtures::shared()?;
    let latest = f.push_as(&registry, tags::BASE_V1, "dnfimage/os:latest")?;
    let v2 = f.image(tags::BASE_V2)?;
    let etcd = EtcdCluster::start(&scratch.path().join("etcd"), 1)?;
    let endpoints = etcd.endpoints();
    let hook = scratch.path().join("reboots");
    let reboot = format!("echo rebooted >> {}", hook.display());
    let reboots = || -> usize {
        std::fs::read_to_string(&hook)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let slots = || etcd.keys("/dnfimage/fleet/");
    let host = FleetHost::new("h", &format!("{:032x}", 0xabc), &registry.addr())?;
    host.ok(&["rebase", &latest])?;
    f.push_as(&registry, tags::BASE_V2, "dnfimage/os:latest")?;
    let v1 = host.next_boot_digest()?;
    let write = |text: String| std::fs::write(host.config_path(), text);

    // A window that does not parse: an error naming the key, nothing staged.
    write(one_config("Mon 25:00-26:00", "etcd", &endpoints, &reboot))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(!ok && said.contains("[upgrade] window"), "{said}");
    assert!(said.contains("\"25:00\" is not a time"), "{said}");
    assert_eq!(host.next_boot_digest()?, v1);

    // Outside the window: staged, no slot, no reboot.
    let closed = format!("{} 00:00-01:00", a_closed_day());
    write(one_config(&closed, "etcd", &endpoints, &reboot))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(ok && said.contains("the reboot waits for it"), "{said}");
    assert_eq!(host.next_boot_digest()?, v2.digest);
    assert_eq!((reboots(), slots()?.len()), (0, 0));

    // Rollout waves: a host of wave 1 waits a wave's delay after staging; find a machine id
    // that puts it there.
    let waves = format!(
        "[upgrade]\npolicy = \"apply\"\nreboot-command = {reboot:?}\nrollout-waves = 2\n\
         wave-delay = 86400\n"
    );
    write(waves)?;
    let machine_id = host.scratch.path().join("machine-id");
    let mut found = false;
    for n in 0..64 {
        std::fs::write(&machine_id, format!("{:032x}\n", 0xabc + n))?;
        let status: serde_json::Value =
            serde_json::from_str(&host.ok(&["--json", "fleet", "status"])?)?;
        if status["wave"] == 1 {
            found = true;
            break;
        }
    }
    assert!(found, "no machine id in wave 1 of 2 among 64");
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(ok && said.contains("rollout wave 1 of 2"), "{said}");
    assert_eq!(reboots(), 0);

    // etcd does not answer: no slot, no reboot, the update stays staged.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let nowhere = vec![format!("http://127.0.0.1:{closed_port}")];
    write(one_config("", "etcd", &nowhere, &reboot))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(!ok && said.contains("No etcd endpoint answered"), "{said}");
    assert_eq!((reboots(), slots()?.len()), (0, 0));

    // Nor does a FleetLock server: the same.
    let fleetlock = format!(
        "{}fleetlock-url = \"http://127.0.0.1:{closed_port}\"\n",
        one_config("", "fleetlock", &[], &reboot)
    );
    write(fleetlock)?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(
        !ok && said.contains(&format!("Connecting to http://127.0.0.1:{closed_port}")),
        "{said}"
    );
    assert_eq!((reboots(), slots()?.len()), (0, 0));

    // The reboot command fails: the slot is given back.
    let failing = format!("{reboot}; exit 3");
    write(one_config("", "etcd", &endpoints, &failing))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(!ok && said.contains("The reboot command"), "{said}");
    assert_eq!((reboots(), slots()?.len()), (1, 0));
    let status: serde_json::Value =
        serde_json::from_str(&host.ok(&["--json", "fleet", "status"])?)?;
    assert!(status["slot"].is_null(), "{status}");

    // It reboots holding the slot; the host comes up on the old deployment (a rollback): the
    // release says so and gives the slot back.
    write(one_config("", "etcd", &endpoints, &reboot))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(ok && said.contains("Rebooting into deployment"), "{said}");
    assert_eq!(reboots(), 2);
    assert_eq!(slots()?.len(), 2, "a slot key and a holder key");
    let shown = host.ok(&["fleet", "status"])?;
    assert!(
        shown.contains("Holding: slot 0 of group \"test\" (etcd)"),
        "{shown}"
    );
    assert!(
        shown.contains("Slots held in the group: 1 (one by this host)"),
        "{shown}"
    );
    let shown = host.ok(&["status"])?;
    assert!(
        shown.contains(
            "Automatic upgrades: apply, reboot slots from etcd (group \"test\"), window any \
             time; holding slot 0 of group \"test\" (etcd)"
        ),
        "{shown}"
    );
    host.ok(&["rollback"])?;
    let (ok, said) = try_cli(&host, &["fleet", "release"])?;
    assert!(ok && said.contains("neither booted nor pending"), "{said}");
    assert_eq!(slots()?.len(), 0);
    let (ok, said) = try_cli(&host, &["fleet", "release"])?;
    assert!(ok && said.contains("holds no reboot slot"), "{said}");

    // No backend: it stages again and reboots alone; the release after the "boot" is clean.
    write(one_config("", "none", &[], &reboot))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(ok && said.contains("Rebooting into deployment"), "{said}");
    assert_eq!(reboots(), 3);
    assert_eq!(host.next_boot_digest()?, v2.digest);
    let (ok, said) = try_cli(&host, &["fleet", "release"])?;
    assert!(ok && said.contains("Up on deployment"), "{said}");
    // Nothing left to do: no update, nothing pending, no reboot.
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(ok, "{said}");
    assert_eq!(reboots(), 3);
    Ok(())
}

/// The blob GETs the primary answered since `pos`: digest to (requests, bytes).
fn blobs_served(registry: &Registry, pos: u64) -> Result<BTreeMap<String, (usize, u64)>> {
    let mut served: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for e in registry.requests_since(pos)? {
        if let (true, Some(d)) = (e.method == "GET" && e.status == 200, e.blob_digest()) {
            let entry = served.entry(d.to_string()).or_default();
            entry.0 += 1;
            entry.1 += e.bytes;
        }
    }
    Ok(served)
}

fn total_bytes(served: &BTreeMap<String, (usize, u64)>) -> u64 {
    served.values().map(|(_, b)| b).sum()
}

/// A cold mirror fetches a blob from the primary for the client and, separately, for its
/// cache (distribution's proxy does both), so at most twice; never more, whoever asks.
fn cold_miss(served: &BTreeMap<String, (usize, u64)>, what: &str) {
    assert!(!served.is_empty(), "{what}: the primary served no blob");
    for (digest, (count, _)) in served {
        assert!(
            *count <= 2,
            "{what}: the primary served {digest} {count} times"
        );
    }
}

/// 12 hosts (`DNFIMAGE_FLEET_HOSTS`) pull through one pull-through mirror: the primary
/// registry serves each blob only for the mirror's first miss, for the first install and for
/// an update that a canary fetches first and then all other hosts fetch at the same time; every
/// host ends on the update.
#[test]
fn hosts_pull_through_a_mirror_that_asks_the_primary_only_on_a_miss() -> Result<()> {
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let f = Fixtures::shared()?;
    let latest = f.push_as(&registry, tags::BASE_V1, "dnfimage/os:latest")?;
    let v2 = f.image(tags::BASE_V2)?;
    let mirror = PullThroughMirror::start(&scratch.path().join("mirror"), &registry.addr())?;
    let n = hosts_wanted();

    // One host straight from the primary: what each host costs it without a mirror.
    let direct = FleetHost::new("direct", &format!("{:032x}", 0xd0), &registry.addr())?;
    let pos = registry.log_position()?;
    direct.ok(&["rebase", &latest])?;
    let one_host = blobs_served(&registry, pos)?;
    assert!(one_host.values().all(|(c, _)| *c == 1), "{one_host:?}");
    drop(direct);

    let mut hosts = Vec::new();
    let mut with_mirror = 0;
    for i in 0..n {
        let host = FleetHost::with_mirror(
            &format!("h{i}"),
            &format!("{:032x}", 0xe0 + i),
            &registry.addr(),
            mirror.addr(),
        )?;
        let pos = registry.log_position()?;
        host.ok(&["rebase", &latest])?;
        let served = blobs_served(&registry, pos)?;
        if i == 0 {
            cold_miss(&served, "the first install through the mirror");
        } else {
            assert!(served.is_empty(), "h{i}: the primary served {served:?}");
        }
        with_mirror += total_bytes(&served);
        hosts.push(host);
    }
    eprintln!(
        "fleet-bench: primary blob bytes for {n} hosts installing v1: {with_mirror} through the \
         mirror; {} without (measured for one host: {}, times {n})",
        total_bytes(&one_host) * n as u64,
        total_bytes(&one_host)
    );

    // The update: a canary fetches it first, then all the others at once.
    f.push_as(&registry, tags::BASE_V2, "dnfimage/os:latest")?;
    let pos = registry.log_position()?;
    hosts[0].ok(&["upgrade"])?;
    let canary = blobs_served(&registry, pos)?;
    cold_miss(&canary, "the canary's update");
    let pos = registry.log_position()?;
    let children: Vec<Child> = hosts[1..]
        .iter()
        .map(|h| h.spawn_cli(&["upgrade"]))
        .collect::<Result<_>>()?;
    for (host, mut child) in hosts[1..].iter().zip(children) {
        let status = child.wait()?;
        anyhow::ensure!(
            status.success(),
            "{}: upgrade failed:\n{}",
            host.name,
            std::fs::read_to_string(host.cli_log())?
        );
    }
    let rest = blobs_served(&registry, pos)?;
    assert!(rest.is_empty(), "the primary served {rest:?}");
    eprintln!(
        "fleet-bench: primary blob bytes for {n} hosts fetching v2 (a canary, then {} at once) \
         through the mirror: {}",
        n - 1,
        total_bytes(&canary)
    );
    for host in &hosts {
        assert_eq!(host.next_boot_digest()?, v2.digest, "{}", host.name);
    }
    Ok(())
}

/// etcd over TLS: with a client certificate required, and with authentication on (the
/// gateway refuses a client certificate then, so that cluster takes the password alone). The
/// host takes and gives back its slot with the settings of its configuration, and is refused
/// with a clear error with the wrong CA, no certificate or the wrong password.
#[test]
fn apply_talks_to_etcd_over_tls_with_a_certificate_or_a_password() -> Result<()> {
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let f = Fixtures::shared()?;
    let latest = f.push_as(&registry, tags::BASE_V1, "dnfimage/os:latest")?;
    let tls = EtcdTls::make(&scratch.path().join("pki"))?;
    let other = EtcdTls::make(&scratch.path().join("other-pki"))?;
    let hook = scratch.path().join("reboots");
    let reboot = format!("echo rebooted >> {}", hook.display());
    let reboots = || {
        std::fs::read_to_string(&hook)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let password = scratch.path().join("password");
    std::fs::write(&password, "s3cret\n")?;
    let wrong = scratch.path().join("wrong");
    std::fs::write(&wrong, "guess\n")?;
    let host = FleetHost::new("h", &format!("{:032x}", 0x715), &registry.addr())?;
    host.ok(&["rebase", &latest])?;
    f.push_as(&registry, tags::BASE_V2, "dnfimage/os:latest")?;
    let write = |endpoints: &[String], extra: String| {
        std::fs::write(
            host.config_path(),
            format!("{}{extra}", one_config("", "etcd", endpoints, &reboot)),
        )
    };
    let ca = |path: &std::path::Path| format!("etcd-ca-file = {path:?}\n");
    let cert = format!(
        "etcd-cert-file = {:?}\netcd-key-file = {:?}\n",
        tls.cert, tls.key
    );
    let user =
        |pw: &std::path::Path| format!("etcd-username = \"root\"\netcd-password-file = {pw:?}\n");
    let take_and_release = |etcd: &EtcdCluster, n: usize| -> Result<()> {
        let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
        assert!(ok && said.contains("Rebooting into deployment"), "{said}");
        assert_eq!(reboots(), n);
        assert_eq!(etcd.keys("/dnfimage/fleet/")?.len(), 2);
        let (ok, said) = try_cli(&host, &["fleet", "release"])?;
        assert!(ok && said.contains("Up on deployment"), "{said}");
        assert!(etcd.keys("/dnfimage/fleet/")?.is_empty());
        // The next update to reboot into: the rollback of the one just "booted".
        host.ok(&["rollback"])?;
        Ok(())
    };

    // A client certificate required.
    let etcd = EtcdCluster::start_tls(&scratch.path().join("etcd"), 1, tls.clone(), true)?;
    let endpoints = etcd.endpoints();
    assert!(endpoints[0].starts_with("https://"), "{endpoints:?}");
    // A CA that did not sign the member's certificate: TLS fails, no slot, no reboot.
    write(&endpoints, format!("{}{cert}", ca(&other.ca)))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(!ok && said.contains("Setting up TLS"), "{said}");
    // No client certificate: the member refuses.
    write(&endpoints, ca(&tls.ca))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(!ok && said.contains("No etcd endpoint answered"), "{said}");
    assert_eq!(reboots(), 0);
    write(&endpoints, format!("{}{cert}", ca(&tls.ca)))?;
    take_and_release(&etcd, 1)?;
    drop(etcd);

    // Authentication on, over TLS.
    let mut etcd =
        EtcdCluster::start_tls(&scratch.path().join("etcd-auth"), 1, tls.clone(), false)?;
    etcd.enable_auth("s3cret")?;
    let endpoints = etcd.endpoints();
    write(&endpoints, format!("{}{}", ca(&tls.ca), user(&wrong)))?;
    let (ok, said) = try_cli(&host, &["upgrade", "--auto"])?;
    assert!(!ok && said.contains("authentication failed"), "{said}");
    assert_eq!(reboots(), 1);
    write(&endpoints, format!("{}{}", ca(&tls.ca), user(&password)))?;
    take_and_release(&etcd, 2)?;
    Ok(())
}

/// A mirror that serves another image under the primary's name is caught by the signature
/// policy: the signatures are looked up for the primary's reference at the digest the mirror
/// served, and there are none. The same host through an honest pull-through mirror installs
/// the signed image.
#[test]
fn a_mirror_serving_another_image_fails_signature_verification() -> Result<()> {
    let scratch = Scratch::new()?;
    let primary = Registry::start(&scratch.path().join("primary"))?;
    let lookaside = Lookaside::new(&scratch.path().join("lookaside"), &primary, true)?;
    let key = SigningKey::generate(&scratch.path().join("gpg"), "fleet <f@example.invalid>")?;
    let policy = write_signed_by_policy(
        &scratch.path().join("policy.json"),
        &primary.addr(),
        &key.public_key,
        false,
    )?;
    let f = Fixtures::shared()?;
    let latest = lookaside.push(&f.oci_ref(tags::BASE_V1), "dnfimage/os:latest", Some(&key))?;
    let v1 = f.image(tags::BASE_V1)?;
    // A registry standing in the mirror's place with another image under the same name.
    let rogue = Registry::start(&scratch.path().join("rogue"))?;
    f.push_as(&rogue, tags::BASE_V2, "dnfimage/os:latest")?;
    let honest = PullThroughMirror::start(&scratch.path().join("mirror"), &primary.addr())?;
    let policy_files = (policy, lookaside.registries_d().to_path_buf());
    // Signatures are looked up where the image is pulled from: the site gives each mirror the
    // primary's signature store in registries.d.
    let primary_yaml =
        std::fs::read_to_string(lookaside.registries_d().join("dnfimage-test.yaml"))?;
    for (name, addr) in [
        ("rogue", rogue.addr()),
        ("honest", honest.addr().to_string()),
    ] {
        std::fs::write(
            lookaside.registries_d().join(format!("{name}.yaml")),
            primary_yaml.replace(&primary.addr(), &addr),
        )?;
    }

    let mut host = FleetHost::with_mirror(
        "rogue",
        &format!("{:032x}", 0xbad),
        &primary.addr(),
        &rogue.addr(),
    )?;
    host.signature_policy = Some(policy_files.clone());
    host.start_services()?;
    let pos = rogue.log_position()?;
    let (ok, said) = try_cli(&host, &["rebase", &latest])?;
    assert!(!ok && said.to_lowercase().contains("signature"), "{said}");
    assert!(
        !rogue.requests_since(pos)?.is_empty(),
        "the pull did not go through the mirror"
    );
    let status: serde_json::Value = serde_json::from_str(&host.ok(&["status", "--json"])?)?;
    assert_eq!(
        status["deployments"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );

    let mut host = FleetHost::with_mirror(
        "honest",
        &format!("{:032x}", 0x600d),
        &primary.addr(),
        honest.addr(),
    )?;
    host.signature_policy = Some(policy_files);
    host.start_services()?;
    let (ok, said) = try_cli(&host, &["rebase", &latest])?;
    assert!(ok, "{said}");
    assert_eq!(host.next_boot_digest()?, v1.digest);
    Ok(())
}
