//! The wire of dnfimage: the varlink interface descriptions (`*.varlink`, the contract), the
//! types that travel over them and the client proxies. Nothing else in the project knows the
//! wire format; services convert their own types at the boundary.

pub mod deployer;
pub mod fetcher;
pub mod idl;
pub mod importer;
pub mod layerer;
pub mod reference;

use std::path::{Path, PathBuf};

/// Where the service sockets live on a host.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/dnfimage";

/// A service socket path: `<runtime_dir>/<interface>`.
pub fn socket_path(runtime_dir: &Path, interface: &str) -> PathBuf {
    runtime_dir.join(interface)
}

/// A client connection to a service socket.
pub type Connection = zlink::tokio::unix::Connection;

/// Connects to the socket of `interface` under `runtime_dir`.
pub async fn connect(runtime_dir: &Path, interface: &str) -> zlink::Result<Connection> {
    zlink::tokio::unix::connect(socket_path(runtime_dir, interface)).await
}

/// Every committed interface description: (interface name, text).
pub const DESCRIPTIONS: &[(&str, &str)] = &[
    (fetcher::INTERFACE, fetcher::IDL),
    (importer::INTERFACE, importer::IDL),
    (deployer::INTERFACE, deployer::IDL),
    (layerer::INTERFACE, layerer::IDL),
];
