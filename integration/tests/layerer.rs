//! The layerer end to end: the real service binary on a test sysroot whose repository holds the
//! fixture images (imported with ostree-ext, as the importer does), the test packages (built
//! with rpmbuild, signed, in an rpm-md repository) served over HTTP on 127.0.0.1, real dnf, rpm
//! and bubblewrap. Driven over the socket with raw JSON and the typed proxy; results checked in
//! the repository with the ostree CLI (`ostree fsck` after every build), and by deploying one.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_integration::deploy_support::cat;
use dnfimage_integration::rpm_support::{
    CORRUPT_REPO, GONE_REPO, Layering, REPO, exists, ls, metadata, parent,
};
use dnfimage_integration::sysroot::STATEROOT;
use dnfimage_integration::{raw_call, run_ok};
use dnfimage_interfaces::deployer::LAYERING_METADATA_KEY;
use dnfimage_interfaces::layerer::{
    BuildPhase, BuildReply, BuildResult, INTERFACE, LayererError, LayererProxy, LayeringRequest,
    LocalPackage, Package, PackageChange, PackageChanges,
};
use dnfimage_testimage::rpms::{
    NETWORK_PROBE_PORT, NEW_KERNEL_VERSION, RPMDB_DIR, files, packages,
};
use dnfimage_testimage::{HOSTNAME, KERNEL_VERSION, TestRpms, tags};
use futures_util::StreamExt;
use serde_json::{Value, json};

fn pkg(name: &str, version: &str, arch: &str) -> Package {
    Package {
        name: name.into(),
        version: version.into(),
        architecture: arch.into(),
    }
}

fn text(l: &Layering, commit: &str, path: &str) -> Result<String> {
    Ok(String::from_utf8(cat(&l.repo(), commit, path)?)?)
}

/// The request recorded in a commit's metadata.
fn recorded(l: &Layering, commit: &str) -> Result<LayeringRequest> {
    let value =
        metadata(&l.repo(), commit, LAYERING_METADATA_KEY).context("no layering metadata")?;
    // GVariant text of a string: 'json'
    let json = value.trim_matches('\'');
    Ok(serde_json::from_str(json)?)
}

/// A failing `Build` leaves no commit, no ref and no build directory behind.
fn assert_failure_leaves_nothing(l: &Layering, params: Value, want: &str) -> Result<Value> {
    let (commits, refs) = (l.commits()?, l.refs()?);
    let (_, outcome) = l.build(params.clone())?;
    let (name, error) = match outcome {
        Ok(v) => anyhow::bail!("Build {params} succeeded: {v}"),
        Err(e) => e,
    };
    assert_eq!(name, want, "Build {params}: {error}");
    assert_eq!(l.commits()?, commits, "Build {params} left a commit");
    assert_eq!(l.refs()?, refs, "Build {params} changed the refs");
    assert_eq!(l.leftovers()?, Vec::<std::path::PathBuf>::new());
    Ok(error)
}

#[test]
fn install_pulls_the_dependency_and_the_commit_deploys() -> Result<()> {
    let l = Layering::start()?;
    let base = l.v1.commit.clone();
    let start = Instant::now();
    let (progress, r) = l.build_ok(json!({"baseCommit": base, "install": [packages::HELLO]}))?;
    eprintln!("1-package build (and a dependency): {:?}", start.elapsed());

    assert_ne!(r.commit, base);
    assert_eq!(r.base_commit, base);
    assert_eq!(parent(&l.repo(), &r.commit)?, base);
    let request = LayeringRequest {
        packages: vec![packages::HELLO.into()],
        ..Default::default()
    };
    assert_eq!(r.request, request);
    assert_eq!(recorded(&l, &r.commit)?, request);
    assert_eq!(
        r.changes,
        PackageChanges {
            upgraded: vec![],
            downgraded: vec![],
            added: vec![
                pkg(packages::HELLO, "1.0-1", "noarch"),
                pkg(packages::LIBHELLO, "1.0-1", "noarch")
            ],
            removed: vec![],
        }
    );
    assert_eq!(text(&l, &r.commit, files::HELLO)?, files::HELLO_CONTENT);
    assert!(exists(&l.repo(), &r.commit, files::LIBHELLO));

    // Still an image tree: config in /usr/etc only, a clean rpm database, nothing in /tmp,
    // the bootable metadata.
    assert!(!exists(&l.repo(), &r.commit, "/etc"));
    assert_eq!(
        text(&l, &r.commit, "/usr/etc/hostname")?,
        format!("{HOSTNAME}\n")
    );
    assert_eq!(
        ls(&l.repo(), &r.commit, &format!("/{RPMDB_DIR}"))?,
        ["rpmdb.sqlite"]
    );
    assert_eq!(ls(&l.repo(), &r.commit, "/tmp")?, Vec::<String>::new());
    assert_eq!(
        metadata(&l.repo(), &r.commit, "ostree.linux").as_deref(),
        Some(format!("'{KERNEL_VERSION}'").as_str())
    );
    assert_eq!(
        metadata(&l.repo(), &r.commit, "ostree.bootable").as_deref(),
        Some("true")
    );
    assert_eq!(
        metadata(&l.repo(), &r.commit, "ostree.manifest-digest"),
        None
    );
    assert_eq!(l.leftovers()?, Vec::<std::path::PathBuf>::new());
    assert!(l.refs()?.contains(&"dnfimage/layered".to_string()));

    // Every phase streamed, downloads counted.
    let phases: Vec<BuildPhase> = progress.iter().map(|p| p.phase).collect();
    for phase in [
        BuildPhase::Preparing,
        BuildPhase::Resolving,
        BuildPhase::Downloading,
        BuildPhase::Verifying,
        BuildPhase::Installing,
        BuildPhase::Committing,
    ] {
        assert!(phases.contains(&phase), "{phase:?} missing from {phases:?}");
    }
    let last_download = progress
        .iter()
        .rev()
        .find(|p| p.phase == BuildPhase::Downloading)
        .context("no download record")?;
    assert_eq!(
        (last_download.packages_done, last_download.packages_total),
        (2, 2)
    );
    assert!(last_download.bytes_done.unwrap_or(0) > 0);

    // The package list of the new commit.
    let (_, listed) = l.call("ListPackages", json!({"commit": r.commit}))?;
    let listed: Vec<Package> =
        serde_json::from_value(listed.map_err(|e| anyhow::anyhow!("{e:?}"))?["packages"].clone())?;
    assert!(listed.contains(&pkg(packages::HELLO, "1.0-1", "noarch")));

    // It deploys, and the deployment has the layered files.
    run_ok(
        Command::new("ostree")
            .args(["admin", "deploy", &format!("--os={STATEROOT}")])
            .arg(format!("--sysroot={}", l.sysroot.path().display()))
            .arg(&r.commit),
    )?;
    let deployment = l
        .sysroot
        .path()
        .join(format!("ostree/deploy/{STATEROOT}/deploy/{}.0", r.commit));
    assert_eq!(
        std::fs::read_to_string(deployment.join(files::HELLO))?,
        files::HELLO_CONTENT
    );
    assert_eq!(
        std::fs::read_to_string(deployment.join("etc/hostname"))?,
        format!("{HOSTNAME}\n")
    );
    assert_eq!(l.sysroot.boot_entries()?.len(), 1);
    l.sysroot.fsck()?;
    Ok(())
}

#[test]
fn scriptlet_runs_in_the_sandbox_without_network() -> Result<()> {
    let l = Layering::start()?;
    // Something to reach on 127.0.0.1, reachable from here (checked) but not from the sandbox.
    let listener = TcpListener::bind(("127.0.0.1", NETWORK_PROBE_PORT)).ok();
    let connections = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let probe = listener.map(|listener| {
        listener.set_nonblocking(true).expect("non-blocking");
        let (connections, stop) = (connections.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        connections.fetch_add(1, Ordering::SeqCst);
                        let _ = s.write_all(b"hello\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    });
    if probe.is_some() {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", NETWORK_PROBE_PORT))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        assert_eq!(buf, "hello\n", "the probe answers outside the sandbox");
    } else {
        eprintln!("port {NETWORK_PROBE_PORT} is taken: checking the scriptlet's output only");
    }
    let before = connections.load(Ordering::SeqCst);

    let (_, r) =
        l.build_ok(json!({"baseCommit": l.v1.commit, "install": [packages::SCRIPTLET]}))?;
    stop.store(true, Ordering::SeqCst);
    if let Some(t) = probe {
        t.join().expect("probe thread");
    }
    assert_eq!(text(&l, &r.commit, files::SCRIPTLET_RAN)?, "ran\n");
    // /etc written by the scriptlet and shipped by the package both end up in /usr/etc.
    assert_eq!(text(&l, &r.commit, files::SCRIPTLET_ETC)?, "ran\n");
    assert_eq!(
        text(&l, &r.commit, files::SCRIPTLET_CONFIG)?,
        "setting = 1\n"
    );
    assert!(!exists(&l.repo(), &r.commit, "/etc"));
    assert_eq!(
        text(&l, &r.commit, files::SCRIPTLET_NETWORK)?,
        "unreachable\n"
    );
    // bwrap's network namespace has its own loopback: nothing listens there, and the host's
    // listener sees no connection.
    let said = text(&l, &r.commit, files::SCRIPTLET_NETWORK_OUTPUT)?;
    assert!(said.contains("can't connect"), "nc said {said:?}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        before,
        "the sandbox reached the probe"
    );
    Ok(())
}

#[test]
fn override_remove_takes_an_image_package_out() -> Result<()> {
    let l = Layering::start()?;
    assert!(exists(&l.repo(), &l.v1.commit, files::DOCS));
    let (_, r) =
        l.build_ok(json!({"baseCommit": l.v1.commit, "overrideRemove": [packages::DOCS]}))?;
    assert!(!exists(&l.repo(), &r.commit, files::DOCS));
    assert!(!exists(&l.repo(), &r.commit, "/usr/share/doc/dnfimage"));
    assert_eq!(r.request.override_remove, [packages::DOCS]);
    assert_eq!(r.changes.removed, [pkg(packages::DOCS, "1.0-1", "noarch")]);
    assert!(r.changes.added.is_empty());

    // rpm -e refuses to break what needs a package (dnf would remove it silently).
    let error = assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": l.v1.commit, "overrideRemove": [packages::BUSYBOX]}),
        "DependencyProblem",
    )?;
    assert!(
        error["packages"]
            .as_array()
            .is_some_and(|p| p.contains(&json!(packages::BASE))),
        "{error}"
    );
    assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": l.v1.commit, "overrideRemove": ["dnfimage-nonexistent"]}),
        "PackageNotFound",
    )?;
    Ok(())
}

#[test]
fn override_replace_swaps_the_kernel_and_is_kept_for_later_builds() -> Result<()> {
    let l = Layering::start()?;
    let rpms = TestRpms::shared()?;
    let kernel = rpms.new_kernel().display().to_string();
    let (_, r) = l.build_ok(json!({"baseCommit": l.v1.commit, "overrideReplace": [kernel]}))?;
    assert_eq!(
        ls(&l.repo(), &r.commit, "/usr/lib/modules")?,
        [NEW_KERNEL_VERSION]
    );
    assert_eq!(
        metadata(&l.repo(), &r.commit, "ostree.linux").as_deref(),
        Some(format!("'{NEW_KERNEL_VERSION}'").as_str())
    );
    let new_kernel = pkg(packages::KERNEL, "6.2.0-1", "noarch");
    assert_eq!(
        r.request.override_replace,
        std::slice::from_ref(&new_kernel)
    );
    assert_eq!(
        r.changes.upgraded,
        [PackageChange {
            name: packages::KERNEL.into(),
            architecture: "noarch".into(),
            from_version: "6.1.0-1".into(),
            to_version: "6.2.0-1".into(),
        }]
    );
    assert_eq!(l.kept_overrides()?, ["dnfimage-kernel-6.2.0-1.noarch.rpm"]);

    // A later build from the recorded request uses the kept copy.
    let (_, r2) = l.build_ok(json!({
        "baseCommit": r.commit, "requestFrom": r.commit, "install": [packages::HELLO]
    }))?;
    assert_eq!(
        r2.base_commit, l.v1.commit,
        "a layered base stands for its image"
    );
    assert_eq!(parent(&l.repo(), &r2.commit)?, l.v1.commit);
    assert_eq!(
        ls(&l.repo(), &r2.commit, "/usr/lib/modules")?,
        [NEW_KERNEL_VERSION]
    );
    assert_eq!(r2.request.override_replace, [new_kernel]);
    assert_eq!(r2.request.packages, [packages::HELLO]);

    // Reset: the image's kernel again.
    let (_, r3) = l.build_ok(json!({
        "baseCommit": r2.commit, "requestFrom": r2.commit, "overrideReset": [packages::KERNEL]
    }))?;
    assert_eq!(
        ls(&l.repo(), &r3.commit, "/usr/lib/modules")?,
        [KERNEL_VERSION]
    );
    assert!(r3.request.override_replace.is_empty());
    assert!(exists(&l.repo(), &r3.commit, files::HELLO));

    // A file that is not there, and one that is not signed by a configured key.
    assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": l.v1.commit, "overrideReplace": ["/nonexistent/kernel.rpm"]}),
        "PackageNotFound",
    )?;
    let unsigned = rpms.repo_package(packages::UNSIGNED).display().to_string();
    let error = assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": l.v1.commit, "overrideReplace": [unsigned]}),
        "SignatureRejected",
    )?;
    assert_eq!(error["package"], json!(unsigned));
    Ok(())
}

#[test]
fn uninstall_reset_and_empty_requests_give_the_image_commit() -> Result<()> {
    let l = Layering::start()?;
    let base = l.v1.commit.clone();
    let (_, r) =
        l.build_ok(json!({"baseCommit": base, "install": [packages::HELLO, packages::DOCS]}))?;
    // The image has dnfimage-docs: requested, inactive, not installed twice.
    assert_eq!(r.request.packages, [packages::DOCS, packages::HELLO]);
    assert_eq!(r.request.inactive, [packages::DOCS]);
    assert_eq!(r.changes.added.len(), 2);

    let (_, r2) = l.build_ok(json!({
        "baseCommit": r.commit, "requestFrom": r.commit, "uninstall": [packages::HELLO]
    }))?;
    assert_eq!(r2.request.packages, [packages::DOCS]);
    assert_eq!(r2.request.inactive, [packages::DOCS]);
    assert!(!exists(&l.repo(), &r2.commit, files::HELLO));
    assert!(r2.changes.added.is_empty() && r2.changes.removed.is_empty());
    // Only inactive packages: the same tree as the image.
    let diff = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", l.repo().display()))
            .args(["diff", &base, &r2.commit]),
    )?;
    assert_eq!(diff.trim(), "", "the tree differs from the image's");

    let commits = l.commits()?;
    let (_, r3) = l.build_ok(json!({
        "baseCommit": r2.commit, "requestFrom": r2.commit, "uninstall": [packages::DOCS]
    }))?;
    assert_eq!(r3.commit, base, "an empty request gives the image commit");
    assert_eq!(r3.request, LayeringRequest::default());
    let (_, r4) = l.build_ok(json!({"baseCommit": base}))?;
    assert_eq!(r4.commit, base);
    assert_eq!(l.commits()?, commits, "nothing was committed");

    // Uninstalling what is not requested contradicts the request.
    let error = assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": base, "uninstall": [packages::HELLO]}),
        "InvalidRequest",
    )?;
    assert_eq!(error["packages"], json!([packages::HELLO]));
    Ok(())
}

#[test]
fn each_failure_is_typed_and_leaves_nothing() -> Result<()> {
    let l = Layering::start()?;
    let rpms = TestRpms::shared()?;
    let base = l.v1.commit.clone();
    let install = |name: &str| json!({"baseCommit": base, "install": [name]});

    let e = assert_failure_leaves_nothing(&l, install("dnfimage-nonexistent"), "PackageNotFound")?;
    assert_eq!(e["packages"], json!(["dnfimage-nonexistent"]));

    let e =
        assert_failure_leaves_nothing(&l, install(packages::NEEDS_MISSING), "DependencyProblem")?;
    assert_eq!(e["packages"], json!([packages::NEEDS_MISSING]));
    assert!(
        e["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("nothing provides dnfimage-nonexistent"))
    );

    let e = assert_failure_leaves_nothing(&l, install(packages::CONFLICT), "FileConflict")?;
    assert_eq!(e["path"], json!("/usr/lib/os-release"));
    assert_eq!(e["package"], json!("dnfimage-conflict-1.0-1.noarch"));
    assert_eq!(e["owner"], json!("dnfimage-base-1.0-1.noarch"));

    let e = assert_failure_leaves_nothing(&l, install(packages::BAD_POST), "ScriptletFailed")?;
    assert_eq!(e["package"], json!("dnfimage-badpost-1.0-1.noarch"));
    assert_eq!(e["scriptlet"], json!("%post"));
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("failing on purpose") && m.contains("exit status 3"))
    );

    let e = assert_failure_leaves_nothing(&l, install(packages::UNSIGNED), "SignatureRejected")?;
    assert_eq!(e["package"], json!("dnfimage-unsigned-1.0-1.noarch"));
    assert_eq!(e["keyId"], Value::Null);

    let e = assert_failure_leaves_nothing(&l, install(packages::OTHER_KEY), "SignatureRejected")?;
    assert_eq!(e["keyId"], json!(rpms.other_short_key_id()));

    let e = assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": base, "install": [packages::HELLO], "repositories": [CORRUPT_REPO]}),
        "CorruptPackage",
    )?;
    assert!(
        e["package"]
            .as_str()
            .is_some_and(|p| p.starts_with(packages::LIBHELLO)),
        "{e}"
    );

    let e = assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": base, "install": [packages::HELLO], "repositories": [GONE_REPO]}),
        "RepositoryUnreachable",
    )?;
    assert_eq!(e["repository"], json!(GONE_REPO));

    let e = assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": base, "install": [packages::HELLO], "repositories": ["nope"]}),
        "UnknownRepository",
    )?;
    assert_eq!(e["repositories"], json!(["nope"]));

    assert_failure_leaves_nothing(&l, json!({"baseCommit": "0".repeat(64)}), "CommitNotFound")?;
    assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": base, "overrideRemove": [packages::DOCS], "install": [packages::DOCS]}),
        "InvalidRequest",
    )?;

    // After all that, a good build still works.
    l.build_ok(json!({"baseCommit": base, "install": [packages::HELLO], "repositories": [REPO]}))?;
    Ok(())
}

/// The service still answers: `GetInfo` replies.
fn answers_get_info(l: &Layering) -> Result<()> {
    let replies = raw_call(
        &l.socket(),
        &json!({"method": "org.varlink.service.GetInfo"}),
    )?;
    let last = replies.last().context("no GetInfo reply")?;
    anyhow::ensure!(last.get("error").is_none(), "GetInfo failed: {last}");
    Ok(())
}

#[test]
fn commits_named_by_anything_but_a_checksum_are_not_found() -> Result<()> {
    let l = Layering::start()?;
    let base = l.v1.commit.clone();
    // 64 bytes that are not 64 ASCII characters: byte 12 is inside a character, where the
    // service once cut it for its status text (and panicked).
    let wide = format!("a{}b", "é".repeat(31));
    for bad in [wide.as_str(), "abc", "", &base.to_uppercase(), &base[..63]] {
        let e = assert_failure_leaves_nothing(
            &l,
            json!({"baseCommit": bad, "install": [packages::HELLO]}),
            "CommitNotFound",
        )?;
        assert_eq!(e["commit"], bad);
        answers_get_info(&l)?;
    }
    let e = assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": base, "requestFrom": wide, "install": [packages::HELLO]}),
        "CommitNotFound",
    )?;
    assert_eq!(e["commit"], wide.as_str());
    for (method, params) in [
        ("ListPackages", json!({"commit": wide})),
        ("PackageDiff", json!({"fromCommit": base, "toCommit": wide})),
        ("PackageDiff", json!({"fromCommit": "ß", "toCommit": base})),
    ] {
        let (_, outcome) = l.call(method, params.clone())?;
        let (name, e) = outcome
            .err()
            .with_context(|| format!("{method} {params}"))?;
        assert_eq!(name, "CommitNotFound", "{method} {params}: {e}");
    }
    answers_get_info(&l)?;
    let (_, listed) = l.call("ListPackages", json!({"commit": base}))?;
    assert!(listed.is_ok(), "{listed:?}");
    Ok(())
}

#[test]
fn a_chatty_failing_scriptlet_gives_a_bounded_message() -> Result<()> {
    use dnfimage_testimage::rpms::{KEY_USER_ID, Keyring, Spec};
    let l = Layering::start()?;
    let rpms = TestRpms::shared()?;
    // A replacement for an image package whose %post prints 10 MiB (half on each stream),
    // then fails.
    let line = "0123456789".repeat(10);
    let post = format!(
        "i=0\nwhile [ $i -lt 50000 ]; do\n  echo \"out $i {line}\"\n  \
         echo \"err $i {line}\" >&2\n  i=$((i+1))\ndone\n\
         echo 'dnfimage-docs: failing on purpose' >&2\nexit 5"
    );
    let spec = Spec::new(packages::DOCS, "2.0")
        .requires("/bin/sh")
        .file(&format!("/{}", files::DOCS), "chatty docs\n")
        .post(&post);
    let out = l.scratch.path().join("chatty");
    let rpm = spec.build(&l.scratch.path().join("rpmbuild"), &out)?;
    Keyring::open(&rpms.gnupg_home)?.sign(KEY_USER_ID, std::slice::from_ref(&rpm))?;

    let e = assert_failure_leaves_nothing(
        &l,
        json!({"baseCommit": l.v1.commit, "overrideReplace": [rpm.display().to_string()]}),
        "ScriptletFailed",
    )?;
    assert_eq!(e["package"], json!("dnfimage-docs-2.0-1.noarch"));
    assert_eq!(e["scriptlet"], json!("%post"));
    let message = e["message"].as_str().context("message")?;
    // The first and the last 64 KiB of each stream, and the marks of what was left out.
    assert!(message.len() < 300 * 1024, "{} bytes", message.len());
    for want in [
        "out 0 0123",
        "err 0 0123",
        "out 49999 0123",
        "failing on purpose",
        "exit status 5",
        " bytes omitted …]",
    ] {
        assert!(message.contains(want), "{want:?} missing");
    }
    answers_get_info(&l)?;
    Ok(())
}

#[test]
fn the_request_is_applied_again_on_a_new_image() -> Result<()> {
    let l = Layering::start()?;
    let v2 = l.import(tags::BASE_V2)?;
    let (_, on_v1) =
        l.build_ok(json!({"baseCommit": l.v1.commit, "install": [packages::HELLO]}))?;
    let (_, on_v2) = l.build_ok(json!({"baseCommit": v2.commit, "requestFrom": on_v1.commit}))?;
    assert_eq!(parent(&l.repo(), &on_v2.commit)?, v2.commit);
    assert_eq!(on_v2.request.packages, [packages::HELLO]);
    assert_eq!(text(&l, &on_v2.commit, files::HELLO)?, files::HELLO_CONTENT);
    assert!(text(&l, &on_v2.commit, "/usr/lib/os-release")?.contains("VERSION=\"2\""));
    Ok(())
}

#[test]
fn list_packages_and_package_diff_read_commits() -> Result<()> {
    let l = Layering::start()?;
    let v2 = l.import(tags::BASE_V2)?;
    let arch = run_ok(Command::new("rpm").args(["--eval", "%{_arch}"]))?;
    let (_, listed) = l.call("ListPackages", json!({"commit": l.v1.commit}))?;
    let listed: Vec<Package> =
        serde_json::from_value(listed.map_err(|e| anyhow::anyhow!("{e:?}"))?["packages"].clone())?;
    assert_eq!(
        listed,
        [
            pkg(packages::BASE, "1.0-1", "noarch"),
            pkg(packages::BUSYBOX, "1.36-1", arch.trim()),
            pkg(packages::DOCS, "1.0-1", "noarch"),
            pkg(packages::KERNEL, "6.1.0-1", "noarch"),
        ]
    );

    let (_, diff) = l.call(
        "PackageDiff",
        json!({"fromCommit": l.v1.commit, "toCommit": v2.commit}),
    )?;
    let diff: PackageChanges = serde_json::from_value(diff.map_err(|e| anyhow::anyhow!("{e:?}"))?)?;
    assert_eq!(
        diff,
        PackageChanges {
            upgraded: vec![PackageChange {
                name: packages::BASE.into(),
                architecture: "noarch".into(),
                from_version: "1.0-1".into(),
                to_version: "2.0-1".into(),
            }],
            downgraded: vec![],
            added: vec![],
            removed: vec![],
        }
    );

    // The typed client, and the other direction.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let back = rt.block_on(async {
        let mut conn = dnfimage_interfaces::connect(&l.scratch.runtime_dir(), INTERFACE).await?;
        let diff = conn.package_diff(&v2.commit, &l.v1.commit).await?;
        anyhow::Ok(diff)
    })?;
    let back = back.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(back.downgraded.len(), 1);
    assert!(back.upgraded.is_empty());

    let (_, e) = l.call("ListPackages", json!({"commit": "0".repeat(64)}))?;
    assert_eq!(e.err().context("an error")?.0, "CommitNotFound");
    // A commit without a package database.
    let empty = l.scratch.path().join("empty-tree");
    std::fs::create_dir_all(empty.join("usr"))?;
    let bare = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", l.repo().display()))
            .args(["commit", "--orphan", "--no-xattrs"])
            .arg(format!("--tree=dir={}", empty.display())),
    )?;
    let (_, e) = l.call("ListPackages", json!({"commit": bare.trim()}))?;
    assert_eq!(e.err().context("an error")?.0, "NoPackageDatabase");
    Ok(())
}

#[test]
fn a_second_build_is_refused_and_cancel_stops_the_first() -> Result<()> {
    let l = Layering::start()?;
    let commits = l.commits()?;
    // Slow enough to be caught while resolving.
    l.repos.server.set_delay(Duration::from_secs(3));
    let socket = l.socket();
    let base = l.v1.commit.clone();
    let first = std::thread::spawn(move || {
        raw_call(
            &socket,
            &json!({"method": format!("{INTERFACE}.Build"), "more": true,
                    "parameters": {"baseCommit": base, "install": [packages::HELLO]}}),
        )
    });
    // Wait until it runs (it streams its first records at once).
    std::thread::sleep(Duration::from_millis(700));
    let (_, second) = l.build(json!({"baseCommit": l.v1.commit, "install": [packages::HELLO]}))?;
    let (name, e) = second.err().context("the second build must be refused")?;
    assert_eq!(name, "AlreadyInProgress");
    assert!(
        e["operation"]
            .as_str()
            .is_some_and(|o| o.contains(packages::HELLO)),
        "{e}"
    );

    let start = Instant::now();
    let (_, cancel) = l.call("Cancel", json!({}))?;
    assert!(cancel.map_err(|e| anyhow::anyhow!("{e:?}"))?["cancelled"].is_string());
    let replies = first.join().expect("build thread")?;
    let last = replies.last().context("no reply")?;
    assert_eq!(
        last["error"],
        json!(format!("{INTERFACE}.Cancelled")),
        "{last}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(l.commits()?, commits);
    assert_eq!(l.leftovers()?, Vec::<std::path::PathBuf>::new());

    let (_, idle) = l.call("Cancel", json!({}))?;
    assert_eq!(
        idle.map_err(|e| anyhow::anyhow!("{e:?}"))?["cancelled"],
        Value::Null
    );
    l.repos.server.set_delay(Duration::ZERO);
    l.build_ok(json!({"baseCommit": l.v1.commit, "install": [packages::HELLO]}))?;
    Ok(())
}

#[test]
fn typed_proxy_streams_a_build() -> Result<()> {
    let l = Layering::start()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result: BuildResult = rt.block_on(async {
        let mut conn = dnfimage_interfaces::connect(&l.scratch.runtime_dir(), INTERFACE).await?;
        let install = vec![packages::LIBHELLO.to_string()];
        let stream = conn
            .build(
                &l.v1.commit,
                None,
                Some(&install),
                None,
                None,
                None,
                None,
                None,
                None,
                Vec::new(),
            )
            .await?;
        futures_util::pin_mut!(stream);
        let mut records = 0;
        while let Some(reply) = stream.next().await {
            let reply = reply?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            if let Some(r) = reply.result {
                anyhow::ensure!(records > 0, "no progress before the result");
                return Ok(r);
            }
            records += 1;
        }
        anyhow::bail!("the stream ended without a result")
    })?;
    assert_eq!(
        result.changes.added,
        [pkg(packages::LIBHELLO, "1.0-1", "noarch")]
    );
    l.sysroot.fsck()?;
    Ok(())
}

/// `overrideReplaceFiles` over the socket: descriptors the call does not pass, or that are not
/// regular files, are refused and leave nothing; a passed RPM is installed.
#[test]
fn replacements_passed_as_descriptors_are_checked() -> Result<()> {
    let l = Layering::start()?;
    let kernel = TestRpms::shared()?.new_kernel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let build = |fd: u32, fds: Vec<std::os::fd::OwnedFd>| {
        rt.block_on(async {
            let mut conn =
                dnfimage_interfaces::connect(&l.scratch.runtime_dir(), INTERFACE).await?;
            let files = [LocalPackage {
                fd,
                name: "~/kernel.rpm".into(),
            }];
            let stream = conn
                .build(
                    &l.v1.commit,
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some(&files),
                    None,
                    None,
                    fds,
                )
                .await?;
            futures_util::pin_mut!(stream);
            while let Some(reply) = stream.next().await {
                match reply? {
                    Err(e) => return Ok(Err(e)),
                    Ok(BuildReply {
                        result: Some(r), ..
                    }) => return Ok(Ok(r)),
                    Ok(_) => {}
                }
            }
            anyhow::bail!("the stream ended without a result")
        })
    };
    let commits = l.commits()?;
    let (pipe, _other) = std::os::unix::net::UnixStream::pair()?;
    for (fd, fds, want) in [
        (
            1,
            vec![std::fs::File::open(&kernel)?.into()],
            "no file descriptor 1",
        ),
        (0, vec![pipe.into()], "not a regular file"),
    ] {
        match build(fd, fds)? {
            Err(LayererError::InvalidRequest { packages, message }) => {
                assert!(message.contains(want), "{message}");
                assert_eq!(packages, ["~/kernel.rpm"]);
            }
            other => anyhow::bail!("{want}: {other:?}"),
        }
    }
    assert_eq!(l.commits()?, commits);
    assert_eq!(l.kept_overrides()?, Vec::<String>::new());

    let r = build(0, vec![std::fs::File::open(&kernel)?.into()])?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(
        ls(&l.repo(), &r.commit, "/usr/lib/modules")?,
        [NEW_KERNEL_VERSION]
    );
    assert_eq!(l.kept_overrides()?, ["dnfimage-kernel-6.2.0-1.noarch.rpm"]);
    l.sysroot.fsck()?;
    Ok(())
}

#[test]
fn served_interface_matches_the_committed_idl() -> Result<()> {
    let l = Layering::start()?;
    dnfimage_integration::assert_served_idl_matches(&l.socket(), INTERFACE)
}
