//! Rebase and upgrade benchmark: `dnf-image rebase` (fetch → import → deploy through the three
//! services) and a v1 → v2 `dnf-image upgrade` (two changed layers), next to ostree-ext's own
//! pull + deploy (`ostree_ext::container::deploy::deploy`) of the same images from the same
//! registry, on fresh sysroots, in the same run. Prints medians and ratios.
//!
//! Then disk use: a bootable image of `--disk-mib` MiB (the app part, a twentieth, changes in
//! every version) rebased and upgraded `--upgrades` times, through `dnf-image` (the repository
//! and the fetcher's cache, before and after `cleanup --repo`) and through ostree-ext's deploy
//! (the repository, before and after ostree-ext's `deploy::prune`, which bootc runs after an
//! upgrade).
//!
//! Then the shape of issue 13: the fixture base plus `--derived-layers` derived layers of
//! `--derived-kib` KiB of random data each, where the next version changes only the last
//! layer: rebase and that one-layer upgrade through both, on loopback and behind a
//! [`DISTANT`] proxy.
//!
//! Run with `make bench` (release binaries). Options: `--runs R` (default 3), `--disk-mib M`
//! (default 200), `--upgrades U` (default 5), `--derived-layers N` (default 8), `--derived-kib K`
//! (default 25600; 0 skips the derived images), `--slow 0|1` (default 1: also behind the proxy),
//! `--small-layers N` (default 64; 0 skips) and `--small-kib K` (default 256): the one-layer
//! upgrade of an image of 8, then N, derived layers of K KiB, and the ratio of the two.
//! With `BENCH_TRACE` set, every line of `dnf-image` is printed with its time.

use std::ffi::OsStr;
use std::time::Instant;

use anyhow::{Context, Result};
use dnfimage_integration::bench::{DISTANT, DISTANT_LABEL, Options, median};
use dnfimage_integration::host::image_services;
use dnfimage_integration::importer_support::{Call, copy_layout, derive, random_file};
use dnfimage_integration::proxy::SlowProxy;
use dnfimage_integration::sysroot::{STATEROOT, TestSysroot};
use dnfimage_integration::{FetcherOptions, Scratch, ServiceProcess, error_name, run_ok};
use dnfimage_interfaces::importer;
use dnfimage_testimage::{BaseOptions, Fixtures, Registry, build_base, oci_ref, skopeo_copy, tags};
use ostree_ext::container::{ImageReference, OstreeImageReference, SignatureSource};
use ostree_ext::{gio, ostree};

/// Moves repository `name` to version 1 or 2 of a benchmark's image and returns the reference
/// to pull it by.
type Publish<'a> = &'a dyn Fn(u32, &str) -> Result<String>;

/// The fixture base, v1 then v2 (two changed layers).
fn fixture_publish(registry: &Registry) -> impl Fn(u32, &str) -> Result<String> + '_ {
    move |v, name| {
        let tag = if v == 1 { tags::BASE_V1 } else { tags::BASE_V2 };
        Fixtures::shared()?.push_as(registry, tag, &format!("{name}:latest"))
    }
}

/// Runs `cmd` (the CLI, whose progress lines go to stderr, "Fetching: …", "Importing: …",
/// "Deploying: …") and returns its seconds and where they went: the seconds from the start to
/// the first line of each phase and to the end.
fn timed(cmd: &mut std::process::Command) -> Result<(f64, String)> {
    use std::io::BufRead;
    let start = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("Starting {cmd:?}"))?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut marks: Vec<(&str, f64)> = Vec::new();
    let mut text = String::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line?;
        let at = start.elapsed().as_secs_f64();
        for phase in ["Fetching", "Importing", "Deploying"] {
            if line.starts_with(&format!("{phase}:")) && marks.iter().all(|(p, _)| *p != phase) {
                marks.push((phase, at));
            }
        }
        if std::env::var_os("BENCH_TRACE").is_some() {
            eprintln!("    {at:6.3} {line}");
        }
        if line.contains("derived layers for content") {
            marks.push(("scan", at));
        }
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait()?;
    let total = start.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "{cmd:?} failed with {status}:\n{text}");
    let split: Vec<String> = marks
        .iter()
        .map(|(p, at)| format!("{p} {at:.2}"))
        .chain([format!("end {total:.2}")])
        .collect();
    Ok((total, split.join(", ")))
}

/// The peak resident set of process `pid` in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("Reading {path}"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .context("VmHWM")?
        .trim()
        .parse()
        .context("VmHWM")?;
    Ok(kib << 10)
}

/// The services whose peak RSS the benchmark reports, in [`ours`]'s order.
const SERVICES: [&str; 3] = ["fetcher", "importer", "deployer"];

/// (rebase seconds, upgrade seconds, peak RSS of each of [`SERVICES`]) through dnf-image and
/// the services.
fn ours(addrs: &[String], publish: Publish<'_>) -> Result<(f64, f64, [u64; 3])> {
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let latest = publish(1, "bench/os")?;
    let conf = scratch.path().join("bench-registries.conf");
    let text: String = addrs
        .iter()
        .map(|a| format!("[[registry]]\nlocation = \"{a}\"\ninsecure = true\n\n"))
        .collect();
    std::fs::write(&conf, text)?;
    let services = image_services(
        &scratch,
        &sysroot,
        &FetcherOptions {
            registries_conf: Some(conf),
            ..Default::default()
        },
    )?;
    let (rebase, split) = timed(scratch.cli().args(["rebase", &latest]))?;
    eprintln!("  dnf-image rebase:  {split}");
    publish(2, "bench/os")?;
    let (upgrade, split) = timed(scratch.cli().arg("upgrade"))?;
    eprintln!("  dnf-image upgrade: {split}");
    let mut rss = [0; 3];
    for (r, service) in rss.iter_mut().zip(&services) {
        *r = peak_rss(service.pid())?;
    }
    Ok((rebase, upgrade, rss))
}

/// The same with ostree-ext's pull + deploy.
fn reference(publish: Publish<'_>) -> Result<(f64, f64)> {
    let scratch = Scratch::new()?;
    let sysroot_dir = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let latest = publish(1, "bench/ref")?;
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(sysroot_dir.path())));
    sysroot.load(gio::Cancellable::NONE)?;
    let imgref = OstreeImageReference {
        sigverify: SignatureSource::ContainerPolicyAllowInsecure,
        imgref: ImageReference::try_from(latest.as_str())?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deploy = |sysroot: &ostree::Sysroot| -> Result<f64> {
        let mut opts = ostree_ext::container::deploy::DeployOpts::default();
        opts.proxy_cfg = Some(ostree_ext::container::store::ImageProxyConfig {
            insecure_skip_tls_verification: Some(true),
            ..Default::default()
        });
        let start = Instant::now();
        rt.block_on(ostree_ext::container::deploy::deploy(
            sysroot,
            STATEROOT,
            &imgref,
            Some(opts),
        ))
        .context("ostree-ext deploy")?;
        Ok(start.elapsed().as_secs_f64())
    };
    let rebase = deploy(&sysroot)?;
    publish(2, "bench/ref")?;
    sysroot.load_if_changed(gio::Cancellable::NONE)?;
    let upgrade = deploy(&sysroot)?;
    Ok((rebase, upgrade))
}

/// The fixture base plus `layers` derived layers of `kib` KiB of random data each, tagged "v1",
/// and the same with the last layer's data replaced, tagged "v2", in one OCI layout.
fn derived_images(
    dir: &std::path::Path,
    name: &str,
    layers: u32,
    kib: u64,
) -> Result<std::path::PathBuf> {
    let layout = dir.join(format!("{name}-oci"));
    copy_layout(&Fixtures::shared()?.oci_dir, &[tags::BASE_V1], &layout)?;
    let mut below = tags::BASE_V1.to_string();
    for i in 1..=layers {
        let data = |v: u32| -> Result<std::path::PathBuf> {
            let root = dir.join(format!("{name}-root-{i}-{v}"));
            random_file(
                &root.join(format!("usr/share/dnfimage-bench/layer-{i:03}.bin")),
                kib << 10,
            )?;
            Ok(root)
        };
        if i == layers {
            derive(&layout, &below, "v2", &data(2)?)?;
        }
        let tag = if i == layers {
            "v1".to_string()
        } else {
            format!("d{i}")
        };
        derive(&layout, &below, &tag, &data(1)?)?;
        below = tag;
    }
    Ok(layout)
}

/// Seconds to import image "v1" of `layout` into a fresh sysroot through the importer (the
/// varlink `Import` from an `oci:` source), and the importer's peak RSS.
fn our_import(layout: &std::path::Path) -> Result<(f64, u64)> {
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let root = sysroot.path().as_os_str().to_owned();
    let service = ServiceProcess::start(
        &scratch,
        "importer",
        importer::INTERFACE,
        &[OsStr::new("--sysroot"), &root],
    )?;
    let start = Instant::now();
    let replies = Call::start(
        &scratch.socket(importer::INTERFACE),
        &format!("{}.Import", importer::INTERFACE),
        serde_json::json!({
            "source": oci_ref(layout, "v1"),
            "image": "docker://bench.example/os:latest",
        }),
        true,
    )?
    .rest()?;
    let secs = start.elapsed().as_secs_f64();
    let last = replies.last().context("no reply")?;
    anyhow::ensure!(error_name(last).is_none(), "the import failed: {last}");
    Ok((secs, peak_rss(service.pid())?))
}

/// Seconds to import the same with ostree-ext's `ImageImporter` into a fresh sysroot.
fn reference_import(layout: &std::path::Path) -> Result<f64> {
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let repo = ostree::Repo::new_for_path(sysroot.repo());
    repo.open(gio::Cancellable::NONE)?;
    let imgref = OstreeImageReference {
        sigverify: SignatureSource::ContainerPolicyAllowInsecure,
        imgref: ImageReference::try_from(oci_ref(layout, "v1").as_str())?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    rt.block_on(async {
        let mut imp =
            ostree_ext::container::store::ImageImporter::new(&repo, &imgref, Default::default())
                .await?;
        match imp.prepare().await? {
            ostree_ext::container::store::PrepareResult::Ready(prep) => {
                imp.import(prep).await?;
            }
            ostree_ext::container::store::PrepareResult::AlreadyPresent(_) => {
                anyhow::bail!("a fresh repository has the image")
            }
        }
        anyhow::Ok(())
    })
    .context("ostree-ext import")?;
    Ok(start.elapsed().as_secs_f64())
}

/// `du -s -B1 PATH`: the bytes `path` takes on disk.
fn du(path: &std::path::Path) -> Result<u64> {
    let out = run_ok(
        std::process::Command::new("du")
            .args(["-s", "-B1"])
            .arg(path),
    )?;
    out.split_whitespace()
        .next()
        .context("du output")?
        .parse()
        .context("du output")
}

/// Versions 1..=`n` of a bootable image of about `mib` MiB in one OCI layout, tags "v1"….
fn disk_images(dir: &std::path::Path, mib: u64, n: u32) -> Result<std::path::PathBuf> {
    let layout = dir.join("oci");
    let app = (mib << 20) / 20;
    let opts = BaseOptions {
        fillers: vec![("filler".to_string(), (mib << 20) - app)],
        app_bytes: app,
        ..Default::default()
    };
    for v in 1..=n {
        build_base(&layout, &format!("v{v}"), v, &opts)?;
    }
    Ok(layout)
}

/// Moves `name` in `registry` to version `v` of `layout`.
fn publish(registry: &Registry, layout: &std::path::Path, v: u32, name: &str) -> Result<String> {
    let dest = registry.docker_ref(name);
    skopeo_copy(&oci_ref(layout, &format!("v{v}")), &dest)?;
    Ok(dest)
}

/// Bytes on disk after a rebase and `upgrades` upgrades through dnf-image:
/// (repository, cache, repository after `cleanup --repo`).
fn our_disk(
    registry: &Registry,
    layout: &std::path::Path,
    upgrades: u32,
) -> Result<(u64, u64, u64)> {
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let conf = scratch.registries_conf(&registry.addr())?;
    let _services = image_services(
        &scratch,
        &sysroot,
        &FetcherOptions {
            registries_conf: Some(conf),
            ..Default::default()
        },
    )?;
    let latest = publish(registry, layout, 1, "bench/disk:latest")?;
    run_ok(scratch.cli().args(["rebase", &latest]))?;
    for v in 2..=upgrades + 1 {
        publish(registry, layout, v, "bench/disk:latest")?;
        run_ok(scratch.cli().arg("upgrade"))?;
    }
    let (repo, cache) = (
        du(&sysroot.repo())?,
        du(&scratch.state_dir().join("cache"))?,
    );
    run_ok(scratch.cli().args(["cleanup", "--repo"]))?;
    Ok((repo, cache, du(&sysroot.repo())?))
}

/// The same through ostree-ext's deploy: (repository, repository after `deploy::prune`).
fn reference_disk(
    registry: &Registry,
    layout: &std::path::Path,
    upgrades: u32,
) -> Result<(u64, u64)> {
    let scratch = Scratch::new()?;
    let sysroot_dir = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(sysroot_dir.path())));
    sysroot.load(gio::Cancellable::NONE)?;
    let latest = publish(registry, layout, 1, "bench/disk-ref:latest")?;
    let imgref = OstreeImageReference {
        sigverify: SignatureSource::ContainerPolicyAllowInsecure,
        imgref: ImageReference::try_from(latest.as_str())?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for v in 1..=upgrades + 1 {
        if v > 1 {
            publish(registry, layout, v, "bench/disk-ref:latest")?;
            sysroot.load_if_changed(gio::Cancellable::NONE)?;
        }
        let mut opts = ostree_ext::container::deploy::DeployOpts::default();
        opts.proxy_cfg = Some(ostree_ext::container::store::ImageProxyConfig {
            insecure_skip_tls_verification: Some(true),
            ..Default::default()
        });
        rt.block_on(ostree_ext::container::deploy::deploy(
            &sysroot,
            STATEROOT,
            &imgref,
            Some(opts),
        ))
        .context("ostree-ext deploy")?;
    }
    let repo = du(&sysroot_dir.repo())?;
    let locked = rt.block_on(ostree_ext::sysroot::SysrootLock::new_from_sysroot(&sysroot))?;
    ostree_ext::container::deploy::prune(&locked).context("ostree-ext deploy::prune")?;
    drop(locked);
    Ok((repo, du(&sysroot_dir.repo())?))
}

/// Runs [`ours`] and [`reference`] `runs` times each, alternating, and prints the medians;
/// returns ours (rebase, upgrade).
fn compare(runs: usize, what: &str, addrs: &[String], publish: Publish<'_>) -> Result<(f64, f64)> {
    let (mut our_r, mut our_u, mut ref_r, mut ref_u) = (vec![], vec![], vec![], vec![]);
    let mut peak = [0u64; 3];
    for _ in 0..runs {
        let (r, u, rss) = ours(addrs, publish)?;
        our_r.push(r);
        our_u.push(u);
        for (p, r) in peak.iter_mut().zip(rss) {
            *p = (*p).max(r);
        }
        let (r, u) = reference(publish)?;
        ref_r.push(r);
        ref_u.push(u);
    }
    let (or, ou, rr, ru) = (median(our_r), median(our_u), median(ref_r), median(ref_u));
    println!("{runs} runs, median; {what}");
    println!(
        "rebase   dnf-image {or:6.2} s   ostree-ext pull+deploy {rr:6.2} s   dnf-image/ostree-ext {:.2}x",
        or / rr
    );
    println!(
        "upgrade  dnf-image {ou:6.2} s   ostree-ext pull+deploy {ru:6.2} s   dnf-image/ostree-ext {:.2}x",
        ou / ru
    );
    let peaks: Vec<String> = SERVICES
        .iter()
        .zip(peak)
        .map(|(s, p)| format!("{s} {:.0} MiB", p as f64 / f64::from(1 << 20)))
        .collect();
    println!("peak RSS  {}", peaks.join(", "));
    Ok((or, ou))
}

fn main() -> Result<()> {
    let options = Options::parse(&[
        "--runs",
        "--disk-mib",
        "--upgrades",
        "--derived-layers",
        "--derived-kib",
        "--slow",
        "--small-layers",
        "--small-kib",
    ])?;
    let runs: usize = options.get("--runs", 3)?;
    let disk_mib: u64 = options.get("--disk-mib", 200)?;
    let upgrades: u32 = options.get("--upgrades", 5)?;
    let derived_layers: u32 = options.get("--derived-layers", 8)?;
    let derived_kib: u64 = options.get("--derived-kib", 25600)?;
    let slow: u8 = options.get("--slow", 1)?;
    let small_layers: u32 = options.get("--small-layers", 64)?;
    let small_kib: u64 = options.get("--small-kib", 256)?;
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let addrs = [registry.addr()];
    compare(
        runs,
        "images: fixture base v1 → v2 (2 changed layers), loopback",
        &addrs,
        &fixture_publish(&registry),
    )?;

    if derived_kib > 0 && derived_layers > 0 {
        let layout = derived_images(scratch.path(), "derived", derived_layers, derived_kib)?;
        let direct = |v: u32, name: &str| publish(&registry, &layout, v, &format!("{name}:latest"));
        let what = format!(
            "images: base + {derived_layers} derived layers of {derived_kib} KiB, v2 changes \
             the last one"
        );
        compare(runs, &format!("{what}, loopback"), &addrs, &direct)?;
        let (mut our_i, mut ref_i, mut rss) = (vec![], vec![], 0);
        for _ in 0..runs {
            let (secs, peak) = our_import(&layout)?;
            our_i.push(secs);
            rss = rss.max(peak);
            ref_i.push(reference_import(&layout)?);
        }
        let bytes = dnfimage_testimage::read_image(&layout, "v1")?.layers_size() as f64;
        let (oi, ri) = (median(our_i), median(ref_i));
        println!(
            "import of the local oci: image ({:.0} MiB): dnf-image {oi:.2} s ({:.0} MB/s, importer \
             peak RSS {:.0} MiB)   ostree-ext {ri:.2} s ({:.0} MB/s)   rate dnf-image/ostree-ext {:.2}x",
            bytes / f64::from(1 << 20),
            bytes / oi / 1e6,
            rss as f64 / f64::from(1 << 20),
            bytes / ri / 1e6,
            ri / oi
        );
        if slow != 0 {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let proxy = rt.block_on(SlowProxy::start(&registry.addr(), DISTANT))?;
            let through = |v: u32, name: &str| {
                let r = publish(&registry, &layout, v, &format!("{name}:latest"))?;
                Ok(r.replace(&registry.addr(), &proxy.addr()))
            };
            compare(
                runs,
                &format!("{what}, {DISTANT_LABEL}"),
                &[registry.addr(), proxy.addr()],
                &through,
            )?;
        }
    }

    // The work of an upgrade grows with what changed: one small layer changed in an image of
    // 8 small layers, then of `small_layers`.
    if small_layers > 0 && small_kib > 0 {
        let mut upgrades_of = Vec::new();
        for n in [8, small_layers] {
            let name = format!("small{n}");
            let layout = derived_images(scratch.path(), &name, n, small_kib)?;
            let direct =
                |v: u32, name: &str| publish(&registry, &layout, v, &format!("{name}:latest"));
            let what = format!(
                "images: base + {n} derived layers of {small_kib} KiB, v2 changes the last one, \
                 loopback"
            );
            upgrades_of.push((n, compare(runs, &what, &addrs, &direct)?.1));
        }
        if let [(a, ua), (b, ub)] = upgrades_of[..] {
            println!(
                "one-layer upgrade of {b} layers against {a} layers of {small_kib} KiB: \
                 {ub:.2} s / {ua:.2} s = {:.2}x",
                ub / ua
            );
        }
    }

    let images = disk_images(scratch.path(), disk_mib, upgrades + 1)?;
    let (repo, cache, pruned) = our_disk(&registry, &images, upgrades)?;
    let (ref_repo, ref_pruned) = reference_disk(&registry, &images, upgrades)?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!("disk after rebase + {upgrades} upgrades of a {disk_mib} MiB image");
    println!(
        "  dnf-image   repo {:7.1} MiB + cache {:7.1} MiB = {:7.1} MiB; after cleanup --repo {:7.1} MiB",
        mib(repo),
        mib(cache),
        mib(repo + cache),
        mib(pruned + cache)
    );
    println!(
        "  ostree-ext  repo {:7.1} MiB (deploy); after deploy::prune {:7.1} MiB",
        mib(ref_repo),
        mib(ref_pruned)
    );
    Ok(())
}
