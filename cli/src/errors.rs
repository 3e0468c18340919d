//! Service errors as sentences a person can act on.
//!
//! Every service error serializes as `{"error": "org.dnfimage.X.Name", "parameters": {…}}`; one
//! formatter covers all of them, with hints for the conditions people meet most.

use dnfimage_interfaces::deployer::Deployment;
use serde::Serialize;
use serde_json::Value;

use crate::output::bytes;

/// A typed service error, carried through `anyhow` with its wire name kept for tests and JSON.
#[derive(Debug)]
pub struct ServiceError {
    /// The unqualified error name, e.g. "ImageNotFound".
    pub name: String,
    /// Its parameters as they came over the wire.
    pub parameters: Value,
    /// The text shown to people.
    pub text: String,
}

impl ServiceError {
    /// The service error `e` carries, if it is one named `name`.
    pub fn named<'a>(e: &'a anyhow::Error, name: &str) -> Option<&'a ServiceError> {
        e.downcast_ref::<ServiceError>()
            .filter(|se| se.name == name)
    }
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for ServiceError {}

/// Whether `e` says that another change ran at the same time (the deployments moved since the
/// command read them, or a service was busy with another change): nothing was changed, and the
/// same command later may succeed.
pub fn another_change_ran(e: &anyhow::Error) -> bool {
    ["StateChanged", "AlreadyInProgress"]
        .iter()
        .any(|name| ServiceError::named(e, name).is_some())
}

/// Turns any service error into an `anyhow::Error` with a readable message.
pub fn service_error<E: Serialize + std::fmt::Debug>(e: E) -> anyhow::Error {
    let value = serde_json::to_value(&e).unwrap_or(Value::Null);
    let qualified = value.get("error").and_then(Value::as_str);
    let name = qualified
        .map(|n| n.rsplit('.').next().unwrap_or(n).to_string())
        .unwrap_or_else(|| format!("{e:?}"));
    let params = value.get("parameters").cloned().unwrap_or(Value::Null);
    let text = match qualified.and_then(|q| q.rsplit('.').nth(1)) {
        Some(service) if name == "InsufficientSpace" => insufficient_space(service, &params),
        _ => describe(&name, &params),
    };
    ServiceError {
        name,
        parameters: params,
        text,
    }
    .into()
}

fn field<'a>(params: &'a Value, key: &str) -> Option<&'a str> {
    params.get(key).and_then(Value::as_str)
}

/// `InsufficientSpace` from `service` ("Fetcher", …), with the commands that free space where
/// that service writes.
fn insufficient_space(service: &str, params: &Value) -> String {
    let hint = match service {
        "Fetcher" => "`dnf-image image prune --keep IMAGE` removes the other cached images",
        "Importer" | "Layerer" => {
            "`dnf-image cleanup --repo` frees the repository objects no deployment uses (add \
             `--rollback` to free those only the rollback deployment uses)"
        }
        "Deployer" => {
            "`dnf-image cleanup --rollback --repo` removes the rollback deployment and frees the \
             repository objects only it used"
        }
        _ => {
            "`dnf-image cleanup --rollback --repo` removes the rollback deployment and the \
             repository objects no deployment uses; `dnf-image image prune` empties the image \
             cache"
        }
    };
    format!(
        "Not enough space in {}: {} needed, {} available; free some space ({hint}) and try again",
        field(params, "path").unwrap_or_default(),
        bytes(params.get("needed").and_then(Value::as_u64).unwrap_or(0)),
        bytes(params.get("available").and_then(Value::as_u64).unwrap_or(0))
    )
}

/// Renders error `name` with `params`.
pub fn describe(name: &str, params: &Value) -> String {
    let get = |k: &str| field(params, k).unwrap_or_default().to_string();
    let num = |k: &str| params.get(k).and_then(Value::as_u64).unwrap_or(0);
    match name {
        "PermissionDenied" => format!(
            "Permission denied: {} needs root (run with sudo)",
            field(params, "method").unwrap_or("this operation")
        ),
        "TooManyConnections" => format!(
            "The service is busy: {} connections {} are open, its limit; wait for other clients \
             to finish and try again",
            num("limit"),
            if get("scope") == "user" {
                "of your user"
            } else {
                "in all"
            }
        ),
        "InsufficientSpace" => insufficient_space("", params),
        "AlreadyInProgress" => {
            let what = field(params, "operation")
                .or_else(|| field(params, "image"))
                .unwrap_or("another operation");
            format!("Busy: {what} is running; wait for it or cancel it with Ctrl-C in its terminal")
        }
        "RegistryUnreachable" => format!(
            "Cannot reach the registry of {}: {}",
            get("image"),
            get("message")
        ),
        "AuthenticationRequired" => format!(
            "The registry refused {} without valid credentials: {}. Log in for the fetcher with \
             `skopeo login --authfile /etc/ostree/auth.json REGISTRY` (or name an auth.json in \
             DNFIMAGE_AUTHFILE) and try again",
            get("image"),
            get("message")
        ),
        "ImageNotFound" => format!("Image {} not found: {}", get("image"), get("message")),
        "NotBooted" => format!(
            "{} is not the sysroot the running system booted from: there is no running /usr to \
             change (apply-live works on the booted host only)",
            get("sysroot")
        ),
        "ReplacementRefused" => {
            let files: Vec<&str> = params
                .get("files")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let more = num("count").saturating_sub(files.len() as u64);
            format!(
                "The pending deployment changes {} of the running /usr ({}{}); nothing was \
                 changed. `dnf-image apply-live --allow-replacement` replaces them too; a reboot \
                 starts the deployment with all its changes",
                crate::output::count(num("count"), "file"),
                files.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        }
        "NotBootable" => format!(
            "{} is not a bootable OS image (it has no containers.bootc=1 or ostree.bootable label)",
            get("image")
        ),
        "DigestMismatch" => format!("Digest mismatch: {}", get("message")),
        // The fetcher's (an image the policy refuses); the layerer's is about a package.
        "SignatureRejected" if params.get("requirement").is_some() => format!(
            "The signature policy refuses {}: {}; it requires {}. Nothing of it was kept",
            get("image"),
            get("reason"),
            get("requirement")
        ),
        "MetadataTooLarge" => format!(
            "The {} of {} takes {}, more than the {} the fetcher reads; nothing was kept",
            get("blob"),
            get("image"),
            bytes(num("size")),
            bytes(num("limit"))
        ),
        "StateChanged" => state_changed(params, None, None),
        "InvalidKernelArgumentsFile" => format!(
            "The image's kernel arguments file {} is not valid: {}. Nothing was deployed; the \
             image must fix it (bootc's format: kargs = [\"a=b\", …], optionally \
             match-architectures = [\"x86_64\", …])",
            get("file"),
            get("message")
        ),
        _ => generic(name, params),
    }
}

/// The deployer's `StateChanged` as a sentence; `then` and `now` are the deployments its
/// `expected` and `actual` name, when the caller knows them.
pub fn state_changed(
    params: &Value,
    then: Option<&Deployment>,
    now: Option<&Deployment>,
) -> String {
    let expected = field(params, "expected").unwrap_or_default();
    let then = if expected.is_empty() {
        "a sysroot without deployments".to_string()
    } else {
        deployment(expected, then)
    };
    let now = match field(params, "actual") {
        Some(actual) => format!(
            "{} is now the deployment changes start from",
            deployment(actual, now)
        ),
        None => "no deployment is left".to_string(),
    };
    format!(
        "The deployments changed while this command ran: it prepared its change on {then}, but \
         another command changed them meanwhile and {now}. Nothing was changed; run the command \
         again."
    )
}

/// A deployment in a sentence: its id ("STATEROOT/COMMIT.SERIAL", the commit shortened), with
/// its image, version and layered packages when `d` is given.
pub fn deployment(id: &str, d: Option<&Deployment>) -> String {
    let short = match id.split_once('/').zip(id.rsplit_once('.')) {
        Some(((stateroot, _), (rest, serial))) if rest.len() > stateroot.len() => {
            let commit = &rest[stateroot.len() + 1..];
            format!("{stateroot}/{}.{serial}", &commit[..commit.len().min(12)])
        }
        _ => id.to_string(),
    };
    let Some(d) = d else {
        return short;
    };
    let mut about = vec![d.image.clone().unwrap_or_else(|| "no image".to_string())];
    if let Some(v) = &d.version {
        about.push(format!("version {v}"));
    }
    if !d.layering.packages.is_empty() {
        about.push(format!("with {}", d.layering.packages.join(" ")));
    }
    format!("{short} ({})", about.join(", "))
}

/// "Name: message (key: value, …)".
fn generic(name: &str, params: &Value) -> String {
    let sentence = split_camel(name);
    let mut out = sentence;
    let Some(map) = params.as_object() else {
        return out;
    };
    if let Some(message) = map.get("message").and_then(Value::as_str) {
        out.push_str(": ");
        out.push_str(message);
    }
    let rest: Vec<String> = map
        .iter()
        .filter(|(k, v)| *k != "message" && !v.is_null())
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}: {s}"),
            other => format!("{k}: {other}"),
        })
        .collect();
    if !rest.is_empty() {
        out.push_str(&format!(" ({})", rest.join(", ")));
    }
    out
}

/// "NoSuchDeployment" → "No such deployment".
fn split_camel(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn describes_errors() {
        let cases = [
            ("NoRollback", json!({}), "No rollback"),
            (
                "NotBooted",
                json!({"sysroot": "/tmp/s"}),
                "/tmp/s is not the sysroot the running system booted from: there is no running \
                 /usr to change (apply-live works on the booted host only)",
            ),
            (
                "ReplacementRefused",
                json!({"count": 12, "files": ["/usr/lib/a", "/usr/lib/b"]}),
                "The pending deployment changes 12 files of the running /usr (/usr/lib/a, \
                 /usr/lib/b and 10 more); nothing was changed. `dnf-image apply-live \
                 --allow-replacement` replaces them too; a reboot starts the deployment with all \
                 its changes",
            ),
            (
                "NoSuchDeployment",
                json!({"index": 4}),
                "No such deployment (index: 4)",
            ),
            (
                "CorruptLayer",
                json!({"image": "x", "layer": "sha256:1", "message": "bad gzip"}),
                "Corrupt layer: bad gzip (image: x, layer: sha256:1)",
            ),
            (
                "PermissionDenied",
                json!({"method": "Deploy"}),
                "Permission denied: Deploy needs root (run with sudo)",
            ),
            (
                "TooManyConnections",
                json!({"limit": 128, "scope": "user"}),
                "The service is busy: 128 connections of your user are open, its limit; wait for \
                 other clients to finish and try again",
            ),
            (
                "AuthenticationRequired",
                json!({"image": "docker://r/os:1", "message": "unauthorized: authentication \
                       required (no credentials: none of /etc/ostree/auth.json exists)"}),
                "The registry refused docker://r/os:1 without valid credentials: unauthorized: \
                 authentication required (no credentials: none of /etc/ostree/auth.json \
                 exists). Log in for the fetcher with `skopeo login --authfile \
                 /etc/ostree/auth.json REGISTRY` (or name an auth.json in DNFIMAGE_AUTHFILE) and \
                 try again",
            ),
            (
                "MetadataTooLarge",
                json!({"image": "oci:/x", "blob": "configuration", "size": 5 << 20,
                       "limit": 4 << 20}),
                "The configuration of oci:/x takes 5.0 MiB, more than the 4.0 MiB the fetcher \
                 reads; nothing was kept",
            ),
            (
                "StateChanged",
                json!({"expected": format!("os/{}.0", "a".repeat(64)),
                       "actual": format!("os/{}.1", "b".repeat(64)), "message": "moved"}),
                "The deployments changed while this command ran: it prepared its change on \
                 os/aaaaaaaaaaaa.0, but another command changed them meanwhile and \
                 os/bbbbbbbbbbbb.1 is now the deployment changes start from. Nothing was \
                 changed; run the command again.",
            ),
            (
                "StateChanged",
                json!({"expected": "", "actual": null, "message": "moved"}),
                "The deployments changed while this command ran: it prepared its change on a \
                 sysroot without deployments, but another command changed them meanwhile and no \
                 deployment is left. Nothing was changed; run the command again.",
            ),
            (
                "SignatureRejected",
                json!({"package": "x.rpm", "keyId": null, "message": "not signed"}),
                "Signature rejected: not signed (package: x.rpm)",
            ),
            (
                "InvalidKernelArgumentsFile",
                json!({"commit": "3a5c", "file": "/usr/lib/bootc/kargs.d/10-x.toml",
                       "message": "Line 1: missing field `kargs`"}),
                "The image's kernel arguments file /usr/lib/bootc/kargs.d/10-x.toml is not \
                 valid: Line 1: missing field `kargs`. Nothing was deployed; the image must fix \
                 it (bootc's format: kargs = [\"a=b\", …], optionally match-architectures = \
                 [\"x86_64\", …])",
            ),
            (
                "InsufficientSpace",
                json!({"path": "/boot", "needed": 2048, "available": 1024}),
                "Not enough space in /boot: 2.0 KiB needed, 1.0 KiB available; free some space \
                 (`dnf-image cleanup --rollback --repo` removes the rollback deployment and the \
                 repository objects no deployment uses; `dnf-image image prune` empties the image \
                 cache) and try again",
            ),
        ];
        for (name, params, want) in cases {
            assert_eq!(describe(name, &params), want);
        }
    }

    #[test]
    fn insufficient_space_names_what_frees_space_where_the_service_writes() {
        use dnfimage_interfaces::{deployer, fetcher, importer};
        let cases: [(anyhow::Error, &str); 3] = [
            (
                service_error(fetcher::FetcherError::InsufficientSpace {
                    path: "/var/cache/dnfimage".into(),
                    needed: 2048,
                    available: 1024,
                }),
                "`dnf-image image prune --keep IMAGE` removes the other cached images",
            ),
            (
                service_error(importer::ImporterError::InsufficientSpace {
                    path: "/sysroot/ostree/repo".into(),
                    needed: 2048,
                    available: 1024,
                }),
                "`dnf-image cleanup --repo` frees the repository objects no deployment uses",
            ),
            (
                service_error(deployer::DeployerError::InsufficientSpace {
                    path: "/boot".into(),
                    needed: 2048,
                    available: 1024,
                }),
                "`dnf-image cleanup --rollback --repo` removes the rollback deployment",
            ),
        ];
        for (e, hint) in cases {
            let text = e.to_string();
            assert!(text.starts_with("Not enough space in /"), "{text}");
            assert!(text.contains(hint), "{text}");
            assert_eq!(
                ServiceError::named(&e, "InsufficientSpace").map(|_| ()),
                Some(())
            );
        }
    }

    #[test]
    fn names_deployments_with_what_they_hold() {
        let d: Deployment = serde_json::from_value(json!({
            "index": 0, "stateroot": "os", "commit": "c".repeat(64), "serial": 2,
            "baseCommit": "b", "image": "docker://r/os:latest", "imageDigest": null,
            "version": "2", "timestamp": "", "kernelVersion": "", "kernelArguments": [],
            "booted": false, "staged": false, "default": true, "rollback": false,
            "pinned": false, "finalizationLocked": false,
            "layering": {"packages": ["hello"], "inactive": [], "overrideRemove": [],
                         "overrideReplace": []},
        }))
        .expect("a valid deployment");
        let id = d.id();
        assert_eq!(deployment(&id, None), "os/cccccccccccc.2");
        assert_eq!(
            deployment(&id, Some(&d)),
            "os/cccccccccccc.2 (docker://r/os:latest, version 2, with hello)"
        );
        // Not an id: as given.
        assert_eq!(deployment("c0", None), "c0");
        let params = json!({"expected": "", "actual": id});
        assert!(
            state_changed(&params, None, Some(&d)).contains(
                "on a sysroot without deployments, but another command changed them meanwhile \
                 and os/cccccccccccc.2 (docker://r/os:latest, version 2, with hello) is now"
            ),
            "{}",
            state_changed(&params, None, Some(&d))
        );
    }

    #[test]
    fn keeps_the_wire_name() {
        let e = dnfimage_interfaces::fetcher::FetcherError::NotBootable { image: "x".into() };
        let err = service_error(e);
        let se = err.downcast_ref::<ServiceError>().expect("a ServiceError");
        assert_eq!(se.name, "NotBootable");
        assert!(se.text.contains("not a bootable OS image"));
    }
}
