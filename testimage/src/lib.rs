//! The test image factory and the registry harness.
//!
//! No registry outside the machine is reachable, so dnfimage builds its own bootable images
//! (see DESIGN.md, "Test images"):
//!
//! - [`build_base`]: a tiny root in ostree layout (static busybox, `/usr/etc` config, a
//!   placeholder kernel in `/usr/lib/modules`), committed with `ostree commit --bootable` and
//!   encapsulated by ostree-ext into one layer per component. v1 and v2 differ only in the
//!   ostree commit layer.
//! - [`build_derived`]: a base plus one plain tar layer, as a Containerfile build makes it.
//! - [`build_not_bootable`]: a plain image without bootable labels.
//! - [`build_bench`]: many large layers of incompressible data, for fetch benchmarks.
//! - [`Fixtures`]: all but the bench image in one OCI layout, built once per
//!   [`FIXTURES_VERSION`] and shared by all test processes.
//! - [`SigningKey`], [`Lookaside`]: a GPG key made at test time and a signature store, to push
//!   images signed, unsigned, by another key or with another image's signature.
//! - [`Registry`]: a `docker-registry` on 127.0.0.1 whose access log shows which blobs a
//!   client fetched.
//! - [`TestRpms`]: RPM packages for layering (a dependency, scriptlets, a conflict, a
//!   replacement kernel, unsigned and foreign-signed ones) in a signed rpm-md repository, and
//!   [`RepoServer`], which serves such a repository over HTTP on 127.0.0.1.
//!
//! Everything here is synchronous (it may be called from async tests too: the ostree-ext work
//! runs on its own thread). External tools: `ostree`, `skopeo`, `docker-registry`, a static
//! `busybox` (Debian `busybox-static`), `rpm`/`rpmbuild`/`rpmsign`, `createrepo_c`, `gpg` and
//! `sqlite3`.

mod base;
mod cmd;
mod fixtures;
mod http;
mod oci;
mod registry;
pub mod rpms;
mod signing;
mod skopeo;

pub use base::{BaseOptions, HOSTNAME, KERNEL_VERSION, OS_NAME, build_base};
pub use fixtures::{
    FIXTURES_DIR_ENV, FIXTURES_VERSION, Fixtures, ImageSummary, PushedRefs, build_all, tags,
};
pub use http::{RepoServer, ServedRequest};
pub use oci::{
    BOOTC_LABEL, BenchOptions, CREATED, DERIVED_CONTENT, DERIVED_FILE, Image, VERSION_LABEL,
    blob_path, build_bench, build_derived, build_not_bootable, list_tags, read_image,
};
pub use registry::{AccessLogEntry, Registry, parse_access_log_line};
pub use rpms::TestRpms;
pub use signing::{Lookaside, SigningKey, write_accept_anything_policy, write_signed_by_policy};
pub use skopeo::{
    copy as skopeo_copy, copy_v2s2 as skopeo_copy_v2s2, copy_with_creds as skopeo_copy_with_creds,
    oci_ref, push_tags, raw_manifest,
};
