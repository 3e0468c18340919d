//! No caller waits on another, and no input wedges a service: every service serves each
//! connection on its own, within limits (message size, connections per user, time between calls),
//! one instance per state, and answers anything a client sends with a reply or a closed
//! connection, staying up.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use dnfimage_integration::host::Host;
use dnfimage_integration::importer_support::Call;
use dnfimage_integration::proxy::{Shaping, SlowProxy};
use dnfimage_integration::{
    FetcherOptions, Scratch, ServiceProcess, bin, error_name, raw_call, run, run_ok,
};
use dnfimage_interfaces::{deployer, fetcher, importer, layerer};
use dnfimage_testimage::{Fixtures, Registry, tags};
use serde_json::{Value, json};

const FETCHER: &str = fetcher::INTERFACE;

/// A TCP server that accepts connections and never answers; says so on `accepted` for each.
fn silent_server() -> Result<(String, mpsc::Receiver<()>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
            let _ = tx.send(());
        }
    });
    Ok((addr, rx))
}

/// Sends `count` calls at once, each on its own connection, cycling through `calls`; every one
/// must be answered without error.
fn answered_by_all(socket: &Path, calls: &[Value], count: usize) -> Result<()> {
    let threads: Vec<_> = (0..count)
        .map(|i| {
            let (socket, call) = (socket.to_path_buf(), calls[i % calls.len()].clone());
            std::thread::spawn(move || raw_call(&socket, &call).map(|r| (call, r)))
        })
        .collect();
    for t in threads {
        let (call, replies) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a caller panicked"))??;
        let last = replies.last().context("no reply")?;
        anyhow::ensure!(error_name(last).is_none(), "{call} got {last}");
    }
    Ok(())
}

fn get_info() -> Value {
    json!({"method": "org.varlink.service.GetInfo", "parameters": {}})
}

/// The service on `socket` answers GetInfo.
fn answers(socket: &Path) -> Result<()> {
    let replies = raw_call(socket, &get_info())?;
    anyhow::ensure!(
        replies[0]["parameters"]["product"]
            .as_str()
            .is_some_and(|p| p.starts_with("dnfimage-")),
        "{replies:?}"
    );
    Ok(())
}

/// A long Fetch (stalled midway through the slow proxy) and an Inspect of a registry that never
/// answers hold the fetcher's two slowest paths; 50 callers on other connections are all answered
/// meanwhile, and both are still running when they are.
#[tokio::test(flavor = "multi_thread")]
async fn fetcher_answers_everyone_during_a_stalled_fetch_and_a_silent_inspect() -> Result<()> {
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let refs = Fixtures::shared()?.push(&registry, "dnfimage/base")?;
    let size = Fixtures::shared()?.image(tags::BASE_V1)?.layers_size();
    // The proxy goes silent halfway through the layers.
    let proxy = SlowProxy::start(
        &registry.addr(),
        Shaping {
            request_delay: Duration::from_millis(5),
            bytes_per_second: 50_000_000,
            silent_after: Some(size / 2),
        },
    )
    .await?;
    let (silent, accepted) = silent_server()?;
    let conf = scratch.path().join("registries.conf");
    std::fs::write(
        &conf,
        [proxy.addr(), silent.clone()]
            .map(|a| format!("[[registry]]\nlocation = \"{a}\"\ninsecure = true\n"))
            .concat(),
    )?;
    let _fetcher = ServiceProcess::fetcher(
        &scratch,
        &FetcherOptions {
            registries_conf: Some(conf),
            registry_timeout: Some(3600),
            ..Default::default()
        },
    )?;
    let socket = scratch.socket(FETCHER);
    let image = refs.base_v1.replace(&registry.addr(), &proxy.addr());

    let mut fetch = Call::start(
        &socket,
        &format!("{FETCHER}.Fetch"),
        json!({"image": image}),
        true,
    )?;
    // Wait until the layers are being fetched (the proxy stalls halfway, for good).
    loop {
        let reply = fetch.next_reply()?.context("the fetch ended")?;
        anyhow::ensure!(error_name(&reply).is_none(), "{reply}");
        if reply["parameters"]["progress"]["phase"] == "fetching" {
            break;
        }
    }
    let mut inspect = Call::start(
        &socket,
        &format!("{FETCHER}.Inspect"),
        json!({"image": format!("docker://{silent}/dnfimage/base:v1")}),
        false,
    )?;
    accepted
        .recv_timeout(Duration::from_secs(60))
        .context("skopeo never connected to the silent registry")?;

    let calls = [
        get_info(),
        json!({"method": format!("{FETCHER}.ListCached"), "parameters": {}}),
        json!({"method": format!("{FETCHER}.LastCheck"), "parameters": {"image": refs.base_v1}}),
    ];
    answered_by_all(&socket, &calls, 50)?;
    assert!(!fetch.finished_yet()?, "the fetch ended early");
    assert!(!inspect.finished_yet()?, "the inspect ended early");

    // Cancel reaches the stalled fetch too.
    let cancelled = raw_call(
        &socket,
        &json!({"method": format!("{FETCHER}.Cancel"), "parameters": {}}),
    )?;
    assert!(error_name(&cancelled[0]).is_none(), "{cancelled:?}");
    let rest = fetch.rest()?;
    assert_eq!(
        rest.last().and_then(error_name),
        Some(format!("{FETCHER}.Cancelled").as_str()),
        "{rest:?}"
    );
    Ok(())
}

/// An importer whose Prune waits for the sysroot lock another program holds answers 50 callers
/// meanwhile; the prune goes on once the lock is free.
#[test]
fn importer_answers_everyone_while_a_prune_waits_for_the_sysroot_lock() -> Result<()> {
    let host = Host::new()?;
    let socket = host.scratch.socket(importer::INTERFACE);
    let lock = host.sysroot.hold_lock()?;
    let mut prune = Call::start(
        &socket,
        &format!("{}.Prune", importer::INTERFACE),
        json!({}),
        true,
    )?;
    loop {
        let reply = prune.next_reply()?.context("the prune ended")?;
        anyhow::ensure!(error_name(&reply).is_none(), "{reply}");
        let message = reply["parameters"]["progress"]["message"].as_str();
        if message.is_some_and(|m| m.contains("sysroot lock")) {
            break;
        }
    }
    let calls = [
        get_info(),
        json!({"method": format!("{}.ListImages", importer::INTERFACE), "parameters": {}}),
    ];
    answered_by_all(&socket, &calls, 50)?;
    assert!(!prune.finished_yet()?, "the prune ended early");
    drop(lock);
    let rest = prune.rest()?;
    let last = rest.last().context("no result")?;
    assert!(error_name(last).is_none(), "{last}");
    assert!(last["parameters"]["result"].is_object(), "{last}");
    Ok(())
}

/// A layerer whose Build waits on a package repository that never answers answers 50 callers
/// meanwhile, Cancel included.
#[test]
fn layerer_answers_everyone_while_a_build_waits_on_a_silent_repository() -> Result<()> {
    let host = Host::with_layerer()?;
    host.ok(&["rebase", &host.latest])?;
    let commit = host.deployments()?[0]["commit"]
        .as_str()
        .context("commit")?
        .to_string();
    let (silent, accepted) = silent_server()?;
    let repos = host.repos.as_ref().context("repos")?;
    dnfimage_integration::rpm_support::write_repo_file(
        &repos.repos_dir,
        "silent",
        &format!("http://{silent}/repo"),
        false,
    )?;
    let socket = host.scratch.socket(layerer::INTERFACE);
    let mut build = Call::start(
        &socket,
        &format!("{}.Build", layerer::INTERFACE),
        json!({"baseCommit": commit, "install": ["dnfimage-hello"], "repositories": ["silent"]}),
        true,
    )?;
    accepted
        .recv_timeout(Duration::from_secs(120))
        .context("dnf never connected to the silent repository")?;
    let calls = [
        get_info(),
        json!({"method": format!("{}.ListPackages", layerer::INTERFACE), "parameters": {"commit": commit}}),
    ];
    answered_by_all(&socket, &calls, 50)?;
    assert!(!build.finished_yet()?, "the build ended early");
    let cancelled = raw_call(
        &socket,
        &json!({"method": format!("{}.Cancel", layerer::INTERFACE), "parameters": {}}),
    )?;
    assert!(error_name(&cancelled[0]).is_none(), "{cancelled:?}");
    let rest = build.rest()?;
    assert_eq!(
        rest.last().and_then(error_name),
        Some(format!("{}.Cancelled", layerer::INTERFACE).as_str()),
        "{rest:?}"
    );
    Ok(())
}

/// A Deploy and a Rollback waiting for the sysroot lock another program holds do not keep 50
/// callers from their Status; each goes through once the lock is free, and a deployer told to
/// wait less gives up with AlreadyInProgress.
#[test]
fn deployer_answers_everyone_while_changes_wait_for_the_sysroot_lock() -> Result<()> {
    let host = Host::new()?;
    host.ok(&["rebase", &host.latest])?;
    let commit = host.deployments()?[0]["commit"]
        .as_str()
        .context("commit")?
        .to_string();
    let socket = host.scratch.socket(deployer::INTERFACE);
    let calls = [
        get_info(),
        json!({"method": format!("{}.Status", deployer::INTERFACE), "parameters": {}}),
    ];

    let lock = host.sysroot.hold_lock()?;
    let mut deploy = Call::start(
        &socket,
        &format!("{}.Deploy", deployer::INTERFACE),
        json!({"commit": commit, "image": host.latest}),
        true,
    )?;
    loop {
        let reply = deploy.next_reply()?.context("the deploy ended")?;
        anyhow::ensure!(error_name(&reply).is_none(), "{reply}");
        let message = reply["parameters"]["progress"]["message"].as_str();
        if message.is_some_and(|m| m.contains("sysroot lock")) {
            break;
        }
    }
    answered_by_all(&socket, &calls, 50)?;
    assert!(!deploy.finished_yet()?, "the deploy ended early");
    drop(lock);
    let last = deploy.rest()?.pop().context("no result")?;
    assert!(last["parameters"]["result"]["changed"] == true, "{last}");
    assert_eq!(host.deployments()?.len(), 2);

    let lock = host.sysroot.hold_lock()?;
    let log = || host.services[2].log_text();
    let waits_before = log().matches("Waiting for another program").count();
    let mut rollback = Call::start(
        &socket,
        &format!("{}.Rollback", deployer::INTERFACE),
        json!({}),
        false,
    )?;
    while log().matches("Waiting for another program").count() == waits_before {
        anyhow::ensure!(!rollback.finished_yet()?, "the rollback did not wait");
        std::thread::sleep(Duration::from_millis(20));
    }
    answered_by_all(&socket, &calls, 50)?;
    assert!(!rollback.finished_yet()?, "the rollback ended early");
    drop(lock);
    let reply = rollback.next_reply()?.context("no reply")?;
    assert!(error_name(&reply).is_none(), "{reply}");

    // A deployer that waits at most a second gives up, saying why.
    let other = Scratch::new()?;
    let _impatient = ServiceProcess::start(
        &other,
        "deployer",
        deployer::INTERFACE,
        &[
            OsStr::new("--sysroot"),
            host.sysroot.path().as_os_str(),
            OsStr::new("--lock-timeout"),
            OsStr::new("1"),
        ],
    )?;
    let _lock = host.sysroot.hold_lock()?;
    let replies = raw_call(
        &other.socket(deployer::INTERFACE),
        &json!({"method": format!("{}.Pin", deployer::INTERFACE), "parameters": {"index": 0, "pinned": true}}),
    )?;
    assert_eq!(
        error_name(&replies[0]),
        Some(format!("{}.AlreadyInProgress", deployer::INTERFACE).as_str()),
        "{replies:?}"
    );
    assert!(
        replies[0]["parameters"]["operation"]
            .as_str()
            .is_some_and(|o| o.contains("held the sysroot lock for over 1 s")),
        "{replies:?}"
    );
    Ok(())
}

/// What hostile clients send: each gets an error reply or a closed connection, and the service
/// answers GetInfo afterwards.
fn hostile_inputs(
    socket: &Path,
    interface: &str,
    reference_call: Option<(&str, &str)>,
) -> Result<()> {
    // An over-long image reference: refused as such, before anything else looks at it.
    if let Some((method, param)) = reference_call {
        let long = format!("docker://127.0.0.1:1/{}:v1", "a".repeat(300 * 1024));
        let mut params = json!({});
        params[param] = json!(long);
        if interface == deployer::INTERFACE {
            params["commit"] = json!("0".repeat(64));
        }
        if interface == importer::INTERFACE {
            params["source"] = json!("oci:/nonexistent:x");
        }
        let replies = raw_call(
            socket,
            &json!({"method": format!("{interface}.{method}"), "parameters": params}),
        )?;
        assert_eq!(
            replies.last().and_then(error_name),
            Some(format!("{interface}.InvalidImageReference").as_str()),
            "{interface}.{method}"
        );
        answers(socket)?;
    }
    // An over-size message (2 MiB without its terminating NUL, then the NUL).
    let mut big = format!(
        r#"{{"method":"org.varlink.service.GetInfo","parameters":{{"x":"{}"}}}}"#,
        "b".repeat(2 << 20)
    )
    .into_bytes();
    big.push(0);
    assert!(
        closed_or_error(socket, &big)?,
        "{interface}: over-size message"
    );
    answers(socket)?;
    // A deeply nested message.
    let depth = 100_000;
    let mut nested = br#"{"method":"org.varlink.service.GetInfo","parameters":{"x":"#.to_vec();
    nested.extend(std::iter::repeat_n(b'[', depth));
    nested.extend(std::iter::repeat_n(b']', depth));
    nested.extend(b"}}\0");
    assert!(
        closed_or_error(socket, &nested)?,
        "{interface}: nested message"
    );
    answers(socket)?;
    // Not UTF-8.
    let bad = b"{\"method\":\"org.varlink.service.GetInfo\",\"parameters\":{\"x\":\"\xff\xfe\"}}\0";
    assert!(closed_or_error(socket, bad)?, "{interface}: non-UTF-8");
    answers(socket)?;
    // Garbage that is not JSON at all, and a NUL alone.
    for junk in [&b"\x00"[..], b"}{\0", b"\x01\x02\x03\0"] {
        assert!(closed_or_error(socket, junk)?, "{interface}: {junk:?}");
        answers(socket)?;
    }
    Ok(())
}

/// Sends `bytes` on a new connection: true when the service answered with an error or closed
/// the connection (as opposed to replying as if the message were fine, or never reacting).
fn closed_or_error(socket: &Path, bytes: &[u8]) -> Result<bool> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    // The service may close before reading it all: a write error is an answer too.
    if stream.write_all(bytes).is_err() {
        return Ok(true);
    }
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                reply.extend_from_slice(&chunk[..n]);
                if let Some(end) = reply.iter().position(|b| *b == 0) {
                    let value: Value = serde_json::from_slice(&reply[..end])?;
                    return Ok(error_name(&value).is_some());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e) => return Err(e).context("Waiting for the service to react"),
        }
    }
}

#[test]
fn hostile_messages_never_wedge_a_service() -> Result<()> {
    let host = Host::with_layerer()?;
    let s = &host.scratch;
    hostile_inputs(&s.socket(FETCHER), FETCHER, Some(("Inspect", "image")))?;
    hostile_inputs(
        &s.socket(importer::INTERFACE),
        importer::INTERFACE,
        Some(("Import", "image")),
    )?;
    hostile_inputs(
        &s.socket(deployer::INTERFACE),
        deployer::INTERFACE,
        Some(("Deploy", "image")),
    )?;
    hostile_inputs(&s.socket(layerer::INTERFACE), layerer::INTERFACE, None)?;
    Ok(())
}

/// Starts `dnfimage-<name>` with `args` and expects it to exit at once with an error; its stderr.
fn refused_start(name: &str, args: &[&OsStr]) -> Result<String> {
    let out = run(Command::new(bin(&format!("dnfimage-{name}")))
        .args(["--idle-timeout", "0"])
        .args(args))?;
    anyhow::ensure!(
        !out.status.success(),
        "a second {name} started: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A second instance on the same state says who holds it and exits without touching anything;
/// one started after the first was killed takes over its state and its stale socket.
#[test]
fn one_instance_per_state_and_a_killed_ones_socket_is_taken_over() -> Result<()> {
    let mut host = Host::with_layerer()?;
    let s = &host.scratch;
    let other_run = s.path().join("other-run");
    let sysroot = host.sysroot.path().as_os_str().to_owned();
    let state = s.state_dir();
    // A partial download the running fetcher owns: a second one must not clear it.
    let partial = state.join("cache/tmp/partial-download");
    std::fs::write(&partial, b"in flight")?;

    let stderr = refused_start(
        "fetcher",
        &[
            OsStr::new("--runtime-dir"),
            other_run.as_os_str(),
            OsStr::new("--state-dir"),
            state.as_os_str(),
        ],
    )?;
    let pid = host.services[0].pid();
    assert!(
        stderr.contains(&format!("dnfimage-fetcher (pid {pid})")),
        "{stderr}"
    );
    assert!(
        partial.exists(),
        "the second fetcher cleared the first's tmp/"
    );

    let stderr = refused_start(
        "importer",
        &[
            OsStr::new("--runtime-dir"),
            other_run.as_os_str(),
            OsStr::new("--sysroot"),
            &sysroot,
        ],
    )?;
    assert!(
        stderr.contains(&format!(
            "dnfimage-importer (pid {})",
            host.services[1].pid()
        )),
        "{stderr}"
    );
    let repos = host.repos.as_ref().context("repos")?;
    let rpms = dnfimage_testimage::rpms::TestRpms::shared()?;
    let stderr = refused_start(
        "layerer",
        &[
            OsStr::new("--runtime-dir"),
            other_run.as_os_str(),
            OsStr::new("--sysroot"),
            &sysroot,
            OsStr::new("--state-dir"),
            state.as_os_str(),
            OsStr::new("--repos-dir"),
            repos.repos_dir.as_os_str(),
            OsStr::new("--gpg-key-dir"),
            rpms.key_dir.as_os_str(),
        ],
    )?;
    assert!(
        stderr.contains(&format!(
            "dnfimage-layerer (pid {})",
            host.services[3].pid()
        )),
        "{stderr}"
    );
    // The first ones still serve.
    for iface in [FETCHER, importer::INTERFACE, layerer::INTERFACE] {
        answers(&s.socket(iface))?;
    }

    // SIGKILL leaves every socket file behind; new instances take them over.
    for service in &mut host.services {
        service.kill();
    }
    for iface in [
        FETCHER,
        importer::INTERFACE,
        deployer::INTERFACE,
        layerer::INTERFACE,
    ] {
        assert!(s.socket(iface).exists(), "{iface} left no socket");
    }
    host.start_services()?;
    for iface in [
        FETCHER,
        importer::INTERFACE,
        deployer::INTERFACE,
        layerer::INTERFACE,
    ] {
        answers(&host.scratch.socket(iface))?;
    }
    Ok(())
}

/// Connections over the per-user limit get TooManyConnections, a connection that sends nothing
/// is closed, and the service goes on answering throughout.
#[test]
fn connection_limits_refuse_with_an_error_and_close_idle_connections() -> Result<()> {
    let scratch = Scratch::new()?;
    let _fetcher = ServiceProcess::start(
        &scratch,
        "fetcher",
        FETCHER,
        &[
            OsStr::new("--state-dir"),
            scratch.state_dir().as_os_str(),
            OsStr::new("--max-connections-per-uid"),
            OsStr::new("3"),
            OsStr::new("--connection-timeout"),
            OsStr::new("2"),
        ],
    )?;
    let socket = scratch.socket(FETCHER);
    // Three connections that each made a call are being served.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut call = Call::start(&socket, "org.varlink.service.GetInfo", json!({}), false)?;
        call.next_reply()?.context("no reply")?;
        held.push(call);
    }
    let replies = raw_call(&socket, &get_info())?;
    assert_eq!(
        error_name(&replies[0]),
        Some(format!("{FETCHER}.TooManyConnections").as_str()),
        "{replies:?}"
    );
    assert_eq!(replies[0]["parameters"]["limit"], 3);
    assert_eq!(replies[0]["parameters"]["scope"], "user");
    // The held connections send nothing more: the service closes them, which frees the slots.
    for call in &mut held {
        assert!(call.closed_by_peer()?, "an idle connection stayed open");
    }
    answers(&socket)?;
    Ok(())
}

/// More clients than the service has file descriptors for: the ones over the limit are refused
/// or wait in the listen queue (accept failing with EMFILE is waited out, never fatal), and once
/// they leave the service answers again.
#[test]
fn a_flood_of_connections_never_ends_a_service() -> Result<()> {
    let scratch = Scratch::new()?;
    let mut fetcher = ServiceProcess::start_wrapped(
        &scratch,
        "fetcher",
        FETCHER,
        &["prlimit", "--nofile=40:40", "--"],
        &[OsStr::new("--state-dir"), scratch.state_dir().as_os_str()],
    )?;
    let socket = scratch.socket(FETCHER);
    // 150 connections, each having sent a call: far more than 40 descriptors.
    let mut flood = Vec::new();
    for _ in 0..150 {
        let mut stream = UnixStream::connect(&socket)?;
        let mut call = serde_json::to_vec(&get_info())?;
        call.push(0);
        stream.write_all(&call)?;
        flood.push(stream);
    }
    // Every one gets an answer (a reply, or TooManyConnections) or waits its turn; none makes
    // the service exit. Read the answers of the first ones.
    let mut answered = 0;
    for stream in flood.iter_mut().take(20) {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = [0u8; 4096];
        if stream.read(&mut buf)? > 0 {
            answered += 1;
        }
    }
    assert_eq!(answered, 20, "the first connections were not answered");
    drop(flood);
    // The service notices the closed connections (and accepts the queued ones, to find them
    // closed) in its own time: until then a new client may still be refused as one too many.
    let mut tries = 0;
    while let Err(e) = answers(&socket) {
        tries += 1;
        anyhow::ensure!(
            tries < 600 && e.to_string().contains("TooManyConnections"),
            "the service does not answer again: {e:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        fetcher.wait_exit(Duration::ZERO),
        None,
        "the fetcher exited"
    );
    let log = fetcher.log_text();
    assert!(
        log.contains("Refusing a connection") || log.contains("Accepting a connection"),
        "the flood never reached a limit:\n{log}"
    );
    Ok(())
}

/// Unprivileged callers cannot make the root service read local paths, nor write its record of
/// update checks.
#[test]
fn unprivileged_callers_cannot_read_local_images_or_record_checks() -> Result<()> {
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let refs = Fixtures::shared()?.push(&registry, "dnfimage/base")?;
    let _fetcher = ServiceProcess::fetcher(
        &scratch,
        &FetcherOptions {
            registries_conf: Some(scratch.registries_conf(&registry.addr())?),
            socket_mode: Some("666"),
            ..Default::default()
        },
    )?;
    // A root-only directory holding an image.
    let private = scratch.path().join("private");
    std::fs::create_dir(&private)?;
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let layout = private.join("layout");
    dnfimage_testimage::skopeo_copy(&refs.base_v1, &format!("oci:{}:v1", layout.display()))?;

    let as_nobody = |args: &[&str]| {
        let mut cmd = scratch.cli();
        cmd.args(args).uid(65534).gid(65534);
        cmd
    };
    for image in [
        format!("oci:{}:v1", layout.display()),
        format!("oci:{}/missing:v1", private.display()),
    ] {
        let out = run(&mut as_nobody(&["image", "inspect", &image]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "nobody inspected {image}");
        assert!(stderr.contains("Permission denied"), "{stderr}");
        assert!(!stderr.contains("missing"), "the path leaked: {stderr}");
    }
    // Root may.
    run_ok(
        scratch
            .cli()
            .args(["image", "inspect", &format!("oci:{}:v1", layout.display())]),
    )?;
    // A check by nobody is answered but not recorded; one by root is.
    run_ok(&mut as_nobody(&["image", "check", &refs.base_v1]))?;
    let last = || -> Result<Value> {
        let replies = raw_call(
            &scratch.socket(FETCHER),
            &json!({"method": format!("{FETCHER}.LastCheck"), "parameters": {"image": refs.base_v1}}),
        )?;
        Ok(replies[0]["parameters"]["check"].clone())
    };
    assert_eq!(last()?, Value::Null, "nobody's check was recorded");
    run_ok(scratch.cli().args(["image", "check", &refs.base_v1]))?;
    assert_eq!(last()?["reference"], refs.base_v1.as_str());
    Ok(())
}

/// No switch lets another user than root change state: the test-only `--allow-uid` is gone from
/// every service binary.
#[test]
fn no_service_binary_lets_another_user_change_state() -> Result<()> {
    for name in ["fetcher", "importer", "deployer", "layerer"] {
        let path = bin(&format!("dnfimage-{name}"));
        let help = run_ok(Command::new(&path).arg("--help"))?;
        assert!(!help.contains("allow-uid"), "{name}: {help}");
        let bytes = std::fs::read(&path)?;
        let needle = b"DNFIMAGE_ALLOW_UID";
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{name} still reads DNFIMAGE_ALLOW_UID"
        );
    }
    Ok(())
}
