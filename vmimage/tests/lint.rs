//! `examples/lint/dnfimage-lint` against small roots, one problem at a time.

use std::path::{Path, PathBuf};
use std::process::Command;

fn lint_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lint/dnfimage-lint")
}

fn write(root: &Path, path: &str, data: &str) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().expect("a path under root")).expect("mkdir");
    std::fs::write(p, data).expect("write");
}

/// (exit code, stderr) of the lint on a root made by `setup`.
fn lint(setup: impl Fn(&Path), env: &[(&str, &str)]) -> (i32, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    for d in ["usr/bin", "usr/etc", "var", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::os::unix::fs::symlink("var/opt", root.join("opt")).expect("symlink");
    write(root, "etc/hostname", "host\n");
    setup(root);
    let out = Command::new("sh")
        .arg(lint_script())
        .arg(root)
        .envs(env.iter().copied())
        .output()
        .expect("running dnfimage-lint");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lint_cases() {
    type Setup = fn(&Path);
    let cases: [(&str, Setup, i32, &str); 8] = [
        ("clean", |_| {}, 0, "ready to ship"),
        (
            "var content",
            |r| write(r, "var/lib/app/state", "x"),
            1,
            "content in /var will not reach hosts",
        ),
        (
            "apt lists",
            |r| write(r, "var/lib/apt/lists/deb.debian.org_Packages", "x"),
            1,
            "leftover files in /var/lib/apt/lists",
        ),
        (
            "dnf cache",
            |r| write(r, "var/cache/dnf/repo/x.rpm", "x"),
            1,
            "leftover files in /var/cache/dnf",
        ),
        (
            "tmp",
            |r| write(r, "tmp/build.log", "x"),
            1,
            "leftover files in /tmp",
        ),
        (
            "rpm lock",
            |r| write(r, "usr/lib/sysimage/rpm/.rpm.lock", ""),
            1,
            "leftover lock file",
        ),
        (
            "opt",
            |r| {
                std::fs::remove_file(r.join("opt")).expect("rm");
                write(r, "opt/tool/bin/tool", "x");
            },
            1,
            "/opt has content, which libostree 2022.7 drops",
        ),
        (
            "empty resolv.conf",
            |r| write(r, "etc/resolv.conf", ""),
            0,
            "warning: empty /etc/resolv.conf",
        ),
    ];
    for (name, setup, code, needle) in cases {
        let (got, stderr) = lint(setup, &[]);
        assert_eq!(got, code, "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
    }
    // A newer libostree keeps /opt.
    let (got, stderr) = lint(
        |r| {
            std::fs::remove_file(r.join("opt")).expect("rm");
            write(r, "opt/tool/bin/tool", "x");
        },
        &[("DNFIMAGE_LINT_LIBOSTREE", "2024.3")],
    );
    assert_eq!(got, 0, "{stderr}");
}
