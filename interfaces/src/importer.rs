//! `org.dnfimage.Importer`: imports cached images into the sysroot's ostree repository and
//! garbage-collects that repository.

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use zlink::{ReplyError, introspect, proxy};

/// The interface name.
pub const INTERFACE: &str = "org.dnfimage.Importer";
/// The committed interface description, the contract the service must match.
pub const IDL: &str = include_str!("../org.dnfimage.Importer.varlink");

/// The phase an import is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "snake_case")]
#[zlink(rename_all = "snake_case")]
pub enum ImportPhase {
    /// Reading the manifest and configuration and finding the layers already imported.
    Preparing,
    /// Writing layers into the repository.
    Importing,
    /// Writing the merged commit and recording the image under its reference.
    Committing,
}

/// What happened to content that the installed libostree cannot keep where the image has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "snake_case")]
#[zlink(rename_all = "snake_case")]
pub enum ImportWarningKind {
    /// The content is not in the commit at all (e.g. "/opt").
    Dropped,
    /// The content is in the commit under another path (e.g. "/var" under
    /// "/usr/share/factory/var").
    Moved,
}

/// Content of an image that its commit does not hold where the image has it, because the
/// installed libostree is older than 2024.3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct ImportWarning {
    /// What happened to the content.
    pub kind: ImportWarningKind,
    /// The layer that carries it, "sha256:…", when known.
    pub layer: Option<String>,
    /// The top-level path in the image, e.g. "/opt".
    pub path: String,
    /// Where the content is in the commit, e.g. "/usr/share/factory/var"; null when dropped.
    pub moved_to: Option<String>,
    /// How many files, when known.
    pub files: Option<u64>,
    /// What happened and what it means for the deployment, for people.
    pub message: String,
}

/// A progress record streamed by `Import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct ImportProgress {
    /// The phase the import is in.
    pub phase: ImportPhase,
    /// The layer this record is about, "sha256:…", if it is about one layer.
    pub layer: Option<String>,
    /// Bytes of that layer imported so far.
    pub layer_bytes_done: Option<u64>,
    /// The size of that layer in bytes.
    pub layer_bytes_total: Option<u64>,
    /// Layers completely imported so far (layers already in the repository not counted).
    pub layers_done: u64,
    /// Layers to import in all.
    pub layers_total: u64,
    /// Bytes of layers imported so far.
    pub bytes_done: u64,
    /// Bytes of layers to import in all.
    pub bytes_total: u64,
    /// Content just found that the commit will not hold where the image has it, if any.
    pub warning: Option<ImportWarning>,
    /// What is happening, for people.
    pub message: String,
}

/// The outcome of a completed `Import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct ImportResult {
    /// The image reference the image is recorded under, "docker://…".
    pub reference: String,
    /// The manifest digest of the imported image, "sha256:…".
    pub digest: String,
    /// The image's version label, if any.
    pub version: Option<String>,
    /// The ostree commit to deploy.
    pub commit: String,
    /// How many layers this call imported.
    pub layers_imported: u64,
    /// How many layers were already in the repository.
    pub layers_skipped: u64,
    /// How many bytes of layers this call imported.
    pub bytes_imported: u64,
    /// Every piece of content the commit does not hold where the image has it.
    pub warnings: Vec<ImportWarning>,
}

/// Reply of `Import`: progress records, then one record with the result.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct ImportReply {
    /// Set on every record but the last.
    pub progress: Option<ImportProgress>,
    /// Set on the last record only.
    pub result: Option<ImportResult>,
}

/// The outcome of a completed `ImportLayers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct ImportLayersResult {
    /// How many layers this call imported.
    pub layers_imported: u64,
    /// How many layers were already in the repository.
    pub layers_skipped: u64,
    /// How many bytes of layers this call imported.
    pub bytes_imported: u64,
}

/// Reply of `ImportLayers`: progress records, then one record with the result.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct ImportLayersReply {
    /// Set on every record but the last.
    pub progress: Option<ImportProgress>,
    /// Set on the last record only.
    pub result: Option<ImportLayersResult>,
}

/// An image in the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct ImportedImage {
    /// The image reference it is recorded under, "docker://…".
    pub reference: String,
    /// The manifest digest, "sha256:…".
    pub digest: String,
    /// The version label, if any.
    pub version: Option<String>,
    /// When the image was created (RFC 3339), if its configuration says.
    pub created: Option<String>,
    /// The ostree commit to deploy.
    pub commit: String,
    /// Whether a deployment uses it (`Prune` keeps it).
    pub deployed: bool,
    /// Every piece of content its commit does not hold where the image has it.
    pub warnings: Vec<ImportWarning>,
}

/// Reply of `ListImages`.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct ListImagesReply {
    /// Every image in the repository.
    pub images: Vec<ImportedImage>,
}

/// Reply of `GetDiskUsage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::Type)]
pub struct GetDiskUsageReply {
    /// The repository directory.
    pub path: String,
    /// The bytes its files and directories take on disk (allocated blocks, as `du` counts them).
    pub bytes: u64,
    /// How many objects it holds.
    pub objects: u64,
}

/// The phase a prune is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "snake_case")]
#[zlink(rename_all = "snake_case")]
pub enum PrunePhase {
    /// Removing the references of images and layered commits no deployment uses.
    RemovingImages,
    /// Removing the layers no remaining image uses.
    RemovingLayers,
    /// Deleting the objects nothing refers to any more.
    RemovingObjects,
}

/// A progress record streamed by `Prune`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct PruneProgress {
    /// The phase the prune is in.
    pub phase: PrunePhase,
    /// What is happening, for people.
    pub message: String,
}

/// The outcome of a completed `Prune`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, introspect::CustomType)]
#[serde(rename_all = "camelCase")]
#[zlink(rename_all = "camelCase")]
pub struct PruneResult {
    /// The references of the images removed.
    pub removed_images: Vec<String>,
    /// How many layered commits were removed.
    pub removed_commits: u64,
    /// How many layers were removed.
    pub removed_layers: u64,
    /// How many objects were deleted.
    pub removed_objects: u64,
    /// How many bytes were freed.
    pub freed_bytes: u64,
}

/// Reply of `Prune`: progress records, then one record with the result.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct PruneReply {
    /// Set on every record but the last.
    pub progress: Option<PruneProgress>,
    /// Set on the last record only.
    pub result: Option<PruneResult>,
}

/// Reply of `Cancel`.
#[derive(Debug, Clone, Serialize, Deserialize, introspect::Type)]
pub struct CancelReply {
    /// What was running and is now being cancelled; null when nothing was running.
    pub cancelled: Option<String>,
}

/// Errors of `org.dnfimage.Importer`.
#[derive(Debug, Clone, PartialEq, Eq, ReplyError, introspect::ReplyError)]
#[zlink(interface = "org.dnfimage.Importer")]
pub enum ImporterError {
    /// A reference cannot be parsed, or `source` is not on local disk ("oci:", "oci-archive:").
    InvalidImageReference {
        /// The reference as given (only its start and length when it is over the length limit).
        image: String,
        /// Why it was refused.
        message: String,
    },
    /// The source has no such image (e.g. the fetcher's cache no longer holds it).
    ImageNotFound {
        /// The reference as given.
        image: String,
        /// What the source said.
        message: String,
    },
    /// The image has no bootable label ("containers.bootc=1" or "ostree.bootable").
    NotBootable {
        /// The reference as given.
        image: String,
    },
    /// A layer is truncated or does not match its digest; the image was not recorded.
    CorruptLayer {
        /// The reference as given.
        image: String,
        /// The digest of the layer, "sha256:…".
        layer: String,
        /// What was wrong with it; fetching the image again replaces it.
        message: String,
    },
    /// The repository's filesystem has not enough free space for the layers to import.
    InsufficientSpace {
        /// The directory that lacks space.
        path: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Another import or prune is running; wait for it or cancel it.
    AlreadyInProgress {
        /// What is running, e.g. "Importing docker://…".
        operation: String,
    },
    /// The operation was cancelled; no reference points to a half-imported image.
    Cancelled {
        /// What was cancelled, e.g. "Importing docker://…".
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

/// Client side of `org.dnfimage.Importer`.
#[proxy(
    interface = "org.dnfimage.Importer",
    rename_all_arguments = "camelCase"
)]
pub trait ImporterProxy {
    /// Imports a cached image into the repository, recording it under its registry reference.
    #[zlink(more)]
    async fn import(
        &mut self,
        source: &str,
        image: &str,
    ) -> zlink::Result<impl Stream<Item = zlink::Result<Result<ImportReply, ImporterError>>>>;
    /// Imports the layers of an image the fetcher is still downloading.
    #[zlink(more)]
    async fn import_layers(
        &mut self,
        layout: &str,
        manifest: &str,
    ) -> zlink::Result<impl Stream<Item = zlink::Result<Result<ImportLayersReply, ImporterError>>>>;
    /// Cancels the running import or prune.
    async fn cancel(&mut self) -> zlink::Result<Result<CancelReply, ImporterError>>;
    /// Lists the images in the repository.
    async fn list_images(&mut self) -> zlink::Result<Result<ListImagesReply, ImporterError>>;
    /// Removes what no deployment uses and `keep` does not name.
    #[zlink(more)]
    async fn prune(
        &mut self,
        keep: Option<&[String]>,
    ) -> zlink::Result<impl Stream<Item = zlink::Result<Result<PruneReply, ImporterError>>>>;
    /// The space the repository takes on disk.
    async fn get_disk_usage(&mut self) -> zlink::Result<Result<GetDiskUsageReply, ImporterError>>;
}

/// Shared by the interface tests of this crate: the description a `#[zlink::service]` generates,
/// a check that serde's field names are the IDL's, and checks of the calls the proxies write.
/// Everything runs in memory and completes on its first poll, so no async runtime is needed.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeSet;
    use std::future::Future;
    use std::os::fd::AsFd;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use serde::Serialize;
    use serde_json::Value;
    use zlink::connection::PassedCredentials;
    use zlink::connection::socket::{ReadHalf, ReadResult, Socket, WriteHalf};
    use zlink::idl::{CustomType, Interface, Type};
    use zlink::service::MethodReply;
    use zlink::test_utils::mock_socket::MockSocket;
    use zlink::{Call, Connection, Service};

    /// A socket that is never read or written: answering `GetInterfaceDescription` needs none.
    #[derive(Debug)]
    pub(crate) struct NoSocket;

    impl Socket for NoSocket {
        type ReadHalf = NoSocket;
        type WriteHalf = NoSocket;

        fn split(self) -> (NoSocket, NoSocket) {
            (NoSocket, NoSocket)
        }
    }

    impl ReadHalf for NoSocket {
        async fn read(&mut self, _buf: &mut [u8]) -> zlink::Result<ReadResult> {
            Err(zlink::Error::SocketRead)
        }
    }

    impl WriteHalf for NoSocket {
        async fn write(
            &mut self,
            _buf: &[u8],
            _fds: &[impl AsFd],
            _credentials: Option<&PassedCredentials>,
        ) -> zlink::Result<()> {
            Err(zlink::Error::SocketWrite)
        }
    }

    /// The output of `future`, which must not wait for anything.
    pub(crate) fn ready<F: Future>(future: F) -> F::Output {
        let mut future = pin!(future);
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("an in-memory call waited for something"),
        }
    }

    /// What `service` answers to `org.varlink.service.GetInterfaceDescription` for `interface`,
    /// exactly as a client on its socket would read it.
    pub(crate) fn description<S: Service<NoSocket>>(mut service: S, interface: &str) -> String {
        let text = serde_json::json!({
            "method": "org.varlink.service.GetInterfaceDescription",
            "parameters": { "interface": interface },
        })
        .to_string();
        let call: Call<S::MethodCall<'_>> =
            serde_json::from_str(&text).expect("the call is well-formed");
        let mut connection = Connection::new(NoSocket);
        let (reply, _fds) = ready(service.handle(&call, &mut connection, Vec::new()));
        let params = match reply {
            MethodReply::Single(Some(params)) => {
                serde_json::to_value(&params).expect("the reply serializes")
            }
            MethodReply::Error(e) => panic!("GetInterfaceDescription({interface}) failed: {e:?}"),
            _ => panic!("GetInterfaceDescription({interface}) answered no single reply"),
        };
        params["description"]
            .as_str()
            .unwrap_or_else(|| panic!("no description in {params}"))
            .to_string()
    }

    /// Asserts that `sample` serializes with exactly the fields, or as one of the values, that
    /// the IDL gives its type, so that serde and the introspection agree on every name.
    pub(crate) fn assert_wire_names<T: Serialize + zlink::introspect::CustomType>(sample: &T) {
        let value = serde_json::to_value(sample).expect("the sample serializes");
        match T::CUSTOM_TYPE {
            CustomType::Object(object) => {
                let idl: BTreeSet<String> = object.fields().map(|f| f.name().to_string()).collect();
                let wire: BTreeSet<String> = value
                    .as_object()
                    .unwrap_or_else(|| panic!("{} is not an object: {value}", object.name()))
                    .keys()
                    .cloned()
                    .collect();
                assert_eq!(
                    wire,
                    idl,
                    "serde and the IDL name the fields of {} differently",
                    object.name()
                );
            }
            CustomType::Enum(e) => {
                let wire = value
                    .as_str()
                    .unwrap_or_else(|| panic!("{value} is not a string"));
                assert!(
                    e.variants().any(|v| v.name() == wire),
                    "{} has no value {wire:?} in the IDL",
                    e.name()
                );
            }
        }
    }

    /// A client connection whose one reply is the `Failed` error of the interface `idl`
    /// describes, with the message "stand-in".
    pub(crate) fn failing(idl: &str) -> Connection<MockSocket> {
        let interface = Interface::try_from(idl).expect("the description parses");
        let reply = serde_json::json!({
            "error": format!("{}.Failed", interface.name()),
            "parameters": { "message": "stand-in" },
        })
        .to_string();
        Connection::new(MockSocket::with_responses(&[&reply]))
    }

    /// Asserts that the call written on `connection` is a method of the interface `idl`
    /// describes, with the 'more' flag exactly when the method supports it, and parameters that
    /// are inputs of the method, every input that is not nullable included.
    pub(crate) fn assert_call_fits(idl: &str, connection: &Connection<MockSocket>) {
        let data = connection.write().write_half().written_data();
        let end = data
            .iter()
            .position(|&b| b == 0)
            .expect("a call was written");
        let call: Value = serde_json::from_slice(&data[..end]).expect("the call is JSON");
        let interface = Interface::try_from(idl).expect("the description parses");
        let full_name = call["method"].as_str().expect("the call names a method");
        let name = full_name
            .strip_prefix(&format!("{}.", interface.name()))
            .unwrap_or_else(|| panic!("{full_name} is not in {}", interface.name()));
        let method = interface
            .methods()
            .find(|m| *m.name() == name)
            .unwrap_or_else(|| panic!("{full_name} is not in the description"));
        let streams = method
            .comments()
            .any(|c| c.text().trim() == "[Supports 'more' flag]");
        assert_eq!(call["more"] == true, streams, "'more' flag of {call}");
        let given: BTreeSet<String> = match &call["parameters"] {
            Value::Null => BTreeSet::new(),
            Value::Object(parameters) => parameters.keys().cloned().collect(),
            other => panic!("parameters of {full_name} are not an object: {other}"),
        };
        for input in given.iter() {
            assert!(
                method.inputs().any(|i| i.name().to_string() == *input),
                "{full_name} has no input {input:?}"
            );
        }
        for input in method.inputs() {
            if !matches!(input.ty(), Type::Optional(_)) {
                assert!(
                    given.contains(&input.name().to_string()),
                    "the call of {full_name} lacks its input {}",
                    input.name()
                );
            }
        }
    }

    /// Calls a proxy method on [`failing`] and checks what comes back (the `Failed` error of
    /// `$error`) and what was written ([`assert_call_fits`]). `more` before the description
    /// marks a streaming method, of which the first reply is checked.
    macro_rules! check_proxy_call {
        ($idl:expr, $error:ident, |$connection:ident| $call:expr) => {{
            use $crate::importer::testing::{assert_call_fits, failing, ready};
            let mut $connection = failing($idl);
            let reply = ready($call).expect("the reply is read");
            assert!(matches!(reply, Err($error::Failed { .. })), "{reply:?}");
            assert_call_fits($idl, &$connection);
        }};
        (more $idl:expr, $error:ident, |$connection:ident| $call:expr) => {{
            use $crate::importer::testing::{assert_call_fits, failing, ready};
            let mut $connection = failing($idl);
            {
                let replies = ready($call).expect("the call is sent");
                let mut replies = std::pin::pin!(replies);
                let reply = ready(futures_util::StreamExt::next(&mut replies))
                    .expect("there is a reply")
                    .expect("the reply is read");
                assert!(matches!(reply, Err($error::Failed { .. })), "{reply:?}");
            }
            assert_call_fits($idl, &$connection);
        }};
    }
    pub(crate) use check_proxy_call;
}

#[cfg(test)]
mod tests {
    use futures_util::stream;
    use zlink::Reply;

    use super::testing::{assert_wire_names, check_proxy_call, description};
    use super::*;
    use crate::idl::canonical;

    /// Stands in for the importer in the description test. It implements no method: each one
    /// fails. It exists so that the macro that will generate the real service's description
    /// generates one here from the same types, for comparison with the committed file.
    struct Described;

    fn unimplemented() -> ImporterError {
        ImporterError::Failed {
            message: "This stand-in implements no method".to_string(),
        }
    }

    /// Imports bootable container images from the fetcher's local OCI cache into the sysroot's
    /// ostree repository, layer by layer, and removes those no deployment uses.
    #[zlink::service(
        interface = "org.dnfimage.Importer",
        types = [
            ImportPhase, ImportWarningKind, ImportWarning, ImportProgress, ImportResult,
            ImportLayersResult, ImportedImage, PrunePhase, PruneProgress, PruneResult,
        ]
    )]
    impl Described {
        /// Imports the image at `source` (a local "oci:" or "oci-archive:" reference, normally
        /// the fetcher's `cacheReference`) into the sysroot's ostree repository, layer by layer,
        /// skipping the layers already there, and records it under `image` (the registry
        /// reference the user asked for, "docker://…", never the cache path).
        /// Warns about content the installed libostree drops or moves. Streams progress records,
        /// then one record with the result. Refuses images that are not bootable, fails before
        /// writing when the repository's filesystem lacks space, and on any failure or cancel
        /// leaves no reference to a half-imported image (complete layers are kept for the next
        /// try).
        #[zlink(more)]
        async fn import(
            &self,
            more: bool,
            source: String,
            image: String,
        ) -> impl Stream<Item = Result<Reply<ImportReply>, ImporterError>> + Unpin + use<> {
            let _ = (more, source, image);
            stream::iter([Err(unimplemented())])
        }

        /// Imports the layers of the image whose manifest `manifest` ("sha256:…", as stored) the
        /// OCI layout at `layout` holds, while the fetcher still downloads them there (the
        /// `staged` image of its progress records): each layer is read as it arrives, from
        /// `tmp/HEX.partial` and then `blobs/sha256/HEX`, checked against its digest, and kept
        /// as a layer commit, which the `Import` of the image then reuses. Records no image.
        /// Streams progress records, then one record with the result. Fails when a download stops
        /// before its layer is complete; on any failure or cancel, complete layers stay and no
        /// reference to a half-imported layer does.
        #[zlink(more)]
        async fn import_layers(
            &self,
            more: bool,
            layout: String,
            manifest: String,
        ) -> impl Stream<Item = Result<Reply<ImportLayersReply>, ImporterError>> + Unpin + use<>
        {
            let _ = (more, layout, manifest);
            stream::iter([Err(unimplemented())])
        }

        /// Cancels the running import or prune; complete layers stay in the repository.
        async fn cancel(&self) -> Result<CancelReply, ImporterError> {
            Err(unimplemented())
        }

        /// Lists the images in the repository.
        async fn list_images(&self) -> Result<ListImagesReply, ImporterError> {
            Err(unimplemented())
        }

        /// Removes every image that no deployment uses and whose reference is not in `keep`
        /// (default: none), the commits the layerer built that no deployment uses, then the
        /// layers no remaining image uses and every object nothing refers to. Streams progress
        /// records, then one record with the result.
        #[zlink(more)]
        async fn prune(
            &self,
            more: bool,
            keep: Option<Vec<String>>,
        ) -> impl Stream<Item = Result<Reply<PruneReply>, ImporterError>> + Unpin + use<> {
            let _ = (more, keep);
            stream::iter([Err(unimplemented())])
        }

        /// The space the repository takes on disk: every file and directory under it, counted
        /// as `du` does. Reads the whole repository: takes a while on a large one.
        async fn get_disk_usage(&self) -> Result<GetDiskUsageReply, ImporterError> {
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

    #[test]
    fn serde_names_are_the_idl_names() {
        let warning = ImportWarning {
            kind: ImportWarningKind::Moved,
            layer: Some("sha256:0".into()),
            path: "/var".into(),
            moved_to: Some("/usr/share/factory/var".into()),
            files: Some(3),
            message: String::new(),
        };
        assert_wire_names(&warning);
        for kind in [ImportWarningKind::Dropped, ImportWarningKind::Moved] {
            assert_wire_names(&kind);
        }
        for phase in [
            ImportPhase::Preparing,
            ImportPhase::Importing,
            ImportPhase::Committing,
        ] {
            assert_wire_names(&phase);
        }
        for phase in [
            PrunePhase::RemovingImages,
            PrunePhase::RemovingLayers,
            PrunePhase::RemovingObjects,
        ] {
            assert_wire_names(&phase);
        }
        assert_wire_names(&ImportProgress {
            phase: ImportPhase::Importing,
            layer: None,
            layer_bytes_done: None,
            layer_bytes_total: None,
            layers_done: 0,
            layers_total: 0,
            bytes_done: 0,
            bytes_total: 0,
            warning: None,
            message: String::new(),
        });
        assert_wire_names(&ImportResult {
            reference: String::new(),
            digest: String::new(),
            version: None,
            commit: String::new(),
            layers_imported: 0,
            layers_skipped: 0,
            bytes_imported: 0,
            warnings: vec![warning.clone()],
        });
        assert_wire_names(&ImportedImage {
            reference: String::new(),
            digest: String::new(),
            version: None,
            created: None,
            commit: String::new(),
            deployed: false,
            warnings: vec![],
        });
        assert_wire_names(&PruneProgress {
            phase: PrunePhase::RemovingObjects,
            message: String::new(),
        });
        assert_wire_names(&PruneResult {
            removed_images: vec![],
            removed_commits: 0,
            removed_layers: 0,
            removed_objects: 0,
            freed_bytes: 0,
        });
    }

    #[test]
    fn proxy_calls_fit_the_description() {
        let keep = vec!["docker://127.0.0.1:5000/base:v1".to_string()];
        check_proxy_call!(more IDL, ImporterError, |c| c.import("oci:/cache:x", "docker://r/i:1"));
        check_proxy_call!(IDL, ImporterError, |c| c.cancel());
        check_proxy_call!(IDL, ImporterError, |c| c.list_images());
        check_proxy_call!(more IDL, ImporterError, |c| c.prune(Some(&keep)));
        check_proxy_call!(more IDL, ImporterError, |c| c.prune(None));
        check_proxy_call!(IDL, ImporterError, |c| c.get_disk_usage());
    }
}
