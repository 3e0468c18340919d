//! What the host's signature policy (containers-policy.json(5)) says about an image, read only
//! to name the requirement in an error and to skip the check when it accepts everything. The
//! verdict itself is always skopeo's (see `registry::ProxySettings::verify`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use dnfimage_interfaces::reference::{ImageRef, Transport};
use serde_json::{Map, Value};

/// A parsed policy file.
#[derive(Debug, Clone)]
pub struct Policy {
    root: Map<String, Value>,
}

impl Policy {
    /// Reads and parses the policy at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("Reading the signature policy {}", path.display()))?;
        Self::parse(&bytes)
            .with_context(|| format!("Parsing the signature policy {}", path.display()))
    }

    /// Parses a policy from its JSON text.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        match serde_json::from_slice(bytes)? {
            Value::Object(root) => Ok(Policy { root }),
            _ => anyhow::bail!("the policy is not a JSON object"),
        }
    }

    fn transports(&self) -> impl Iterator<Item = (&str, &Map<String, Value>)> {
        self.root
            .get("transports")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|t| t.iter())
            .filter_map(|(name, scopes)| Some((name.as_str(), scopes.as_object()?)))
    }

    /// Whether every requirement list of the policy is exactly `insecureAcceptAnything`: then
    /// no image can be rejected and there is nothing to check.
    pub fn accepts_anything(&self) -> bool {
        let accepts = |reqs: &Value| {
            reqs.as_array().is_some_and(|list| {
                !list.is_empty()
                    && list.iter().all(|r| {
                        r.get("type").and_then(Value::as_str) == Some("insecureAcceptAnything")
                    })
            })
        };
        self.root.get("default").is_some_and(accepts)
            && self
                .transports()
                .all(|(_, scopes)| scopes.values().all(accepts))
    }

    /// The requirement that applies to `image`, as "TRANSPORT scope "SCOPE": REQUIREMENTS" (or
    /// "default: REQUIREMENTS"), looked up as containers/image does: the image's own identity,
    /// then ever wider namespaces, then the transport's "" scope, then the default.
    pub fn requirement_for(&self, image: &ImageRef) -> String {
        match self.applicable(image) {
            (label, Some(reqs)) => format!("{label}: {}", describe(reqs)),
            (_, None) => "default: none (the policy has no default)".into(),
        }
    }

    /// The requirement list that applies to `image` and where it is ("TRANSPORT scope
    /// "SCOPE"" or "default"); no list when the policy has no default.
    fn applicable(&self, image: &ImageRef) -> (String, Option<&Value>) {
        let transport = transport_name(image);
        let scopes = self
            .transports()
            .find(|(name, _)| *name == transport)
            .map(|(_, s)| s);
        if let Some(scopes) = scopes {
            for scope in scopes_of(image).iter().map(String::as_str).chain([""]) {
                if let Some(reqs) = scopes.get(scope) {
                    return (format!("{transport} scope \"{scope}\""), Some(reqs));
                }
            }
        }
        ("default".into(), self.root.get("default"))
    }

    /// The `signedBy` requirements that apply to `image`: an image the policy accepted was
    /// signed by a key of each.
    pub fn signed_by(&self, image: &ImageRef) -> Vec<Map<String, Value>> {
        self.applicable(image)
            .1
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .filter(|r| r.get("type").and_then(Value::as_str) == Some("signedBy"))
            .cloned()
            .collect()
    }
}

/// The policy's name for the transport of `image`.
pub fn transport_name(image: &ImageRef) -> &'static str {
    match image.transport() {
        Transport::Registry => "docker",
        Transport::OciDir => "oci",
        Transport::OciArchive => "oci-archive",
    }
}

/// The key material of a `signedBy` requirement (`keyPath`, `keyPaths` or `keyData`), as
/// keyring bytes.
pub fn key_material(requirement: &Map<String, Value>) -> Result<Vec<Vec<u8>>> {
    use base64::Engine as _;
    let read = |path: &str| {
        std::fs::read(path).with_context(|| format!("Reading the signature policy key {path}"))
    };
    let mut keyrings = Vec::new();
    if let Some(path) = requirement.get("keyPath").and_then(Value::as_str) {
        keyrings.push(read(path)?);
    }
    for path in requirement
        .get("keyPaths")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        keyrings.push(read(path)?);
    }
    if let Some(data) = requirement.get("keyData").and_then(Value::as_str) {
        keyrings.push(
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .context("Decoding the keyData of the signature policy")?,
        );
    }
    Ok(keyrings)
}

/// The scopes that can name `image`, most specific first.
fn scopes_of(image: &ImageRef) -> Vec<String> {
    match image.transport() {
        Transport::Registry => {
            let Some(repository) = image.repository() else {
                return Vec::new();
            };
            let identity = match (image.digest(), image.tag()) {
                (Some(digest), _) => format!("{repository}@{digest}"),
                (None, Some(tag)) => format!("{repository}:{tag}"),
                (None, None) => format!("{repository}:latest"),
            };
            let mut out = vec![identity];
            let mut namespace = repository;
            loop {
                out.push(namespace.to_string());
                match namespace.rfind('/') {
                    Some(i) => namespace = &namespace[..i],
                    None => break,
                }
            }
            let mut domain = image.domain().unwrap_or(namespace);
            while let Some(i) = domain.find('.') {
                domain = &domain[i + 1..];
                out.push(format!("*.{domain}"));
            }
            out
        }
        Transport::OciDir | Transport::OciArchive => {
            let Some(path) = image.path() else {
                return Vec::new();
            };
            let resolved: PathBuf = std::fs::canonicalize(path)
                .or_else(|_| std::path::absolute(path))
                .unwrap_or_else(|_| path.to_path_buf());
            let mut out = Vec::new();
            if image.transport() == Transport::OciDir {
                out.push(format!(
                    "{}:{}",
                    resolved.display(),
                    image.tag().unwrap_or_default()
                ));
            }
            out.extend(
                resolved
                    .ancestors()
                    .filter(|a| a.parent().is_some())
                    .map(|a| a.display().to_string()),
            );
            out
        }
    }
}

/// A requirement list in a few words, e.g. `signedBy (GPGKeys, key /etc/pki/k.gpg)`.
fn describe(reqs: &Value) -> String {
    let Some(list) = reqs.as_array() else {
        return "not a list of requirements".into();
    };
    if list.is_empty() {
        return "no requirements (an empty list, which containers/image refuses)".into();
    }
    list.iter()
        .map(|r| {
            let get = |k: &str| r.get(k).and_then(Value::as_str);
            let kind = get("type").unwrap_or("(no type)");
            let mut details = Vec::new();
            if let Some(key_type) = get("keyType") {
                details.push(key_type.to_string());
            }
            if let Some(path) = get("keyPath") {
                details.push(format!("key {path}"));
            } else if r.get("keyData").is_some() {
                details.push("key given inline".into());
            }
            if let Some(identity) = r
                .get("signedIdentity")
                .and_then(|i| i.get("type"))
                .and_then(Value::as_str)
            {
                details.push(format!("identity {identity}"));
            }
            if details.is_empty() {
                kind.to_string()
            } else {
                format!("{kind} ({})", details.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNED: &str = r#"{
        "default": [{"type": "reject"}],
        "transports": {
            "docker": {
                "127.0.0.1:5000/os": [{"type": "signedBy", "keyType": "GPGKeys",
                                        "keyPath": "/etc/pki/os.gpg"}],
                "127.0.0.1:5000/os/base:debug": [{"type": "insecureAcceptAnything"}],
                "*.example.org": [{"type": "signedBy", "keyType": "GPGKeys", "keyData": "x",
                                   "signedIdentity": {"type": "matchRepository"}}]
            },
            "oci": {"": [{"type": "insecureAcceptAnything"}]}
        }
    }"#;

    #[test]
    fn names_the_requirement_that_applies() {
        let policy = Policy::parse(SIGNED.as_bytes()).expect("valid policy");
        let cases = [
            (
                "docker://127.0.0.1:5000/os/base:v1",
                "docker scope \"127.0.0.1:5000/os\": signedBy (GPGKeys, key /etc/pki/os.gpg)",
            ),
            (
                "docker://127.0.0.1:5000/os/base:debug",
                "docker scope \"127.0.0.1:5000/os/base:debug\": insecureAcceptAnything",
            ),
            (
                "docker://quay.example.org/x/y:1",
                "docker scope \"*.example.org\": signedBy (GPGKeys, key given inline, \
                 identity matchRepository)",
            ),
            ("docker://127.0.0.1:5001/os/base:v1", "default: reject"),
            (
                "oci:/nonexistent/layout:v1",
                "oci scope \"\": insecureAcceptAnything",
            ),
            ("oci-archive:/nonexistent/a.tar", "default: reject"),
        ];
        for (image, want) in cases {
            let image = ImageRef::parse(image).expect("valid reference");
            assert_eq!(policy.requirement_for(&image), want, "{image}");
        }
    }

    #[test]
    fn tells_a_policy_that_accepts_anything() {
        let cases = [
            (r#"{"default": [{"type": "insecureAcceptAnything"}]}"#, true),
            (
                r#"{"default": [{"type": "insecureAcceptAnything"}],
                    "transports": {"docker": {"": [{"type": "insecureAcceptAnything"}]}}}"#,
                true,
            ),
            (
                r#"{"default": [{"type": "insecureAcceptAnything"}],
                    "transports": {"docker": {"x": [{"type": "reject"}]}}}"#,
                false,
            ),
            (r#"{"default": [{"type": "reject"}]}"#, false),
            (r#"{"default": []}"#, false),
            (r#"{"transports": {}}"#, false),
            (SIGNED, false),
        ];
        for (text, want) in cases {
            let policy = Policy::parse(text.as_bytes()).expect("valid policy");
            assert_eq!(policy.accepts_anything(), want, "{text}");
        }
        assert!(Policy::parse(b"[]").is_err());
        assert!(Policy::parse(b"{").is_err());
    }
}
