//! `org.dnfimage.Deployer`: the deployments of the ostree sysroot, the only writer of them.

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use zlink::{ReplyError, introspect, proxy};

pub use crate::layerer::{LayeringRequest, Package};

/// The interface name.
pub const INTERFACE: &str = "org.dnfimage.Deployer";
/// The committed interface description, the contract the service must match.
pub const IDL: &str = include_str!("../org.dnfimage.Deployer.varlink");

/// The commit metadata key (a string: the [`LayeringRequest`] as JSON, in its wire form) under
/// which `org.dnfimage.Layerer.Build` records the request in the commits it makes.
/// `org.dnfimage.Deployer.Deploy` copies it into the origin of the deployment.
pub const LAYERING_METADATA_KEY: &str = "dnfimage.layering";

/// Whether a deployment's image is held to the host's signature policy, and what checking it
/// found when it was fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct ImageTrust {
    /// Whether upgrades check the image against the host's signature policy (the origin says
    /// "ostree-image-signed:" or "ostree-remote-registry:"); false when verification was turned
    /// off ("ostree-unverified-registry:", "ostree-unverified-image:").
    pub enforced: bool,
    /// Whether the policy required signatures and they were verified when the image was
    /// fetched; false when it accepted the image without any, or nothing was recorded.
    pub verified: bool,
    /// The policy requirement that applied when the image was fetched; null when not recorded.
    pub requirement: Option<String>,
    /// The keys whose signatures were verified, "FINGERPRINT (USER ID)".
    pub signers: Vec<String>,
}

/// A deployment: a bootable checkout of a commit, with its kernel arguments and origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct Deployment {
    /// Its place in the boot order, 0 first; what `Pin` and `SetKernelArguments` take.
    pub index: u64,
    /// The stateroot it belongs to.
    pub stateroot: String,
    /// The ostree commit it checks out.
    pub commit: String,
    /// Its serial among the deployments of the same commit (its directory is "COMMIT.SERIAL").
    pub serial: u64,
    /// The image commit under the layered packages; null when nothing is layered.
    pub base_commit: Option<String>,
    /// The image reference its origin records, "docker://…"; null when it is not from an image.
    pub image: Option<String>,
    /// The manifest digest of that image, "sha256:…", what `upgrade --check` compares.
    pub image_digest: Option<String>,
    /// The image's version label, or else the commit's "version" metadata; null when neither.
    pub version: Option<String>,
    /// When the commit was made (RFC 3339).
    pub timestamp: String,
    /// The kernel version, its directory name under "/usr/lib/modules".
    pub kernel_version: String,
    /// Its kernel arguments in order, without the "ostree=" argument ostree manages.
    pub kernel_arguments: Vec<String>,
    /// Whether the running system was booted from it.
    pub booted: bool,
    /// Whether it is staged: written, and made bootable when the system shuts down.
    pub staged: bool,
    /// Whether the next boot starts it; it is pending when it is not also the booted one.
    pub default: bool,
    /// Whether it is the rollback: the one after the booted one (after the default one when
    /// the sysroot is not booted).
    pub rollback: bool,
    /// Whether it is pinned: no deploy or cleanup removes it.
    pub pinned: bool,
    /// Whether it is staged with `lockFinalization` and waits for `UnlockStaged`.
    pub finalization_locked: bool,
    /// What is layered on the image, from its origin; empty lists when nothing is.
    pub layering: LayeringRequest,
    /// How its image is held to the signature policy, from its origin; null when it is not
    /// from an image.
    pub trust: Option<ImageTrust>,
    /// libostree's unlocked state of its "/usr" ("transient", "development", "hotfix"); null
    /// when it is locked, as deployments are.
    #[serde(default)]
    pub unlocked: Option<String>,
    /// The commit whose additions `ApplyLive` copied into the running "/usr" of this booted
    /// deployment (they last until the next boot); null when none were.
    #[serde(default)]
    pub live_commit: Option<String>,
}

impl Deployment {
    /// How `expectedDeployment` names it: [`deployment_id`].
    pub fn id(&self) -> String {
        deployment_id(&self.stateroot, &self.commit, self.serial)
    }
}

/// How the `expectedDeployment` parameter of the methods that write deployments, and the
/// `StateChanged` error, name a deployment: "STATEROOT/COMMIT.SERIAL", as its directory under
/// "ostree/deploy" is named.
pub fn deployment_id(stateroot: &str, commit: &str, serial: u64) -> String {
    format!("{stateroot}/{commit}.{serial}")
}

/// Reply of `Status`.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct StatusReply {
    /// The sysroot the service manages, "/" on a host.
    pub sysroot: String,
    /// Whether the running system was booted from this sysroot.
    pub booted: bool,
    /// Every deployment, in boot order.
    pub deployments: Vec<Deployment>,
    /// The change to the deployments running now, e.g. "Deploying docker://…"; null when none.
    pub operation: Option<String>,
}

/// What deploying a commit needs on one filesystem, and what it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct FilesystemSpace {
    /// The directory checked, e.g. "/boot".
    pub path: String,
    /// Bytes needed.
    pub needed: u64,
    /// Bytes available.
    pub available: u64,
}

/// Reply of `CheckSpace`.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct CheckSpaceReply {
    /// Whether every filesystem has the space needed.
    pub fits: bool,
    /// Each filesystem the deployment writes to: "/boot" and the sysroot's.
    pub filesystems: Vec<FilesystemSpace>,
}

/// The phase a deploy is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "snake_case")]
#[zlink(rename_all = "snake_case")]
pub enum DeployPhase {
    /// Checking the commit and the free space on "/boot" and the sysroot.
    Checking,
    /// Checking the commit out, merging "/etc" and writing the origin.
    Deploying,
    /// Handing the deployment to ostree-finalize-staged.service (booted system).
    Staging,
    /// Writing the boot entries and removing the deployments no longer kept (unbooted sysroot).
    UpdatingBootEntries,
}

/// A progress record streamed by `Deploy` and `SetKernelArguments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct DeployProgress {
    /// The phase the deploy is in.
    pub phase: DeployPhase,
    /// What is happening, for people.
    pub message: String,
}

/// The outcome of a completed `Deploy` or `SetKernelArguments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct DeployResult {
    /// Whether a deployment was written; false only when `SetKernelArguments` had nothing to do.
    pub changed: bool,
    /// The new deployment as `Status` shows it (the unchanged one when nothing was written).
    pub deployment: Deployment,
    /// The kernel arguments `Deploy` added because the new image declares them in
    /// "/usr/lib/bootc/kargs.d" and the image it replaces did not; empty for `SetKernelArguments`.
    #[serde(default)]
    pub added_kernel_arguments: Vec<String>,
    /// The kernel arguments `Deploy` removed because the image it replaces declared them and the
    /// new image does not; empty for `SetKernelArguments`.
    #[serde(default)]
    pub removed_kernel_arguments: Vec<String>,
}

/// Reply of `Deploy` and `SetKernelArguments`: progress records, then one with the result.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct DeployReply {
    /// Set on every record but the last.
    pub progress: Option<DeployProgress>,
    /// Set on the last record only.
    pub result: Option<DeployResult>,
}

/// Reply of `ApplyLive`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::Type)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct ApplyLiveReply {
    /// The pending deployment's commit whose additions the running "/usr" now has; null when
    /// nothing was applied.
    pub live_commit: Option<String>,
    /// Files, directories and symbolic links added to the running "/usr".
    pub added: u64,
    /// Files of the running "/usr" replaced by the pending deployment's: those of the rpm
    /// database, which list the added packages, and the others only with `allowReplacement`.
    pub replaced: u64,
    /// Paths the pending deployment no longer has, left in the running "/usr".
    pub removed_kept: u64,
    /// Why nothing was applied, for people ("No pending deployment", …); null when something was.
    pub nothing_to_apply: Option<String>,
}

/// Reply of `UnlockStaged`, `Rollback` and `Pin`.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct DeploymentReply {
    /// The deployment changed, as `Status` now shows it.
    pub deployment: Deployment,
}

/// The phase a cleanup is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "snake_case")]
#[zlink(rename_all = "snake_case")]
pub enum CleanupPhase {
    /// Writing the boot entries without the removed deployments.
    UpdatingBootEntries,
    /// Deleting the files of deployments that are no longer listed.
    RemovingFiles,
}

/// A progress record streamed by `Cleanup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct CleanupProgress {
    /// The phase the cleanup is in.
    pub phase: CleanupPhase,
    /// What is happening, for people.
    pub message: String,
}

/// The outcome of a completed `Cleanup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct CleanupResult {
    /// The deployments removed, as `Status` showed them before.
    pub removed_deployments: Vec<Deployment>,
}

/// Reply of `Cleanup`: progress records, then one record with the result.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct CleanupReply {
    /// Set on every record but the last.
    pub progress: Option<CleanupProgress>,
    /// Set on the last record only.
    pub result: Option<CleanupResult>,
}

/// Reply of `Cancel`.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct CancelReply {
    /// What was running and is now being cancelled; null when nothing was running.
    pub cancelled: Option<String>,
}

/// Errors of `org.dnfimage.Deployer`.
#[derive(Debug, Clone, PartialEq, Eq, ReplyError, introspect::ReplyError)]
#[zlink(interface = "org.dnfimage.Deployer")]
pub enum DeployerError {
    /// The image reference to record cannot be parsed.
    InvalidImageReference {
        /// The reference as given (only its start and length when it is over the length limit).
        image: String,
        /// Why it was refused.
        message: String,
    },
    /// The repository has no such commit; import or build it first.
    CommitNotFound {
        /// The commit as given.
        commit: String,
    },
    /// The commit cannot boot: no kernel and initramfs under "/usr/lib/modules", or both
    /// "/etc" and "/usr/etc".
    NotBootable {
        /// The commit as given.
        commit: String,
        /// What is missing or wrong.
        message: String,
    },
    /// There is no such deployment: the index is out of range, or nothing is staged.
    NoSuchDeployment {
        /// The index as given; null when the method looked for the staged deployment.
        index: Option<u64>,
        /// What was looked for.
        message: String,
    },
    /// There is no other deployment to roll back to.
    NoRollback,
    /// The deployment is pinned, so it is not removed; unpin it first.
    DeploymentPinned {
        /// Its index.
        index: u64,
    },
    /// A kernel argument cannot be parsed, or one to delete or replace is not there.
    InvalidKernelArgument {
        /// The argument as given.
        argument: String,
        /// What is wrong with it.
        message: String,
    },
    /// A kernel arguments file of the image ("/usr/lib/bootc/kargs.d/*.toml") cannot be read
    /// or is not in bootc's format; nothing was written.
    InvalidKernelArgumentsFile {
        /// The commit being deployed.
        commit: String,
        /// The file, "/usr/lib/bootc/kargs.d/NAME.toml".
        file: String,
        /// What is wrong with it.
        message: String,
    },
    /// A filesystem the deployment writes to lacks space; nothing was written.
    InsufficientSpace {
        /// The directory that lacks space, e.g. "/boot".
        path: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Another change to the deployments is running; wait for it or cancel it.
    AlreadyInProgress {
        /// What is running, e.g. "Deploying docker://…".
        operation: String,
    },
    /// The deployments changed since the caller read them: the deployment a change starts from
    /// is no longer the one `expectedDeployment` named. Nothing was written; read `Status` and
    /// prepare the change again.
    StateChanged {
        /// The deployment the caller named, as given.
        expected: String,
        /// The deployment a change starts from now, "STATEROOT/COMMIT.SERIAL"; null when the
        /// sysroot has none.
        actual: Option<String>,
        /// What changed, for people.
        message: String,
    },
    /// The operation was cancelled before it changed the boot entries; nothing changed.
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
    /// The sysroot is not the one the running system booted from, so it has no running "/usr"
    /// to change.
    NotBooted {
        /// The sysroot the service manages.
        sysroot: String,
    },
    /// The pending deployment changes files the running "/usr" has; nothing was changed. Call
    /// again with `allowReplacement` to replace them too.
    ReplacementRefused {
        /// How many files it changes.
        count: u64,
        /// The first of them, "/usr/…".
        files: Vec<String>,
    },
    /// Anything else; the message says what went wrong. The deployments are as they were.
    Failed {
        /// What went wrong, with its causes.
        message: String,
    },
}

/// Client side of `org.dnfimage.Deployer`.
#[allow(clippy::too_many_arguments)]
#[proxy(
    interface = "org.dnfimage.Deployer",
    rename_all_arguments = "camelCase"
)]
pub trait DeployerProxy {
    /// Lists the deployments.
    async fn status(&mut self) -> zlink::Result<Result<StatusReply, DeployerError>>;
    /// Tells whether deploying a commit fits on the filesystems.
    async fn check_space(
        &mut self,
        commit: &str,
    ) -> zlink::Result<Result<CheckSpaceReply, DeployerError>>;
    /// Writes a new deployment of a commit.
    #[zlink(more)]
    #[allow(clippy::too_many_arguments)]
    async fn deploy(
        &mut self,
        commit: &str,
        image: &str,
        stateroot: Option<&str>,
        kernel_arguments: Option<&[String]>,
        lock_finalization: Option<bool>,
        expected_deployment: Option<&str>,
        trust: Option<&ImageTrust>,
    ) -> zlink::Result<impl Stream<Item = zlink::Result<Result<DeployReply, DeployerError>>>>;
    /// Writes a new deployment with changed kernel arguments.
    #[zlink(more)]
    async fn set_kernel_arguments(
        &mut self,
        index: Option<u64>,
        append: Option<&[String]>,
        delete: Option<&[String]>,
        replace: Option<&[String]>,
        expected_deployment: Option<&str>,
    ) -> zlink::Result<impl Stream<Item = zlink::Result<Result<DeployReply, DeployerError>>>>;
    /// Lets the staged deployment be finished at the next shutdown.
    async fn unlock_staged(&mut self) -> zlink::Result<Result<DeploymentReply, DeployerError>>;
    /// Makes the next boot start the previous deployment.
    async fn rollback(
        &mut self,
        expected_deployment: Option<&str>,
    ) -> zlink::Result<Result<DeploymentReply, DeployerError>>;
    /// Pins or unpins a deployment.
    async fn pin(
        &mut self,
        index: u64,
        pinned: bool,
    ) -> zlink::Result<Result<DeploymentReply, DeployerError>>;
    /// Removes the pending and/or the rollback deployment.
    #[zlink(more)]
    async fn cleanup(
        &mut self,
        pending: Option<bool>,
        rollback: Option<bool>,
        expected_deployment: Option<&str>,
    ) -> zlink::Result<impl Stream<Item = zlink::Result<Result<CleanupReply, DeployerError>>>>;
    /// Cancels the running deploy, kernel argument change or cleanup.
    async fn cancel(&mut self) -> zlink::Result<Result<CancelReply, DeployerError>>;
    /// Copies the pending deployment's additions into the running "/usr".
    async fn apply_live(
        &mut self,
        allow_replacement: Option<bool>,
    ) -> zlink::Result<Result<ApplyLiveReply, DeployerError>>;
}

#[cfg(test)]
mod tests {
    use futures_util::stream;
    use zlink::Reply;

    use super::*;
    use crate::idl::canonical;
    use crate::importer::testing::{assert_wire_names, check_proxy_call, description};

    /// Stands in for the deployer in the description test. It implements no method: each one
    /// fails. It exists so that the macro that will generate the real service's description
    /// generates one here from the same types, for comparison with the committed file.
    struct Described;

    fn unimplemented() -> DeployerError {
        DeployerError::Failed {
            message: "This stand-in implements no method".to_string(),
        }
    }

    /// Owns the ostree sysroot: lists its deployments and writes, orders, pins and removes
    /// them. It is the only writer of deployments; a second change while one runs is refused,
    /// and so is one prepared against deployments that changed since (`expectedDeployment`); a
    /// failed one leaves the deployments as they were.
    #[zlink::service(
        interface = "org.dnfimage.Deployer",
        types = [
            Package, LayeringRequest, ImageTrust, Deployment, FilesystemSpace, DeployPhase,
        DeployProgress,
            DeployResult, CleanupPhase, CleanupProgress, CleanupResult,
        ]
    )]
    impl Described {
        /// Lists every deployment of the sysroot with its image, commit, kernel, kernel
        /// arguments, flags and layering request. The booted deployment is the one the
        /// "ostree=" kernel argument names when "/run/ostree-booted" exists; on a sysroot that
        /// is not booted (e.g. a test sysroot) none is booted and every method still works.
        async fn status(&self) -> Result<StatusReply, DeployerError> {
            Err(unimplemented())
        }

        /// Tells whether deploying `commit` fits: what it needs on "/boot" (its kernel and
        /// initramfs, unless a deployment already has the same ones) and on the sysroot, against
        /// what is free. `Deploy` makes the same check before writing anything.
        async fn check_space(&self, commit: String) -> Result<CheckSpaceReply, DeployerError> {
            let _ = commit;
            Err(unimplemented())
        }

        /// Deploys `commit` (an Import or Build result) into `stateroot` (default: the
        /// stateroot of the deployment that boots next, or "default" on an empty sysroot; it is
        /// created when missing), with an origin that records `image` (the image reference
        /// upgrades follow, "docker://…") and the layering request Build recorded in the commit,
        /// if any. The new deployment boots next, with `kernelArguments` (default: those of the
        /// deployment that boots next now, none on an empty sysroot), without those the image of
        /// the deployment that boots next declares in "/usr/lib/bootc/kargs.d/*.toml" and the new
        /// image no longer declares, then with those the new image declares there and that image
        /// did not (bootc's rules: the files in name order, those for another architecture
        /// ignored; one that cannot be parsed fails the call with `InvalidKernelArgumentsFile`).
        /// On a booted system it is
        /// staged and made bootable at shutdown, after `UnlockStaged` when `lockFinalization` is
        /// true (default false); on a sysroot that is not booted it is written at once and
        /// `lockFinalization` is ignored. The booted (or default) deployment stays as the
        /// rollback, pinned ones stay too, and older ones are removed. Checks free space first
        /// and writes nothing when it lacks. Streams progress records, then one record with the
        /// result. `expectedDeployment` (default null: no check) names the deployment the caller
        /// prepared the change against, "STATEROOT/COMMIT.SERIAL" of the one a change starts from:
        /// the staged one, else the booted one, else the one that boots next ("" for a sysroot
        /// without deployments). When that is no longer so once the sysroot lock is held, nothing is
        /// written and the call fails with `StateChanged`. `trust` (default: enforced, nothing
        /// verified recorded) says whether upgrades must check the image against the host's
        /// signature policy, recorded as the origin's scheme ("ostree-image-signed:" when
        /// enforced, else "ostree-unverified-registry:"), and what the fetch's check found.
        #[zlink(more)]
        #[allow(clippy::too_many_arguments)]
        async fn deploy(
            &self,
            more: bool,
            commit: String,
            image: String,
            stateroot: Option<String>,
            #[zlink(rename = "kernelArguments")] kernel_arguments: Option<Vec<String>>,
            #[zlink(rename = "lockFinalization")] lock_finalization: Option<bool>,
            #[zlink(rename = "expectedDeployment")] expected_deployment: Option<String>,
            trust: Option<ImageTrust>,
        ) -> impl Stream<Item = Result<Reply<DeployReply>, DeployerError>> + Unpin + use<> {
            let _ = (
                more,
                commit,
                image,
                stateroot,
                kernel_arguments,
                lock_finalization,
                expected_deployment,
                trust,
            );
            stream::iter([Err(unimplemented())])
        }

        /// Deploys the commit of deployment `index` (default: the one that boots next, so a
        /// pending update is kept) again, with the same origin and changed kernel arguments:
        /// `delete` removes arguments ("K" every K, "K=V" that one), `replace` changes them
        /// ("K=V" sets every K to V, "K=OLD=NEW" changes one value), then `append` adds
        /// arguments ("K" or "K=V"); each defaults to none. Like `Deploy` it checks out a
        /// deployment and writes boot entries, seconds of work, so it streams the same progress
        /// records and result; the result's `changed` is false, and nothing is written, when
        /// the arguments already are as asked. `expectedDeployment` is checked first, as by
        /// `Deploy`.
        #[zlink(more)]
        async fn set_kernel_arguments(
            &self,
            more: bool,
            index: Option<u64>,
            append: Option<Vec<String>>,
            delete: Option<Vec<String>>,
            replace: Option<Vec<String>>,
            #[zlink(rename = "expectedDeployment")] expected_deployment: Option<String>,
        ) -> impl Stream<Item = Result<Reply<DeployReply>, DeployerError>> + Unpin + use<> {
            let _ = (more, index, append, delete, replace, expected_deployment);
            stream::iter([Err(unimplemented())])
        }

        /// Lets the staged deployment that `Deploy` locked with `lockFinalization` be made
        /// bootable at the next shutdown.
        async fn unlock_staged(&self) -> Result<DeploymentReply, DeployerError> {
            Err(unimplemented())
        }

        /// Makes the next boot start the previous deployment again: the booted one when a
        /// pending deployment would boot next (a staged one is dropped), else the rollback one.
        /// It only reorders the deployments and rewrites the boot entries, which takes well
        /// under a second, so it is not a 'more' method. `expectedDeployment` is checked first, as
        /// by `Deploy`.
        async fn rollback(
            &self,
            #[zlink(rename = "expectedDeployment")] expected_deployment: Option<String>,
        ) -> Result<DeploymentReply, DeployerError> {
            let _ = expected_deployment;
            Err(unimplemented())
        }

        /// Pins deployment `index` so that no deploy or cleanup removes it (`pinned` true), or
        /// unpins it (false). A staged deployment cannot be pinned.
        async fn pin(&self, index: u64, pinned: bool) -> Result<DeploymentReply, DeployerError> {
            let _ = (index, pinned);
            Err(unimplemented())
        }

        /// Removes the pending deployment (`pending`, default false: the staged one, or the one
        /// that boots next when it is not the booted one) and the rollback deployment
        /// (`rollback`, default false), rewrites the boot entries, then deletes the files of
        /// every deployment no longer listed. When one of them is pinned nothing is removed;
        /// when one does not exist that is not an error. Deleting a deployment takes seconds,
        /// hence progress records, then one record with the result. The repository objects
        /// left unused are freed by org.dnfimage.Importer.Prune. `expectedDeployment` is checked
        /// first, as by `Deploy`.
        #[zlink(more)]
        async fn cleanup(
            &self,
            more: bool,
            pending: Option<bool>,
            rollback: Option<bool>,
            #[zlink(rename = "expectedDeployment")] expected_deployment: Option<String>,
        ) -> impl Stream<Item = Result<Reply<CleanupReply>, DeployerError>> + Unpin + use<>
        {
            let _ = (more, pending, rollback, expected_deployment);
            stream::iter([Err(unimplemented())])
        }

        /// Cancels the running deploy, kernel argument change or cleanup if it has not started
        /// writing the boot entries yet; after that it runs to its end.
        async fn cancel(&self) -> Result<CancelReply, DeployerError> {
            Err(unimplemented())
        }

        /// Makes the additions of the pending deployment (the one that boots next, when it is not
        /// the booted one) usable now, without a reboot: the files, directories and symbolic links
        /// under "/usr" its commit has and the booted one's does not are copied into the running
        /// "/usr", over a transient overlay (libostree's transient unlock, gone at the next boot, when
        /// the deployment itself has them), and so are the rpm database files it changes, which list
        /// the added packages. Other files both commits have with other contents are refused with
        /// `ReplacementRefused` unless `allowReplacement` (default false), then replaced too; paths
        /// the pending deployment removes, and its "/etc" changes, are left alone. Nothing to apply
        /// (no pending deployment, no additions, already applied) is no error: the reply says why.
        /// Refused with `NotBooted` on a sysroot that is not booted.
        async fn apply_live(
            &self,
            #[zlink(rename = "allowReplacement")] allow_replacement: Option<bool>,
        ) -> Result<ApplyLiveReply, DeployerError> {
            let _ = allow_replacement;
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

    fn deployment() -> Deployment {
        Deployment {
            index: 0,
            stateroot: "default".into(),
            commit: "3a5c".into(),
            serial: 0,
            base_commit: None,
            image: Some("docker://127.0.0.1:5000/base:v1".into()),
            image_digest: Some("sha256:0".into()),
            version: Some("1".into()),
            timestamp: "2025-01-01T00:00:00Z".into(),
            kernel_version: "6.1.0".into(),
            kernel_arguments: vec!["root=/dev/vda2".into()],
            booted: true,
            staged: false,
            default: true,
            rollback: false,
            pinned: false,
            finalization_locked: false,
            layering: LayeringRequest::default(),
            trust: Some(ImageTrust {
                enforced: true,
                verified: true,
                requirement: Some("default: signedBy".into()),
                signers: vec!["0123 (OS <os@example.org>)".into()],
            }),
            unlocked: Some("transient".into()),
            live_commit: Some("4b6d".into()),
        }
    }

    #[test]
    fn serde_names_are_the_idl_names() {
        assert_wire_names(&deployment());
        assert_wire_names(&FilesystemSpace {
            path: "/boot".into(),
            needed: 1,
            available: 2,
        });
        for phase in [
            DeployPhase::Checking,
            DeployPhase::Deploying,
            DeployPhase::Staging,
            DeployPhase::UpdatingBootEntries,
        ] {
            assert_wire_names(&phase);
        }
        assert_wire_names(&DeployProgress {
            phase: DeployPhase::Checking,
            message: String::new(),
        });
        assert_wire_names(&DeployResult {
            changed: true,
            deployment: deployment(),
            added_kernel_arguments: vec!["quiet".into()],
            removed_kernel_arguments: vec!["console=ttyS0".into()],
        });
        for phase in [
            CleanupPhase::UpdatingBootEntries,
            CleanupPhase::RemovingFiles,
        ] {
            assert_wire_names(&phase);
        }
        assert_wire_names(&CleanupProgress {
            phase: CleanupPhase::RemovingFiles,
            message: String::new(),
        });
        assert_wire_names(&CleanupResult {
            removed_deployments: vec![deployment()],
        });
    }

    #[test]
    fn names_a_deployment_as_its_directory() {
        assert_eq!(deployment().id(), "default/3a5c.0");
        assert_eq!(deployment_id("fedora", "ab", 12), "fedora/ab.12");
    }

    #[test]
    fn proxy_calls_fit_the_description() {
        let arguments = vec!["quiet".to_string()];
        check_proxy_call!(IDL, DeployerError, |c| c.status());
        check_proxy_call!(IDL, DeployerError, |c| c.check_space("3a5c"));
        check_proxy_call!(more IDL, DeployerError, |c| c.deploy(
            "3a5c",
            "docker://r/i:1",
            None,
            None,
            None,
            None,
            None
        ));
        let trust = ImageTrust::default();
        check_proxy_call!(more IDL, DeployerError, |c| c.deploy(
            "3a5c",
            "docker://r/i:1",
            Some("default"),
            Some(&arguments),
            Some(true),
            Some("default/3a5c.0"),
            Some(&trust)
        ));
        check_proxy_call!(more IDL, DeployerError, |c| c.set_kernel_arguments(
            Some(1),
            Some(&arguments),
            Some(&arguments),
            Some(&arguments),
            Some("")
        ));
        check_proxy_call!(more IDL, DeployerError, |c| c
            .set_kernel_arguments(None, None, None, None, None));
        check_proxy_call!(IDL, DeployerError, |c| c.unlock_staged());
        check_proxy_call!(IDL, DeployerError, |c| c.rollback(None));
        check_proxy_call!(IDL, DeployerError, |c| c.rollback(Some("default/3a5c.0")));
        check_proxy_call!(IDL, DeployerError, |c| c.pin(2, true));
        check_proxy_call!(more IDL, DeployerError, |c| c.cleanup(
            Some(true),
            Some(false),
            Some("default/3a5c.0")
        ));
        check_proxy_call!(more IDL, DeployerError, |c| c.cleanup(None, None, None));
        check_proxy_call!(IDL, DeployerError, |c| c.cancel());
        check_proxy_call!(IDL, DeployerError, |c| c.apply_live(None));
        check_proxy_call!(IDL, DeployerError, |c| c.apply_live(Some(true)));
    }
}
