//! `dnfimage-testimage`: build the test images, run a test registry, push images to it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use dnfimage_testimage::{
    BaseOptions, BenchOptions, ImageSummary, Registry, RepoServer, TestRpms, build_all,
    build_bench, list_tags, push_tags, read_image,
};

/// Test images and a throwaway registry for dnfimage.
#[derive(Debug, Parser)]
#[command(version)]
enum Cli {
    /// Build all fixture images (base-v1, base-v2, derived, not-bootable) into an OCI layout.
    Build {
        /// The OCI layout directory (created if missing; existing tags are replaced).
        #[arg(long)]
        out: PathBuf,
    },
    /// Build the fetch benchmark image: many layers of incompressible data, labelled bootable.
    BenchImage {
        /// The OCI layout directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Number of layers.
        #[arg(long, default_value_t = 9)]
        layers: u32,
        /// Total payload in MiB, spread evenly over the layers.
        #[arg(long, default_value_t = 210)]
        mb: u64,
        /// Tag of the image in the layout.
        #[arg(long, default_value = "bench")]
        tag: String,
    },
    /// Run docker-registry on a free 127.0.0.1 port and print `ADDR=127.0.0.1:PORT`.
    ///
    /// Also prints `LOG=<access log path>`. Runs until SIGTERM, SIGINT or SIGHUP, or until stdin
    /// closes when stdin is a pipe (so `… registry --dir D &` in a script keeps running).
    Registry {
        /// Work directory: config.yml, registry.log, storage/.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Build (or find already built) the layering test packages and print where they are:
    /// `REPO=` (rpm-md repository), `KEYS=` (key directory for the layerer), `KERNEL=` (the
    /// replacement kernel package).
    ///
    /// With `--serve`, also serve the repository over HTTP on a free 127.0.0.1 port, print
    /// `URL=…`, and run until SIGTERM, SIGINT or SIGHUP, or until stdin closes when it is a pipe.
    Rpms {
        /// Serve the repository over HTTP.
        #[arg(long)]
        serve: bool,
    },
    /// Push tags of an OCI layout to a registry as docker://ADDR/REPO:TAG.
    Push {
        /// The OCI layout directory.
        #[arg(long)]
        oci: PathBuf,
        /// Registry address, e.g. 127.0.0.1:5000.
        #[arg(long)]
        registry: String,
        /// Repository name, e.g. dnfimage/base.
        #[arg(long)]
        repo: String,
        /// Tags to push (default: every tag in the layout).
        #[arg(long)]
        tag: Vec<String>,
    },
}

fn print_summary(images: &[ImageSummary]) {
    for i in images {
        eprintln!(
            "{:<14} {} layers={} bytes={} built in {:.2}s",
            i.tag,
            i.digest,
            i.layers.len(),
            i.bytes,
            i.elapsed.as_secs_f64()
        );
    }
}

/// Block until a termination signal, or EOF on stdin when stdin is a pipe or socket (a
/// terminal, /dev/null or a file as stdin would otherwise end a backgrounded registry at once).
fn wait_for_shutdown() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let stdin_is_pipe = rustix::fs::fstat(std::io::stdin()).is_ok_and(|st| {
        matches!(
            rustix::fs::FileType::from_raw_mode(st.st_mode),
            rustix::fs::FileType::Fifo | rustix::fs::FileType::Socket
        )
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Starting tokio runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("Handling SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("Handling SIGINT")?;
        let mut hup = signal(SignalKind::hangup()).context("Handling SIGHUP")?;
        let stdin_closed = async {
            if stdin_is_pipe {
                let mut stdin = tokio::io::stdin();
                let mut buf = [0u8; 256];
                while tokio::io::AsyncReadExt::read(&mut stdin, &mut buf)
                    .await
                    .is_ok_and(|n| n > 0)
                {}
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
            _ = stdin_closed => {}
        }
        anyhow::Ok(())
    })?;
    // The stdin reader sits in a blocking thread; don't wait for it.
    rt.shutdown_background();
    Ok(())
}

fn push(oci: &Path, registry: &str, repo: &str, tags: Vec<String>) -> Result<()> {
    let tags = if tags.is_empty() {
        list_tags(oci)?
    } else {
        tags
    };
    let start = Instant::now();
    for r in push_tags(oci, registry, repo, &tags)? {
        println!("{r}");
    }
    eprintln!(
        "pushed {} tags in {:.2}s",
        tags.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli {
        Cli::Build { out } => {
            let start = Instant::now();
            let images = build_all(&out, &BaseOptions::default())?;
            print_summary(&images);
            eprintln!("built in {:.2}s", start.elapsed().as_secs_f64());
        }
        Cli::BenchImage {
            out,
            layers,
            mb,
            tag,
        } => {
            let start = Instant::now();
            let opts = BenchOptions {
                layers,
                total_mib: mb,
            };
            build_bench(&out, &tag, &opts)?;
            let image = read_image(&out, &tag)?;
            print_summary(&[ImageSummary {
                tag,
                digest: image.digest.clone(),
                layers: image.layer_digests(),
                bytes: image.layers_size(),
                elapsed: start.elapsed(),
            }]);
        }
        Cli::Registry { dir } => {
            let mut registry = Registry::start(&dir)?;
            println!("ADDR={}", registry.addr());
            println!("LOG={}", registry.log_path().display());
            std::io::stdout().flush().context("Writing address")?;
            wait_for_shutdown()?;
            registry.stop();
        }
        Cli::Rpms { serve } => {
            let rpms = TestRpms::shared()?;
            println!("REPO={}", rpms.repo_dir.display());
            println!("KEYS={}", rpms.key_dir.display());
            println!("KERNEL={}", rpms.new_kernel().display());
            if serve {
                let mut server = RepoServer::serve(&rpms.repo_dir)?;
                println!("URL={}", server.url());
                std::io::stdout().flush().context("Writing the URL")?;
                wait_for_shutdown()?;
                server.stop();
            }
        }
        Cli::Push {
            oci,
            registry,
            repo,
            tag,
        } => push(&oci, &registry, &repo, tag)?,
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
