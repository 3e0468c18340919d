//! The library behind `dnfimage-vmimage` (see its `main.rs`): bootable OCI images from ostree
//! commits, qcow2 disks from images, NoCloud seeds. The tests use [`disk::use_syslinux_menu`] to
//! prepare sysroots the way the disks are.

pub mod bls;
pub mod cmd;
pub mod disk;
pub mod encapsulate;
pub mod seed;
