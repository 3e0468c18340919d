//! `dnfimage-vmimage`: the build tool behind `examples/base` and the VM suite.
//!
//! - `encapsulate`: an ostree commit → a chunked, bootable OCI image in an OCI layout;
//! - `disk`: an image reference → a qcow2 (GPT: ESP with GRUB, `/boot`, root) with the image
//!   deployed by ostree-ext and its origin pointing at a reference of your choice; GRUB's menu
//!   is the syslinux menu libostree rewrites on every deployment change;
//! - `boot-entry`: the default BLS entry of such a disk (kernel, initramfs, options), for direct
//!   kernel boot;
//! - `seed`: a NoCloud `cidata` volume that sets a user, a password and an SSH key.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use dnfimage_vmimage::{disk, encapsulate, seed};

#[derive(Parser)]
#[command(version, about = "Builds bootable OS images and qcow2 disks from them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encapsulate an ostree commit as a chunked, bootable OCI image.
    Encapsulate {
        /// The ostree repository holding the commit.
        #[arg(long)]
        repo: PathBuf,
        /// The commit or ref to encapsulate.
        #[arg(long)]
        rev: String,
        /// Destination OCI layout and tag, e.g. `/out/oci:v1`.
        #[arg(long)]
        oci: String,
        /// `org.opencontainers.image.version` label.
        #[arg(long)]
        version: String,
    },
    /// Build a qcow2 disk from an image reference.
    Disk(disk::DiskArgs),
    /// Extract the default boot entry of a disk built by `disk`.
    BootEntry {
        /// The qcow2 disk.
        #[arg(long)]
        disk: PathBuf,
        /// Directory receiving `vmlinuz`, `initramfs.img` and `entry.json`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a NoCloud seed (an ISO 9660 volume labelled `cidata`).
    Seed(seed::SeedArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Encapsulate {
            repo,
            rev,
            oci,
            version,
        } => encapsulate::encapsulate(&repo, &rev, &oci, &version),
        Command::Disk(args) => disk::build(&args),
        Command::BootEntry { disk, out } => disk::boot_entry(&disk, &out).map(|e| {
            println!("{}", e.options);
        }),
        Command::Seed(args) => seed::write(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
