//! The fetcher enforces the host's signature policy (containers-policy.json) before it keeps
//! anything: real skopeo, a registry on 127.0.0.1, GPG keys made here, signatures read from a
//! lookaside served over HTTP on 127.0.0.1.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use dnfimage_integration::{
    FetcherOptions, Scratch, ServiceProcess, assert_blobs_intact, error_name, raw_call, run, run_ok,
};
use dnfimage_interfaces::fetcher;
use dnfimage_testimage::{
    Fixtures, Lookaside, Registry, SigningKey, tags, write_accept_anything_policy,
    write_signed_by_policy,
};
use serde_json::{Value, json};

/// A registry with signed and badly signed images, the key the policy trusts, and a fetcher
/// whose policy (`policy`, rewritten by tests) requires that key for the registry.
struct Setup {
    scratch: Scratch,
    registry: Registry,
    lookaside: Lookaside,
    key: SigningKey,
    other_key: SigningKey,
    policy: PathBuf,
    _fetcher: ServiceProcess,
}

fn setup() -> Result<Setup> {
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let lookaside = Lookaside::new(&scratch.path().join("lookaside"), &registry, true)?;
    let key = SigningKey::generate(
        &scratch.path().join("gpg"),
        "dnfimage test <t@example.invalid>",
    )?;
    let other_key = SigningKey::generate(
        &scratch.path().join("gpg-other"),
        "someone else <o@example.invalid>",
    )?;
    let policy = write_signed_by_policy(
        &scratch.path().join("policy.json"),
        &registry.addr(),
        &key.public_key,
        true,
    )?;
    let fetcher = ServiceProcess::fetcher(
        &scratch,
        &FetcherOptions {
            registries_conf: Some(scratch.registries_conf(&registry.addr())?),
            policy: Some(policy.clone()),
            registries_d: Some(lookaside.registries_d().to_path_buf()),
            ..Default::default()
        },
    )?;
    Ok(Setup {
        scratch,
        registry,
        lookaside,
        key,
        other_key,
        policy,
        _fetcher: fetcher,
    })
}

impl Setup {
    fn socket(&self) -> PathBuf {
        self.scratch.socket(fetcher::INTERFACE)
    }

    fn cache(&self) -> PathBuf {
        self.scratch.state_dir().join("cache")
    }

    /// The blobs in the cache.
    fn cached_blobs(&self) -> Result<BTreeSet<String>> {
        let dir = self.cache().join("blobs/sha256");
        if !dir.exists() {
            return Ok(BTreeSet::new());
        }
        assert_blobs_intact(&self.cache())?;
        std::fs::read_dir(&dir)?
            .map(|e| Ok(format!("sha256:{}", e?.file_name().to_string_lossy())))
            .collect()
    }

    /// Calls `method` on `image`, expecting an error; returns its name and parameters.
    fn error(&self, method: &str, image: &str) -> Result<(String, Value)> {
        let replies = raw_call(
            &self.socket(),
            &json!({"method": format!("{}.{method}", fetcher::INTERFACE),
                    "parameters": {"image": image}}),
        )?;
        let last = replies.last().context("no reply")?.clone();
        let name = error_name(&last)
            .with_context(|| format!("{method} of {image} did not fail: {last}"))?
            .to_string();
        Ok((name, last["parameters"].clone()))
    }

    fn fetch_json(&self, image: &str) -> Result<Value> {
        let out = run_ok(self.scratch.cli().args(["--json", "image", "fetch", image]))?;
        serde_json::from_str(&out).with_context(|| format!("Parsing {out}"))
    }

    /// Expects `method` of `image` to be refused by the policy for `why`; nothing may be added
    /// to the cache and no blob read from the registry.
    fn assert_rejected(&self, method: &str, image: &str, why: &str) -> Result<Value> {
        let (blobs, pos) = (self.cached_blobs()?, self.registry.log_position()?);
        let (name, params) = self.error(method, image)?;
        assert_eq!(name, "org.dnfimage.Fetcher.SignatureRejected", "{params}");
        assert_eq!(params["image"], image, "{params}");
        let requirement = params["requirement"].as_str().unwrap_or_default();
        assert_eq!(
            requirement,
            format!(
                "docker scope \"{}\": signedBy (GPGKeys, key {})",
                self.registry.addr(),
                self.key.public_key.display()
            ),
            "{params}"
        );
        let reason = params["reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with(why), "{method} {image}: {reason}");
        assert_eq!(
            self.cached_blobs()?,
            blobs,
            "{image} left blobs in the cache"
        );
        assert_eq!(
            self.registry.blob_requests_since(pos)?,
            Vec::<String>::new(),
            "checking {image} read blobs"
        );
        Ok(params)
    }
}

fn digest_of(tag: &str) -> Result<String> {
    Ok(Fixtures::shared()?.image(tag)?.digest)
}

#[test]
fn only_images_the_policy_accepts_are_fetched_from_a_registry() -> Result<()> {
    let s = setup()?;
    let f = Fixtures::shared()?;
    let (v1, v2) = (digest_of(tags::BASE_V1)?, digest_of(tags::BASE_V2)?);
    let la = &s.lookaside;

    let signed = la.push(&f.oci_ref(tags::BASE_V1), "signed/os:v1", Some(&s.key))?;
    let unsigned = la.push(&f.oci_ref(tags::BASE_V2), "unsigned/os:v2", None)?;
    let other_key = la.push(
        &f.oci_ref(tags::BASE_V2),
        "otherkey/os:v2",
        Some(&s.other_key),
    )?;
    // The signature of signed/os:v1 next to another digest: what a registry serving another
    // (or an altered) manifest under a signed name looks like.
    let other_digest = la.push(&f.oci_ref(tags::BASE_V2), "moved/os:v2", None)?;
    la.copy_signatures("signed/os", &v1, "moved/os", &v2)?;
    // The same digest under another name, with the signature made for signed/os:v1.
    let other_name = la.push(&f.oci_ref(tags::BASE_V1), "renamed/os:v1", None)?;
    la.copy_signatures("signed/os", &v1, "renamed/os", &v1)?;
    // Another tag of the signed repository: the signature names signed/os:v1 only.
    let other_tag = la.push(&f.oci_ref(tags::BASE_V1), "signed/os:latest", None)?;

    for (image, why) in [
        (&unsigned, "the image is not signed"),
        (
            &other_key,
            &format!(
                "it is signed by a key the policy does not accept ({})",
                s.other_key.fingerprint
            ),
        ),
        (
            &other_digest,
            "its signature is for another image or digest",
        ),
        (&other_name, "its signature is for another image reference"),
        (&other_tag, "its signature is for another image reference"),
    ] {
        s.assert_rejected("Fetch", image, why)?;
        s.assert_rejected("CheckUpdate", image, why)?;
    }
    assert_eq!(s.cached_blobs()?, BTreeSet::new());
    let listed = run_ok(s.scratch.cli().args(["--json", "image", "list"]))?;
    assert!(!listed.contains("os:"), "rejected images listed: {listed}");

    // Inspecting reads metadata only and trusts nothing: it is not refused.
    run_ok(s.scratch.cli().args(["image", "inspect", &unsigned]))?;

    // The CLI says it in one sentence.
    let out = run(s.scratch.cli().args(["image", "fetch", &unsigned]))?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "The signature policy refuses {unsigned}: the image is not signed"
        )) && stderr.contains("it requires docker scope"),
        "{stderr}"
    );

    // Signed by the trusted key: checked and fetched.
    let replies = raw_call(
        &s.socket(),
        &json!({"method": format!("{}.CheckUpdate", fetcher::INTERFACE),
                "parameters": {"image": signed}}),
    )?;
    let last = replies.last().context("no reply")?;
    assert_eq!(error_name(last), None, "{last}");
    assert_eq!(last["parameters"]["digest"], v1.as_str());
    let fetched = s.fetch_json(&signed)?;
    assert_eq!(fetched["digest"], v1.as_str());
    let blobs = s.cached_blobs()?;
    for digest in f.image(tags::BASE_V1)?.layer_digests() {
        assert!(blobs.contains(&digest), "{digest} not fetched");
    }
    // The result names the requirement and the signer, by fingerprint and user id.
    let signer = format!("{} (dnfimage test <t@example.invalid>)", s.key.fingerprint);
    assert_eq!(fetched["signature"]["checked"], true, "{fetched}");
    assert_eq!(fetched["signature"]["verified"], true, "{fetched}");
    assert_eq!(
        fetched["signature"]["signers"],
        json!([signer]),
        "{fetched}"
    );
    let requirement = fetched["signature"]["requirement"]
        .as_str()
        .unwrap_or_default();
    assert!(
        requirement.starts_with(&format!("docker scope \"{}\": signedBy", s.registry.addr())),
        "{fetched}"
    );
    // A requirement trusting several keys: the one that signed is named, not the others.
    std::fs::write(
        &s.policy,
        serde_json::to_vec(&json!({
            "default": [{"type": "reject"}],
            "transports": {"docker": {s.registry.addr(): [{
                "type": "signedBy", "keyType": "GPGKeys",
                "keyPaths": [s.other_key.public_key, s.key.public_key],
            }]}},
        }))?,
    )?;
    let fetched = s.fetch_json(&signed)?;
    assert_eq!(
        fetched["signature"]["signers"],
        json!([signer]),
        "{fetched}"
    );
    // Verification turned off: fetched unchecked, and said so.
    let replies = raw_call(
        &s.socket(),
        &json!({"method": format!("{}.Fetch", fetcher::INTERFACE),
                "parameters": {"image": unsigned, "signatureVerification": false}}),
    )?;
    let last = replies.last().context("no reply")?;
    assert_eq!(error_name(last), None, "{last}");
    assert_eq!(
        last["parameters"]["result"]["signature"],
        json!({"checked": false, "verified": false, "requirement": null, "signers": []}),
        "{last}"
    );

    // A policy that accepts anything: everything is fetched, as before policies were read.
    write_accept_anything_policy(&s.policy)?;
    let fetched = s.fetch_json(&unsigned)?;
    assert_eq!(fetched["digest"], v2.as_str());
    Ok(())
}

#[test]
fn oci_layouts_meet_the_policy_only_when_it_needs_no_signature() -> Result<()> {
    let s = setup()?;
    let f = Fixtures::shared()?;
    let layout = f.oci_ref(tags::BASE_V1);
    // skopeo 1.9.3 keeps no signatures in an OCI layout: a signedBy requirement for `oci:`
    // can never be met.
    let (name, params) = s.error("Fetch", &layout)?;
    assert_eq!(name, "org.dnfimage.Fetcher.SignatureRejected", "{params}");
    let requirement = params["requirement"].as_str().unwrap_or_default();
    assert!(
        requirement.starts_with("oci scope \"\": signedBy (GPGKeys"),
        "{requirement}"
    );
    let reason = params["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("the image is not signed"), "{reason}");
    assert_eq!(s.cached_blobs()?, BTreeSet::new());

    write_signed_by_policy(&s.policy, &s.registry.addr(), &s.key.public_key, false)?;
    let fetched = s.fetch_json(&layout)?;
    assert_eq!(fetched["digest"], digest_of(tags::BASE_V1)?.as_str());

    // A policy that rejects everything refuses layouts too.
    std::fs::write(&s.policy, r#"{"default": [{"type": "reject"}]}"#)?;
    let (name, params) = s.error("Fetch", &f.oci_ref(tags::BASE_V2))?;
    assert_eq!(name, "org.dnfimage.Fetcher.SignatureRejected", "{params}");
    assert_eq!(params["requirement"], "default: reject");
    let reason = params["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("the policy rejects it outright"),
        "{reason}"
    );
    Ok(())
}

#[test]
fn an_unreadable_policy_refuses_every_check() -> Result<()> {
    let s = setup()?;
    let f = Fixtures::shared()?;
    std::fs::remove_file(&s.policy)?;
    let (name, params) = s.error("Fetch", &f.oci_ref(tags::BASE_V1))?;
    assert_eq!(name, "org.dnfimage.Fetcher.Failed", "{params}");
    let message = params["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "Reading the signature policy {}",
            s.policy.display()
        )),
        "{message}"
    );
    std::fs::write(&s.policy, "{")?;
    let (name, params) = s.error("Fetch", &f.oci_ref(tags::BASE_V1))?;
    assert_eq!(name, "org.dnfimage.Fetcher.Failed", "{params}");
    assert_eq!(s.cached_blobs()?, BTreeSet::new());
    Ok(())
}
