//! Image references, parsed in one place for every service and the CLI: the distribution
//! spec's syntax for registries, containers-image's for local OCI layouts and archives, and the
//! origin forms ostree-ext, rpm-ostree and bootc write.
//!
//! Every check runs in time linear in the input, and the length comes first: an input longer
//! than [`MAX_REFERENCE_LEN`] is refused before anything else looks at it, so no caller can
//! make a service spend more than a few microseconds on a reference.
//!
//! A reference is `docker://NAME` (a reference without transport is a registry one),
//! `oci:/PATH[:TAG]` or `oci-archive:/PATH[:TAG]`; its text form ([`ImageRef`]'s `Display`)
//! is the transport followed by the name as given, which is how every service records it.

use std::borrow::Cow;
use std::fmt;
use std::net::Ipv6Addr;
use std::path::Path;
use std::str::FromStr;

/// Bytes in a registry repository name, host included (`host[:port]/path`): the limit of
/// docker/distribution and most clients.
pub const MAX_REPOSITORY_LEN: usize = 255;
/// Characters in a registry tag (distribution spec: `[\w][\w.-]{0,127}`).
pub const MAX_TAG_LEN: usize = 128;
/// The longest digest taken: `sha512:` and 128 hex digits.
pub const MAX_DIGEST_LEN: usize = "sha512:".len() + 128;
/// A registry reference after `docker://`: repository, tag and digest, each at its limit.
pub const MAX_REGISTRY_LEN: usize = MAX_REPOSITORY_LEN + 1 + MAX_TAG_LEN + 1 + MAX_DIGEST_LEN;
/// Linux's `PATH_MAX`; it counts the terminating NUL, so a path has at most 4095 bytes.
pub const PATH_MAX: usize = 4096;
/// Bytes in the tag of an OCI layout (its `org.opencontainers.image.ref.name`): room for a full
/// registry reference, which is what tools often record there.
pub const MAX_LAYOUT_TAG_LEN: usize = MAX_REGISTRY_LEN;
/// The longest reference any transport takes: an `oci-archive:` path of `PATH_MAX - 1` bytes
/// and a layout tag at its limit. Anything longer is refused before it is looked at.
pub const MAX_REFERENCE_LEN: usize = "oci-archive:".len() + (PATH_MAX - 1) + 1 + MAX_LAYOUT_TAG_LEN;
/// The longest origin value read: the longest scheme naming a remote, the remote's name (a file
/// name in `remotes.d`, so at most `NAME_MAX`), and a reference.
pub const MAX_ORIGIN_LEN: usize = "ostree-remote-registry:".len() + 255 + 1 + MAX_REFERENCE_LEN;

/// Transports of containers-image and ostree-ext that we do not take, named so that
/// `containers-storage:os` reads as an unsupported transport rather than a bad tag.
const OTHER_TRANSPORTS: &[&str] = &[
    "containers-storage",
    "dir",
    "docker",
    "docker-archive",
    "docker-daemon",
    "ostree",
    "registry",
    "sif",
    "tarball",
];

/// How an image is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A registry: `docker://host/name:tag` (or a bare `host/name:tag`).
    Registry,
    /// An OCI layout directory: `oci:/path[:tag]`.
    OciDir,
    /// An OCI layout archive: `oci-archive:/path.tar[:tag]`.
    OciArchive,
}

impl Transport {
    /// The prefix naming the transport in a reference.
    pub fn prefix(self) -> &'static str {
        match self {
            Transport::Registry => "docker://",
            Transport::OciDir => "oci:",
            Transport::OciArchive => "oci-archive:",
        }
    }
}

/// The part of a reference a length limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The whole reference.
    Reference,
    /// A registry reference after `docker://`.
    Registry,
    /// A registry repository name, host included.
    Repository,
    /// A registry tag.
    Tag,
    /// The path of an `oci:` or `oci-archive:` reference.
    Path,
    /// The tag of an `oci:` or `oci-archive:` reference.
    LayoutTag,
    /// The image reference of an origin.
    Origin,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Reference => "the image reference",
            Part::Registry => "the registry reference",
            Part::Repository => "the repository name (host and path)",
            Part::Tag => "the tag",
            Part::Path => "the path",
            Part::LayoutTag => "the tag in the OCI layout",
            Part::Origin => "the origin's image reference",
        })
    }
}

/// Why a reference was refused; each service maps it to its own typed error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Nothing was given.
    #[error("the image reference is empty")]
    Empty,
    /// A part is longer than its limit.
    #[error("{part} is {length} bytes long, more than the {limit} allowed")]
    TooLong {
        /// Which part.
        part: Part,
        /// Its length in bytes.
        length: usize,
        /// The most it may have.
        limit: usize,
    },
    /// Whitespace or a control character.
    #[error(
        "the image reference contains {character:?}; whitespace and control characters are not \
         allowed"
    )]
    ForbiddenCharacter { character: char },
    /// A transport other than `docker://`, `oci:` and `oci-archive:`.
    #[error("the transport {transport:?} is not supported; use docker://, oci: or oci-archive:")]
    UnsupportedTransport { transport: String },
    /// A transport with nothing after it.
    #[error("the image reference names no image")]
    NoImage,
    /// A name that a program would take for an option.
    #[error("an image name cannot start with '-'")]
    LeadingDash,
    /// A relative `oci:` or `oci-archive:` path.
    #[error("the path of an oci: or oci-archive: reference must be absolute")]
    RelativePath,
    /// A registry reference where a local one is needed.
    #[error("the image must be on local disk: oci:/PATH[:TAG] or oci-archive:/PATH[:TAG]")]
    NotLocal,
    /// `a//b`, a leading or a trailing `/`.
    #[error("the repository name has an empty path component")]
    EmptyComponent,
    /// A repository path component outside the distribution spec's syntax.
    #[error(
        "{component:?} is not a valid repository path component: lowercase letters and digits, \
         separated by '.', '_', '__' or dashes"
    )]
    InvalidComponent { component: String },
    /// A registry host that is neither a lowercase DNS name, an IPv4 address nor `[IPv6]`.
    #[error(
        "{host:?} is not a valid registry host: a lowercase DNS name, an IPv4 address or a \
         bracketed IPv6 address"
    )]
    InvalidHost { host: String },
    /// A registry port that is not a number from 1 to 65535.
    #[error("{port:?} is not a port number from 1 to 65535")]
    InvalidPort { port: String },
    /// A `:` with nothing after it.
    #[error("the tag after ':' is empty")]
    EmptyTag,
    /// A registry tag outside the distribution spec's syntax.
    #[error(
        "{tag:?} is not a valid tag: letters, digits, '_', '.' and '-', not starting with '.' \
         or '-'"
    )]
    InvalidTag { tag: String },
    /// An OCI layout tag that skopeo would refuse.
    #[error(
        "{tag:?} is not a valid tag in an OCI layout: letters and digits separated by one of \
         '-', '.', '_', ':', '@', '+' or \"--\", in '/'-separated parts"
    )]
    InvalidLayoutTag { tag: String },
    /// A digest that is not sha256 or sha512 in lowercase hex.
    #[error(
        "{digest:?} is not a valid digest: \"sha256:\" and 64, or \"sha512:\" and 128, \
         lowercase hex digits"
    )]
    InvalidDigest { digest: String },
    /// An origin value without one of ostree-ext's schemes.
    #[error(
        "{scheme:?} is not an ostree image reference scheme (ostree-unverified-registry:, \
         ostree-unverified-image:, ostree-image-signed:, ostree-remote-registry: or \
         ostree-remote-image:)"
    )]
    OriginScheme { scheme: String },
    /// `ostree-remote-…:` without the remote.
    #[error("the origin names no ostree remote (ostree-remote-registry:REMOTE:IMAGE)")]
    OriginRemote,
    /// An origin image without `TRANSPORT:`.
    #[error("the origin's image {image:?} names no transport (TRANSPORT:NAME)")]
    OriginTransport { image: String },
    /// `docker:NAME` in an origin.
    #[error("the docker transport is written docker://NAME")]
    DockerWithoutSlashes,
}

/// A checked image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    transport: Transport,
    /// Everything after the transport prefix.
    name: String,
    /// Where its parts are in `name`.
    parts: Parts,
}

/// Byte offsets into an [`ImageRef`]'s name, found while parsing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Parts {
    /// The end of the repository (registry) or of the path (layouts).
    base_end: usize,
    /// The end of the host and port, when a registry reference names them.
    domain_end: Option<usize>,
    /// Where the tag starts (after its ':').
    tag_start: Option<usize>,
    /// Where the digest starts (after its '@').
    digest_start: Option<usize>,
}

impl ImageRef {
    /// Parses `s`; a reference without a transport is a registry reference.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        check_text(s)?;
        let (transport, name) = split_transport(s)?;
        if name.is_empty() {
            return Err(ReferenceError::NoImage);
        }
        if name.starts_with('-') {
            return Err(ReferenceError::LeadingDash);
        }
        let parts = match transport {
            Transport::Registry => parse_registry(name)?,
            Transport::OciDir | Transport::OciArchive => parse_layout(name)?,
        };
        Ok(Self {
            transport,
            name: name.to_string(),
            parts,
        })
    }

    /// Parses a reference that must name an image on local disk: `oci:/PATH[:TAG]` or
    /// `oci-archive:/PATH[:TAG]`.
    pub fn parse_local(s: &str) -> Result<Self, ReferenceError> {
        check_length(Part::Reference, s.len(), MAX_REFERENCE_LEN)?;
        let local = [Transport::OciDir, Transport::OciArchive]
            .iter()
            .any(|t| s.starts_with(t.prefix()));
        if !local && !s.is_empty() {
            return Err(ReferenceError::NotLocal);
        }
        Self::parse(s)
    }

    /// How the image is reached.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Everything after the transport prefix, as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The repository of a registry reference: `[host[:port]/]path`, without tag or digest.
    pub fn repository(&self) -> Option<&str> {
        (self.transport == Transport::Registry).then(|| &self.name[..self.parts.base_end])
    }

    /// The host (and port) a registry reference names, if it names one.
    pub fn domain(&self) -> Option<&str> {
        self.parts.domain_end.map(|end| &self.name[..end])
    }

    /// The path of an `oci:` or `oci-archive:` reference.
    pub fn path(&self) -> Option<&Path> {
        (self.transport != Transport::Registry)
            .then(|| Path::new(&self.name[..self.parts.base_end]))
    }

    /// The OCI layout directory of an `oci:` reference (its blobs can be read directly).
    pub fn layout_dir(&self) -> Option<&Path> {
        self.path().filter(|_| self.transport == Transport::OciDir)
    }

    /// The tag, if one is given.
    pub fn tag(&self) -> Option<&str> {
        let start = self.parts.tag_start?;
        let end = self
            .parts
            .digest_start
            .map_or(self.name.len(), |digest| digest - 1);
        Some(&self.name[start..end])
    }

    /// The digest of a registry reference (`sha256:…`), if one is given.
    pub fn digest(&self) -> Option<&str> {
        self.parts.digest_start.map(|start| &self.name[start..])
    }

    /// The value of an origin's `container-image-reference`, as ostree-ext and bootc write it:
    /// for an image held to the host's signature policy (`verified`)
    /// `ostree-image-signed:docker://quay.io/os:1`, `ostree-image-signed:oci:/srv/os:1`; for one
    /// whose signature is not checked `ostree-unverified-registry:quay.io/os:1`,
    /// `ostree-unverified-image:oci:/srv/os:1`.
    pub fn to_origin(&self, verified: bool) -> String {
        match (verified, self.transport) {
            (true, _) => format!("ostree-image-signed:{self}"),
            (false, Transport::Registry) => format!("ostree-unverified-registry:{}", self.name),
            (false, Transport::OciDir | Transport::OciArchive) => {
                format!("ostree-unverified-image:{self}")
            }
        }
    }
}

impl fmt::Display for ImageRef {
    /// `docker://NAME`, `oci:PATH[:TAG]`, `oci-archive:PATH[:TAG]` (ostree-ext's form too).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.transport.prefix(), self.name)
    }
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// `input` as an error reply may echo it: whole when it is within [`MAX_REFERENCE_LEN`], else
/// its start and its length, so that refusing a huge reference does not send it back.
pub fn excerpt(input: &str) -> Cow<'_, str> {
    const SHOWN: usize = 64;
    if input.len() <= MAX_REFERENCE_LEN {
        return Cow::Borrowed(input);
    }
    let mut end = SHOWN;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &input[..end], input.len()))
}

fn check_length(part: Part, length: usize, limit: usize) -> Result<(), ReferenceError> {
    if length > limit {
        return Err(ReferenceError::TooLong {
            part,
            length,
            limit,
        });
    }
    Ok(())
}

/// The checks on the whole text, the length first.
fn check_text(s: &str) -> Result<(), ReferenceError> {
    check_length(Part::Reference, s.len(), MAX_REFERENCE_LEN)?;
    if s.is_empty() {
        return Err(ReferenceError::Empty);
    }
    if let Some(character) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(ReferenceError::ForbiddenCharacter { character });
    }
    Ok(())
}

/// Splits off the transport, refusing the ones we do not take.
fn split_transport(s: &str) -> Result<(Transport, &str), ReferenceError> {
    for transport in [
        Transport::Registry,
        Transport::OciDir,
        Transport::OciArchive,
    ] {
        if let Some(name) = s.strip_prefix(transport.prefix()) {
            return Ok((transport, name));
        }
    }
    if let Some((scheme, _)) = s.split_once("://").filter(|(scheme, _)| is_scheme(scheme)) {
        return Err(ReferenceError::UnsupportedTransport {
            transport: format!("{scheme}://"),
        });
    }
    if let Some((prefix, rest)) = s.split_once(':') {
        // "host:port/name" and "name:tag" are registry references; "transport:…" is not.
        let transport_like = prefix != "localhost"
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let known = OTHER_TRANSPORTS.contains(&prefix) || prefix.starts_with("ostree-");
        let port = rest.split('/').next().unwrap_or_default();
        let is_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        if transport_like && !is_port && (known || rest.contains('/')) {
            return Err(ReferenceError::UnsupportedTransport {
                transport: format!("{prefix}:"),
            });
        }
    }
    Ok((Transport::Registry, s))
}

/// A URL scheme: a letter, then letters, digits, '+', '.' or '-'.
fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
}

/// `[host[:port]/]path[:tag][@digest]`, by the distribution spec, with a lowercase host.
fn parse_registry(name: &str) -> Result<Parts, ReferenceError> {
    check_length(Part::Registry, name.len(), MAX_REGISTRY_LEN)?;
    let (rest, digest_start) = match name.find('@') {
        Some(at) => (&name[..at], Some(at + 1)),
        None => (name, None),
    };
    if let Some(start) = digest_start {
        check_digest(&name[start..])?;
    }
    // The tag follows the first ':' after the last '/' (a ':' before it is the port's).
    let last_component = rest.rfind('/').map_or(0, |slash| slash + 1);
    let tag_start = rest[last_component..]
        .find(':')
        .map(|colon| last_component + colon + 1);
    let base_end = tag_start.map_or(rest.len(), |start| start - 1);
    if let Some(start) = tag_start {
        check_tag(&rest[start..])?;
    }
    let repository = &rest[..base_end];
    if repository.is_empty() {
        return Err(ReferenceError::NoImage);
    }
    check_length(Part::Repository, repository.len(), MAX_REPOSITORY_LEN)?;
    let domain = repository.split_once('/').and_then(|(first, _)| {
        (first.contains(['.', ':']) || first.starts_with('[') || first == "localhost")
            .then_some(first)
    });
    let path = match domain {
        Some(domain) => {
            check_domain(domain)?;
            &repository[domain.len() + 1..]
        }
        None => repository,
    };
    for component in path.split('/') {
        check_path_component(component)?;
    }
    Ok(Parts {
        base_end,
        domain_end: domain.map(str::len),
        tag_start,
        digest_start,
    })
}

/// `host[:port]`: a lowercase DNS name or IPv4 address, or `[IPv6]`.
fn check_domain(domain: &str) -> Result<(), ReferenceError> {
    let invalid = || ReferenceError::InvalidHost {
        host: domain.to_string(),
    };
    let port = if let Some(inner) = domain.strip_prefix('[') {
        let (address, after) = inner.split_once(']').ok_or_else(invalid)?;
        let lowercase = address
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b":.".contains(&b));
        if !lowercase || address.parse::<Ipv6Addr>().is_err() {
            return Err(invalid());
        }
        match after {
            "" => None,
            after => Some(after.strip_prefix(':').ok_or_else(invalid)?),
        }
    } else {
        let (host, port) = match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        };
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !host.split('.').all(label_ok) {
            return Err(invalid());
        }
        port
    };
    if let Some(port) = port {
        let valid = (1..=5).contains(&port.len())
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !valid {
            return Err(ReferenceError::InvalidPort {
                port: port.to_string(),
            });
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*`.
fn check_path_component(component: &str) -> Result<(), ReferenceError> {
    if component.is_empty() {
        return Err(ReferenceError::EmptyComponent);
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let separator =
        |run: &[u8]| matches!(run, b"." | b"_" | b"__") || run.iter().all(|&b| b == b'-');
    if !separated(component.as_bytes(), alnum, separator) {
        return Err(ReferenceError::InvalidComponent {
            component: component.to_string(),
        });
    }
    Ok(())
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), ReferenceError> {
    if tag.is_empty() {
        return Err(ReferenceError::EmptyTag);
    }
    check_length(Part::Tag, tag.len(), MAX_TAG_LEN)?;
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut bytes = tag.bytes();
    let valid = bytes.next().is_some_and(word) && bytes.all(|b| word(b) || b == b'.' || b == b'-');
    if !valid {
        return Err(ReferenceError::InvalidTag {
            tag: tag.to_string(),
        });
    }
    Ok(())
}

/// `sha256:` and 64, or `sha512:` and 128, lowercase hex digits.
fn check_digest(digest: &str) -> Result<(), ReferenceError> {
    let hex_len = match digest.split_once(':') {
        Some(("sha256", hex)) => Some((hex, 64)),
        Some(("sha512", hex)) => Some((hex, 128)),
        _ => None,
    };
    let valid = hex_len.is_some_and(|(hex, len)| {
        hex.len() == len
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !valid {
        return Err(ReferenceError::InvalidDigest {
            digest: digest.to_string(),
        });
    }
    Ok(())
}

/// `/PATH[:TAG]`: skopeo splits at the first ':', so the path cannot contain one.
fn parse_layout(name: &str) -> Result<Parts, ReferenceError> {
    let (path, tag_start) = match name.find(':') {
        Some(colon) => (&name[..colon], Some(colon + 1)),
        None => (name, None),
    };
    if !path.starts_with('/') {
        return Err(ReferenceError::RelativePath);
    }
    check_length(Part::Path, path.len(), PATH_MAX - 1)?;
    if let Some(start) = tag_start {
        check_layout_tag(&name[start..])?;
    }
    Ok(Parts {
        base_end: path.len(),
        domain_end: None,
        tag_start,
        digest_start: None,
    })
}

/// containers-image's rule for the image named in a layout (from the image spec's
/// `org.opencontainers.image.ref.name`): `component(/component)*`, a component being
/// `[A-Za-z0-9]+((?:[-._:@+]|--)[A-Za-z0-9]+)*`.
fn check_layout_tag(tag: &str) -> Result<(), ReferenceError> {
    if tag.is_empty() {
        return Err(ReferenceError::EmptyTag);
    }
    check_length(Part::LayoutTag, tag.len(), MAX_LAYOUT_TAG_LEN)?;
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let separator =
        |run: &[u8]| matches!(run, b"--") || (run.len() == 1 && b"-._:@+".contains(&run[0]));
    if !tag
        .split('/')
        .all(|c| separated(c.as_bytes(), alnum, separator))
    {
        return Err(ReferenceError::InvalidLayoutTag {
            tag: tag.to_string(),
        });
    }
    Ok(())
}

/// Whether `s` is runs of `alnum` bytes separated by runs of other bytes that `separator`
/// accepts, starting and ending with an `alnum` run. One pass.
fn separated(s: &[u8], alnum: impl Fn(u8) -> bool, separator: impl Fn(&[u8]) -> bool) -> bool {
    let mut i = 0;
    loop {
        let start = i;
        while i < s.len() && alnum(s[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == s.len() {
            return true;
        }
        let start = i;
        while i < s.len() && !alnum(s[i]) {
            i += 1;
        }
        if !separator(&s[start..i]) {
            return false;
        }
    }
}

/// How the signature of an image an origin names is checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Signature {
    /// By the ostree remote of that name.
    OstreeRemote(String),
    /// By `containers-policy.json`.
    ContainerPolicy,
    /// Not at all (`ostree-unverified-…`).
    Unverified,
}

/// The transports an origin may name: ostree-ext's, which are more than we take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OriginTransport {
    /// `docker://` or `registry:`.
    Registry,
    /// `oci:`.
    OciDir,
    /// `oci-archive:`.
    OciArchive,
    /// `docker-archive:`.
    DockerArchive,
    /// `containers-storage:`.
    ContainerStorage,
    /// `dir:`.
    Dir,
}

impl OriginTransport {
    /// The transport as an image reference names it (ostree-ext's display form).
    pub fn prefix(self) -> &'static str {
        match self {
            OriginTransport::Registry => "docker://",
            OriginTransport::OciDir => "oci:",
            OriginTransport::OciArchive => "oci-archive:",
            OriginTransport::DockerArchive => "docker-archive:",
            OriginTransport::ContainerStorage => "containers-storage:",
            OriginTransport::Dir => "dir:",
        }
    }
}

/// The image an origin's `container-image-reference` names, read as ostree-ext reads it
/// (`ostree-unverified-registry:IMAGE`, `ostree-unverified-image:TRANSPORT:IMAGE`,
/// `ostree-image-signed:TRANSPORT:IMAGE`, `ostree-remote-registry:REMOTE:IMAGE`,
/// `ostree-remote-image:REMOTE:TRANSPORT:IMAGE`). Names are not checked further: refusing what
/// rpm-ostree or bootc wrote would hide which image a deployment follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OriginReference {
    /// How the signature is checked.
    pub signature: Signature,
    /// How the image is reached.
    pub transport: OriginTransport,
    /// The image name after the transport.
    pub name: String,
}

impl OriginReference {
    /// Parses the value of `container-image-reference`. Unlike ostree-ext, an empty name after
    /// `docker://` is refused.
    pub fn parse(value: &str) -> Result<Self, ReferenceError> {
        check_length(Part::Origin, value.len(), MAX_ORIGIN_LEN)?;
        let (scheme, rest) = value
            .split_once(':')
            .ok_or_else(|| ReferenceError::OriginScheme {
                scheme: value.to_string(),
            })?;
        let remote = |rest: &str| -> Result<(Signature, String), ReferenceError> {
            let (remote, image) = rest.split_once(':').ok_or(ReferenceError::OriginRemote)?;
            Ok((
                Signature::OstreeRemote(remote.to_string()),
                image.to_string(),
            ))
        };
        // The registry shorthands name the image without its transport.
        let (signature, registry, image) = match scheme {
            "ostree-image-signed" => (Signature::ContainerPolicy, false, rest.to_string()),
            "ostree-unverified-image" => (Signature::Unverified, false, rest.to_string()),
            "ostree-unverified-registry" => (Signature::Unverified, true, rest.to_string()),
            "ostree-remote-registry" => {
                let (signature, image) = remote(rest)?;
                (signature, true, image)
            }
            "ostree-remote-image" => {
                let (signature, image) = remote(rest)?;
                (signature, false, image)
            }
            scheme => {
                return Err(ReferenceError::OriginScheme {
                    scheme: scheme.to_string(),
                });
            }
        };
        let (transport, name) = if registry {
            (OriginTransport::Registry, image.as_str())
        } else {
            let (transport, name) =
                image
                    .split_once(':')
                    .ok_or_else(|| ReferenceError::OriginTransport {
                        image: image.clone(),
                    })?;
            let transport_of = match transport {
                "registry" | "docker" => OriginTransport::Registry,
                "oci" => OriginTransport::OciDir,
                "oci-archive" => OriginTransport::OciArchive,
                "docker-archive" => OriginTransport::DockerArchive,
                "containers-storage" => OriginTransport::ContainerStorage,
                "dir" => OriginTransport::Dir,
                other => {
                    return Err(ReferenceError::UnsupportedTransport {
                        transport: format!("{other}:"),
                    });
                }
            };
            let name = if transport == "docker" && !name.is_empty() {
                name.strip_prefix("//")
                    .ok_or(ReferenceError::DockerWithoutSlashes)?
            } else {
                name
            };
            (transport_of, name)
        };
        if name.is_empty() {
            return Err(ReferenceError::NoImage);
        }
        Ok(Self {
            signature,
            transport,
            name: name.to_string(),
        })
    }

    /// The image as the services name it: `docker://quay.io/os:1`, `oci:/srv/os`, …
    pub fn image(&self) -> String {
        format!("{}{}", self.transport.prefix(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ReferenceError as E;

    const SHA256: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Input, transport, display, repository or path, domain, tag, digest.
    type Valid<'a> = (
        &'a str,
        Transport,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
    );

    /// An origin value and what is read from it.
    type Read<'a> = (&'a str, Result<(Signature, OriginTransport, &'a str), E>);

    fn sha512() -> String {
        format!("sha512:{}", "0123456789abcdef".repeat(8))
    }

    /// What a valid reference parses to.
    #[derive(Debug, PartialEq, Eq)]
    struct Parsed<'a> {
        transport: Transport,
        /// The repository, or the path.
        base: &'a str,
        domain: Option<&'a str>,
        tag: Option<&'a str>,
        digest: Option<&'a str>,
    }

    fn parsed(r: &ImageRef) -> Parsed<'_> {
        Parsed {
            transport: r.transport(),
            base: r
                .repository()
                .or_else(|| r.path().and_then(Path::to_str))
                .expect("a reference has a repository or a path"),
            domain: r.domain(),
            tag: r.tag(),
            digest: r.digest(),
        }
    }

    #[test]
    fn parses_valid_references() {
        use Transport::*;
        let digested = format!("localhost:5000/os@{SHA256}");
        let docker_digested = format!("docker://{digested}");
        let tagged_digest = format!("quay.io/os:1@{}", sha512());
        let docker_tagged_digest = format!("docker://{tagged_digest}");
        let sha512 = sha512();
        #[rustfmt::skip]
        let cases: &[Valid] = &[
            ("docker://127.0.0.1:5000/dnfimage/base:v1", Registry,
             "docker://127.0.0.1:5000/dnfimage/base:v1", "127.0.0.1:5000/dnfimage/base",
             Some("127.0.0.1:5000"), Some("v1"), None),
            ("127.0.0.1:5000/dnfimage/base:v1", Registry,
             "docker://127.0.0.1:5000/dnfimage/base:v1", "127.0.0.1:5000/dnfimage/base",
             Some("127.0.0.1:5000"), Some("v1"), None),
            ("quay.io/fedora/fedora-bootc:41", Registry, "docker://quay.io/fedora/fedora-bootc:41",
             "quay.io/fedora/fedora-bootc", Some("quay.io"), Some("41"), None),
            ("localhost/os", Registry, "docker://localhost/os", "localhost/os",
             Some("localhost"), None, None),
            ("os:latest", Registry, "docker://os:latest", "os", None, Some("latest"), None),
            ("os", Registry, "docker://os", "os", None, None, None),
            ("library/os", Registry, "docker://library/os", "library/os", None, None, None),
            ("localhost:5000", Registry, "docker://localhost:5000", "localhost", None,
             Some("5000"), None),
            (&digested, Registry, &docker_digested, "localhost:5000/os",
             Some("localhost:5000"), None, Some(SHA256)),
            (&tagged_digest, Registry, &docker_tagged_digest, "quay.io/os", Some("quay.io"),
             Some("1"), Some(&sha512)),
            ("[::1]:5000/os:_A.b-c", Registry, "docker://[::1]:5000/os:_A.b-c", "[::1]:5000/os",
             Some("[::1]:5000"), Some("_A.b-c"), None),
            ("[fe80::1]/os", Registry, "docker://[fe80::1]/os", "[fe80::1]/os",
             Some("[fe80::1]"), None, None),
            ("my-registry.example:65535/a.b/c_d/e__f/g---h:1", Registry,
             "docker://my-registry.example:65535/a.b/c_d/e__f/g---h:1",
             "my-registry.example:65535/a.b/c_d/e__f/g---h", Some("my-registry.example:65535"),
             Some("1"), None),
            ("oci:/var/tmp/layout:v2", OciDir, "oci:/var/tmp/layout:v2", "/var/tmp/layout", None,
             Some("v2"), None),
            ("oci:/layout", OciDir, "oci:/layout", "/layout", None, None, None),
            ("oci:/var/lib/dnfimage/cache:host_os-0123", OciDir,
             "oci:/var/lib/dnfimage/cache:host_os-0123", "/var/lib/dnfimage/cache", None,
             Some("host_os-0123"), None),
            // skopeo splits at the first ':'; the tag may be a whole registry reference.
            ("oci:/127.0.0.1:5000/dnfimage/base:v1", OciDir,
             "oci:/127.0.0.1:5000/dnfimage/base:v1", "/127.0.0.1", None,
             Some("5000/dnfimage/base:v1"), None),
            ("oci:/srv/Ünïcode/é:A--b+c@d", OciDir, "oci:/srv/Ünïcode/é:A--b+c@d",
             "/srv/Ünïcode/é", None, Some("A--b+c@d"), None),
            ("oci-archive:/tmp/os.tar", OciArchive, "oci-archive:/tmp/os.tar", "/tmp/os.tar",
             None, None, None),
            ("oci-archive:/tmp/os.tar:v1", OciArchive, "oci-archive:/tmp/os.tar:v1",
             "/tmp/os.tar", None, Some("v1"), None),
        ];
        for (input, transport, display, base, domain, tag, digest) in cases {
            let r = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            let want = Parsed {
                transport: *transport,
                base,
                domain: *domain,
                tag: *tag,
                digest: *digest,
            };
            assert_eq!(parsed(&r), want, "{input}");
            assert_eq!(r.to_string(), *display, "{input}");
            assert_eq!(input.parse::<ImageRef>().as_ref(), Ok(&r), "{input}");
            check_invariants(&r);
        }
    }

    #[test]
    fn refuses_invalid_references() {
        let unsupported = |t: &str| E::UnsupportedTransport {
            transport: t.into(),
        };
        let component = |c: &str| E::InvalidComponent {
            component: c.into(),
        };
        let host = |h: &str| E::InvalidHost { host: h.into() };
        let port = |p: &str| E::InvalidPort { port: p.into() };
        let tag = |t: &str| E::InvalidTag { tag: t.into() };
        let layout_tag = |t: &str| E::InvalidLayoutTag { tag: t.into() };
        let digest = |d: &str| E::InvalidDigest { digest: d.into() };
        let forbidden = |c: char| E::ForbiddenCharacter { character: c };
        let short_sha256 = &SHA256[..SHA256.len() - 1];
        let upper_sha256 = SHA256.replace('a', "A");
        let cases: Vec<(String, E)> = [
            ("", E::Empty),
            ("docker://", E::NoImage),
            ("oci:", E::NoImage),
            ("oci-archive:", E::NoImage),
            ("-v", E::LeadingDash),
            ("docker://-v", E::LeadingDash),
            ("docker://--src-creds=x:y/foo", E::LeadingDash),
            ("quay.io/foo bar", forbidden(' ')),
            ("quay.io/foo\n", forbidden('\n')),
            ("quay.io/foo;rm -rf", forbidden(' ')),
            ("oci:/a\0b", forbidden('\0')),
            ("oci:/srv/a b:x", forbidden(' ')),
            ("oci:/a\u{7f}", forbidden('\u{7f}')),
            ("oci:/a\u{2028}", forbidden('\u{2028}')),
            (
                "containers-storage:localhost/foo",
                unsupported("containers-storage:"),
            ),
            ("containers-storage:os", unsupported("containers-storage:")),
            ("docker-daemon:os:1", unsupported("docker-daemon:")),
            ("registry:quay.io/os:1", unsupported("registry:")),
            ("dir:/tmp/x", unsupported("dir:")),
            ("docker:quay.io/x", unsupported("docker:")),
            (
                "ostree-unverified-registry:quay.io/x",
                unsupported("ostree-unverified-registry:"),
            ),
            ("something:quay.io/x", unsupported("something:")),
            ("http://example.com/foo", unsupported("http://")),
            ("oci:relative/path", E::RelativePath),
            ("oci-archive:os.tar:1", E::RelativePath),
            ("oci:/layout:", E::EmptyTag),
            ("oci:/layout:a__b", layout_tag("a__b")),
            ("oci:/layout:a_-b", layout_tag("a_-b")),
            ("oci:/layout:a--", layout_tag("a--")),
            ("oci:/layout:a---b", layout_tag("a---b")),
            ("oci:/layout:a//b", layout_tag("a//b")),
            ("oci:/layout:é", layout_tag("é")),
            ("quay.io//foo", E::EmptyComponent),
            ("docker:///abs", E::EmptyComponent),
            ("quay.io/foo/", E::EmptyComponent),
            ("docker://x/y:", E::EmptyTag),
            ("docker://:tag", E::NoImage),
            ("quay.io/Foo", component("Foo")),
            ("UPPER/x", component("UPPER")),
            ("quay.io/a..b", component("a..b")),
            ("quay.io/a___b", component("a___b")),
            ("quay.io/a_", component("a_")),
            ("quay.io/.a", component(".a")),
            ("quay.io/a+b", component("a+b")),
            ("registry/os$:1", component("os$")),
            ("quay.io/é", component("é")),
            ("Quay.io/x", host("Quay.io")),
            ("quay..io/x", host("quay..io")),
            ("-quay.io/x", E::LeadingDash),
            ("quay-.io/x", host("quay-.io")),
            ("quay_io.x/x", host("quay_io.x")),
            ("[::1/x", host("[::1")),
            ("[::G]/x", host("[::G]")),
            ("[FE80::1]/x", host("[FE80::1]")),
            ("[::1]x/x", host("[::1]x")),
            ("localhost:/x", port("")),
            ("localhost:0/x", port("0")),
            ("localhost:65536/x", port("65536")),
            ("localhost:000001/x", port("000001")),
            ("[::1]:x/y", port("x")),
            ("quay.io/os:.v1", tag(".v1")),
            ("quay.io/os:-v1", tag("-v1")),
            ("quay.io/os:v1+x", tag("v1+x")),
            ("quay.io/foo@sha256:abc", digest("sha256:abc")),
            ("quay.io/foo@", digest("")),
            ("quay.io/foo@sha1:abc", digest("sha1:abc")),
            ("quay.io/foo@sha256", digest("sha256")),
        ]
        .into_iter()
        .map(|(input, e)| (input.to_string(), e))
        .chain([
            (format!("quay.io/foo@{short_sha256}"), digest(short_sha256)),
            (format!("quay.io/foo@{upper_sha256}"), digest(&upper_sha256)),
            (
                format!("quay.io/foo@{SHA256}@{SHA256}"),
                digest(&format!("{SHA256}@{SHA256}")),
            ),
            (
                format!("quay.io/foo@{}", SHA256.replace("sha256", "sha512")),
                digest(&SHA256.replace("sha256", "sha512")),
            ),
        ])
        .collect();
        for (input, want) in &cases {
            assert_eq!(ImageRef::parse(input).as_ref(), Err(want), "{input:?}");
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn enforces_each_limit_at_its_bound() {
        let too_long = |part, length, limit| E::TooLong {
            part,
            length,
            limit,
        };
        let a = |n: usize| "a".repeat(n);
        let path = |n: usize| format!("/{}", a(n - 1));
        let hex = "0123456789abcdef".repeat(8);
        let longest_registry = format!(
            "x.io/{}:{}@sha512:{hex}",
            a(MAX_REPOSITORY_LEN - 5),
            a(MAX_TAG_LEN)
        );
        assert_eq!(longest_registry.len(), MAX_REGISTRY_LEN);
        let longest = format!(
            "oci-archive:{}:{}",
            path(PATH_MAX - 1),
            a(MAX_LAYOUT_TAG_LEN)
        );
        assert_eq!(longest.len(), MAX_REFERENCE_LEN);
        // (input, None when accepted, else the error)
        let cases: Vec<(String, Option<E>)> = vec![
            (format!("x.io/{}", a(MAX_REPOSITORY_LEN - 5)), None),
            (
                format!("x.io/{}", a(MAX_REPOSITORY_LEN - 4)),
                Some(too_long(Part::Repository, 256, 255)),
            ),
            (format!("os:{}", a(MAX_TAG_LEN)), None),
            (
                format!("os:{}", a(MAX_TAG_LEN + 1)),
                Some(too_long(Part::Tag, 129, 128)),
            ),
            (format!("docker://{longest_registry}"), None),
            (
                format!("docker://{}", a(MAX_REGISTRY_LEN + 1)),
                Some(too_long(Part::Registry, 521, 520)),
            ),
            (
                a(MAX_REGISTRY_LEN + 1),
                Some(too_long(Part::Registry, 521, 520)),
            ),
            (format!("oci:{}", path(PATH_MAX - 1)), None),
            (
                format!("oci:{}", path(PATH_MAX)),
                Some(too_long(Part::Path, 4096, 4095)),
            ),
            (format!("oci:/x:{}", a(MAX_LAYOUT_TAG_LEN)), None),
            (
                format!("oci:/x:{}", a(MAX_LAYOUT_TAG_LEN + 1)),
                Some(too_long(Part::LayoutTag, 521, 520)),
            ),
            (longest.clone(), None),
            (
                format!("{longest}a"),
                Some(too_long(Part::Reference, 4629, MAX_REFERENCE_LEN)),
            ),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse(&input);
            match want {
                None => check_invariants(&got.unwrap_or_else(|e| panic!("{}: {e}", input.len()))),
                Some(want) => assert_eq!(got, Err(want), "{}", input.len()),
            }
        }
    }

    #[test]
    fn refuses_huge_references_by_length_first() {
        for size in [100 << 10, 1 << 20] {
            // Whatever else is wrong with them, the length is what is reported.
            for prefix in ["", "docker://", "oci:/", "oci-archive:/", "-", " ", "dir:"] {
                for fill in ["a", "a/", " ", "\0", "é"] {
                    let mut input = prefix.to_string();
                    while input.len() < size {
                        input.push_str(fill);
                    }
                    let want = Err(E::TooLong {
                        part: Part::Reference,
                        length: input.len(),
                        limit: MAX_REFERENCE_LEN,
                    });
                    assert_eq!(ImageRef::parse(&input), want, "{prefix:?} {fill:?}");
                    assert_eq!(ImageRef::parse_local(&input), want, "{prefix:?} {fill:?}");
                    let origin = format!("ostree-unverified-registry:{input}");
                    assert_eq!(
                        OriginReference::parse(&origin),
                        Err(E::TooLong {
                            part: Part::Origin,
                            length: origin.len(),
                            limit: MAX_ORIGIN_LEN,
                        })
                    );
                    let shown = excerpt(&input);
                    assert!(shown.len() < 100, "{shown}");
                    assert!(shown.ends_with(&format!("… ({} bytes)", input.len())));
                }
            }
        }
        assert_eq!(excerpt("docker://quay.io/os:1"), "docker://quay.io/os:1");
    }

    #[test]
    fn parses_local_references_only() {
        let cases: &[(&str, Result<&str, E>)] = &[
            ("oci:/cache:t", Ok("/cache")),
            ("oci-archive:/a.tar:v1", Ok("/a.tar")),
            ("oci:relative:tag", Err(E::RelativePath)),
            ("oci:/layout:", Err(E::EmptyTag)),
            ("docker://registry/os:1", Err(E::NotLocal)),
            ("registry/os:1", Err(E::NotLocal)),
            ("containers-storage:os", Err(E::NotLocal)),
            (
                "oci:/with space:x",
                Err(E::ForbiddenCharacter { character: ' ' }),
            ),
            ("", Err(E::Empty)),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse_local(input);
            let got = got.as_ref().map(|r| r.path().and_then(Path::to_str));
            assert_eq!(got, want.as_ref().map(|p| Some(*p)), "{input}");
        }
        let dir = ImageRef::parse_local("oci:/cache:t").unwrap();
        assert_eq!(dir.layout_dir(), Some(Path::new("/cache")));
        let archive = ImageRef::parse_local("oci-archive:/a.tar").unwrap();
        assert_eq!((archive.layout_dir(), archive.tag()), (None, None));
    }

    #[test]
    fn writes_and_reads_origins() {
        let digested = format!("docker://quay.io/os@{SHA256}");
        let digested_origin = format!("ostree-unverified-registry:quay.io/os@{SHA256}");
        let cases: &[(&str, &str)] = &[
            (
                "docker://127.0.0.1:5000/dnfimage/base:v1",
                "ostree-unverified-registry:127.0.0.1:5000/dnfimage/base:v1",
            ),
            (
                "quay.io/fedora/fedora-bootc:41",
                "ostree-unverified-registry:quay.io/fedora/fedora-bootc:41",
            ),
            (&digested, &digested_origin),
            (
                "oci:/var/cache/oci:base-v1",
                "ostree-unverified-image:oci:/var/cache/oci:base-v1",
            ),
            (
                "oci-archive:/tmp/os.tar",
                "ostree-unverified-image:oci-archive:/tmp/os.tar",
            ),
        ];
        for (input, origin) in cases {
            let r = ImageRef::parse(input).unwrap();
            assert_eq!(r.to_origin(false), *origin, "{input}");
            let read = OriginReference::parse(origin).unwrap();
            assert_eq!(read.signature, Signature::Unverified);
            assert_eq!(read.image(), r.to_string(), "{input}");
            // Held to the policy: ostree-image-signed, with the transport spelled out.
            let signed = r.to_origin(true);
            assert_eq!(signed, format!("ostree-image-signed:{r}"), "{input}");
            let read = OriginReference::parse(&signed).unwrap();
            assert_eq!(read.signature, Signature::ContainerPolicy);
            assert_eq!(read.image(), r.to_string(), "{input}");
        }
    }

    #[test]
    fn reads_origins_as_ostree_ext_does() {
        use OriginTransport as T;
        use Signature as S;
        let remote = |r: &str| S::OstreeRemote(r.into());
        let cases: &[Read] = &[
            (
                "ostree-unverified-registry:quay.io/os:1",
                Ok((S::Unverified, T::Registry, "quay.io/os:1")),
            ),
            (
                "ostree-unverified-image:docker://quay.io/os:1",
                Ok((S::Unverified, T::Registry, "quay.io/os:1")),
            ),
            (
                "ostree-unverified-image:registry:quay.io/os:1",
                Ok((S::Unverified, T::Registry, "quay.io/os:1")),
            ),
            (
                "ostree-image-signed:docker://quay.io/os:1",
                Ok((S::ContainerPolicy, T::Registry, "quay.io/os:1")),
            ),
            (
                "ostree-image-signed:oci:/srv/os",
                Ok((S::ContainerPolicy, T::OciDir, "/srv/os")),
            ),
            (
                "ostree-remote-registry:fedora:quay.io/os:1",
                Ok((remote("fedora"), T::Registry, "quay.io/os:1")),
            ),
            (
                "ostree-remote-image:fedora:oci-archive:/srv/os.tar",
                Ok((remote("fedora"), T::OciArchive, "/srv/os.tar")),
            ),
            (
                "ostree-unverified-image:containers-storage:localhost/os",
                Ok((S::Unverified, T::ContainerStorage, "localhost/os")),
            ),
            (
                "ostree-unverified-image:docker-archive:/x.tar",
                Ok((S::Unverified, T::DockerArchive, "/x.tar")),
            ),
            (
                "ostree-unverified-image:dir:/srv/x",
                Ok((S::Unverified, T::Dir, "/srv/x")),
            ),
            // Names are read as written: another tool wrote them.
            (
                "ostree-unverified-registry:Quay.io/OS",
                Ok((S::Unverified, T::Registry, "Quay.io/OS")),
            ),
            (
                "nonsense",
                Err(E::OriginScheme {
                    scheme: "nonsense".into(),
                }),
            ),
            (
                "docker://quay.io/os:1",
                Err(E::OriginScheme {
                    scheme: "docker".into(),
                }),
            ),
            ("ostree-remote-registry:quay.io/os", Err(E::OriginRemote)),
            (
                "ostree-unverified-image:quay.io/os",
                Err(E::OriginTransport {
                    image: "quay.io/os".into(),
                }),
            ),
            (
                "ostree-unverified-image:docker:quay.io/os",
                Err(E::DockerWithoutSlashes),
            ),
            (
                "ostree-unverified-image:sif:/x",
                Err(E::UnsupportedTransport {
                    transport: "sif:".into(),
                }),
            ),
            ("ostree-unverified-registry:", Err(E::NoImage)),
            ("ostree-unverified-image:oci:", Err(E::NoImage)),
            ("ostree-unverified-image:docker:", Err(E::NoImage)),
            ("ostree-unverified-image:docker://", Err(E::NoImage)),
        ];
        for (value, want) in cases {
            let got = OriginReference::parse(value)
                .map(|r| (r.signature.clone(), r.transport, r.name.clone()));
            let want = want.clone().map(|(s, t, n)| (s, t, n.to_string()));
            assert_eq!(got, want, "{value}");
        }
        let read = OriginReference::parse("ostree-unverified-image:containers-storage:os").unwrap();
        assert_eq!(read.image(), "containers-storage:os");
    }

    /// What holds for every reference the parser accepts.
    fn check_invariants(r: &ImageRef) {
        let text = r.to_string();
        assert!(text.len() <= MAX_REFERENCE_LEN, "{text}");
        assert_eq!(ImageRef::parse(&text).as_ref(), Ok(r), "{text}");
        // The parts put together give the name back.
        let mut rebuilt = match r.transport() {
            Transport::Registry => r.repository().expect("repository").to_string(),
            _ => r.path().and_then(Path::to_str).expect("path").to_string(),
        };
        if let Some(domain) = r.domain() {
            assert!(rebuilt.starts_with(&format!("{domain}/")), "{text}");
        }
        if let Some(tag) = r.tag() {
            rebuilt = format!("{rebuilt}:{tag}");
        }
        if let Some(digest) = r.digest() {
            rebuilt = format!("{rebuilt}@{digest}");
        }
        assert_eq!(rebuilt, r.name(), "{text}");
        for verified in [false, true] {
            let origin = OriginReference::parse(&r.to_origin(verified)).expect("our own origin");
            assert_eq!(origin.image(), text);
        }
    }

    /// Parses `input` every way there is; none may panic, and what is accepted holds up.
    fn parse_every_way(input: &str) {
        match ImageRef::parse(input) {
            Ok(r) => check_invariants(&r),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        if let Ok(r) = ImageRef::parse_local(input) {
            assert!(r.path().is_some_and(Path::is_absolute), "{input:?}");
            check_invariants(&r);
        }
        if let Ok(r) = OriginReference::parse(input) {
            assert!(!r.name.is_empty(), "{input:?}");
        }
        let _ = excerpt(input);
    }

    #[test]
    fn no_short_input_panics() {
        // Bytes that mean something to one rule or another, and a split UTF-8 sequence.
        let alphabet: &[u8] = b"a Z09:/@.-_[]+%\0\n\xc3\xa9\xff";
        let prefixes = [
            "",
            "docker://",
            "oci:",
            "oci:/",
            "oci-archive:/x:",
            "q.io/",
            "q.io/b:",
            "localhost:",
            "[::1]",
            "a/b@sha256:",
            "ostree-unverified-registry:",
            "ostree-remote-image:r:",
            "ostree-unverified-image:docker:",
        ];
        let mut inputs: Vec<Vec<u8>> = vec![vec![]];
        let mut level = vec![vec![]];
        for _ in 0..3 {
            level = level
                .iter()
                .flat_map(|s: &Vec<u8>| {
                    alphabet.iter().map(move |b| {
                        let mut s = s.clone();
                        s.push(*b);
                        s
                    })
                })
                .collect();
            inputs.extend(level.iter().cloned());
        }
        for prefix in prefixes {
            for bytes in &inputs {
                let mut input = prefix.as_bytes().to_vec();
                input.extend(bytes);
                match std::str::from_utf8(&input) {
                    Ok(s) => parse_every_way(s),
                    // The wire carries UTF-8 only; what a lossy decoder makes of the rest too.
                    Err(_) => parse_every_way(&String::from_utf8_lossy(&input)),
                }
            }
        }
    }

    #[test]
    fn no_mutated_reference_panics() {
        let valid = [
            format!("docker://127.0.0.1:5000/dnfimage/base:v1@{SHA256}"),
            "[::1]:5000/a.b/c__d:e".to_string(),
            "oci:/var/lib/dnfimage/cache:host_os-0123".to_string(),
            "oci-archive:/tmp/os.tar:v1".to_string(),
            "ostree-remote-registry:fedora:quay.io/os:1".to_string(),
        ];
        let alphabet = [
            'a', 'Z', '0', ':', '/', '@', '.', '-', '_', '[', ']', ' ', 'é',
        ];
        for input in &valid {
            let chars: Vec<char> = input.chars().collect();
            for i in 0..=chars.len() {
                let splice = |with: Option<char>, skip: usize| {
                    let end = (i + skip).min(chars.len());
                    chars[..i]
                        .iter()
                        .chain(with.iter())
                        .chain(&chars[end..])
                        .collect::<String>()
                };
                parse_every_way(&splice(None, 1));
                for c in alphabet {
                    parse_every_way(&splice(Some(c), 0));
                    parse_every_way(&splice(Some(c), 1));
                }
            }
        }
    }
}
