//! The two references an import takes, in ostree-ext's types: the local `source` the image is
//! read from, and the `image` reference it is recorded under. Both are parsed and checked by
//! `dnfimage_interfaces::reference`, which every service shares.

use dnfimage_interfaces::reference::{ImageRef, Transport};
use ostree_ext::container::{self as ext, ImageReference, OstreeImageReference, SignatureSource};

/// `image` as ostree-ext names it; the text is the same.
pub fn to_ostree(image: &ImageRef) -> ImageReference {
    ImageReference {
        transport: match image.transport() {
            Transport::Registry => ext::Transport::Registry,
            Transport::OciDir => ext::Transport::OciDir,
            Transport::OciArchive => ext::Transport::OciArchive,
        },
        name: image.name().to_string(),
    }
}

/// The local `source` as ostree-ext and skopeo read it; signatures are not checked on local
/// copies (the fetcher verified every blob's digest when it stored it).
pub fn source_ref(source: &ImageRef) -> OstreeImageReference {
    OstreeImageReference {
        sigverify: SignatureSource::ContainerPolicyAllowInsecure,
        imgref: to_ostree(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_to_ostree_ext_with_the_same_text() {
        let cases = [
            "docker://127.0.0.1:5000/dnfimage/base:v1",
            "oci:/var/lib/dnfimage/cache:host_os-0123",
            "oci-archive:/tmp/os.tar:v1",
            "oci:/layout",
        ];
        for input in cases {
            let image = ImageRef::parse(input).unwrap();
            let ext = to_ostree(&image);
            assert_eq!(ext.to_string(), input);
            assert_eq!(ImageReference::try_from(input).as_ref().ok(), Some(&ext));
            let source = source_ref(&image);
            assert_eq!(source.imgref, ext);
            assert_eq!(
                source.sigverify,
                SignatureSource::ContainerPolicyAllowInsecure
            );
        }
    }
}
