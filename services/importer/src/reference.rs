//! The two references an import takes, checked before skopeo or ostree-ext see them: the local
//! `source` the image is read from, and the `image` reference it is recorded under.

use std::path::PathBuf;

use ostree_ext::container::{ImageReference, OstreeImageReference, SignatureSource, Transport};

/// Where an image is read from: an OCI layout or archive on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `oci:` or `oci-archive:`.
    pub transport: Transport,
    /// The layout directory or archive file.
    pub path: PathBuf,
    /// The tag (or digest) in the layout, if given.
    pub tag: Option<String>,
}

impl Source {
    /// Parses `oci:/dir[:tag]` or `oci-archive:/file.tar[:tag]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        check_text(s)?;
        let (transport, rest) = if let Some(rest) = s.strip_prefix("oci:") {
            (Transport::OciDir, rest)
        } else if let Some(rest) = s.strip_prefix("oci-archive:") {
            (Transport::OciArchive, rest)
        } else {
            return Err("the source must be on local disk: \"oci:/path[:tag]\" or \
                 \"oci-archive:/path.tar[:tag]\" (the fetcher's cacheReference)"
                .into());
        };
        // skopeo splits at the first ':', so a path cannot contain one.
        let (path, tag) = match rest.split_once(':') {
            Some((path, tag)) => (path, Some(tag)),
            None => (rest, None),
        };
        if !path.starts_with('/') {
            return Err("the source path must be absolute".into());
        }
        if tag.is_some_and(str::is_empty) {
            return Err("the source names an empty tag".into());
        }
        Ok(Self {
            transport,
            path: PathBuf::from(path),
            tag: tag.map(str::to_string),
        })
    }

    /// The reference as ostree-ext and skopeo take it; signatures are not checked on local
    /// copies (the fetcher verified every blob's digest when it stored it).
    pub fn ostree_ref(&self) -> OstreeImageReference {
        OstreeImageReference {
            sigverify: SignatureSource::ContainerPolicyAllowInsecure,
            imgref: ImageReference {
                transport: self.transport,
                name: match &self.tag {
                    Some(tag) => format!("{}:{tag}", self.path.display()),
                    None => self.path.display().to_string(),
                },
            },
        }
    }

    /// The OCI layout directory, when the source is one (its blobs can be checked directly).
    pub fn layout_dir(&self) -> Option<&std::path::Path> {
        (self.transport == Transport::OciDir).then_some(self.path.as_path())
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.ostree_ref().imgref)
    }
}

/// Parses the reference an image is recorded under: `docker://host/name:tag` (a reference
/// without transport is a registry one), `oci:/path[:tag]` or `oci-archive:/path[:tag]`.
/// Equal images always give equal references, so they can be compared.
pub fn parse_image(s: &str) -> Result<ImageReference, String> {
    check_text(s)?;
    let (transport, name) = if let Some(rest) = s.strip_prefix("docker://") {
        (Transport::Registry, rest)
    } else if let Some(rest) = s.strip_prefix("oci:") {
        (Transport::OciDir, rest)
    } else if let Some(rest) = s.strip_prefix("oci-archive:") {
        (Transport::OciArchive, rest)
    } else if s.contains("://") {
        return Err("only the docker:// transport takes \"://\"".into());
    } else if let Some((transport, _)) = s
        .split_once(':')
        .filter(|(t, _)| OTHER_TRANSPORTS.contains(t))
    {
        return Err(format!(
            "the transport {transport:?} is not supported; use docker://, oci: or oci-archive:"
        ));
    } else if let Some((transport, _)) = s.split_once(':').filter(|(t, rest)| {
        // "host:port/name" and "name:tag" are registry references; "transport:…" is not.
        let port = rest.split('/').next().unwrap_or_default();
        let is_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        !t.contains(['/', '.']) && rest.contains('/') && !is_port
    }) {
        return Err(format!(
            "the transport {transport:?} is not supported; use docker://, oci: or oci-archive:"
        ));
    } else {
        (Transport::Registry, s)
    };
    if name.is_empty() {
        return Err("the image reference names no image".into());
    }
    if name.starts_with('-') {
        return Err("an image name cannot start with '-'".into());
    }
    if transport != Transport::Registry && !name.starts_with('/') {
        return Err("an oci: or oci-archive: path must be absolute".into());
    }
    if transport == Transport::Registry {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/:@".contains(c);
        if let Some(c) = name.chars().find(|c| !allowed(*c)) {
            return Err(format!("{c:?} is not allowed in a registry reference"));
        }
    }
    Ok(ImageReference {
        transport,
        name: name.to_string(),
    })
}

/// Transports of containers-image (and ostree-ext) that look like "name:tag" registry
/// references when written without a path.
const OTHER_TRANSPORTS: &[&str] = &[
    "containers-storage",
    "dir",
    "docker-archive",
    "docker-daemon",
    "ostree",
    "registry",
    "sif",
    "tarball",
];

fn check_text(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("the reference is empty".into());
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the reference contains {c:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        // input → (path, tag, display), or None when refused
        type Expected<'a> = Option<(&'a str, Option<&'a str>, &'a str)>;
        let cases: &[(&str, Expected<'_>)] = &[
            (
                "oci:/var/lib/dnfimage/cache:host_os-0123",
                Some((
                    "/var/lib/dnfimage/cache",
                    Some("host_os-0123"),
                    "oci:/var/lib/dnfimage/cache:host_os-0123",
                )),
            ),
            ("oci:/layout", Some(("/layout", None, "oci:/layout"))),
            (
                "oci-archive:/tmp/os.tar:v1",
                Some(("/tmp/os.tar", Some("v1"), "oci-archive:/tmp/os.tar:v1")),
            ),
            ("oci:relative:tag", None),
            ("oci:/layout:", None),
            ("docker://registry/os:1", None),
            ("registry/os:1", None),
            ("containers-storage:os", None),
            ("oci:/with space:x", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = Source::parse(input);
            match want {
                None => assert!(got.is_err(), "{input} -> {got:?}"),
                Some((path, tag, display)) => {
                    let got = got.unwrap_or_else(|e| panic!("{input}: {e}"));
                    assert_eq!(got.path, PathBuf::from(path), "{input}");
                    assert_eq!(got.tag.as_deref(), *tag, "{input}");
                    assert_eq!(got.to_string(), *display, "{input}");
                }
            }
        }
        let dir = Source::parse("oci:/cache:t").unwrap();
        assert_eq!(dir.layout_dir(), Some(std::path::Path::new("/cache")));
        assert_eq!(
            Source::parse("oci-archive:/a.tar").unwrap().layout_dir(),
            None
        );
    }

    #[test]
    fn parses_and_normalizes_image_references() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "docker://127.0.0.1:5000/dnfimage/base:v1",
                Some("docker://127.0.0.1:5000/dnfimage/base:v1"),
            ),
            (
                "127.0.0.1:5000/dnfimage/base:v1",
                Some("docker://127.0.0.1:5000/dnfimage/base:v1"),
            ),
            ("quay.io/os/base:42", Some("docker://quay.io/os/base:42")),
            ("localhost/os", Some("docker://localhost/os")),
            ("os:latest", Some("docker://os:latest")),
            (
                "registry.example/os@sha256:0123",
                Some("docker://registry.example/os@sha256:0123"),
            ),
            ("oci:/srv/images:v1", Some("oci:/srv/images:v1")),
            ("oci-archive:/srv/os.tar", Some("oci-archive:/srv/os.tar")),
            ("containers-storage:localhost/os", None),
            ("containers-storage:os", None),
            ("docker-daemon:os:1", None),
            ("registry:quay.io/os:1", None),
            ("dir:/srv/os", None),
            ("http://registry/os", None),
            ("docker://", None),
            ("docker://-flag", None),
            ("oci:relative", None),
            ("registry/os:1 ", None),
            ("registry/os$:1", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = parse_image(input).map(|r| r.to_string());
            match want {
                None => assert!(got.is_err(), "{input} -> {got:?}"),
                Some(want) => assert_eq!(got.as_deref(), Ok(*want), "{input}"),
            }
        }
    }
}
