//! The origin file of a deployment: the image reference upgrades follow, in the form ostree-ext
//! and bootc write (`[origin] container-image-reference=ostree-image-signed:docker://…` when
//! upgrades check the host's signature policy, `ostree-unverified-registry:…` when that was
//! turned off), what the signature check found when the image was fetched, and the layering
//! request, both in groups of our own so that rpm-ostree never mistakes them for its own.
//!
//! ```ini
//! [origin]
//! container-image-reference=ostree-image-signed:docker://quay.io/example/os:42
//!
//! [dnfimage-signature]
//! verified=true
//! requirement=docker scope "quay.io/example": signedBy (GPGKeys, key /etc/pki/os.gpg)
//! signers=0123…4567 (OS builders <os@example.org>);
//!
//! [dnfimage-layering]
//! packages=htop;vim-enhanced;
//! inactive=
//! override-remove=nano;
//! override-replace=kernel-6.2.1-1.fc41.x86_64;
//! ```

use dnfimage_interfaces::deployer::{ImageTrust, LayeringRequest, Package};
use dnfimage_interfaces::reference::{OriginReference, Signature};
use ostree_ext::glib;
use ostree_ext::keyfileext::{KeyFileExt, map_keyfile_optional};

/// The origin group ostree-ext and bootc use.
pub const ORIGIN_GROUP: &str = "origin";
/// The key holding the image reference (`ostree_ext::container::deploy::ORIGIN_CONTAINER`).
pub const CONTAINER_KEY: &str = ostree_ext::container::deploy::ORIGIN_CONTAINER;
/// Our group for the layering request.
pub const LAYERING_GROUP: &str = "dnfimage-layering";
/// Our group for what the signature check found.
pub const SIGNATURE_GROUP: &str = "dnfimage-signature";

const VERIFIED: &str = "verified";
const REQUIREMENT: &str = "requirement";
const SIGNERS: &str = "signers";

const PACKAGES: &str = "packages";
const INACTIVE: &str = "inactive";
const OVERRIDE_REMOVE: &str = "override-remove";
const OVERRIDE_REPLACE: &str = "override-replace";

/// The image an origin records, parsed and checked as every service does.
pub use dnfimage_interfaces::reference::ImageRef;

/// `NAME-VERSION-RELEASE.ARCH` (with `EPOCH:` before the version when there is one).
pub fn nevra(p: &Package) -> String {
    format!("{}-{}.{}", p.name, p.version, p.architecture)
}

/// The reverse of [`nevra`].
pub fn parse_nevra(s: &str) -> Option<Package> {
    let (rest, arch) = s.rsplit_once('.')?;
    let (rest, release) = rest.rsplit_once('-')?;
    let (name, version) = rest.rsplit_once('-')?;
    if [name, version, release, arch].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(Package {
        name: name.to_string(),
        version: format!("{version}-{release}"),
        architecture: arch.to_string(),
    })
}

/// A keyfile string list (`a;b;`), escaped as `g_key_file_set_string_list` does (glib-rs 0.18
/// does not bind it).
fn list_value(values: &[String]) -> String {
    let mut out = String::new();
    for v in values {
        for (i, c) in v.chars().enumerate() {
            match c {
                '\\' => out.push_str("\\\\"),
                ';' => out.push_str("\\;"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                ' ' if i == 0 => out.push_str("\\s"),
                c => out.push(c),
            }
        }
        out.push(';');
    }
    out
}

/// Whether the request layers nothing.
pub fn is_empty(request: &LayeringRequest) -> bool {
    request.packages.is_empty()
        && request.inactive.is_empty()
        && request.override_remove.is_empty()
        && request.override_replace.is_empty()
}

/// A new origin recording `image`, held to the signature policy as `trust` says, and
/// `layering` (nothing for an empty request).
pub fn new_origin(
    image: &ImageRef,
    trust: &ImageTrust,
    layering: &LayeringRequest,
) -> glib::KeyFile {
    let origin = glib::KeyFile::new();
    origin.set_string(
        ORIGIN_GROUP,
        CONTAINER_KEY,
        &image.to_origin(trust.enforced),
    );
    // Whether it is enforced is the reference's scheme; the group records only what a check
    // found.
    if trust.verified || trust.requirement.is_some() {
        origin.set_boolean(SIGNATURE_GROUP, VERIFIED, trust.verified);
        if let Some(requirement) = &trust.requirement {
            origin.set_string(SIGNATURE_GROUP, REQUIREMENT, requirement);
        }
        origin.set_value(SIGNATURE_GROUP, SIGNERS, &list_value(&trust.signers));
    }
    set_layering(&origin, layering);
    origin
}

/// Replaces the layering request recorded in `origin`.
pub fn set_layering(origin: &glib::KeyFile, layering: &LayeringRequest) {
    // Only "group not found" can fail here, which is what we want gone anyway.
    let _ = origin.remove_group(LAYERING_GROUP);
    if is_empty(layering) {
        return;
    }
    let list = |key: &str, values: &[String]| {
        origin.set_value(LAYERING_GROUP, key, &list_value(values));
    };
    list(PACKAGES, &layering.packages);
    list(INACTIVE, &layering.inactive);
    list(OVERRIDE_REMOVE, &layering.override_remove);
    let replace: Vec<String> = layering.override_replace.iter().map(nevra).collect();
    list(OVERRIDE_REPLACE, &replace);
}

/// What an origin records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The image, `docker://…`; `None` when the origin names no container image.
    pub image: Option<String>,
    /// The layering request; empty when there is none.
    pub layering: LayeringRequest,
    /// How the image is held to the signature policy; `None` when there is no image.
    pub trust: Option<ImageTrust>,
}

/// Reads what `origin` records. An unreadable image reference is reported as no image, with a
/// debug log: the deployment may come from another tool.
pub fn read(origin: &glib::KeyFile) -> Result<Recorded, String> {
    let reference = origin
        .optional_string(ORIGIN_GROUP, CONTAINER_KEY)
        .map_err(|e| format!("Reading {CONTAINER_KEY}: {e}"))?
        .and_then(|v| match OriginReference::parse(&v) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!("Origin image reference {v:?} unreadable, ignoring: {e}");
                None
            }
        });
    let trust = reference
        .as_ref()
        .map(|r| read_trust(origin, &r.signature))
        .transpose()?;
    let image = reference.map(|r| r.image());
    let list = |key: &str| -> Result<Vec<String>, String> {
        map_keyfile_optional(origin.string_list(LAYERING_GROUP, key))
            .map(|v| {
                v.map(|v| v.iter().map(|s| s.to_string()).collect())
                    .unwrap_or_default()
            })
            .map_err(|e| format!("Reading {LAYERING_GROUP}.{key}: {e}"))
    };
    let override_replace = list(OVERRIDE_REPLACE)?
        .iter()
        .map(|s| parse_nevra(s).ok_or_else(|| format!("{OVERRIDE_REPLACE}: {s:?} is not N-V-R.A")))
        .collect::<Result<_, _>>()?;
    Ok(Recorded {
        image,
        trust,
        layering: LayeringRequest {
            packages: list(PACKAGES)?,
            inactive: list(INACTIVE)?,
            override_remove: list(OVERRIDE_REMOVE)?,
            override_replace,
        },
    })
}

/// How an origin with `signature` holds its image to the policy, with what our group records.
/// An `ostree-remote-registry:` origin (rpm-ostree's, signatures checked by the ostree remote)
/// counts as enforced: upgrades check the host's signature policy for it.
fn read_trust(origin: &glib::KeyFile, signature: &Signature) -> Result<ImageTrust, String> {
    let in_group = |e: glib::Error| format!("Reading {SIGNATURE_GROUP}: {e}");
    let verified = map_keyfile_optional(origin.boolean(SIGNATURE_GROUP, VERIFIED))
        .map_err(in_group)?
        .unwrap_or(false);
    let requirement = origin
        .optional_string(SIGNATURE_GROUP, REQUIREMENT)
        .map_err(|e| format!("Reading {SIGNATURE_GROUP}.{REQUIREMENT}: {e}"))?;
    let signers = map_keyfile_optional(origin.string_list(SIGNATURE_GROUP, SIGNERS))
        .map_err(in_group)?
        .map(|v| v.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    Ok(ImageTrust {
        enforced: !matches!(signature, Signature::Unverified),
        verified,
        requirement: requirement.map(|r| r.to_string()),
        signers,
    })
}

/// Parses an origin file's text.
pub fn parse(text: &str) -> Result<glib::KeyFile, String> {
    let kf = glib::KeyFile::new();
    kf.load_from_data(text, glib::KeyFileFlags::KEEP_COMMENTS)
        .map_err(|e| format!("Parsing the origin: {e}"))?;
    Ok(kf)
}

/// A copy of `origin` without the transient state libostree keeps in it (unlocked state).
pub fn copy(origin: &glib::KeyFile) -> Result<glib::KeyFile, String> {
    let copy = parse(&origin.to_data())?;
    ostree_ext::ostree::Deployment::origin_remove_transient_state(&copy);
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_origins_other_tools_write() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "[origin]\ncontainer-image-reference=ostree-unverified-registry:quay.io/os:1\n",
                Some("docker://quay.io/os:1"),
            ),
            (
                "[origin]\ncontainer-image-reference=ostree-unverified-image:docker://quay.io/os:1\n",
                Some("docker://quay.io/os:1"),
            ),
            (
                "[origin]\ncontainer-image-reference=ostree-remote-registry:fedora:quay.io/os:1\n",
                Some("docker://quay.io/os:1"),
            ),
            (
                "[origin]\ncontainer-image-reference=ostree-image-signed:oci:/srv/os\n",
                Some("oci:/srv/os"),
            ),
            (
                "[origin]\ncontainer-image-reference=ostree-remote-image:fedora:docker://quay.io/os:1\n",
                Some("docker://quay.io/os:1"),
            ),
            // bootc switch --transport containers-storage: shown as written.
            (
                "[origin]\ncontainer-image-reference=ostree-unverified-image:containers-storage:localhost/os\n",
                Some("containers-storage:localhost/os"),
            ),
            (
                "[origin]\nrefspec=fedora:fedora/x86_64/coreos/stable\n",
                None,
            ),
            (
                "[origin]\ncontainer-image-reference=nonsense\n[libostree-transient]\nunlocked=development\n",
                None,
            ),
            ("", None),
        ];
        for (text, want) in cases {
            let kf = parse(text).unwrap();
            let recorded = read(&kf).unwrap();
            assert_eq!(recorded.image.as_deref(), *want, "{text}");
            assert_eq!(recorded.layering, LayeringRequest::default(), "{text}");
            // Whatever names an image is held to the policy unless it says "unverified".
            assert_eq!(
                recorded.trust.map(|t| t.enforced),
                want.map(|_| !text.contains("ostree-unverified-")),
                "{text}"
            );
        }
    }

    #[test]
    fn the_signature_choice_and_check_round_trip() {
        let signed = ImageTrust {
            enforced: true,
            verified: true,
            requirement: Some("docker scope \"quay.io/os\": signedBy (GPGKeys, key /k.gpg)".into()),
            signers: vec!["0123456789ABCDEF0123456789ABCDEF01234567 (OS <os@example.org>)".into()],
        };
        let accepted_unsigned = ImageTrust {
            enforced: true,
            verified: false,
            requirement: Some("default: insecureAcceptAnything".into()),
            signers: Vec::new(),
        };
        let unverified = ImageTrust::default();
        let cases = [
            (
                "docker://quay.io/os:1",
                &signed,
                "ostree-image-signed:docker://quay.io/os:1",
            ),
            (
                "oci:/srv/os:1",
                &accepted_unsigned,
                "ostree-image-signed:oci:/srv/os:1",
            ),
            (
                "docker://quay.io/os:1",
                &unverified,
                "ostree-unverified-registry:quay.io/os:1",
            ),
            (
                "oci:/srv/os:1",
                &unverified,
                "ostree-unverified-image:oci:/srv/os:1",
            ),
        ];
        for (image, trust, written) in cases {
            let r = ImageRef::parse(image).unwrap();
            let text = new_origin(&r, trust, &LayeringRequest::default())
                .to_data()
                .to_string();
            assert!(
                text.contains(&format!("container-image-reference={written}\n")),
                "{text}"
            );
            let back = read(&parse(&text).unwrap()).unwrap();
            assert_eq!(back.image.as_deref(), Some(image));
            assert_eq!(back.trust.as_ref(), Some(trust), "{text}");
            // What ostree-ext (rpm-ostree, bootc) reads from it: the same image, and the same
            // choice about signatures.
            let theirs =
                ostree_ext::container::OstreeImageReference::try_from(written).expect(written);
            assert_eq!(theirs.imgref.to_string(), image, "{written}");
            assert_eq!(
                matches!(
                    theirs.sigverify,
                    ostree_ext::container::SignatureSource::ContainerPolicy
                ),
                trust.enforced,
                "{written}"
            );
        }
    }

    #[test]
    fn layering_request_round_trips_through_the_origin() {
        let requests = [
            LayeringRequest::default(),
            LayeringRequest {
                packages: vec!["htop".into(), "vim-enhanced".into()],
                inactive: vec!["bash".into()],
                override_remove: vec!["nano".into()],
                override_replace: vec![
                    Package {
                        name: "kernel-core".into(),
                        version: "6.2.1-1.fc41".into(),
                        architecture: "x86_64".into(),
                    },
                    Package {
                        name: "foo".into(),
                        version: "2:1.0-3".into(),
                        architecture: "noarch".into(),
                    },
                ],
            },
            // Whatever a caller sends survives the keyfile's list escaping.
            LayeringRequest {
                packages: vec!["semi;colon".into(), "back\\slash".into(), " lead".into()],
                inactive: vec!["tab\tnew\nline".into()],
                ..Default::default()
            },
        ];
        let image = ImageRef::parse("docker://quay.io/os:1").unwrap();
        let unverified = ImageTrust::default();
        for request in requests {
            let origin = new_origin(&image, &unverified, &request);
            let text = origin.to_data().to_string();
            assert!(
                text.contains("container-image-reference=ostree-unverified-registry:quay.io/os:1"),
                "{text}"
            );
            assert!(!text.contains(SIGNATURE_GROUP), "{text}");
            assert_eq!(text.contains(LAYERING_GROUP), !is_empty(&request), "{text}");
            let back = read(&parse(&text).unwrap()).unwrap();
            assert_eq!(back.image.as_deref(), Some("docker://quay.io/os:1"));
            assert_eq!(back.layering, request);
            // Replacing the request in a copy leaves the image alone.
            let copied = copy(&origin).unwrap();
            set_layering(&copied, &LayeringRequest::default());
            assert!(!copied.to_data().contains(LAYERING_GROUP));
        }
    }

    #[test]
    fn parses_nevras() {
        type Case<'a> = (&'a str, Option<(&'a str, &'a str, &'a str)>);
        let cases: &[Case] = &[
            ("bash-5.2.15-2.x86_64", Some(("bash", "5.2.15-2", "x86_64"))),
            (
                "kernel-core-6.2.1-1.fc41.x86_64",
                Some(("kernel-core", "6.2.1-1.fc41", "x86_64")),
            ),
            ("foo-2:1.0-3.noarch", Some(("foo", "2:1.0-3", "noarch"))),
            ("nodash.x86_64", None),
            ("a-1.x86_64", None),
            ("-1-2.x", None),
            ("a-1-2.", None),
        ];
        for (s, want) in cases {
            let got = parse_nevra(s);
            let want = want.map(|(n, v, a)| Package {
                name: n.into(),
                version: v.into(),
                architecture: a.into(),
            });
            assert_eq!(got, want, "{s}");
            if let Some(p) = got {
                assert_eq!(nevra(&p), *s);
            }
        }
    }
}
