//! `org.dnfimage.Layerer`: client-side package layering and overrides on image commits, and
//! the package databases of commits.

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use zlink::{ReplyError, introspect, proxy};

/// The interface name.
pub const INTERFACE: &str = "org.dnfimage.Layerer";
/// The committed interface description, the contract the service must match.
pub const IDL: &str = include_str!("../org.dnfimage.Layerer.varlink");

/// An installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct Package {
    /// The package name, e.g. "bash".
    pub name: String,
    /// Its version and release, "VERSION-RELEASE" after "EPOCH:" if it has an epoch, e.g. "2.4-1".
    pub version: String,
    /// Its architecture, e.g. "x86_64" or "noarch".
    pub architecture: String,
}

/// A local package file passed with a call as an open file descriptor, so that the layerer
/// reads what the caller can read (a file in a home directory, say) and never opens a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct LocalPackage {
    /// The index of the file descriptor among those passed with the call: an RPM file open
    /// for reading.
    pub fd: u32,
    /// What the caller calls the file (e.g. the path it opened), for messages only: the
    /// layerer never opens it.
    pub name: String,
}

/// A package that two commits hold in different versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct PackageChange {
    /// The package name.
    pub name: String,
    /// Its architecture.
    pub architecture: String,
    /// Its version and release in the first commit, written as in `Package`.
    pub from_version: String,
    /// Its version and release in the second commit, written as in `Package`.
    pub to_version: String,
}

/// How the packages of a second commit differ from those of a first one; each list is sorted
/// by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct PackageChanges {
    /// Packages whose version is newer in the second commit.
    pub upgraded: Vec<PackageChange>,
    /// Packages whose version is older in the second commit.
    pub downgraded: Vec<PackageChange>,
    /// Packages only the second commit has.
    pub added: Vec<Package>,
    /// Packages only the first commit has.
    pub removed: Vec<Package>,
}

/// What is layered on an image commit: recorded in the commits `Build` makes and, by the
/// deployer, in the origins of their deployments, so that an upgrade can apply it again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct LayeringRequest {
    /// Packages requested on top of the image, as they were given to `install`.
    pub packages: Vec<String>,
    /// Requested packages the image already contains: kept in the request, not installed twice.
    pub inactive: Vec<String>,
    /// Names of image packages removed.
    pub override_remove: Vec<String>,
    /// The local packages that replace image packages (the layerer keeps their files).
    pub override_replace: Vec<Package>,
}

/// The phase a build is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "snake_case")]
#[zlink(rename_all = "snake_case")]
pub enum BuildPhase {
    /// Checking the base commit out under an overlay.
    Preparing,
    /// Resolving the request against the base's package database and the repositories.
    Resolving,
    /// Downloading packages.
    Downloading,
    /// Checking the packages' signatures against the configured keys.
    Verifying,
    /// Installing and removing packages in the sandbox, scriptlets included.
    Installing,
    /// Cleaning the package database and committing the result.
    Committing,
}

/// A progress record streamed by `Build`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct BuildProgress {
    /// The phase the build is in.
    pub phase: BuildPhase,
    /// The package this record is about, "NAME-VERSION-RELEASE.ARCHITECTURE", if any.
    pub package: Option<String>,
    /// Packages this phase is done with (downloaded, verified or installed).
    pub packages_done: u64,
    /// Packages this phase handles in all; 0 while unknown.
    pub packages_total: u64,
    /// Bytes downloaded so far, while downloading.
    pub bytes_done: Option<u64>,
    /// Bytes to download in all, while downloading.
    pub bytes_total: Option<u64>,
    /// What is happening, for people.
    pub message: String,
}

/// The outcome of a completed `Build`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct BuildResult {
    /// The commit to deploy: the new one, or the image commit itself when the request is empty.
    pub commit: String,
    /// The image commit it is built on, the new commit's parent.
    pub base_commit: String,
    /// The request recorded in the commit.
    pub request: LayeringRequest,
    /// How its packages differ from the image commit's.
    pub changes: PackageChanges,
}

/// Reply of `Build`: progress records, then one record with the result.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct BuildReply {
    /// Set on every record but the last.
    pub progress: Option<BuildProgress>,
    /// Set on the last record only.
    pub result: Option<BuildResult>,
}

/// Reply of `Cancel`.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct CancelReply {
    /// What was running and is now being cancelled; null when nothing was running.
    pub cancelled: Option<String>,
}

/// Reply of `ListPackages`.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct ListPackagesReply {
    /// Every package in the commit's package database, sorted by name.
    pub packages: Vec<Package>,
}

/// Errors of `org.dnfimage.Layerer`.
#[derive(Debug, Clone, PartialEq, Eq, ReplyError, introspect::ReplyError)]
#[zlink(interface = "org.dnfimage.Layerer")]
pub enum LayererError {
    /// The repository has no such commit.
    CommitNotFound {
        /// The commit as given.
        commit: String,
    },
    /// The commit has no rpm database ("usr/lib/sysimage/rpm", "usr/share/rpm", "var/lib/rpm").
    NoPackageDatabase {
        /// The commit as given.
        commit: String,
    },
    /// The request contradicts itself or the recorded one (e.g. uninstalling a package that
    /// is not requested, or removing and replacing the same package).
    InvalidRequest {
        /// The packages concerned.
        packages: Vec<String>,
        /// What is wrong.
        message: String,
    },
    /// No repository has the packages to install, the image lacks the packages to remove, or a
    /// file to replace with does not exist.
    PackageNotFound {
        /// The packages or files not found.
        packages: Vec<String>,
        /// What the resolver said.
        message: String,
    },
    /// The request cannot be resolved: something needed is missing, or a removal breaks a
    /// package that needs what is removed.
    DependencyProblem {
        /// The packages involved, requested and installed.
        packages: Vec<String>,
        /// The resolver's problems, one a string, e.g. "nothing provides libfoo needed by bar".
        problems: Vec<String>,
    },
    /// A package to install has a file that another package already owns.
    FileConflict {
        /// The file, e.g. "/usr/bin/foo".
        path: String,
        /// The package being installed.
        package: String,
        /// The package that owns the file (an image package or another layered one).
        owner: String,
        /// What rpm said, every conflict included.
        message: String,
    },
    /// A package's scriptlet failed in the sandbox; nothing was committed.
    ScriptletFailed {
        /// The package, "NAME-VERSION-RELEASE.ARCHITECTURE".
        package: String,
        /// The scriptlet, e.g. "%post".
        scriptlet: String,
        /// What the scriptlet printed, and its exit status.
        message: String,
    },
    /// A repository could not be reached, or its metadata could not be read.
    RepositoryUnreachable {
        /// The repository id.
        repository: String,
        /// What the download said.
        message: String,
    },
    /// No repository with these ids is configured.
    UnknownRepository {
        /// The ids as given.
        repositories: Vec<String>,
    },
    /// A package is unsigned, signed with a key that is not configured, or its signature is bad.
    #[zlink(rename_all = "camelCase")]
    SignatureRejected {
        /// The package, or the file given to replace with.
        package: String,
        /// The id of the key it is signed with; null when it is unsigned.
        key_id: Option<String>,
        /// What the check said.
        message: String,
    },
    /// A package cannot be read, or its content does not match its checksum.
    CorruptPackage {
        /// The package, or the file given to replace with.
        package: String,
        /// What is wrong with it.
        message: String,
    },
    /// A filesystem the build writes to has not enough free space.
    InsufficientSpace {
        /// The directory that lacks space.
        path: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Another build is running; wait for it or cancel it.
    AlreadyInProgress {
        /// What is running, e.g. "Layering vim on 3a5c…".
        operation: String,
    },
    /// The build was cancelled; nothing was committed.
    Cancelled {
        /// What was cancelled.
        operation: String,
    },
    /// Only root may call this method.
    PermissionDenied {
        /// The method refused.
        method: String,
    },
    /// The service already serves as many connections as it allows (in all, or for the
    /// caller's user); close some and try again.
    TooManyConnections {
        /// The limit reached.
        limit: i64,
        /// Which limit: "total" or "user".
        scope: String,
    },
    /// Anything else; the message says what went wrong.
    Failed {
        /// What went wrong, with its causes.
        message: String,
    },
}

pub use client::*;

// `Build` takes the six inputs plus `requestFrom` and `overrideReset`; the proxy macro
// does not pass an `allow` on a method on to the code it generates, hence this module.
#[allow(clippy::too_many_arguments)]
mod client {
    use super::*;

    /// Client side of `org.dnfimage.Layerer`.
    #[proxy(interface = "org.dnfimage.Layerer", rename_all_arguments = "camelCase")]
    pub trait LayererProxy {
        /// Builds a commit that layers packages and overrides on an image commit; `fds` are the
        /// files `override_replace_files` refers to.
        #[zlink(more)]
        async fn build(
            &mut self,
            base_commit: &str,
            request_from: Option<&str>,
            install: Option<&[String]>,
            uninstall: Option<&[String]>,
            override_remove: Option<&[String]>,
            override_replace: Option<&[String]>,
            override_replace_files: Option<&[LocalPackage]>,
            override_reset: Option<&[String]>,
            repositories: Option<&[String]>,
            #[zlink(fds)] fds: Vec<std::os::fd::OwnedFd>,
        ) -> zlink::Result<impl Stream<Item = zlink::Result<Result<BuildReply, LayererError>>>>;
        /// Cancels the running build.
        async fn cancel(&mut self) -> zlink::Result<Result<CancelReply, LayererError>>;
        /// Lists the packages of a commit.
        async fn list_packages(
            &mut self,
            commit: &str,
        ) -> zlink::Result<Result<ListPackagesReply, LayererError>>;
        /// Compares the packages of two commits.
        async fn package_diff(
            &mut self,
            from_commit: &str,
            to_commit: &str,
        ) -> zlink::Result<Result<PackageChanges, LayererError>>;
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream;
    use zlink::Reply;

    use super::*;
    use crate::idl::canonical;
    use crate::importer::testing::{assert_wire_names, check_proxy_call, description};

    /// Stands in for the layerer in the description test. It implements no method: each one
    /// fails. It exists so that the macro that will generate the real service's description
    /// generates one here from the same types, for comparison with the committed file.
    struct Described;

    fn unimplemented() -> LayererError {
        LayererError::Failed {
            message: "This stand-in implements no method".to_string(),
        }
    }

    /// Layers RPM packages and overrides on image commits, in a sandbox, so that they survive
    /// image upgrades, and reads the package databases of commits.
    #[zlink::service(
        interface = "org.dnfimage.Layerer",
        types = [
            Package, LocalPackage, PackageChange, PackageChanges, LayeringRequest, BuildPhase,
            BuildProgress, BuildResult,
        ]
    )]
    impl Described {
        /// Builds a commit whose parent is the image commit `baseCommit` (a commit Build made
        /// stands for the image commit under it) and that holds a layering request: the one
        /// recorded in commit `requestFrom` (default: an empty one; pass the booted deployment's
        /// commit to change what is layered on it, or to carry it over to a new image), with
        /// `install` packages added, requested `uninstall` packages dropped, `overrideRemove`
        /// image packages removed, image packages replaced by the local RPM files
        /// `overrideReplaceFiles` (passed as file descriptors, each read once: the copy read is
        /// the one checked, installed and kept for later builds) and `overrideReplace` (paths
        /// the layerer opens itself, for root callers that have no way to pass descriptors),
        /// and the overrides of the `overrideReset` packages dropped; each of these defaults to
        /// none. Packages come from
        /// the configured repositories with the ids `repositories` (default: every enabled one)
        /// and must be signed with a configured key. dnf resolves against the image's own
        /// package database; requested packages the image already has stay in the request as
        /// inactive; rpm installs in a sandbox without network, and a failing scriptlet fails
        /// the build. When the request ends up empty nothing is built and the result's commit is
        /// the image commit. Streams progress records, then one record with the result; nothing
        /// is committed on failure.
        #[zlink(more)]
        #[allow(clippy::too_many_arguments)]
        async fn build(
            &self,
            more: bool,
            #[zlink(rename = "baseCommit")] base_commit: String,
            #[zlink(rename = "requestFrom")] request_from: Option<String>,
            install: Option<Vec<String>>,
            uninstall: Option<Vec<String>>,
            #[zlink(rename = "overrideRemove")] override_remove: Option<Vec<String>>,
            #[zlink(rename = "overrideReplace")] override_replace: Option<Vec<String>>,
            #[zlink(rename = "overrideReplaceFiles")] override_replace_files: Option<
                Vec<LocalPackage>,
            >,
            #[zlink(rename = "overrideReset")] override_reset: Option<Vec<String>>,
            repositories: Option<Vec<String>>,
            #[zlink(fds)] fds: Vec<std::os::fd::OwnedFd>,
        ) -> impl Stream<Item = Result<Reply<BuildReply>, LayererError>> + Unpin + use<> {
            let _ = (more, base_commit, request_from, install, uninstall);
            let _ = (
                override_remove,
                override_replace,
                override_replace_files,
                override_reset,
                repositories,
                fds,
            );
            stream::iter([Err(unimplemented())])
        }

        /// Cancels the running build; nothing is committed.
        async fn cancel(&self) -> Result<CancelReply, LayererError> {
            Err(unimplemented())
        }

        /// Lists the packages in the rpm database of `commit`, without checking the commit out.
        async fn list_packages(&self, commit: String) -> Result<ListPackagesReply, LayererError> {
            let _ = commit;
            Err(unimplemented())
        }

        /// Compares the rpm databases of `fromCommit` and `toCommit` (e.g. the booted commit and
        /// a downloaded one), without checking the commits out.
        async fn package_diff(
            &self,
            #[zlink(rename = "fromCommit")] from_commit: String,
            #[zlink(rename = "toCommit")] to_commit: String,
        ) -> Result<PackageChanges, LayererError> {
            let _ = (from_commit, to_commit);
            Err(unimplemented())
        }
    }

    #[test]
    fn generated_description_is_the_committed_one() {
        let generated = description(Described, INTERFACE);
        let generated = canonical(&generated).expect("the generated description parses");
        assert!(
            generated == IDL,
            "{INTERFACE}.varlink is not what the types generate, which is:\n{generated}"
        );
    }

    fn package(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            architecture: "x86_64".into(),
        }
    }

    fn files_example() -> LocalPackage {
        LocalPackage {
            fd: 0,
            name: "./kernel.rpm".into(),
        }
    }

    #[test]
    fn serde_names_are_the_idl_names() {
        let change = PackageChange {
            name: "kernel".into(),
            architecture: "x86_64".into(),
            from_version: "6.1-1".into(),
            to_version: "6.2-1".into(),
        };
        let changes = PackageChanges {
            upgraded: vec![change.clone()],
            downgraded: vec![],
            added: vec![package("vim", "9.0-1")],
            removed: vec![],
        };
        let request = LayeringRequest {
            packages: vec!["vim".into()],
            inactive: vec![],
            override_remove: vec!["nano".into()],
            override_replace: vec![package("kernel", "6.2-1")],
        };
        assert_wire_names(&package("vim", "9.0-1"));
        assert_wire_names(&files_example());
        assert_wire_names(&change);
        assert_wire_names(&changes);
        assert_wire_names(&request);
        for phase in [
            BuildPhase::Preparing,
            BuildPhase::Resolving,
            BuildPhase::Downloading,
            BuildPhase::Verifying,
            BuildPhase::Installing,
            BuildPhase::Committing,
        ] {
            assert_wire_names(&phase);
        }
        assert_wire_names(&BuildProgress {
            phase: BuildPhase::Downloading,
            package: None,
            packages_done: 1,
            packages_total: 2,
            bytes_done: None,
            bytes_total: None,
            message: String::new(),
        });
        assert_wire_names(&BuildResult {
            commit: String::new(),
            base_commit: String::new(),
            request,
            changes,
        });
    }

    #[test]
    fn proxy_calls_fit_the_description() {
        let names = vec!["vim".to_string()];
        let files = vec![LocalPackage {
            fd: 0,
            name: "/home/me/kernel.rpm".into(),
        }];
        check_proxy_call!(more IDL, LayererError, |c| c.build(
            "3a5c",
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            Vec::new()
        ));
        check_proxy_call!(more IDL, LayererError, |c| c.build(
            "3a5c",
            Some("9f0e"),
            Some(&names),
            Some(&names),
            Some(&names),
            Some(&names),
            Some(&files),
            Some(&names),
            Some(&names),
            Vec::new()
        ));
        check_proxy_call!(IDL, LayererError, |c| c.cancel());
        check_proxy_call!(IDL, LayererError, |c| c.list_packages("3a5c"));
        check_proxy_call!(IDL, LayererError, |c| c.package_diff("3a5c", "9f0e"));
    }
}
