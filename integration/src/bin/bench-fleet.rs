//! Fleet benchmark: what the primary registry serves for `--hosts` hosts installing an image
//! straight from it and through one pull-through `docker-registry` mirror (blob bytes counted in
//! its access log), and the wall time of a rollout of an update to those hosts under
//! `[upgrade] policy = "apply"` with `--max` rebooting at once, coordinated by a real 3-member
//! etcd cluster. A simulated host "reboots" instantly: the bench runs its `dnf-image fleet
//! release` as soon as its reboot command ran, so the time is staging plus coordination.
//!
//! Run with `make bench` (release binaries). Options: `--hosts N` (default 12), `--max M`
//! (default 2).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_integration::bench::Options;
use dnfimage_integration::fleet::{EtcdCluster, FleetHost, PullThroughMirror};
use dnfimage_integration::{Scratch, run_ok};
use dnfimage_testimage::{Fixtures, Registry, tags};

/// Blob bytes the primary answered with since `pos`.
fn blob_bytes(registry: &Registry, pos: u64) -> Result<u64> {
    Ok(registry
        .requests_since(pos)?
        .iter()
        .filter(|e| e.method == "GET" && e.status == 200 && e.blob_digest().is_some())
        .map(|e| e.bytes)
        .sum())
}

fn main() -> Result<()> {
    let o = Options::parse(&["--hosts", "--max"])?;
    let (n, max): (usize, usize) = (o.get("--hosts", 12)?, o.get("--max", 2)?);
    anyhow::ensure!(n > 0 && max > 0, "--hosts and --max must be at least 1");
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let f = Fixtures::shared()?;
    let latest = f.push_as(&registry, tags::BASE_V1, "dnfimage/os:latest")?;
    let mirror = PullThroughMirror::start(&scratch.path().join("mirror"), &registry.addr())?;

    // Without the mirror: every host from the primary.
    let pos = registry.log_position()?;
    for i in 0..n {
        let host = FleetHost::new(
            &format!("d{i}"),
            &format!("{:032x}", 0xd00 + i),
            &registry.addr(),
        )?;
        host.ok(&["rebase", &latest])?;
    }
    let direct = blob_bytes(&registry, pos)?;

    // Through the mirror; these hosts then roll out the update.
    let pos = registry.log_position()?;
    let mut hosts = Vec::new();
    for i in 0..n {
        let host = FleetHost::with_mirror(
            &format!("h{i}"),
            &format!("{:032x}", 0xe00 + i),
            &registry.addr(),
            mirror.addr(),
        )?;
        host.ok(&["rebase", &latest])?;
        hosts.push(host);
    }
    let mirrored = blob_bytes(&registry, pos)?;
    println!(
        "fleet: primary registry blob bytes for {n} hosts installing v1: {:.1} MB without a \
         mirror, {:.1} MB through a pull-through mirror",
        direct as f64 / 1e6,
        mirrored as f64 / 1e6
    );

    let etcd = EtcdCluster::start(&scratch.path().join("etcd"), 3)?;
    let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("{e:?}")).collect();
    let reboots = scratch.path().join("reboots");
    std::fs::write(&reboots, "")?;
    for (i, host) in hosts.iter().enumerate() {
        std::fs::write(
            host.config_path(),
            format!(
                "[upgrade]\npolicy = \"apply\"\nreboot-command = \"echo {i} >> {}\"\n\
                 [fleet]\nbackend = \"etcd\"\ngroup = \"bench\"\nmax-rebooting = {max}\n\
                 retry-interval = 1\netcd-endpoints = [{}]\n",
                reboots.display(),
                endpoints.join(", ")
            ),
        )?;
    }
    f.push_as(&registry, tags::BASE_V2, "dnfimage/os:latest")?;
    let start = Instant::now();
    let mut running: Vec<_> = hosts
        .iter()
        .map(|h| h.spawn_cli(&["upgrade", "--auto"]).map(Some))
        .collect::<Result<_>>()?;
    let mut released = BTreeSet::new();
    while released.len() < n {
        let text = std::fs::read_to_string(&reboots)?;
        let mut progressed = false;
        for i in text.lines().filter_map(|l| l.trim().parse::<usize>().ok()) {
            if released.contains(&i) {
                continue;
            }
            let status = running[i].take().context("a host rebooted twice")?.wait()?;
            anyhow::ensure!(status.success(), "h{i}: upgrade --auto exited {status}");
            run_ok(hosts[i].cli().args(["fleet", "release"]))?;
            released.insert(i);
            progressed = true;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    println!(
        "fleet: rollout of v2 to {n} hosts with at most {max} rebooting (etcd, 3 members; a \
         host asks again every 1 s): {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
