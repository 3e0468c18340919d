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
//! Run with `make bench` (release binaries). Options: `--runs R` (default 3), `--disk-mib M`
//! (default 200), `--upgrades U` (default 5).

use std::ffi::OsStr;
use std::time::Instant;

use anyhow::{Context, Result};
use dnfimage_integration::bench::{Options, median};
use dnfimage_integration::sysroot::{STATEROOT, TestSysroot};
use dnfimage_integration::{FetcherOptions, Scratch, ServiceProcess, run_ok};
use dnfimage_interfaces::{deployer, importer};
use dnfimage_testimage::{BaseOptions, Fixtures, Registry, build_base, oci_ref, skopeo_copy, tags};
use ostree_ext::container::{ImageReference, OstreeImageReference, SignatureSource};
use ostree_ext::{gio, ostree};

/// (rebase seconds, upgrade seconds) through dnf-image and the services.
fn ours(registry: &Registry) -> Result<(f64, f64)> {
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let fixtures = Fixtures::shared()?;
    let latest = fixtures.push_as(registry, tags::BASE_V1, "bench/os:latest")?;
    let conf = scratch.registries_conf(&registry.addr())?;
    let root = sysroot.path().as_os_str().to_owned();
    let _services = [
        ServiceProcess::fetcher(
            &scratch,
            &FetcherOptions {
                registries_conf: Some(conf),
                ..Default::default()
            },
        )?,
        ServiceProcess::start(
            &scratch,
            "importer",
            importer::INTERFACE,
            &[OsStr::new("--sysroot"), &root],
        )?,
        ServiceProcess::start(
            &scratch,
            "deployer",
            deployer::INTERFACE,
            &[OsStr::new("--sysroot"), &root],
        )?,
    ];
    let start = Instant::now();
    run_ok(scratch.cli().args(["rebase", &latest]))?;
    let rebase = start.elapsed().as_secs_f64();
    fixtures.push_as(registry, tags::BASE_V2, "bench/os:latest")?;
    let start = Instant::now();
    run_ok(scratch.cli().arg("upgrade"))?;
    let upgrade = start.elapsed().as_secs_f64();
    Ok((rebase, upgrade))
}

/// The same with ostree-ext's pull + deploy.
fn reference(registry: &Registry) -> Result<(f64, f64)> {
    let scratch = Scratch::new()?;
    let sysroot_dir = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let fixtures = Fixtures::shared()?;
    let latest = fixtures.push_as(registry, tags::BASE_V1, "bench/ref:latest")?;
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
    fixtures.push_as(registry, tags::BASE_V2, "bench/ref:latest")?;
    sysroot.load_if_changed(gio::Cancellable::NONE)?;
    let upgrade = deploy(&sysroot)?;
    Ok((rebase, upgrade))
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
    let root = sysroot.path().as_os_str().to_owned();
    let _services = [
        ServiceProcess::fetcher(
            &scratch,
            &FetcherOptions {
                registries_conf: Some(conf),
                ..Default::default()
            },
        )?,
        ServiceProcess::start(
            &scratch,
            "importer",
            importer::INTERFACE,
            &[OsStr::new("--sysroot"), &root],
        )?,
        ServiceProcess::start(
            &scratch,
            "deployer",
            deployer::INTERFACE,
            &[OsStr::new("--sysroot"), &root],
        )?,
    ];
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

fn main() -> Result<()> {
    let options = Options::parse(&["--runs", "--disk-mib", "--upgrades"])?;
    let runs: usize = options.get("--runs", 3)?;
    let disk_mib: u64 = options.get("--disk-mib", 200)?;
    let upgrades: u32 = options.get("--upgrades", 5)?;
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let (mut our_r, mut our_u, mut ref_r, mut ref_u) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let (r, u) = ours(&registry)?;
        our_r.push(r);
        our_u.push(u);
        let (r, u) = reference(&registry)?;
        ref_r.push(r);
        ref_u.push(u);
    }
    let (or, ou, rr, ru) = (median(our_r), median(our_u), median(ref_r), median(ref_u));
    println!("{runs} runs, median; images: fixture base v1 → v2 (2 changed layers)");
    println!(
        "rebase   dnf-image {or:6.2} s   ostree-ext pull+deploy {rr:6.2} s   ratio ostree-ext/dnf-image {:.2}x",
        rr / or
    );
    println!(
        "upgrade  dnf-image {ou:6.2} s   ostree-ext pull+deploy {ru:6.2} s   ratio ostree-ext/dnf-image {:.2}x",
        ru / ou
    );

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
