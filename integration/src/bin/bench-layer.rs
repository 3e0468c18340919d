//! Layering benchmark: `Layerer.Build` of 1 package and of N packages (default 50 of 200 files
//! each, 10,000 files, a dependency chain) on base v1, against plain `dnf --installroot` of the
//! same packages into a copy of the same tree, in the same run. Prints the medians and ratios.
//!
//! Run with `cargo build --release --workspace && ./target/release/bench-layer` (as root).
//! Options: `--packages N --files F --runs R`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use dnfimage_integration::bench::{Options, median};
use dnfimage_integration::rpm_support::write_repo_file;
use dnfimage_integration::sysroot::TestSysroot;
use dnfimage_integration::{Scratch, ServiceProcess, bin_dir, deploy_support, raw_call, run_ok};
use dnfimage_interfaces::layerer::INTERFACE;
use dnfimage_testimage::rpms::{RPMDB_DIR, build_bench_repo, packages};
use dnfimage_testimage::{Fixtures, RepoServer, TestRpms, tags};
use serde_json::json;

struct Params {
    packages: usize,
    files: usize,
    runs: usize,
}

fn params() -> Result<Params> {
    let o = Options::parse(&["--packages", "--files", "--runs"])?;
    Ok(Params {
        packages: o.get("--packages", 50)?,
        files: o.get("--files", 200)?,
        runs: o.get("--runs", 3)?,
    })
}

/// The bench repository, built once and kept under target/; returns it and its package names.
fn bench_repo(p: &Params) -> Result<(PathBuf, Vec<String>)> {
    let dir = bin_dir().join(format!(
        "../dnfimage-fixtures/bench-rpms-{}x{}",
        p.packages, p.files
    ));
    let names: Vec<String> = (0..p.packages)
        .map(|i| format!("dnfimage-bench-{i:03}"))
        .collect();
    if !dir.join("repodata/repomd.xml").exists() {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let start = Instant::now();
        let built = build_bench_repo(&tmp, p.packages, p.files)?;
        anyhow::ensure!(built == names, "unexpected package names {built:?}");
        std::fs::rename(&tmp, &dir)?;
        eprintln!(
            "built {} bench packages in {:.1} s",
            p.packages,
            start.elapsed().as_secs_f64()
        );
    }
    Ok((dir, names))
}

/// `Layerer.Build` of `install` on `base`; seconds.
fn layer(socket: &Path, base: &str, install: &[String]) -> Result<f64> {
    let start = Instant::now();
    let replies = raw_call(
        socket,
        &json!({"method": format!("{INTERFACE}.Build"), "more": true,
                "parameters": {"baseCommit": base, "install": install}}),
    )?;
    let elapsed = start.elapsed().as_secs_f64();
    let last = replies.last().context("no reply")?;
    anyhow::ensure!(last.get("error").is_none(), "Build failed: {last}");
    Ok(elapsed)
}

/// Plain `dnf --installroot` of `install` into a fresh copy of `base`; seconds (the copy is
/// not timed).
fn plain_dnf(
    repo: &Path,
    base: &str,
    work: &Path,
    repos_dir: &Path,
    install: &[String],
) -> Result<f64> {
    let root = work.join("copy");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(work)?;
    run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(["checkout", "--force-copy", base])
            .arg(&root),
    )?;
    let home = work.join("home");
    std::fs::create_dir_all(&home)?;
    std::fs::write(home.join(".rpmmacros"), format!("%_dbpath /{RPMDB_DIR}\n"))?;
    let start = Instant::now();
    run_ok(
        Command::new("dnf")
            .arg("-y")
            .arg(format!("--installroot={}", root.display()))
            .arg(format!("--setopt=reposdir={}", repos_dir.display()))
            .args([
                "--nogpgcheck",
                "--releasever=1",
                "--disableplugin=*",
                "install",
            ])
            .args(install)
            .env("HOME", &home),
    )?;
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let p = params()?;
    let (bench_dir, names) = bench_repo(&p)?;
    let rpms = TestRpms::shared()?;
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let base =
        deploy_support::import(&sysroot.repo(), &Fixtures::shared()?.oci_ref(tags::BASE_V1))?
            .commit;
    let test_server = RepoServer::serve(&rpms.repo_dir)?;
    let bench_server = RepoServer::serve(&bench_dir)?;
    let repos_dir = scratch.path().join("repos.d");
    write_repo_file(&repos_dir, "dnfimage-test", &test_server.url(), true)?;
    write_repo_file(&repos_dir, "dnfimage-bench", &bench_server.url(), true)?;
    let state = scratch.state_dir();
    let args: Vec<&std::ffi::OsStr> = vec![
        "--sysroot".as_ref(),
        sysroot.path().as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--repos-dir".as_ref(),
        repos_dir.as_os_str(),
        "--gpg-key-dir".as_ref(),
        rpms.key_dir.as_os_str(),
    ];
    let service = ServiceProcess::start(&scratch, "layerer", INTERFACE, &args)?;
    let socket = scratch.socket(INTERFACE);
    let one = vec![packages::LIBHELLO.to_string()];
    let work = scratch.path().join("plain");

    let mut rows = Vec::new();
    for (label, install) in [("1 package", &one), ("all", &names)] {
        let (mut layered, mut plain) = (Vec::new(), Vec::new());
        for _ in 0..p.runs {
            layered.push(layer(&socket, &base, install)?);
            plain.push(plain_dnf(
                &sysroot.repo(),
                &base,
                &work,
                &repos_dir,
                install,
            )?);
        }
        let label = if label == "all" {
            format!("{} packages, {} files", p.packages, p.packages * p.files)
        } else {
            label.to_string()
        };
        rows.push((label, median(layered), median(plain)));
    }
    sysroot.fsck()?;
    for line in service.log_text().lines().filter(|l| l.contains("Built ")) {
        eprintln!("{}", line.trim());
    }
    drop(service);

    println!(
        "{:<28} {:>12} {:>20} {:>7}",
        "layering", "Build (s)", "dnf --installroot (s)", "ratio"
    );
    for (label, layered, plain) in rows {
        println!(
            "{label:<28} {layered:>12.2} {plain:>20.2} {:>7.2}",
            layered / plain
        );
    }
    println!(
        "(median of {} runs; Build = overlay, resolve+download, signature checks, sandboxed \
         rpm, commit; dnf installs into a plain copy without checks)",
        p.runs
    );
    Ok(())
}
