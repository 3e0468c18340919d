//! The systemd units: what `scripts/install.sh` installs, `systemd-analyze verify` and
//! `security` on it, and the units under systemd as PID 1 in a `systemd-nspawn` container:
//! socket activation, idle exit, `STATUS=`, SIGTERM during a fetch, the journal, and callers
//! that are not root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_integration::proxy::{Shaping, SlowProxy};
use dnfimage_integration::sysroot::TestSysroot;
use dnfimage_integration::systemd::{
    Container, ContainerOptions, UNIT_DIR, analyze, container_unavailable, exec_binary,
    exposure_score, install, installed_units, parse_unit, program_installed, report, unit_value,
    wait_for,
};
use dnfimage_integration::{assert_blobs_intact, bin_dir, run, run_ok};
use dnfimage_testimage::{BenchOptions, Fixtures, Registry, tags};

/// The services, as (unit stem, varlink interface).
const SERVICES: [(&str, &str); 4] = [
    ("fetcher", "org.dnfimage.Fetcher"),
    ("importer", "org.dnfimage.Importer"),
    ("deployer", "org.dnfimage.Deployer"),
    ("layerer", "org.dnfimage.Layerer"),
];

/// The highest `systemd-analyze security` exposure each service may reach; a unit change that
/// opens more fails here and must raise the number on purpose.
const MAX_EXPOSURE: [(&str, f64); 6] = [
    ("dnfimage-fetcher.service", 2.0),
    ("dnfimage-importer.service", 2.5),
    ("dnfimage-deployer.service", 2.8),
    ("dnfimage-layerer.service", 4.5),
    // 1.2 before `policy = "apply"`: the network (for the fleet's coordination backend) costs 0.4.
    ("dnfimage-upgrade.service", 1.6),
    ("dnfimage-fleet-release.service", 1.6),
];

/// The services' idle timeout in the container: short, with room for a slow machine between a
/// call and the check that its service runs.
const IDLE_SECS: u64 = 3;

fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix(prefix).tempdir()?)
}

/// Every installed unit: the shape the house style asks for.
#[test]
fn units_follow_the_house_rules() -> Result<()> {
    let dest = temp_dir("dnfimage-units-")?;
    install(dest.path())?;
    let units = installed_units(dest.path())?;
    let mut want: Vec<String> = SERVICES
        .iter()
        .flat_map(|(s, _)| {
            [
                format!("dnfimage-{s}.service"),
                format!("dnfimage-{s}.socket"),
            ]
        })
        .collect();
    want.extend([
        "dnfimage-fleet-release.service".into(),
        "dnfimage-upgrade.service".into(),
        "dnfimage-upgrade.timer".into(),
    ]);
    want.sort();
    assert_eq!(units, want);

    for unit in &units {
        let text = std::fs::read_to_string(dest.path().join(UNIT_DIR).join(unit))?;
        assert!(
            text.starts_with("# SPDX-License-Identifier: "),
            "{unit}: no SPDX header"
        );
        for key in ["Description", "Documentation"] {
            assert!(
                unit_value(&text, "Unit", key).is_some(),
                "{unit}: no {key}="
            );
        }
        let entries = parse_unit(&text);
        let in_section = |section: &str| -> Vec<(String, String)> {
            entries
                .iter()
                .filter(|(s, _, _)| s == section)
                .map(|(_, k, v)| (k.clone(), v.clone()))
                .collect()
        };
        // Written out alphabetically after Type= and ExecStart=, so a missing one shows.
        for section in ["Socket", "Timer", "Service"] {
            let keys: Vec<String> = in_section(section)
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k != "Type" && k != "ExecStart")
                .collect();
            let mut sorted = keys.clone();
            sorted.sort();
            assert_eq!(
                keys, sorted,
                "{unit}: [{section}] is not in alphabetical order"
            );
        }
        let stem = unit.rsplit_once('.').map(|(s, _)| s).unwrap_or(unit);
        if let Some((service, interface)) = SERVICES
            .iter()
            .find(|(s, _)| stem == format!("dnfimage-{s}"))
        {
            if unit.ends_with(".socket") {
                assert_eq!(
                    unit_value(&text, "Socket", "ListenStream"),
                    Some(format!("/run/dnfimage/{interface}")),
                    "{unit}"
                );
                assert_eq!(
                    unit_value(&text, "Socket", "FileDescriptorName").as_deref(),
                    Some("varlink")
                );
                let mode = unit_value(&text, "Socket", "SocketMode").context("SocketMode=")?;
                assert!(
                    text.contains("PermissionDenied"),
                    "{unit}: SocketMode={mode} is not explained"
                );
                assert_eq!(
                    unit_value(&text, "Install", "WantedBy").as_deref(),
                    Some("sockets.target")
                );
            } else {
                let socket = format!("dnfimage-{service}.socket");
                assert_eq!(
                    unit_value(&text, "Service", "Type").as_deref(),
                    Some("notify")
                );
                assert_eq!(
                    unit_value(&text, "Service", "ExecStart"),
                    Some(format!("/usr/libexec/dnfimage/dnfimage-{service}"))
                );
                assert_eq!(unit_value(&text, "Unit", "Requires"), Some(socket.clone()));
                assert!(
                    unit_value(&text, "Unit", "After").is_some_and(|a| a.contains(&socket)),
                    "{unit}: not After= its socket"
                );
                assert!(
                    in_section("Install").is_empty(),
                    "{unit}: a socket-activated service has no [Install]"
                );
                assert!(
                    text.contains("# Hardening"),
                    "{unit}: hardening not justified"
                );
            }
        }
    }
    Ok(())
}

/// `systemd-analyze verify` on every installed unit whose program is installed, in a root whose
/// `/usr` is the install over the host's; and the exposure score of each service.
#[test]
fn installed_units_verify_and_score() -> Result<()> {
    let dest = temp_dir("dnfimage-verify-")?;
    let scratch = temp_dir("dnfimage-verify-root-")?;
    let printed = install(dest.path())?;
    let mut verifiable = Vec::new();
    for unit in installed_units(dest.path())? {
        let program = exec_binary(dest.path(), &unit)?;
        if program_installed(dest.path(), &program) {
            verifiable.push(unit);
        } else {
            let name = program.rsplit('/').next().unwrap_or(&program);
            report(&format!(
                "units: not verifying {unit}: {program} is not installed ({})",
                printed
                    .lines()
                    .find(|l| l.contains(&format!("{name} is not built")))
                    .unwrap_or("")
            ));
        }
    }
    assert!(
        verifiable.iter().any(|u| u == "dnfimage-fetcher.service"),
        "the fetcher is built, its units must verify: {verifiable:?}"
    );
    let mut args = vec!["verify"];
    args.extend(verifiable.iter().map(String::as_str));
    let out = analyze(dest.path(), scratch.path(), &args)?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {verifiable:?} ({}):\n{said}",
        out.status
    );
    report(&format!(
        "units: systemd-analyze verify passed: {verifiable:?}"
    ));

    // The same check catches a broken unit in this setup (it is not vacuous).
    let broken = dest.path().join(UNIT_DIR).join("dnfimage-broken.service");
    let fetcher =
        std::fs::read_to_string(dest.path().join(UNIT_DIR).join("dnfimage-fetcher.service"))?;
    std::fs::write(
        &broken,
        fetcher.replace(
            "NoNewPrivileges=yes",
            "NoNewPrivileges=sometimes\nNoSuchSetting=1",
        ),
    )?;
    let scratch2 = temp_dir("dnfimage-verify-root-")?;
    let out = analyze(
        dest.path(),
        scratch2.path(),
        &["verify", "dnfimage-broken.service"],
    )?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("NoSuchSetting") && said.contains("sometimes"),
        "verify did not report the broken unit: {said}"
    );
    std::fs::remove_file(&broken)?;

    for (service, max) in MAX_EXPOSURE {
        let scratch = temp_dir("dnfimage-security-root-")?;
        let out = analyze(
            dest.path(),
            scratch.path(),
            &["security", "--no-pager", "--offline=yes", service],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let score = exposure_score(&text).with_context(|| {
            format!(
                "no score for {service}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        report(&format!(
            "units: systemd-analyze security {service}: {score}"
        ));
        assert!(
            score <= max,
            "{service} is exposed {score} > {max}:\n{text}"
        );
    }
    Ok(())
}

/// The bootable image the fetcher tests also use: 6 layers, 24 MiB, built once per target dir.
fn slow_image(registry: &Registry) -> Result<String> {
    let dir = bin_dir().join("dnfimage-fixtures/slow-24");
    if !dir.join("index.json").exists() {
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        dnfimage_testimage::build_bench(
            &tmp,
            "slow",
            &BenchOptions {
                layers: 6,
                total_mib: 24,
            },
        )?;
        // Another test process may have published it first; then ours is not needed.
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    let dest = registry.docker_ref("dnfimage/slow:latest");
    dnfimage_testimage::skopeo_copy(&dnfimage_testimage::oci_ref(&dir, "slow"), &dest)?;
    Ok(dest)
}

/// `varlinkctl` (systemd 257, a script in ../shared/tools that keeps its files in a cache), made
/// ready on the host so the container can run it with the cache bound in. None if unavailable.
fn varlinkctl() -> Option<(PathBuf, PathBuf)> {
    let script = dnfimage_integration::varlinkctl();
    let cache = PathBuf::from(
        std::env::var("VARLINKCTL_CACHE").unwrap_or_else(|_| "/var/cache/varlinkctl-257".into()),
    );
    let ok = Command::new(&script)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some((script, cache))
}

/// Lays out the container's `/etc`: what the install put there, presets that enable the
/// sockets of the built services and the timer (and nothing of the host's), and drop-ins with a
/// short idle timeout and the test registry's registries.conf.
fn container_etc(etc: &Path, dest: &Path, built: &[&str], registries_conf: &str) -> Result<()> {
    let systemd = etc.join("systemd");
    std::fs::create_dir_all(systemd.join("system-preset"))?;
    std::fs::create_dir_all(systemd.join("system"))?;
    let mut preset = String::new();
    for service in built {
        preset.push_str(&format!("enable dnfimage-{service}.socket\n"));
    }
    preset.push_str("enable dnfimage-upgrade.timer\ndisable *\n");
    std::fs::write(
        systemd.join("system-preset/00-dnfimage-test.preset"),
        preset,
    )?;
    // No console to ask questions on.
    std::os::unix::fs::symlink(
        "/dev/null",
        systemd.join("system/systemd-firstboot.service"),
    )?;
    for (service, _) in SERVICES {
        let dir = systemd.join(format!("system/dnfimage-{service}.service.d"));
        std::fs::create_dir_all(&dir)?;
        let extra = if service == "fetcher" {
            "Environment=DNFIMAGE_REGISTRIES_CONF=/etc/dnfimage/registries.conf\n"
        } else {
            // The test sysroot is bound where a booted host has its physical root, which the
            // units already let the services write.
            "Environment=DNFIMAGE_SYSROOT=/sysroot\n"
        };
        std::fs::write(
            dir.join("50-test.conf"),
            format!("[Service]\nEnvironment=DNFIMAGE_IDLE_TIMEOUT={IDLE_SECS}\n{extra}"),
        )?;
    }
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(dest.join("etc/dnfimage"))
            .arg(etc),
    )?;
    std::fs::write(etc.join("dnfimage/registries.conf"), registries_conf)?;
    // skopeo's signature policy, as the skopeo package installs it on a host.
    if Path::new("/etc/containers").exists() {
        run_ok(Command::new("cp").args(["-a", "/etc/containers"]).arg(etc))?;
    }
    Ok(())
}

/// How long each phase took, for the summary printed at the end.
struct Timings(Vec<(String, Duration)>);

impl Timings {
    fn add(&mut self, what: &str, took: Duration) {
        self.0.push((what.to_string(), took));
    }
}

fn stdout_of(cmd: &mut Command) -> Result<(bool, String, String)> {
    let out = run(cmd)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Kills a background command run inside the container when dropped.
struct Background(Option<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The units under systemd as PID 1, in phases sharing one container (boot takes a second,
/// the registry and the slow image a few).
#[test]
fn units_under_systemd_in_a_container() -> Result<()> {
    if let Some(reason) = container_unavailable() {
        let ci = std::env::var_os("CI").is_some();
        report(&format!(
            "units: {} the systemd container test: {reason}",
            if ci { "FAILING" } else { "SKIPPING" }
        ));
        anyhow::ensure!(!ci, "CI must run the systemd container test: {reason}");
        return Ok(());
    }
    let started = Instant::now();
    let mut timings = Timings(Vec::new());
    let tmp = temp_dir("dnfimage-nspawn-")?;
    let dest = tmp.path().join("dest");
    install(&dest)?;
    let built: Vec<&str> = SERVICES
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| {
            dest.join(format!("usr/libexec/dnfimage/dnfimage-{s}"))
                .exists()
        })
        .collect();
    for (s, _) in SERVICES.iter().filter(|(s, _)| !built.contains(s)) {
        report(&format!(
            "units: dnfimage-{s} is not built yet: its units are installed but not enabled, \
             and its activation is not tested"
        ));
    }

    // A registry on the host's loopback (the container shares the network), and a proxy that
    // makes a fetch of the slow image take about 12 s.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let registry = Registry::start(&tmp.path().join("registry"))?;
    let direct = slow_image(&registry)?;
    let proxy = rt.block_on(SlowProxy::start(
        &registry.addr(),
        Shaping {
            request_delay: Duration::from_millis(10),
            bytes_per_second: 2_000_000,
            silent_after: None,
        },
    ))?;
    let image = direct.replace(&registry.addr(), &proxy.addr());
    timings.add("registry and slow image", started.elapsed());

    let fixtures = Fixtures::shared()?;
    let etc = tmp.path().join("etc");
    container_etc(
        &etc,
        &dest,
        &built,
        &format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            proxy.addr()
        ),
    )?;
    let mut usr_layers = vec![dest.join("usr")];
    let mut binds_ro = vec![(fixtures.oci_dir.clone(), "/fixtures".to_string())];
    let varlinkctl = varlinkctl();
    if let Some((script, cache)) = &varlinkctl {
        let tools = tmp.path().join("tools/usr/local/bin");
        std::fs::create_dir_all(&tools)?;
        std::fs::copy(script, tools.join("varlinkctl"))?;
        usr_layers.push(tmp.path().join("tools/usr"));
        binds_ro.push((cache.clone(), cache.display().to_string()));
    } else {
        report("units: varlinkctl is not available; the varlinkctl calls are skipped");
    }

    let sysroot = TestSysroot::create(&tmp.path().join("sysroot"))?;

    let machine = format!("dnfimage-test-{}", std::process::id());
    let ct = Container::boot(
        &machine,
        &ContainerOptions {
            usr_layers,
            etc,
            binds_ro,
            binds: vec![(sysroot.path().to_path_buf(), "/sysroot".into())],
            log: tmp.path().join("nspawn.log"),
            boot_timeout: Duration::from_secs(60),
        },
    )?;
    timings.add("boot", ct.boot_time);
    let fetcher = "dnfimage-fetcher.service";
    let context = |what: &str| {
        let status = ct
            .run_ok(
                "systemctl",
                &["status", "--no-pager", "--full", "--lines=30", "dnfimage-*"],
            )
            .unwrap_or_else(|e| format!("{e:#}"));
        format!("{what}\n--- systemctl status:\n{status}")
    };

    // Phase 1: after boot the sockets listen and no service runs.
    for (s, _) in SERVICES {
        let service = format!("dnfimage-{s}.service");
        assert_eq!(
            ct.active_state(&service)?,
            "inactive",
            "{service} runs after boot"
        );
        let socket = format!("dnfimage-{s}.socket");
        let want = if built.contains(&s) {
            "active"
        } else {
            "inactive"
        };
        assert_eq!(ct.active_state(&socket)?, want, "{socket}");
        if built.contains(&s) {
            assert_eq!(ct.show(&socket, "SubState")?, "listening");
        }
    }
    assert_eq!(ct.active_state("dnfimage-upgrade.timer")?, "active");
    let units = ct.run_ok(
        "systemctl",
        &[
            "list-units",
            "--all",
            "--no-legend",
            "--plain",
            "dnfimage-*",
        ],
    )?;
    report(&format!("units: after boot:\n{units}"));

    // Phase 2: a CLI call starts the fetcher and nothing else. (An InvocationID is set once a
    // unit has been started since boot.)
    for (s, _) in SERVICES {
        let service = format!("dnfimage-{s}.service");
        assert_eq!(
            ct.show(&service, "InvocationID")?,
            "",
            "{service} ran before"
        );
    }
    let t = Instant::now();
    let list = ct.run_ok("dnf-image", &["image", "list"])?;
    timings.add("`dnf-image image list`, activation included", t.elapsed());
    assert_eq!(ct.active_state(fetcher)?, "active", "{}", context(&list));
    assert_eq!(
        ct.show(fetcher, "StatusText")?,
        "Serving org.dnfimage.Fetcher"
    );
    for (s, _) in &SERVICES[1..] {
        let service = format!("dnfimage-{s}.service");
        assert_eq!(
            ct.show(&service, "InvocationID")?,
            "",
            "{service} was started"
        );
    }
    let first_invocation = ct.show(fetcher, "InvocationID")?;

    // Phase 3: it exits by itself after the idle timeout (3 s here), successfully, and the
    // socket keeps listening.
    let idle = ct.wait_state(fetcher, "inactive", Duration::from_secs(20))?;
    timings.add("fetcher idle exit after the call (timeout 3 s)", idle);
    assert!(
        idle >= Duration::from_secs(IDLE_SECS) - Duration::from_millis(500),
        "exited after {idle:?}"
    );
    assert_eq!(ct.show(fetcher, "Result")?, "success");
    assert_eq!(ct.show(fetcher, "ExecMainStatus")?, "0");
    assert_eq!(ct.show("dnfimage-fetcher.socket", "SubState")?, "listening");

    // Phase 4: a caller that is not root may read but not change state.
    let (ok, out, err) = stdout_of(ct.command_as(65534, "dnf-image").args(["image", "list"]))?;
    assert!(ok, "image list as nobody: {out}{err}");
    assert_ne!(
        ct.show(fetcher, "InvocationID")?,
        first_invocation,
        "not started again"
    );
    let (ok, out, err) = stdout_of(
        ct.command_as(65534, "dnf-image")
            .args(["image", "fetch", &image]),
    )?;
    assert!(
        !ok && err.contains("Permission denied"),
        "fetch as nobody: {out}{err}"
    );
    assert!(
        !ct.path("/var/lib/dnfimage/cache/blobs/sha256")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "a refused fetch wrote blobs"
    );

    // The other built services: activation through varlinkctl, PermissionDenied for Cancel as
    // nobody, idle exit.
    if varlinkctl.is_some() {
        for (s, interface) in SERVICES.iter().filter(|(s, _)| built.contains(s)) {
            let service = format!("dnfimage-{s}.service");
            ct.wait_state(&service, "inactive", Duration::from_secs(20))?;
            let socket = format!("/run/dnfimage/{interface}");
            let t = Instant::now();
            let info = ct.run_ok("varlinkctl", &["info", &socket])?;
            let took = t.elapsed();
            assert!(info.contains(interface), "{info}");
            assert_eq!(ct.active_state(&service)?, "active", "{}", context(&info));
            for (other, _) in SERVICES.iter().filter(|(o, _)| o != s) {
                assert_eq!(
                    ct.active_state(&format!("dnfimage-{other}.service"))?,
                    "inactive",
                    "varlinkctl info {socket} started dnfimage-{other}"
                );
            }
            let (ok, out, err) = stdout_of(ct.command_as(65534, "varlinkctl").args([
                "call",
                &socket,
                &format!("{interface}.Cancel"),
                "{}",
            ]))?;
            assert!(
                !ok && err.contains(&format!("{interface}.PermissionDenied")),
                "{interface}.Cancel as nobody: {out}{err}"
            );
            let idle = ct.wait_state(&service, "inactive", Duration::from_secs(20))?;
            assert_eq!(ct.show(&service, "Result")?, "success", "{service}");
            report(&format!(
                "units: {service}: varlinkctl info {took:?} (activation included), \
                 idle exit {idle:?} later"
            ));
        }
    }

    // Phase 5: STATUS= in `systemctl status` while a fetch runs.
    ct.wait_state(fetcher, "inactive", Duration::from_secs(20))?;
    let mut fetch = Background(Some(
        ct.command("dnf-image")
            .args(["image", "fetch", &image, "--concurrency", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("Starting the fetch in the container")?,
    ));
    let t = Instant::now();
    let (status_text, _) = wait_for("the fetch's STATUS=", Duration::from_secs(30), || {
        if let Some(child) = fetch.0.as_mut()
            && child.try_wait()?.is_some()
        {
            let out = fetch.0.take().context("the fetch")?.wait_with_output()?;
            anyhow::bail!(
                "The fetch ended before STATUS= showed it ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                context(&String::from_utf8_lossy(&out.stderr))
            );
        }
        let text = ct.show(fetcher, "StatusText")?;
        // First "Fetching IMAGE", then with the layer count once the manifest is read.
        Ok((text.starts_with("Fetching ") && text.contains(" layers, ")).then_some(text))
    })?;
    timings.add("fetch start to STATUS=Fetching", t.elapsed());
    assert!(
        status_text.contains(&image) && status_text.contains("6 layers"),
        "{status_text}"
    );
    let status = ct.run_ok("systemctl", &["status", "--no-pager", fetcher])?;
    assert!(
        status.contains(&format!("Status: \"{status_text}\"")),
        "{status}"
    );
    report(&format!(
        "units: systemctl status during a fetch:\n{status}"
    ));
    // Let some layers complete, so that stopping is midway.
    std::thread::sleep(Duration::from_secs(3));

    // Phase 6: `systemctl stop` (SIGTERM) cancels the fetch and the service exits cleanly;
    // complete layers stay, nothing half-written looks complete.
    let t = Instant::now();
    ct.run_ok("systemctl", &["stop", fetcher])?;
    let stop = t.elapsed();
    timings.add("systemctl stop during the fetch", stop);
    assert!(stop < Duration::from_secs(15), "stop took {stop:?}");
    assert_eq!(ct.active_state(fetcher)?, "inactive");
    assert_eq!(
        ct.show(fetcher, "Result")?,
        "success",
        "{}",
        context("after stop")
    );
    assert_eq!(ct.show(fetcher, "ExecMainStatus")?, "0");
    let mut child = fetch.0.take().context("the fetch")?;
    let (code, _) = wait_for("the CLI's fetch to end", Duration::from_secs(20), || {
        Ok(child.try_wait()?.map(|s| s.code()))
    })?;
    let out = child.wait_with_output()?;
    let cli_err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(
        code,
        Some(0),
        "the fetch succeeded despite the stop: {cli_err}"
    );
    report(&format!(
        "units: the CLI's fetch after systemctl stop: exit {code:?}: {}",
        cli_err.trim()
    ));
    let blobs = assert_blobs_intact(&ct.path("/var/lib/dnfimage/cache"))?;
    assert!(blobs < 6, "the fetch was not midway: {blobs} blobs");

    // Phase 7: the journal holds the service's own log lines under its unit name, written by
    // the journald layer (TARGET is its field), including the cancellation.
    let journal = ct.journal(fetcher)?;
    let ours: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|e| e["_SYSTEMD_UNIT"] == fetcher && e["SYSLOG_IDENTIFIER"] == "dnfimage-fetcher")
        .collect();
    assert!(
        ours.iter().any(|e| e.get("TARGET").is_some()),
        "no entry from the journald layer: {journal:?}"
    );
    assert!(
        ours.iter().any(|e| e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains("SIGTERM: cancelling"))),
        "no cancellation in the journal: {ours:?}"
    );
    assert!(
        ours.iter().any(|e| e["MESSAGE"] == "Idle, exiting"),
        "no idle exit in the journal"
    );
    let text = ct.run_ok("journalctl", &["--no-pager", "-u", fetcher])?;
    report(&format!("units: journalctl -u {fetcher}:\n{text}"));

    // Phase 8: the socket starts it again after the stop.
    let list = ct.run_ok("dnf-image", &["image", "list"])?;
    assert_eq!(ct.active_state(fetcher)?, "active", "{list}");

    // Phase 9: real work through three services under their units and sandboxes: the CLI
    // rebases the test sysroot onto a fixture image from an `oci:` layout bound read-only into
    // the container; the fetcher caches it, the importer reads the cache and writes the
    // repository, the deployer writes the deployment and its boot entries.
    if ["importer", "deployer"].iter().all(|s| built.contains(s)) {
        let t = Instant::now();
        let rebase = ct.run_ok(
            "dnf-image",
            &["--sysroot", "/sysroot", "rebase", "oci:/fixtures:base-v1"],
        );
        let rebase = rebase.with_context(|| context("rebase"))?;
        timings.add("dnf-image rebase (fetch, import, deploy)", t.elapsed());
        let status = ct.run_ok("dnf-image", &["--sysroot", "/sysroot", "--json", "status"])?;
        assert!(
            status.contains("oci:/fixtures:base-v1"),
            "{rebase}\n{status}"
        );
        sysroot.fsck()?;
        let admin = sysroot.admin_status()?;
        assert!(admin.contains("default"), "{admin}");
        for s in ["fetcher", "importer", "deployer"] {
            let service = format!("dnfimage-{s}.service");
            ct.wait_state(&service, "inactive", Duration::from_secs(20))?;
            assert_eq!(ct.show(&service, "Result")?, "success", "{service}");
        }
    } else {
        report("units: the importer or deployer is not built: the rebase phase is skipped");
    }

    // Phase 10: the upgrade timer waits; its service does nothing on a host not booted from
    // ostree (the container is not).
    assert!(
        !ct.show("dnfimage-upgrade.timer", "NextElapseUSecMonotonic")?
            .is_empty()
    );
    ct.run_ok("systemctl", &["start", "dnfimage-upgrade.service"])?;
    assert_eq!(
        ct.show("dnfimage-upgrade.service", "ConditionResult")?,
        "no"
    );

    // Phase 11: with policy "check" (the default config), the timer's service records an
    // available update, and `status` shows it. The sysroot follows a registry image this time;
    // /run/ostree-booted stands in for an ostree-booted host (the deployer still sees a
    // sysroot that is not booted: there is no ostree= kernel argument).
    if ["importer", "deployer"].iter().all(|s| built.contains(s)) {
        let latest_direct = fixtures.push_as(&registry, tags::BASE_V1, "dnfimage/os:latest")?;
        let latest = latest_direct.replace(&registry.addr(), &proxy.addr());
        ct.run_ok("dnf-image", &["--sysroot", "/sysroot", "rebase", &latest])
            .with_context(|| context("rebase onto the registry image"))?;
        fixtures.push_as(&registry, tags::BASE_V2, "dnfimage/os:latest")?;
        ct.run_ok("touch", &["/run/ostree-booted"])?;
        ct.run_ok("systemctl", &["start", "dnfimage-upgrade.service"])
            .with_context(|| context("the upgrade service"))?;
        assert_eq!(
            ct.show("dnfimage-upgrade.service", "ConditionResult")?,
            "yes"
        );
        assert_eq!(ct.show("dnfimage-upgrade.service", "Result")?, "success");
        let status = ct.run_ok("dnf-image", &["--sysroot", "/sysroot", "status"])?;
        assert!(
            status.contains("Update available") && status.contains(" 2 "),
            "the timer's check was not recorded:\n{status}"
        );
        // Nothing was deployed: policy check only records.
        let json = ct.run_ok("dnf-image", &["--sysroot", "/sysroot", "--json", "status"])?;
        let doc: serde_json::Value = serde_json::from_str(&json)?;
        assert_eq!(doc["deployments"][0]["version"], "1", "{json}");
        ct.run_ok("rm", &["-f", "/run/ostree-booted"])?;
    }

    // The exposure scores as the running manager computes them.
    for (s, _) in SERVICES {
        let service = format!("dnfimage-{s}.service");
        let (_, out, err) =
            stdout_of(
                ct.command("systemd-analyze")
                    .args(["security", "--no-pager", &service]),
            )?;
        match exposure_score(&out) {
            Some(score) => report(&format!(
                "units: in the container, security {service}: {score}"
            )),
            None => report(&format!(
                "units: in the container, no score for {service}: {err}"
            )),
        }
    }

    drop(ct);
    report(&format!(
        "units: the container test took {:?}",
        started.elapsed()
    ));
    for (what, took) in &timings.0 {
        report(&format!("units: {what}: {took:?}"));
    }
    drop(proxy);
    Ok(())
}
