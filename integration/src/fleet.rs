//! Fleet tests' parts: a real etcd cluster on 127.0.0.1 and light scratch hosts that share one
//! registry (each its own sysroot, state, services and dnfimage configuration).

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::sysroot::TestSysroot;
use crate::{FetcherOptions, Scratch, ServiceProcess, run, run_ok};

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("Binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// One member of the cluster.
struct Member {
    name: String,
    client: String,
    child: Option<Child>,
}

/// A real etcd cluster (Debian's `etcd-server`): members on 127.0.0.1 with their data in a
/// scratch directory, stopped when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    /// Client TLS, when the members serve https and require a client certificate.
    pub tls: Option<EtcdTls>,
    /// `USER:PASSWORD` once authentication is on.
    user: Option<String>,
}

/// Certificates made by `openssl` for a cluster on 127.0.0.1: a CA, the members' server
/// certificate and a client certificate, all PEM.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn openssl(args: &[&str], paths: &[(&str, &Path)]) -> Result<String> {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    run_ok(&mut cmd)
}

impl EtcdTls {
    /// Makes them in `dir`.
    pub fn make(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let p = |name: &str| dir.join(name);
        let x509 = ["-days", "1"];
        openssl(
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", x509[0], x509[1],
            ],
            &[
                ("-subj", Path::new("/CN=dnfimage test CA")),
                ("-keyout", &p("ca.key")),
                ("-out", &p("ca.pem")),
            ],
        )?;
        // The member's certificate is also a client one: etcd's JSON gateway calls the member
        // with it, which a member requiring client certificates checks like any other.
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let file = |ending: &str| p(&format!("{name}.{ending}"));
            std::fs::write(file("ext"), ext)?;
            openssl(
                &["req", "-newkey", "rsa:2048", "-nodes"],
                &[
                    ("-subj", Path::new(&format!("/CN={name}"))),
                    ("-keyout", &file("key")),
                    ("-out", &file("csr")),
                ],
            )?;
            openssl(
                &["x509", "-req", x509[0], x509[1], "-CAcreateserial"],
                &[
                    ("-in", &file("csr")),
                    ("-CA", &p("ca.pem")),
                    ("-CAkey", &p("ca.key")),
                    ("-extfile", &file("ext")),
                    ("-out", &file("pem")),
                ],
            )?;
        }
        Ok(Self {
            ca: p("ca.pem"),
            cert: p("client.pem"),
            key: p("client.key"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
        })
    }
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until every one of them is healthy.
    pub fn start(dir: &Path, n: usize) -> Result<Self> {
        Self::launch(dir, n, None)
    }

    /// The same, serving clients over TLS with `tls`'s certificates; with `client_certs`,
    /// requiring a client certificate signed by its CA.
    pub fn start_tls(dir: &Path, n: usize, tls: EtcdTls, client_certs: bool) -> Result<Self> {
        Self::launch(dir, n, Some((tls, client_certs)))
    }

    fn launch(dir: &Path, n: usize, tls: Option<(EtcdTls, bool)>) -> Result<Self> {
        let (tls, client_certs) = match tls {
            Some((t, c)) => (Some(t), c),
            None => (None, false),
        };
        std::fs::create_dir_all(dir)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("dnfimage-test-{}-{}", std::process::id(), ports[0].0);
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let client_url = format!("{scheme}://127.0.0.1:{client}");
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let mut cmd = Command::new("etcd");
            if let Some(tls) = &tls {
                cmd.arg("--cert-file")
                    .arg(&tls.server_cert)
                    .arg("--key-file")
                    .arg(&tls.server_key);
                // A trusted CA makes etcd ask every client for a certificate.
                if client_certs {
                    cmd.arg("--trusted-ca-file")
                        .arg(&tls.ca)
                        .arg("--client-cert-auth");
                }
            }
            let child = cmd
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(dir.join(&name))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("Starting etcd")?;
            members.push(Member {
                name,
                client: client_url,
                child: Some(child),
            });
        }
        let cluster = Self {
            members,
            dir: dir.to_path_buf(),
            tls,
            user: None,
        };
        let start = Instant::now();
        loop {
            let healthy = run(cluster
                .etcdctl_command(&cluster.endpoints())
                .args(["endpoint", "health"]))?;
            if healthy.status.success() {
                return Ok(cluster);
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "The etcd cluster did not become healthy: {}; logs in {}",
                String::from_utf8_lossy(&healthy.stderr),
                cluster.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The client URLs of the members, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// Stops member `i` (SIGTERM) and waits until it exited.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        if let Some(mut child) = m.child.take() {
            run_ok(Command::new("kill").arg(child.id().to_string()))?;
            child.wait()?;
        }
        eprintln!("fleet: stopped etcd member {}", m.name);
        Ok(())
    }

    fn etcdctl_command(&self, endpoints: &[String]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")));
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key);
        }
        if let Some(user) = &self.user {
            cmd.arg(format!("--user={user}"));
        }
        cmd
    }

    /// `etcdctl` against the members still running.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client.clone())
            .collect();
        run_ok(self.etcdctl_command(&running).args(args))
    }

    /// Turns authentication on with user `root` and `password` (which then has every right).
    pub fn enable_auth(&mut self, password: &str) -> Result<()> {
        self.etcdctl(&[
            "user",
            "add",
            "root",
            &format!("--new-user-password={password}"),
        ])?;
        self.etcdctl(&["auth", "enable"])?;
        self.user = Some(format!("root:{password}"));
        Ok(())
    }

    /// The keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .etcdctl(&["get", "--prefix", "--keys-only", prefix])?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A host of a fleet test: its own sysroot, services, state and configuration; the registry
/// is shared.
pub struct FleetHost {
    pub name: String,
    pub scratch: Scratch,
    pub sysroot: TestSysroot,
    pub services: Vec<ServiceProcess>,
    registry_addr: String,
    /// A pull-through mirror of the registry, when the host pulls through one.
    mirror: Option<String>,
    /// The fetcher's `--policy` and `--registries-d` (default: the machine's), taken by the
    /// next [`FleetHost::start_services`].
    pub signature_policy: Option<(PathBuf, PathBuf)>,
}

impl FleetHost {
    /// A host named `name` with machine id `machine_id`, following images from the registry
    /// at `registry_addr`.
    pub fn new(name: &str, machine_id: &str, registry_addr: &str) -> Result<Self> {
        Self::build(name, machine_id, registry_addr, None)
    }

    /// The same, pulling through the mirror at `mirror_addr` (registries.conf `[[registry.mirror]]`).
    pub fn with_mirror(
        name: &str,
        machine_id: &str,
        registry_addr: &str,
        mirror_addr: &str,
    ) -> Result<Self> {
        Self::build(name, machine_id, registry_addr, Some(mirror_addr))
    }

    fn build(
        name: &str,
        machine_id: &str,
        registry_addr: &str,
        mirror: Option<&str>,
    ) -> Result<Self> {
        let scratch = Scratch::new()?;
        let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
        std::fs::write(scratch.path().join("machine-id"), format!("{machine_id}\n"))?;
        let mut host = Self {
            name: name.to_string(),
            scratch,
            sysroot,
            services: Vec::new(),
            registry_addr: registry_addr.to_string(),
            mirror: mirror.map(str::to_string),
            signature_policy: None,
        };
        host.start_services()?;
        Ok(host)
    }

    /// (Re)starts the fetcher, importer and deployer.
    pub fn start_services(&mut self) -> Result<()> {
        let conf = self.scratch.registries_conf(&self.registry_addr)?;
        if let Some(mirror) = &self.mirror {
            std::fs::write(
                &conf,
                format!(
                    "[[registry]]\nlocation = \"{}\"\ninsecure = true\n\
                     [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n",
                    self.registry_addr
                ),
            )?;
        }
        self.services.clear();
        self.services = crate::host::image_services(
            &self.scratch,
            &self.sysroot,
            &FetcherOptions {
                registries_conf: Some(conf),
                policy: self.signature_policy.as_ref().map(|p| p.0.clone()),
                registries_d: self.signature_policy.as_ref().map(|p| p.1.clone()),
                ..Default::default()
            },
        )?;
        Ok(())
    }

    /// The configuration file `dnf-image` reads.
    pub fn config_path(&self) -> PathBuf {
        self.scratch.path().join("dnfimage.conf")
    }

    /// Where this host's CLI writes its output when run by [`FleetHost::spawn_cli`].
    pub fn cli_log(&self) -> PathBuf {
        self.scratch.path().join("logs/cli.log")
    }

    /// `dnf-image` for this host: its services, sysroot, configuration, machine id and state.
    pub fn cli(&self) -> Command {
        let mut cmd = self.scratch.cli();
        cmd.arg("--sysroot")
            .arg(self.sysroot.path())
            .env("DNFIMAGE_CONFIG", self.config_path())
            .env(
                "DNFIMAGE_MACHINE_ID_FILE",
                self.scratch.path().join("machine-id"),
            )
            .env(
                "DNFIMAGE_FLEET_STATE",
                self.scratch.path().join("fleet.json"),
            );
        cmd
    }

    pub fn ok(&self, args: &[&str]) -> Result<String> {
        run_ok(self.cli().args(args)).with_context(|| format!("{}: dnf-image {args:?}", self.name))
    }

    /// Starts `dnf-image ARGS` in a process group of its own, output appended to
    /// [`FleetHost::cli_log`].
    pub fn spawn_cli(&self, args: &[&str]) -> Result<Child> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.cli_log())?;
        Ok(self
            .cli()
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?)
    }

    /// The default deployment's image digest (what the next boot runs).
    pub fn next_boot_digest(&self) -> Result<String> {
        let status: serde_json::Value = serde_json::from_str(&self.ok(&["status", "--json"])?)?;
        let deployments = status["deployments"].as_array().context("deployments")?;
        let d = deployments
            .iter()
            .find(|d| d["default"] == true)
            .or_else(|| deployments.first())
            .context("no deployment")?;
        Ok(d["imageDigest"].as_str().unwrap_or_default().to_string())
    }
}

/// A site mirror: `docker-registry` in pull-through (proxy) mode in front of a registry, as
/// units/README.md describes it; stopped when dropped.
pub struct PullThroughMirror {
    child: Child,
    addr: String,
}

impl PullThroughMirror {
    /// Starts a mirror of the registry at `upstream` (`127.0.0.1:PORT`), caching under `dir`.
    pub fn start(dir: &Path, upstream: &str) -> Result<Self> {
        std::fs::create_dir_all(dir.join("storage"))?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: dnfimage-test-mirror\n\
                 proxy:\n  remoteurl: http://{upstream}\n",
                dir.join("storage").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("mirror.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("Starting docker-registry as a mirror")?;
        let mirror = Self { child, addr };
        let start = Instant::now();
        while std::net::TcpStream::connect(&mirror.addr).is_err() {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "The mirror did not listen on {}",
                mirror.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(mirror)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for PullThroughMirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
