//! `dnf-image`: the command line. A pure varlink client: it never touches the sysroot, the cache
//! or a registry itself; it asks the services and shows what they say.

pub mod errors;
mod fleet;
mod host;
mod image;
mod layer;
pub mod output;
mod progress;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

pub use output::Output;

/// Exit code when there is nothing to do and `--unchanged-exit-77` was given.
pub const EXIT_UNCHANGED: u8 = 77;
/// Exit code of `upgrade --auto` when another change to the deployments ran at the same time
/// (sysexits.h's EX_TEMPFAIL): nothing was changed, the next timer run tries again.
pub const EXIT_TEMPFAIL: u8 = 75;

/// Container-native OS updates for ostree-based systems.
#[derive(Debug, Parser)]
#[command(name = "dnf-image", version, propagate_version = true)]
pub struct Cli {
    /// Directory holding the service sockets.
    #[arg(long, global = true, env = "DNFIMAGE_RUNTIME_DIR", default_value = dnfimage_interfaces::DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
    /// The sysroot to operate on; the deployer must be the one managing it.
    #[arg(long, global = true, env = "DNFIMAGE_SYSROOT")]
    pub sysroot: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `--apply`: reboot once the change is made, as bootc spells it (`-r`/`--reboot` as rpm-ostree
/// does).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ApplyArg {
    /// Reboot (`systemctl reboot`) once the new deployment is staged or the rollback is set.
    /// Nothing is rebooted when nothing changed, when the change failed, or when the sysroot
    /// is not the booted one.
    #[arg(long, short = 'r', visible_alias = "reboot")]
    pub apply: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the deployments: which is booted, which boots next, which is the rollback.
    Status {
        /// Only the booted deployment (the default one on a sysroot that is not booted).
        #[arg(long)]
        booted: bool,
        /// Also show the space the repository and the image cache take on disk.
        #[arg(long)]
        disk: bool,
    },
    /// Switch the host to another image (also the first deployment on a fresh sysroot).
    ///
    /// When the deployment that boots next already is that image at the digest the reference
    /// names now (nothing layered on it), nothing is deployed: "the image specification is
    /// unchanged".
    Rebase {
        /// The image: docker://host/name:tag (default transport), oci:/dir[:tag], oci-archive:/file.
        image: String,
        /// The stateroot for a first deployment (default: the booted or default one, else "default").
        #[arg(long)]
        stateroot: Option<String>,
        /// Layers fetched at once.
        #[arg(long)]
        concurrency: Option<u64>,
        /// Deploy the image again even when the deployment that boots next already is it.
        #[arg(long)]
        force: bool,
        /// Exit with 77 when the image specification is unchanged (nothing deployed).
        #[arg(long, conflicts_with = "force")]
        unchanged_exit_77: bool,
        /// Do not check the image against the host's signature policy
        /// (/etc/containers/policy.json), now or when upgrading: recorded in the origin as
        /// `ostree-unverified-registry:`. Without it the policy is enforced and recorded as
        /// `ostree-image-signed:`.
        #[arg(long)]
        no_signature_verification: bool,
        #[command(flatten)]
        apply: ApplyArg,
    },
    /// Fetch, import and stage the newest version of the image the host follows.
    Upgrade {
        /// Only tell whether an update exists: version, digest, layers and bytes to download.
        #[arg(long, conflicts_with_all = ["download_only", "from_downloaded", "apply"])]
        check: bool,
        /// Fetch and import the update but do not deploy it.
        #[arg(long, conflicts_with_all = ["from_downloaded", "apply"])]
        download_only: bool,
        /// Deploy what `--download-only` fetched, without the network.
        #[arg(long)]
        from_downloaded: bool,
        /// Exit with 77 when there is no update.
        #[arg(long)]
        unchanged_exit_77: bool,
        /// Download the update and show the package changes it brings, without deploying it.
        #[arg(long, conflicts_with_all = ["check", "download_only", "from_downloaded", "apply"])]
        preview: bool,
        /// Layers fetched at once.
        #[arg(long)]
        concurrency: Option<u64>,
        /// Do what the `[upgrade] policy` of /etc/dnfimage/dnfimage.conf says: none, check
        /// (record the update, which `status` then shows), stage (also download and stage it)
        /// or apply (stage it, then reboot into it inside the window, holding a reboot slot of
        /// the fleet; `dnf-image fleet status` shows how).
        /// For dnfimage-upgrade.timer. Exits with 75 (EX_TEMPFAIL) when another change to the
        /// deployments ran at the same time: nothing was changed, the next run tries again.
        #[arg(long, conflicts_with_all = ["check", "download_only", "from_downloaded", "apply"])]
        auto: bool,
        #[command(flatten)]
        apply: ApplyArg,
    },
    /// Make the previous deployment the one that boots next.
    Rollback {
        #[command(flatten)]
        apply: ApplyArg,
    },
    /// Reboot coordination of `[upgrade] policy = "apply"`.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Keep a deployment through upgrades and cleanups (`--unpin` to release it).
    Pin {
        /// The deployment's index in `status`.
        index: u64,
        /// Release the pin instead.
        #[arg(long)]
        unpin: bool,
    },
    /// Remove the pending and/or rollback deployment (default: both), and with `--repo` free
    /// the repository objects no deployment uses.
    Cleanup {
        /// Remove the staged or pending deployment.
        #[arg(long)]
        pending: bool,
        /// Remove the rollback deployment.
        #[arg(long)]
        rollback: bool,
        /// Free the repository's images, layers and objects that no remaining deployment uses
        /// (an update downloaded for the image a deployment follows stays). Alone it leaves the
        /// deployments as they are; with --pending or --rollback it runs after their removal.
        #[arg(long)]
        repo: bool,
    },
    /// Show or change the kernel arguments of the deployment that boots next.
    Kargs {
        /// Add an argument, e.g. `quiet` or `console=ttyS0` (repeatable).
        #[arg(long)]
        append: Vec<String>,
        /// Remove an argument by key or `key=value` (repeatable).
        #[arg(long)]
        delete: Vec<String>,
        /// Replace `key=old=new` (or `key=new` for a key set once) (repeatable).
        #[arg(long)]
        replace: Vec<String>,
    },
    /// Layer packages on this machine's deployment; they survive image upgrades.
    Install {
        /// Package names (as the configured repositories know them).
        #[arg(required = true)]
        packages: Vec<String>,
        /// Use only this repository id (repeatable; default: every enabled one).
        #[arg(long = "repo")]
        repositories: Vec<String>,
    },
    /// Remove layered packages.
    Uninstall {
        /// Package names given to `install`.
        #[arg(required = true)]
        packages: Vec<String>,
    },
    /// Replace or remove packages of the image itself on this machine.
    #[command(subcommand)]
    Override(layer::OverrideCommand),
    /// Drop every layered package and override: back to the image as built.
    Reset,
    /// Make the pending deployment's additions (packages installed since boot) usable now,
    /// without a reboot: its new files under /usr are copied into a transient overlay on the
    /// running /usr that lasts until the next boot, which starts the deployment itself.
    ///
    /// Files it changes are refused unless `--allow-replacement`; files it removes and its /etc
    /// changes wait for the reboot. Works on the booted host only.
    ApplyLive {
        /// Also replace the files of the running /usr that the pending deployment changes.
        #[arg(long)]
        allow_replacement: bool,
    },
    /// Work with images in registries and in the local cache.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

/// `dnf-image fleet …`.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// After the reboot into a staged deployment: give back the reboot slot once the host is
    /// up on it (run by dnfimage-fleet-release.service at boot).
    Release,
    /// Show the upgrade policy, the coordination backend, the window, this host's rollout wave
    /// and the reboot slot it holds.
    Status,
}

/// Connects to a service, saying what to do when it is not there.
pub(crate) async fn connect(cli: &Cli, interface: &str) -> Result<dnfimage_interfaces::Connection> {
    let path = dnfimage_interfaces::socket_path(&cli.runtime_dir, interface);
    dnfimage_interfaces::connect(&cli.runtime_dir, interface)
        .await
        .with_context(|| {
            format!(
                "Connecting to {interface} at {} (is its socket active? \
                 `systemctl start dnfimage-{}.socket`)",
                path.display(),
                interface
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_lowercase()
            )
        })
}

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> Result<u8> {
    let out = Output::new(cli.json);
    match &cli.command {
        Command::Image(cmd) => image::run(&cli, &out, cmd).await,
        Command::Status { booted, disk } => host::status(&cli, &out, *booted, *disk).await,
        Command::Rebase {
            image,
            stateroot,
            concurrency,
            force,
            unchanged_exit_77,
            no_signature_verification,
            apply,
        } => {
            let opts = host::RebaseOptions {
                stateroot: stateroot.as_deref(),
                concurrency: *concurrency,
                force: *force,
                unchanged_exit_77: *unchanged_exit_77,
                verify: !no_signature_verification,
                apply: apply.apply,
            };
            host::rebase(&cli, &out, image, &opts).await
        }
        Command::Upgrade {
            check,
            download_only,
            from_downloaded,
            unchanged_exit_77,
            preview,
            concurrency,
            auto,
            apply,
        } => {
            let mut opts = host::UpgradeOptions {
                check: *check,
                download_only: *download_only || *preview,
                preview: *preview,
                from_downloaded: *from_downloaded,
                unchanged_exit_77: *unchanged_exit_77,
                concurrency: *concurrency,
                apply: apply.apply,
            };
            let mut auto_apply = false;
            if *auto {
                match host::Policy::load()? {
                    host::Policy::None => {
                        out.note("Automatic upgrades are off ([upgrade] policy = \"none\").");
                        return Ok(0);
                    }
                    host::Policy::Check => opts.check = true,
                    host::Policy::Stage => {}
                    host::Policy::Apply => auto_apply = true,
                }
            }
            let result = if auto_apply {
                fleet::apply(&cli, &out, &opts).await
            } else {
                host::upgrade(&cli, &out, &opts).await
            };
            match result {
                Err(e) if *auto && errors::another_change_ran(&e) => {
                    eprintln!("error: {e:#}");
                    eprintln!(
                        "The automatic upgrade stops here; dnfimage-upgrade.timer tries again at \
                         its next run."
                    );
                    Ok(EXIT_TEMPFAIL)
                }
                other => other,
            }
        }
        Command::Rollback { apply } => host::rollback(&cli, &out, apply.apply).await,
        Command::Fleet(FleetCommand::Release) => fleet::release(&cli, &out).await,
        Command::Fleet(FleetCommand::Status) => fleet::status(&out, cli.json).await,
        Command::Pin { index, unpin } => host::pin(&cli, &out, *index, !unpin).await,
        Command::Cleanup {
            pending,
            rollback,
            repo,
        } => {
            // Neither deployment flag: both, unless only the repository is asked for.
            let both = !pending && !rollback && !repo;
            host::cleanup(&cli, &out, *pending || both, *rollback || both, *repo).await
        }
        Command::Kargs {
            append,
            delete,
            replace,
        } => host::kargs(&cli, &out, append, delete, replace).await,
        Command::Install {
            packages,
            repositories,
        } => {
            let change = layer::Change {
                install: packages.clone(),
                repositories: repositories.clone(),
                ..Default::default()
            };
            layer::apply(&cli, &out, change).await
        }
        Command::Uninstall { packages } => {
            let change = layer::Change {
                uninstall: packages.clone(),
                ..Default::default()
            };
            layer::apply(&cli, &out, change).await
        }
        Command::Override(cmd) => layer::override_command(&cli, &out, cmd).await,
        Command::Reset => layer::reset(&cli, &out).await,
        Command::ApplyLive { allow_replacement } => {
            host::apply_live(&cli, &out, *allow_replacement).await
        }
    }
}
