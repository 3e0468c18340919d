//! Image references as callers give them, checked before they reach skopeo.

use std::fmt;

use sha2::{Digest, Sha256};

/// The transports the fetcher accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A registry: `docker://host/name:tag` (or a bare `host/name:tag`).
    Registry,
    /// An OCI layout directory: `oci:/path[:tag]`.
    OciDir,
    /// An OCI layout archive: `oci-archive:/path.tar[:tag]`.
    OciArchive,
}

/// A checked image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// How the image is reached.
    pub transport: Transport,
    /// Everything after the transport prefix.
    pub name: String,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.transport {
            Transport::Registry => "docker://",
            Transport::OciDir => "oci:",
            Transport::OciArchive => "oci-archive:",
        };
        write!(f, "{prefix}{}", self.name)
    }
}

impl ImageRef {
    /// Parses `s`; a reference without a transport is a registry reference.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("the image reference is empty".into());
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("the image reference contains {c:?}"));
        }
        let (transport, name) = if let Some(rest) = s.strip_prefix("docker://") {
            (Transport::Registry, rest)
        } else if let Some(rest) = s.strip_prefix("oci:") {
            (Transport::OciDir, rest)
        } else if let Some(rest) = s.strip_prefix("oci-archive:") {
            (Transport::OciArchive, rest)
        } else if let Some((transport, _)) = s.split_once(':').filter(|(t, rest)| {
            let port = rest.split('/').next().unwrap_or_default();
            let is_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            !rest.starts_with("//") && !t.contains(['/', '.']) && rest.contains('/') && !is_port
        }) {
            return Err(format!(
                "the transport {transport:?} is not supported; use docker://, oci: or oci-archive:"
            ));
        } else if s.contains("://") {
            return Err("only the docker:// transport takes \"://\"".into());
        } else {
            (Transport::Registry, s)
        };
        if name.is_empty() {
            return Err("the image reference names no image".into());
        }
        if name.starts_with('-') {
            return Err("an image name cannot start with '-'".into());
        }
        match transport {
            Transport::Registry => check_registry_name(name)?,
            Transport::OciDir | Transport::OciArchive => {
                if !name.starts_with('/') {
                    return Err("an oci: or oci-archive: path must be absolute".into());
                }
            }
        }
        Ok(Self {
            transport,
            name: name.to_string(),
        })
    }

    /// A tag naming this reference in the cache's OCI layout: readable, unique per reference.
    pub fn cache_tag(&self) -> String {
        let readable: String = self
            .name
            .trim_start_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        let hash = Sha256::digest(self.to_string().as_bytes());
        format!("{readable}-{}", &hex::encode(hash)[..12])
    }
}

/// Checks `host[:port]/path[:tag][@digest]` loosely: the registry decides the rest.
fn check_registry_name(name: &str) -> Result<(), String> {
    let (repo, digest) = match name.split_once('@') {
        Some((repo, digest)) => (repo, Some(digest)),
        None => (name, None),
    };
    if let Some(digest) = digest {
        let valid = digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(format!("{digest:?} is not a sha256 digest"));
        }
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/:".contains(c);
    if let Some(c) = repo.chars().find(|c| !allowed(*c)) {
        return Err(format!("{c:?} is not allowed in an image name"));
    }
    if repo.split('/').any(str::is_empty) {
        return Err("an image name has an empty path component".into());
    }
    if repo.chars().any(|c| c.is_ascii_uppercase()) && !repo.contains('/') {
        return Err("a repository name must be lowercase".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let ok: &[(&str, Transport, &str)] = &[
            (
                "docker://127.0.0.1:5000/dnfimage/base:v1",
                Transport::Registry,
                "127.0.0.1:5000/dnfimage/base:v1",
            ),
            (
                "quay.io/fedora/fedora-bootc:41",
                Transport::Registry,
                "quay.io/fedora/fedora-bootc:41",
            ),
            (
                "localhost:5000/os@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                Transport::Registry,
                "localhost:5000/os@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            (
                "oci:/var/tmp/layout:v2",
                Transport::OciDir,
                "/var/tmp/layout:v2",
            ),
            (
                "oci-archive:/tmp/os.tar",
                Transport::OciArchive,
                "/tmp/os.tar",
            ),
        ];
        for (input, transport, name) in ok {
            let r = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (r.transport, r.name.as_str()),
                (*transport, *name),
                "{input}"
            );
        }
        let bad = [
            "",
            "docker://",
            "docker://--src-creds=x:y/foo",
            "-v",
            "quay.io/foo bar",
            "quay.io/foo\n",
            "containers-storage:localhost/foo",
            "dir:/tmp/x",
            "http://example.com/foo",
            "oci:relative/path",
            "quay.io//foo",
            "quay.io/foo@sha256:abc",
            "quay.io/foo;rm -rf",
        ];
        for input in bad {
            assert!(ImageRef::parse(input).is_err(), "{input:?} was accepted");
        }
    }

    #[test]
    fn cache_tags_are_valid_and_distinct() {
        let a = ImageRef::parse("docker://127.0.0.1:5000/dnfimage/base:v1").unwrap();
        let b = ImageRef::parse("oci:/127.0.0.1:5000/dnfimage/base:v1").unwrap();
        let ta = a.cache_tag();
        assert!(ta.starts_with("127.0.0.1_5000_dnfimage_base_v1-"), "{ta}");
        assert_ne!(ta, b.cache_tag());
        assert!(
            ta.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        );
        assert_eq!(ta, a.cache_tag());
    }
}
