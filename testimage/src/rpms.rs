//! RPM packages for the layering tests: built with `rpmbuild` from content given in code, signed
//! with `rpmsign` by a GPG key generated for the tests, and published as an rpm-md repository
//! with `createrepo_c`. Also the base packages whose rpm database the base images carry.
//!
//! [`TestRpms::shared`] builds everything once per [`RPMS_VERSION`] and factory source into the
//! fixture cache directory (file lock and completion stamp, like [`crate::Fixtures`]), so every
//! test process shares one build. [`crate::RepoServer`] serves the repository over HTTP.
//!
//! External tools: `rpmbuild`, `rpmsign`, `rpm` (all from Debian's `rpm`), `gpg`, `gpgconf`
//! (`gnupg`) and `createrepo_c` (`createrepo-c`).

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, anyhow, bail};

use crate::base::KERNEL_VERSION;
use crate::cmd::run;

/// Bump when the packages change for reasons outside this file's source (the cache key also
/// covers the source, see [`TestRpms::build`]).
pub const RPMS_VERSION: &str = "1";

/// Where the base images keep their rpm database, as Fedora images do.
pub const RPMDB_DIR: &str = "usr/lib/sysimage/rpm";

/// The kernel version of the replacement kernel package ([`packages::KERNEL`] 6.2.0).
pub const NEW_KERNEL_VERSION: &str = "6.2.0-dnfimage";

/// A port on 127.0.0.1 that the `%post` scriptlet of [`packages::SCRIPTLET`] tries to reach.
/// A test may listen there: from inside the layering sandbox the connection must fail.
pub const NETWORK_PROBE_PORT: u16 = 47231;

/// The user id of the test signing key.
pub const KEY_USER_ID: &str = "dnfimage test <test@dnfimage.invalid>";
/// The user id of the second key, which the layerer is never told about.
pub const OTHER_KEY_USER_ID: &str = "dnfimage other <other@dnfimage.invalid>";

/// Names of the packages, in the base images and in the test repository.
pub mod packages {
    /// Base package: os-release, `/etc/hostname`, the app data. Version "1.0-1" in base v1,
    /// "2.0-1" in base v2. Requires [`BUSYBOX`].
    pub const BASE: &str = "dnfimage-base";
    /// Base package: the static busybox and `/usr/bin/sh`; provides `/bin/sh`.
    pub const BUSYBOX: &str = "dnfimage-busybox";
    /// Base package: the placeholder kernel in `/usr/lib/modules/6.1.0-dnfimage`. Also built
    /// as version 6.2.0 (a local file, not in the repository) to replace it.
    pub const KERNEL: &str = "dnfimage-kernel";
    /// Base package that nothing needs: `/usr/share/doc/dnfimage/README`.
    pub const DOCS: &str = "dnfimage-docs";

    /// Repository: requires [`LIBHELLO`].
    pub const HELLO: &str = "dnfimage-hello";
    /// Repository: what [`HELLO`] needs.
    pub const LIBHELLO: &str = "dnfimage-libhello";
    /// Repository: a `%post` that writes files (also under `/etc`) and tries the network.
    pub const SCRIPTLET: &str = "dnfimage-scriptlet";
    /// Repository: owns `/usr/lib/os-release`, which [`BASE`] owns with other content.
    pub const CONFLICT: &str = "dnfimage-conflict";
    /// Repository: its `%post` fails (exit status 3).
    pub const BAD_POST: &str = "dnfimage-badpost";
    /// Repository: requires a package nobody provides.
    pub const NEEDS_MISSING: &str = "dnfimage-needs-missing";
    /// Repository: not signed.
    pub const UNSIGNED: &str = "dnfimage-unsigned";
    /// Repository: signed with the other key.
    pub const OTHER_KEY: &str = "dnfimage-otherkey";
}

/// Files the packages install, for assertions.
pub mod files {
    /// From [`super::packages::HELLO`].
    pub const HELLO: &str = "usr/share/dnfimage-hello/hello.txt";
    /// Its content.
    pub const HELLO_CONTENT: &str = "hello from a layered package\n";
    /// From [`super::packages::LIBHELLO`].
    pub const LIBHELLO: &str = "usr/share/dnfimage-libhello/lib.txt";
    /// Shipped by [`super::packages::SCRIPTLET`] as `/etc/dnfimage-scriptlet.conf`; an ostree
    /// commit keeps it under `/usr/etc`.
    pub const SCRIPTLET_CONFIG: &str = "usr/etc/dnfimage-scriptlet.conf";
    /// Written by the `%post` of [`super::packages::SCRIPTLET`]: "ran\n".
    pub const SCRIPTLET_RAN: &str = "usr/share/dnfimage-scriptlet/post-ran";
    /// Written by that `%post` under `/etc` (so `/usr/etc` in a commit): "ran\n".
    pub const SCRIPTLET_ETC: &str = "usr/etc/dnfimage-scriptlet.d/post-ran";
    /// Written by that `%post`: "reached\n" or "unreachable\n", whether it could connect to
    /// [`super::NETWORK_PROBE_PORT`] on 127.0.0.1.
    pub const SCRIPTLET_NETWORK: &str = "usr/share/dnfimage-scriptlet/network";
    /// What `nc` said when that `%post` tried to connect.
    pub const SCRIPTLET_NETWORK_OUTPUT: &str = "usr/share/dnfimage-scriptlet/network.out";
    /// From [`super::packages::DOCS`] in the base images.
    pub const DOCS: &str = "usr/share/doc/dnfimage/README";
}

/// One entry of a package's payload.
#[derive(Debug, Clone)]
pub enum Content {
    /// A regular file with its mode.
    File(Vec<u8>, u32),
    /// A symbolic link to the target.
    Symlink(String),
    /// A directory the package owns.
    Dir,
}

/// A package to build: what `rpmbuild` gets as a spec file and a payload tree.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Release.
    pub release: String,
    /// Build architecture; `None` for noarch.
    pub arch: Option<String>,
    /// `Requires:` lines.
    pub requires: Vec<String>,
    /// `Provides:` lines.
    pub provides: Vec<String>,
    /// The payload: absolute path → content. Files under `/etc` are `%config(noreplace)`.
    pub contents: Vec<(String, Content)>,
    /// The `%post` scriptlet (run by `/bin/sh`).
    pub post: Option<String>,
}

impl Spec {
    /// A noarch package `name-version-1` with no payload.
    pub fn new(name: &str, version: &str) -> Self {
        Spec {
            name: name.to_string(),
            version: version.to_string(),
            release: "1".to_string(),
            arch: None,
            requires: Vec::new(),
            provides: Vec::new(),
            contents: Vec::new(),
            post: None,
        }
    }

    /// Adds a file with mode 0644.
    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>) -> Self {
        self.contents
            .push((path.to_string(), Content::File(data.into(), 0o644)));
        self
    }

    /// Adds an owned directory.
    pub fn dir(mut self, path: &str) -> Self {
        self.contents.push((path.to_string(), Content::Dir));
        self
    }

    /// Adds a `Requires:`.
    pub fn requires(mut self, what: &str) -> Self {
        self.requires.push(what.to_string());
        self
    }

    /// Sets the `%post` scriptlet.
    pub fn post(mut self, script: &str) -> Self {
        self.post = Some(script.to_string());
        self
    }

    /// The architecture rpm gives the package.
    pub fn architecture(&self) -> &str {
        self.arch.as_deref().unwrap_or("noarch")
    }

    /// The file name `rpmbuild` writes: `NAME-VERSION-RELEASE.ARCH.rpm`.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}-{}.{}.rpm",
            self.name,
            self.version,
            self.release,
            self.architecture()
        )
    }

    fn spec_text(&self, payload: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Name: {}", self.name);
        let _ = writeln!(s, "Version: {}", self.version);
        let _ = writeln!(s, "Release: {}", self.release);
        let _ = writeln!(s, "Summary: dnfimage test package {}", self.name);
        let _ = writeln!(s, "License: MIT");
        if self.arch.is_none() {
            let _ = writeln!(s, "BuildArch: noarch");
        }
        let _ = writeln!(s, "AutoReqProv: no");
        for r in &self.requires {
            let _ = writeln!(s, "Requires: {r}");
        }
        for p in &self.provides {
            let _ = writeln!(s, "Provides: {p}");
        }
        let _ = writeln!(
            s,
            "\n%description\nA package built by the dnfimage test factory.\n"
        );
        let _ = writeln!(s, "%install\nmkdir -p %{{buildroot}}");
        if !self.contents.is_empty() {
            let _ = writeln!(s, "cp -a '{}'/. %{{buildroot}}/", payload.display());
        }
        if let Some(post) = &self.post {
            let _ = writeln!(s, "\n%post\n{post}");
        }
        let _ = writeln!(s, "\n%files");
        for (path, content) in &self.contents {
            match content {
                Content::Dir => {
                    let _ = writeln!(s, "%dir {path}");
                }
                _ if path.starts_with("/etc/") => {
                    let _ = writeln!(s, "%config(noreplace) {path}");
                }
                _ => {
                    let _ = writeln!(s, "{path}");
                }
            }
        }
        s
    }

    /// Builds the package into `out_dir` (scratch files in `work`); returns its path.
    pub fn build(&self, work: &Path, out_dir: &Path) -> Result<PathBuf> {
        let top = work.join(format!("build-{}-{}", self.name, self.version));
        let payload = top.join("payload");
        if top.exists() {
            std::fs::remove_dir_all(&top).with_context(|| format!("Removing {}", top.display()))?;
        }
        std::fs::create_dir_all(&payload)
            .with_context(|| format!("Creating {}", payload.display()))?;
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("Creating {}", out_dir.display()))?;
        for (path, content) in &self.contents {
            let rel = path.trim_start_matches('/');
            let dest = payload.join(rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("Creating the parent of {path}"))?;
            }
            match content {
                Content::File(data, mode) => {
                    std::fs::write(&dest, data).with_context(|| format!("Writing {path}"))?;
                    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(*mode))
                        .with_context(|| format!("Setting the mode of {path}"))?;
                }
                Content::Symlink(target) => std::os::unix::fs::symlink(target, &dest)
                    .with_context(|| format!("Linking {path}"))?,
                Content::Dir => {
                    std::fs::create_dir_all(&dest).with_context(|| format!("Creating {path}"))?
                }
            }
        }
        let spec_path = top.join(format!("{}.spec", self.name));
        std::fs::write(&spec_path, self.spec_text(&payload))
            .with_context(|| format!("Writing {}", spec_path.display()))?;
        let define = |cmd: &mut Command, name: &str, value: &str| {
            cmd.arg("--define").arg(format!("{name} {value}"));
        };
        let mut cmd = Command::new("rpmbuild");
        cmd.arg("-bb").arg("--quiet");
        define(&mut cmd, "_topdir", &top.display().to_string());
        define(&mut cmd, "_rpmdir", &out_dir.display().to_string());
        define(
            &mut cmd,
            "_build_name_fmt",
            "%%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
        );
        define(&mut cmd, "_build_id_links", "none");
        define(&mut cmd, "debug_package", "%{nil}");
        define(&mut cmd, "__os_install_post", "%{nil}");
        define(&mut cmd, "_buildhost", "dnfimage.invalid");
        define(&mut cmd, "_binary_payload", "w6.gzdio");
        cmd.arg(&spec_path).stdin(Stdio::null());
        run(&mut cmd).with_context(|| format!("Building {}", self.file_name()))?;
        let rpm = out_dir.join(self.file_name());
        if !rpm.exists() {
            bail!("rpmbuild did not write {}", rpm.display());
        }
        std::fs::remove_dir_all(&top).with_context(|| format!("Removing {}", top.display()))?;
        Ok(rpm)
    }
}

/// The packages whose files make up the base image written by `base::write_root` (the root
/// `root`, version `version`): their payload is read from the root, so the rpm database that
/// [`install_base_rpmdb`] writes matches the files. `/usr/etc` files are packaged under `/etc`,
/// where rpm sees them on a deployed system.
pub(crate) fn base_specs(root: &Path, version: u32) -> Result<Vec<Spec>> {
    let read = |rel: &str| -> Result<Vec<u8>> {
        std::fs::read(root.join(rel)).with_context(|| format!("Reading {rel} of the base root"))
    };
    let mode = |rel: &str| -> Result<u32> {
        Ok(std::fs::metadata(root.join(rel))
            .with_context(|| format!("Reading {rel} of the base root"))?
            .permissions()
            .mode()
            & 0o7777)
    };
    let file = |rel: &str| -> Result<(String, Content)> {
        Ok((format!("/{rel}"), Content::File(read(rel)?, mode(rel)?)))
    };

    let mut base = Spec::new(packages::BASE, &format!("{version}.0"));
    base.requires.push(packages::BUSYBOX.to_string());
    base.contents = vec![
        file("usr/lib/os-release")?,
        (
            "/etc/hostname".to_string(),
            Content::File(read("usr/etc/hostname")?, mode("usr/etc/hostname")?),
        ),
        (
            "/etc/os-release".to_string(),
            Content::Symlink("../lib/os-release".to_string()),
        ),
        ("/usr/share/dnfimage-app".to_string(), Content::Dir),
        file("usr/share/dnfimage-app/data")?,
        file("usr/share/dnfimage-app/version")?,
    ];

    let mut busybox = Spec::new(packages::BUSYBOX, "1.36");
    busybox.arch = Some(host_arch()?);
    busybox.provides = vec!["/bin/sh".to_string(), "/usr/bin/sh".to_string()];
    busybox.contents = vec![
        file("usr/bin/busybox")?,
        (
            "/usr/bin/sh".to_string(),
            Content::Symlink("busybox".to_string()),
        ),
    ];

    let kernel = kernel_spec(
        KERNEL_VERSION,
        read(&format!("usr/lib/modules/{KERNEL_VERSION}/vmlinuz"))?,
        read(&format!("usr/lib/modules/{KERNEL_VERSION}/initramfs.img"))?,
    );

    let docs = Spec::new(packages::DOCS, "1.0")
        .dir("/usr/share/doc/dnfimage")
        .file(&format!("/{}", files::DOCS), read(files::DOCS)?);
    Ok(vec![base, busybox, kernel, docs])
}

/// The kernel package for kernel version `kver` ("6.1.0-dnfimage"): version "6.1.0".
fn kernel_spec(kver: &str, vmlinuz: Vec<u8>, initramfs: Vec<u8>) -> Spec {
    let version = kver.split('-').next().unwrap_or(kver);
    let dir = format!("/usr/lib/modules/{kver}");
    let mut spec = Spec::new(packages::KERNEL, version);
    spec.provides.push("kernel".to_string());
    spec.contents = vec![
        (dir.clone(), Content::Dir),
        (format!("{dir}/vmlinuz"), Content::File(vmlinuz, 0o644)),
        (
            format!("{dir}/initramfs.img"),
            Content::File(initramfs, 0o644),
        ),
    ];
    spec
}

fn host_arch() -> Result<String> {
    static ARCH: OnceLock<String> = OnceLock::new();
    if let Some(a) = ARCH.get() {
        return Ok(a.clone());
    }
    let arch = run(Command::new("rpm").args(["--eval", "%{_arch}"]))
        .context("Asking rpm for the architecture")?
        .trim()
        .to_string();
    Ok(ARCH.get_or_init(|| arch).clone())
}

/// Builds the base packages from the files of `root` (a base root in ostree layout) and records
/// them in a new rpm database under [`RPMDB_DIR`] with `rpm --justdb` (the files are already
/// there). Leaves no lock, WAL or temporary file behind, and nothing under `/var`.
pub(crate) fn install_base_rpmdb(root: &Path, version: u32, work: &Path) -> Result<()> {
    let out = work.join("base-rpms");
    let mut rpms = Vec::new();
    for spec in base_specs(root, version)? {
        rpms.push(spec.build(work, &out)?);
    }
    let dbpath = format!("/{RPMDB_DIR}");
    let rpm = |args: &[&str]| -> Result<String> {
        let mut cmd = Command::new("rpm");
        cmd.arg("--root")
            .arg(root)
            .arg("--dbpath")
            .arg(&dbpath)
            .args(args)
            .stdin(Stdio::null());
        run(&mut cmd)
    };
    rpm(&["--initdb"]).context("Creating the rpm database")?;
    let mut args = vec!["-i", "--justdb", "--nodeps", "--noscripts", "--nosignature"];
    let paths: Vec<String> = rpms.iter().map(|p| p.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    rpm(&args).context("Recording the base packages")?;
    let listed = rpm(&["-qa"])?;
    if listed.lines().count() != rpms.len() {
        bail!("The base rpm database lists {listed:?}");
    }
    clean_rpmdb(&root.join(RPMDB_DIR))?;
    // rpm makes its temporary directory; the image must have nothing under /var.
    for dir in ["var/tmp", "var/lib/rpm"] {
        let p = root.join(dir);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("Removing {dir}"))?;
        }
    }
    Ok(())
}

/// Checkpoints the sqlite WAL of the rpm database in `dir` into the database and removes the
/// `-wal`, `-shm` and `.rpm.lock` files.
fn clean_rpmdb(dir: &Path) -> Result<()> {
    let db = dir.join("rpmdb.sqlite");
    run(Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA wal_checkpoint(TRUNCATE);"))
    .context("Checkpointing the rpm database")?;
    for name in ["rpmdb.sqlite-wal", "rpmdb.sqlite-shm", ".rpm.lock"] {
        let p = dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("Removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// The packages of the test repository and the local ones, signed or not.
fn test_specs() -> Vec<(Spec, Signing, Place)> {
    // No /dev/null is needed: the sandbox may not provide one.
    let scriptlet_post = format!(
        "mkdir -p /usr/share/dnfimage-scriptlet /etc/dnfimage-scriptlet.d\n\
         echo ran > /usr/share/dnfimage-scriptlet/post-ran\n\
         echo ran > /etc/dnfimage-scriptlet.d/post-ran\n\
         if echo probe | busybox nc -w 3 127.0.0.1 {NETWORK_PROBE_PORT} \
         > /usr/share/dnfimage-scriptlet/network.out 2>&1; then\n\
         \x20 echo reached > /usr/share/dnfimage-scriptlet/network\n\
         else\n\
         \x20 echo unreachable > /usr/share/dnfimage-scriptlet/network\n\
         fi\n"
    );
    let new_kernel = kernel_spec(
        NEW_KERNEL_VERSION,
        format!("placeholder kernel {NEW_KERNEL_VERSION}\n").into_bytes(),
        format!("placeholder initramfs {NEW_KERNEL_VERSION}\n").into_bytes(),
    );
    vec![
        (
            Spec::new(packages::HELLO, "1.0")
                .requires(packages::LIBHELLO)
                .dir("/usr/share/dnfimage-hello")
                .file(&format!("/{}", files::HELLO), files::HELLO_CONTENT),
            Signing::TestKey,
            Place::Repo,
        ),
        (
            Spec::new(packages::LIBHELLO, "1.0")
                .dir("/usr/share/dnfimage-libhello")
                .file(&format!("/{}", files::LIBHELLO), "a dependency\n"),
            Signing::TestKey,
            Place::Repo,
        ),
        (
            Spec::new(packages::SCRIPTLET, "1.0")
                .requires("/bin/sh")
                .file("/usr/share/dnfimage-scriptlet/README", "has a %post\n")
                .file("/etc/dnfimage-scriptlet.conf", "setting = 1\n")
                .post(&scriptlet_post),
            Signing::TestKey,
            Place::Repo,
        ),
        (
            Spec::new(packages::CONFLICT, "1.0")
                .file("/usr/lib/os-release", "NAME=\"a conflicting package\"\n"),
            Signing::TestKey,
            Place::Repo,
        ),
        (
            Spec::new(packages::BAD_POST, "1.0")
                .requires("/bin/sh")
                .file("/usr/share/dnfimage-badpost/README", "fails in %post\n")
                .post("echo 'dnfimage-badpost: failing on purpose' >&2\nexit 3"),
            Signing::TestKey,
            Place::Repo,
        ),
        (
            Spec::new(packages::NEEDS_MISSING, "1.0")
                .requires("dnfimage-nonexistent")
                .file(
                    "/usr/share/dnfimage-needs-missing/README",
                    "cannot resolve\n",
                ),
            Signing::TestKey,
            Place::Repo,
        ),
        (
            Spec::new(packages::UNSIGNED, "1.0")
                .file("/usr/share/dnfimage-unsigned/README", "not signed\n"),
            Signing::None,
            Place::Repo,
        ),
        (
            Spec::new(packages::OTHER_KEY, "1.0").file(
                "/usr/share/dnfimage-otherkey/README",
                "signed by a stranger\n",
            ),
            Signing::OtherKey,
            Place::Repo,
        ),
        (new_kernel, Signing::TestKey, Place::Local),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signing {
    TestKey,
    OtherKey,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Repo,
    Local,
}

/// A GPG home with signing keys; its agent is stopped when dropped.
#[derive(Debug)]
pub struct Keyring {
    home: PathBuf,
}

impl Keyring {
    /// Opens (creating it if needed) the GPG home `home`.
    pub fn open(home: &Path) -> Result<Self> {
        std::fs::create_dir_all(home).with_context(|| format!("Creating {}", home.display()))?;
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("Setting the mode of {}", home.display()))?;
        Ok(Keyring {
            home: home.to_path_buf(),
        })
    }

    fn gpg(&self) -> Command {
        let mut cmd = Command::new("gpg");
        cmd.arg("--homedir")
            .arg(&self.home)
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
            .stdin(Stdio::null());
        cmd
    }

    /// Generates a signing key without passphrase for `user_id`, unless there is one.
    pub fn generate(&self, user_id: &str) -> Result<()> {
        if run(self.gpg().args(["--list-secret-keys", user_id])).is_ok() {
            return Ok(());
        }
        run(self
            .gpg()
            .args(["--quick-gen-key", user_id, "rsa2048", "sign", "never"]))
        .with_context(|| format!("Generating a GPG key for {user_id}"))?;
        Ok(())
    }

    /// The ASCII-armoured public key of `user_id`.
    pub fn export(&self, user_id: &str) -> Result<String> {
        run(self.gpg().args(["--armor", "--export", user_id]))
            .with_context(|| format!("Exporting the key of {user_id}"))
    }

    /// The long key id (16 hex digits, lower case) of `user_id`.
    pub fn key_id(&self, user_id: &str) -> Result<String> {
        let out = run(self.gpg().args(["--with-colons", "--list-keys", user_id]))?;
        out.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.first() == Some(&"pub")).then(|| f.get(4).map(|id| id.to_lowercase()))?
            })
            .ok_or_else(|| anyhow!("No public key for {user_id}"))
    }

    /// Signs the packages `rpms` in place with the key of `user_id`.
    pub fn sign(&self, user_id: &str, rpms: &[PathBuf]) -> Result<()> {
        if rpms.is_empty() {
            return Ok(());
        }
        let mut cmd = Command::new("rpmsign");
        cmd.arg("--addsign")
            .arg("--define")
            .arg(format!("_gpg_path {}", self.home.display()))
            .arg("--define")
            .arg(format!("_gpg_name {user_id}"))
            .arg("--define")
            .arg("__gpg /usr/bin/gpg")
            .args(rpms)
            .stdin(Stdio::null());
        run(&mut cmd).context("Signing packages")?;
        Ok(())
    }
}

impl Drop for Keyring {
    fn drop(&mut self) {
        crate::cmd::stop_gpg_agent(&self.home, "the test keyring");
    }
}

/// Runs `createrepo_c` on `dir`.
pub fn createrepo(dir: &Path) -> Result<()> {
    run(Command::new("createrepo_c")
        .arg("--quiet")
        .arg("--no-database")
        .arg(dir)
        .stdin(Stdio::null()))
    .with_context(|| format!("Creating the repository metadata in {}", dir.display()))?;
    Ok(())
}

/// The test packages, built once and shared (treat every path as read-only; copy the
/// repository before damaging it).
#[derive(Debug, Clone)]
pub struct TestRpms {
    /// The rpm-md repository (every package but the local ones).
    pub repo_dir: PathBuf,
    /// Signed packages that are not in the repository (the replacement kernel).
    pub local_dir: PathBuf,
    /// A directory holding only the test key (ASCII-armoured), as a layerer's key directory.
    pub key_dir: PathBuf,
    /// The public key file of the test key, in `key_dir`.
    pub key_file: PathBuf,
    /// The public key of the other key (not in `key_dir`).
    pub other_key_file: PathBuf,
    /// The long key id of the test key.
    pub key_id: String,
    /// The long key id of the other key.
    pub other_key_id: String,
    /// The GPG home holding both secret keys.
    pub gnupg_home: PathBuf,
}

/// Names the cached build: [`RPMS_VERSION`] plus a hash of this file's source.
fn cache_key() -> String {
    use sha2::{Digest as _, Sha256};
    let hash = hex::encode(Sha256::digest(include_str!("rpms.rs").as_bytes()));
    format!("rpms-v{RPMS_VERSION}-{}", &hash[..12])
}

impl TestRpms {
    fn at(dir: &Path) -> Self {
        TestRpms {
            repo_dir: dir.join("repo"),
            local_dir: dir.join("local"),
            key_dir: dir.join("keys"),
            key_file: dir.join("keys/RPM-GPG-KEY-dnfimage-test"),
            other_key_file: dir.join("RPM-GPG-KEY-dnfimage-other"),
            key_id: String::new(),
            other_key_id: String::new(),
            gnupg_home: dir.join("gnupg"),
        }
    }

    /// Builds the packages under `cache_dir`, or reuses a complete build there made from the
    /// same source. A file lock makes concurrent processes wait for one build.
    pub fn build(cache_dir: &Path) -> Result<TestRpms> {
        let dir = crate::fixtures::cached_build(
            cache_dir,
            &cache_key(),
            "test packages",
            Self::build_into,
        )?;
        let mut rpms = Self::at(&dir);
        let keyring = Keyring::open(&rpms.gnupg_home)?;
        rpms.key_id = keyring.key_id(KEY_USER_ID)?;
        rpms.other_key_id = keyring.key_id(OTHER_KEY_USER_ID)?;
        Ok(rpms)
    }

    fn build_into(dir: &Path) -> Result<()> {
        let rpms = Self::at(dir);
        let work = dir.join("work");
        for d in [&rpms.repo_dir, &rpms.local_dir, &rpms.key_dir, &work] {
            std::fs::create_dir_all(d).with_context(|| format!("Creating {}", d.display()))?;
        }
        let keyring = Keyring::open(&rpms.gnupg_home)?;
        keyring.generate(KEY_USER_ID)?;
        keyring.generate(OTHER_KEY_USER_ID)?;
        std::fs::write(&rpms.key_file, keyring.export(KEY_USER_ID)?)
            .context("Writing the public key")?;
        std::fs::write(&rpms.other_key_file, keyring.export(OTHER_KEY_USER_ID)?)
            .context("Writing the other public key")?;
        let (mut test_key, mut other_key) = (Vec::new(), Vec::new());
        for (spec, signing, place) in test_specs() {
            let out = match place {
                Place::Repo => &rpms.repo_dir,
                Place::Local => &rpms.local_dir,
            };
            let rpm = spec.build(&work, out)?;
            match signing {
                Signing::TestKey => test_key.push(rpm),
                Signing::OtherKey => other_key.push(rpm),
                Signing::None => {}
            }
        }
        keyring.sign(KEY_USER_ID, &test_key)?;
        keyring.sign(OTHER_KEY_USER_ID, &other_key)?;
        createrepo(&rpms.repo_dir)?;
        std::fs::remove_dir_all(&work).context("Removing the build directory")?;
        Ok(())
    }

    /// The packages shared by all tests of all processes: built at most once, next to the
    /// fixture images (`$DNFIMAGE_FIXTURES_DIR` or `<cargo target dir>/dnfimage-fixtures`).
    pub fn shared() -> Result<&'static TestRpms> {
        static CELL: OnceLock<TestRpms> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(r) = CELL.get() {
            return Ok(r);
        }
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = CELL.get() {
            return Ok(r);
        }
        let rpms = Self::build(&crate::fixtures::shared_cache_dir())?;
        Ok(CELL.get_or_init(|| rpms))
    }

    /// The path of the repository package `name` (version 1.0-1, noarch).
    pub fn repo_package(&self, name: &str) -> PathBuf {
        self.repo_dir.join(format!("{name}-1.0-1.noarch.rpm"))
    }

    /// The replacement kernel package (6.2.0, signed, not in the repository).
    pub fn new_kernel(&self) -> PathBuf {
        let version = NEW_KERNEL_VERSION.split('-').next().unwrap_or_default();
        self.local_dir
            .join(format!("{}-{version}-1.noarch.rpm", packages::KERNEL))
    }

    /// The short key id rpm prints ("key ID 1a2b3c4d") of the test key.
    pub fn short_key_id(&self) -> &str {
        &self.key_id[self.key_id.len().saturating_sub(8)..]
    }

    /// The short key id of the other key.
    pub fn other_short_key_id(&self) -> &str {
        &self.other_key_id[self.other_key_id.len().saturating_sub(8)..]
    }
}

/// Builds `count` signed packages `dnfimage-bench-NNN` of `files` small files each (plus a
/// dependency chain: each requires the one before), signed with the test key, into a new
/// repository at `dir`. For the layering benchmark.
pub fn build_bench_repo(dir: &Path, count: usize, files: usize) -> Result<Vec<String>> {
    let rpms = TestRpms::shared()?;
    let work = dir.join(".work");
    std::fs::create_dir_all(&work).with_context(|| format!("Creating {}", work.display()))?;
    let mut built = Vec::new();
    let mut names = Vec::new();
    for i in 0..count {
        let name = format!("dnfimage-bench-{i:03}");
        let base = format!("/usr/share/{name}");
        let mut spec = Spec::new(&name, "1.0").dir(&base);
        if i > 0 {
            spec = spec.requires(&format!("dnfimage-bench-{:03}", i - 1));
        }
        for f in 0..files {
            spec = spec.file(
                &format!("{base}/file-{f:04}"),
                format!("{name} file {f}\n").repeat(8),
            );
        }
        built.push(spec.build(&work, dir)?);
        names.push(name);
    }
    Keyring::open(&rpms.gnupg_home)?.sign(KEY_USER_ID, &built)?;
    std::fs::remove_dir_all(&work).context("Removing the build directory")?;
    createrepo(dir)?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm_query(file: &Path, format: &str) -> Result<String> {
        run(Command::new("rpm")
            .args(["-qp", "--nosignature", "--qf", format])
            .arg(file))
    }

    #[test]
    fn spec_text_lists_payload_and_scriptlet() {
        let spec = Spec::new("x", "1.0")
            .requires("y")
            .dir("/usr/share/x")
            .file("/usr/share/x/a", "a")
            .file("/etc/x.conf", "c")
            .post("echo hi");
        let text = spec.spec_text(Path::new("/p"));
        for want in [
            "Name: x\n",
            "BuildArch: noarch\n",
            "Requires: y\n",
            "cp -a '/p'/. %{buildroot}/\n",
            "%post\necho hi\n",
            "%dir /usr/share/x\n",
            "/usr/share/x/a\n",
            "%config(noreplace) /etc/x.conf\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert_eq!(spec.file_name(), "x-1.0-1.noarch.rpm");
    }

    /// The shared packages: signed as intended (checked with rpmkeys against a keyring holding
    /// the test key only), with the dependency and the repository metadata.
    #[test]
    fn test_packages_are_signed_and_published() -> Result<()> {
        let rpms = TestRpms::shared()?;
        let tmp = tempfile::tempdir()?;
        let keyring = tmp.path().join("keyring");
        std::fs::create_dir(&keyring)?;
        run(Command::new("rpmkeys")
            .arg("--dbpath")
            .arg(&keyring)
            .arg("--import")
            .arg(&rpms.key_file))?;
        let check = |file: &Path| -> String {
            let out = Command::new("rpmkeys")
                .arg("--dbpath")
                .arg(&keyring)
                .arg("-Kv")
                .arg(file)
                .output()
                .expect("rpmkeys runs");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let signed = check(&rpms.repo_package(packages::HELLO));
        assert!(
            signed.contains(&format!("key ID {}: OK", rpms.short_key_id())),
            "{signed}"
        );
        assert!(
            !check(&rpms.repo_package(packages::UNSIGNED)).contains("Signature"),
            "unsigned"
        );
        let other = check(&rpms.repo_package(packages::OTHER_KEY));
        assert!(
            other.contains(&format!("key ID {}: NOKEY", rpms.other_short_key_id())),
            "{other}"
        );
        assert!(
            check(&rpms.new_kernel()).contains(": OK"),
            "kernel is signed"
        );
        assert_eq!(
            rpm_query(&rpms.repo_package(packages::HELLO), "[%{REQUIRES}\n]")?
                .lines()
                .filter(|l| !l.starts_with("rpmlib("))
                .collect::<Vec<_>>(),
            [packages::LIBHELLO]
        );
        assert_eq!(
            rpm_query(&rpms.new_kernel(), "[%{FILENAMES}\n]")?,
            format!(
                "/usr/lib/modules/{NEW_KERNEL_VERSION}\n\
                 /usr/lib/modules/{NEW_KERNEL_VERSION}/initramfs.img\n\
                 /usr/lib/modules/{NEW_KERNEL_VERSION}/vmlinuz\n"
            )
        );
        assert!(rpms.repo_dir.join("repodata/repomd.xml").exists());
        assert!(
            !rpms
                .repo_dir
                .join(rpms.new_kernel().file_name().context("name")?)
                .exists()
        );
        Ok(())
    }
}
