//! Rebase and upgrade benchmark: `dnf-image rebase` (fetch → import → deploy through the three
//! services) and a v1 → v2 `dnf-image upgrade` (two changed layers), next to ostree-ext's own
//! pull + deploy (`ostree_ext::container::deploy::deploy`) of the same images from the same
//! registry, on fresh sysroots, in the same run. Prints medians and ratios.
//!
//! Run with `make bench` (release binaries). Option: `--runs R` (default 3).

use std::ffi::OsStr;
use std::time::Instant;

use anyhow::{Context, Result};
use dnfimage_integration::bench::{Options, median};
use dnfimage_integration::sysroot::{STATEROOT, TestSysroot};
use dnfimage_integration::{FetcherOptions, Scratch, ServiceProcess, run_ok};
use dnfimage_interfaces::{deployer, importer};
use dnfimage_testimage::{Fixtures, Registry, tags};
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

fn main() -> Result<()> {
    let runs: usize = Options::parse(&["--runs"])?.get("--runs", 3)?;
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
    Ok(())
}
