//! The dnf plugin (`dnf-plugin/dnfimage.py`, installed by `scripts/install.sh`) under the real
//! dnf 4: `dnf image …` runs the built `dnf-image` against a scratch host's real services, on
//! any host; on a host booted from an image, `dnf upgrade`, `dnf install` and `dnf remove`
//! become dnfimage's and the other commands that would write /usr are refused with a sentence,
//! while read-only commands work as usual.
//!
//! dnf runs in a bubblewrap sandbox: the host's root read-only (so a plugin that let a
//! command through could not change this machine), the scratch directory writable, and a
//! `/run` of its own, with `/run/ostree-booted` in it when the test plays an ostree-booted host.
//! The plugin finds `dnf-image` on PATH and `dnf-image` finds the scratch services through its
//! own environment (`DNFIMAGE_RUNTIME_DIR`, `DNFIMAGE_SYSROOT`): no knob of the plugin's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result};
use dnfimage_integration::host::Host;
use dnfimage_integration::rpm_support::REPO;
use dnfimage_integration::{bin_dir, repo_root, run};
use dnfimage_testimage::rpms::packages;
use dnfimage_testimage::tags;
use serde_json::Value;

/// Installs the plugin as `make install` does (`scripts/install.sh` into a staging root, no
/// binaries), once for a host's scratch directory; returns the directory dnf loads it from.
fn installed_plugin_dir(host: &Host) -> Result<PathBuf> {
    fn find(dir: &Path) -> Option<PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if path.ends_with("dnf-plugins/dnfimage.py") {
                return path.parent().map(Path::to_path_buf);
            }
            if path.is_dir()
                && let Some(found) = find(&path)
            {
                return Some(found);
            }
        }
        None
    }
    let root = host.scratch.path().join("installed");
    if !root.exists() {
        let out = run(Command::new(repo_root().join("scripts/install.sh"))
            .env("DESTDIR", &root)
            .env("PROFILE", "debug")
            .env("CARGO_TARGET_DIR", host.scratch.path().join("no-target"))
            .env_remove("PREFIX")
            .env_remove("DNF_PLUGINDIR"))?;
        anyhow::ensure!(out.status.success(), "install.sh: {}", text(&out));
    }
    let dir = find(&root.join("usr/lib")).context("install.sh installed no dnf plugin")?;
    assert_eq!(
        std::fs::read(dir.join("dnfimage.py"))?,
        std::fs::read(repo_root().join("dnf-plugin/dnfimage.py"))?
    );
    Ok(dir)
}

/// Runs `dnf ARGS` with the installed plugin, as on an ostree-booted host when `ostree_booted`.
fn dnf(host: &Host, ostree_booted: bool, args: &[&str]) -> Result<Output> {
    let plugins = installed_plugin_dir(host)?;
    let scratch = host.scratch.path();
    let dnf_dir = scratch.join("dnf");
    for sub in ["cache", "log", "persist"] {
        std::fs::create_dir_all(dnf_dir.join(sub))?;
    }
    let booted_marker = scratch.join("ostree-booted");
    std::fs::write(&booted_marker, "")?;
    let repos_dir = host
        .repos
        .as_ref()
        .context("the host has package repositories")?
        .repos_dir
        .clone();
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut cmd = Command::new("bwrap");
    cmd.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"])
        .args(["--tmpfs", "/run", "--tmpfs", "/tmp"])
        .arg("--bind")
        .args([scratch, scratch]);
    if ostree_booted {
        cmd.arg("--ro-bind")
            .arg(&booted_marker)
            .arg("/run/ostree-booted");
    }
    cmd.args(["--setenv", "PATH", &path])
        .arg("--setenv")
        .arg("DNFIMAGE_RUNTIME_DIR")
        .arg(host.scratch.runtime_dir())
        .arg("--setenv")
        .arg("DNFIMAGE_SYSROOT")
        .arg(host.sysroot.path())
        .args(["--", "dnf", "--releasever=12"])
        .arg(format!("--setopt=pluginpath={}", plugins.display()))
        .arg(format!("--setopt=reposdir={}", repos_dir.display()))
        .arg(format!(
            "--setopt=cachedir={}",
            dnf_dir.join("cache").display()
        ))
        .arg(format!("--setopt=logdir={}", dnf_dir.join("log").display()))
        .arg(format!(
            "--setopt=persistdir={}",
            dnf_dir.join("persist").display()
        ))
        .args(args)
        .stdin(Stdio::null());
    run(&mut cmd)
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `dnf ARGS` succeeded; returns its stdout and stderr.
fn dnf_ok(host: &Host, booted: bool, args: &[&str]) -> Result<String> {
    let out = dnf(host, booted, args)?;
    anyhow::ensure!(out.status.success(), "dnf {args:?}: {}", text(&out));
    Ok(text(&out))
}

fn layered(host: &Host) -> Result<Vec<String>> {
    let d = &host.deployments()?[0];
    Ok(d["layering"]["packages"]
        .as_array()
        .context("packages")?
        .iter()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect())
}

#[test]
fn dnf_image_is_dnf_image_and_other_hosts_keep_dnf() -> Result<()> {
    let host = Host::with_layerer()?;

    // `dnf image --help` is dnf-image's help, commands and all.
    let own = run(host
        .scratch
        .cli()
        .env("DNFIMAGE_SYSROOT", host.sysroot.path())
        .arg("--help"))?;
    let out = dnf(&host, false, &["image", "--help"])?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&own.stdout)
    );
    for command in [
        "status",
        "rebase",
        "upgrade",
        "install",
        "uninstall",
        "override",
    ] {
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(command),
            "{}",
            text(&out)
        );
    }

    // Any command, with its options (even one dnf also has: --repo), reaches the services.
    dnf_ok(&host, false, &["image", "rebase", &host.latest])?;
    let out = dnf(&host, false, &["image", "status", "--json"])?;
    assert!(out.status.success(), "{}", text(&out));
    let shown: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["deployments"], host.status()?["deployments"]);
    dnf_ok(
        &host,
        false,
        &["image", "install", "--repo", REPO, packages::HELLO],
    )?;
    assert_eq!(layered(&host)?, [packages::HELLO]);

    // dnf-image's exit status is dnf's: 77 for "no update", 2 for a usage error.
    let out = dnf(
        &host,
        false,
        &["image", "upgrade", "--check", "--unchanged-exit-77"],
    )?;
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    let out = dnf(&host, false, &["image", "upgrade", "--no-such-flag"])?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));

    // Not an ostree-booted host: dnf's own commands stay dnf's, even with an image update out.
    host.publish(tags::BASE_V2)?;
    let before = host.status()?["deployments"].clone();
    let out = dnf(&host, false, &["upgrade"])?;
    let all = text(&out);
    assert!(
        !all.contains("Staged") && !all.contains("dnf-image"),
        "dnf upgrade ran dnfimage's: {all}"
    );
    let out = dnf(
        &host,
        false,
        &["--nogpgcheck", "install", packages::LIBHELLO],
    )?;
    assert!(
        !out.status.success(),
        "dnf installed into this host: {}",
        text(&out)
    );
    // dnf resolved it itself and stopped at its question (no terminal: no).
    assert!(text(&out).contains("Operation aborted"), "{}", text(&out));
    let out = dnf(&host, false, &["downgrade", packages::HELLO])?;
    assert!(!text(&out).contains("image host"), "{}", text(&out));
    assert_eq!(host.status()?["deployments"], before);

    // Read-only commands with the plugin loaded.
    let listed = dnf_ok(
        &host,
        false,
        &["repoquery", "--repo", REPO, packages::HELLO],
    )?;
    assert!(listed.contains(packages::HELLO), "{listed}");
    Ok(())
}

#[test]
fn on_an_image_host_dnf_upgrade_install_and_remove_are_dnfimages() -> Result<()> {
    let host = Host::with_layerer()?;
    host.ok(&["rebase", &host.latest])?;
    let v1 = host.deployments()?[0]["imageDigest"].clone();

    // Read-only commands work as usual.
    let listed = dnf_ok(&host, true, &["repoquery", "--repo", REPO, packages::HELLO])?;
    assert!(listed.contains(packages::HELLO), "{listed}");
    let info = dnf_ok(&host, true, &["info", "--repo", REPO, packages::HELLO])?;
    assert!(info.contains(packages::HELLO), "{info}");
    dnf_ok(&host, true, &["makecache", "--repo", REPO])?;

    // install layers (the dependency comes along), through dnf-image, from the repository
    // named with dnf's --repo.
    let out = dnf_ok(&host, true, &["install", "--repo", REPO, packages::HELLO])?;
    assert!(out.contains(packages::LIBHELLO), "{out}");
    assert_eq!(layered(&host)?, [packages::HELLO]);
    assert_eq!(
        host.deployed_file(0, dnfimage_testimage::rpms::files::HELLO)?,
        dnfimage_testimage::rpms::files::HELLO_CONTENT
    );

    // Commands dnf cannot do here: one sentence saying what to do instead, nothing changed.
    let before = host.status()?["deployments"].clone();
    let hello_rpm = host.scratch.path().join("hello.rpm");
    std::fs::write(&hello_rpm, "")?;
    let hello_rpm = hello_rpm.display().to_string();
    for (args, instead) in [
        (
            vec!["remove", packages::BASE],
            format!("`dnf image override remove {}`", packages::BASE),
        ),
        (
            vec!["remove", packages::HELLO, packages::KERNEL],
            format!("`dnf image override remove {}`", packages::KERNEL),
        ),
        (vec!["remove", "--duplicates"], "`dnf image status`".into()),
        (vec!["upgrade", packages::HELLO], "without arguments".into()),
        (vec!["upgrade-minimal"], "without arguments".into()),
        (
            vec!["install", &hello_rpm],
            "`dnf image override replace".into(),
        ),
        (vec!["install", "@core"], "by name".into()),
        (
            vec!["downgrade", packages::HELLO],
            "`dnf image rollback`".into(),
        ),
        (
            vec!["reinstall", packages::HELLO],
            "`dnf image reset`".into(),
        ),
        (vec!["distro-sync"], "`dnf image rebase IMAGE`".into()),
        (
            vec!["swap", packages::BASE, packages::HELLO],
            "`dnf image override remove PKG`".into(),
        ),
        (vec!["autoremove"], "`dnf image reset`".into()),
        (vec!["group", "install", "core"], "by name".into()),
        (vec!["groupinstall", "core"], "by name".into()),
        (vec!["module", "install", "nodejs"], "by name".into()),
        (vec!["history", "undo", "1"], "`dnf image rollback`".into()),
        (vec!["shell"], "one command at a time".into()),
        // Not known to the plugin by name: stopped once dnf has resolved what it would do.
        (
            vec![
                "--nogpgcheck",
                "repository-packages",
                REPO,
                "install",
                packages::HELLO,
            ],
            "`dnf image --help` lists the rest".into(),
        ),
    ] {
        let out = dnf(&host, true, &args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "dnf {args:?}: {}", text(&out));
        assert!(
            stderr.contains(&instead),
            "dnf {args:?} does not say {instead}: {}",
            text(&out)
        );
        let sentence = stderr
            .lines()
            .find(|l| l.starts_with("Error: "))
            .with_context(|| format!("dnf {args:?}: no error: {stderr}"))?;
        assert!(sentence.ends_with('.'), "{sentence}");
    }
    assert_eq!(host.status()?["deployments"], before);

    // Read-only subcommands of those commands are dnf's (the test repository has no groups).
    let out = dnf(&host, true, &["group", "list"])?;
    assert!(
        text(&out).contains("No group data available"),
        "{}",
        text(&out)
    );
    dnf_ok(&host, true, &["history", "list"])?;

    // remove uninstalls a layered package.
    dnf_ok(&host, true, &["remove", packages::HELLO])?;
    assert!(layered(&host)?.is_empty());

    // upgrade (no arguments) is dnf-image's: nothing new yet, then the next image staged.
    let out = dnf(&host, true, &["upgrade"])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("No update"), "{}", text(&out));
    host.publish(tags::BASE_V2)?;
    let before = host.status()?["deployments"].clone();
    let out = dnf_ok(&host, true, &["upgrade", "--downloadonly"])?;
    assert!(out.contains("Downloaded"), "{out}");
    assert_eq!(
        host.status()?["deployments"],
        before,
        "--downloadonly deployed: {out}"
    );
    let out = dnf(&host, true, &["upgrade", "--refresh"])?;
    assert!(out.status.success(), "{}", text(&out));
    let d = &host.deployments()?[0];
    assert_ne!(
        d["imageDigest"],
        v1,
        "no new image deployed: {}",
        text(&out)
    );
    assert_eq!(d["image"], host.deployments()?[1]["image"]);
    let out = dnf(&host, true, &["image", "upgrade", "--unchanged-exit-77"])?;
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));
    Ok(())
}

/// The plugin sees the host as an image host only when dnf-image says the deployment follows
/// an image: on an ostree-booted host whose deployer cannot be reached, it says so and stops.
#[test]
fn an_ostree_host_without_an_answer_from_dnf_image_is_not_changed() -> Result<()> {
    let mut host = Host::with_layerer()?;
    host.ok(&["rebase", &host.latest])?;
    host.services.clear();
    let out = dnf(&host, true, &["install", packages::HELLO])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`dnf-image status` cannot say whether from an image")
            && stderr.contains("org.dnfimage.Deployer"),
        "{}",
        text(&out)
    );
    // Read-only commands do not ask.
    dnf_ok(&host, true, &["repoquery", "--repo", REPO, packages::HELLO])?;
    Ok(())
}
