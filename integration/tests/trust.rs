//! The host's signature policy through `dnf-image`: what `rebase` records in the origin
//! (`ostree-image-signed:` by default, `ostree-unverified-registry:` after
//! `--no-signature-verification`), that `upgrade` keeps that choice, and that `status` says who
//! signed what is deployed. Real skopeo, registry, GPG keys made here, ostree sysroot.

use anyhow::Result;
use dnfimage_integration::host::Host;
use dnfimage_integration::run;
use dnfimage_testimage::{Fixtures, Lookaside, SigningKey, tags, write_signed_by_policy};
use serde_json::{Value, json};

/// The origin's `container-image-reference` line.
fn reference_line(origin: &str) -> &str {
    origin
        .lines()
        .find(|l| l.starts_with("container-image-reference="))
        .unwrap_or_default()
}

/// Runs `dnf-image args` on `host`, expecting success: its stdout and stderr.
fn ok(host: &Host, args: &[&str]) -> Result<String> {
    let out = run(host.cli().args(args))?;
    let both = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?} failed: {both}");
    Ok(both)
}

/// Runs `dnf-image args` on `host`, expecting a refusal by the signature policy that changes
/// nothing: returns its stderr.
fn refused(host: &Host, args: &[&str], before: &Value) -> Result<String> {
    let out = run(host.cli().args(args))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    assert!(
        stderr.contains("The signature policy refuses") && stderr.contains("not signed"),
        "{args:?}: {stderr}"
    );
    assert_eq!(
        &host.status()?["deployments"],
        before,
        "{args:?} changed the deployments"
    );
    host.sysroot.fsck()?;
    Ok(stderr)
}

#[test]
fn the_signature_choice_is_recorded_kept_and_shown() -> Result<()> {
    let mut host = Host::new()?;
    let f = Fixtures::shared()?;
    let dir = host.scratch.path().to_path_buf();
    let lookaside = Lookaside::new(&dir.join("lookaside"), &host.registry, false)?;
    let key = SigningKey::generate(&dir.join("gpg"), "OS builders <os@example.invalid>")?;
    let policy = write_signed_by_policy(
        &dir.join("policy.json"),
        &host.registry.addr(),
        &key.public_key,
        false,
    )?;
    host.signature_policy = Some((policy, lookaside.registries_d().to_path_buf()));
    host.start_services()?;
    let signer = format!("{} (OS builders <os@example.invalid>)", key.fingerprint);
    let v1 = f.image(tags::BASE_V1)?;

    // Unsigned: refused, nothing deployed.
    let empty = host.status()?["deployments"].clone();
    refused(&host, &["rebase", &host.latest], &empty)?;

    // Signed by the key the policy requires: deployed, held to the policy from now on, and
    // status names the signer.
    let signed = lookaside.push(
        &f.oci_ref(tags::BASE_V1),
        "dnfimage/signed:latest",
        Some(&key),
    )?;
    let out = ok(&host, &["rebase", &signed])?;
    assert!(
        out.contains(&format!("verified, signed by {signer}")),
        "{out}"
    );
    let deps = host.deployments()?;
    assert_eq!(deps[0]["imageDigest"], v1.digest.as_str());
    let trust = &deps[0]["trust"];
    assert_eq!(trust["enforced"], true, "{trust}");
    assert_eq!(trust["verified"], true, "{trust}");
    assert_eq!(trust["signers"], json!([signer]), "{trust}");
    assert!(
        trust["requirement"]
            .as_str()
            .is_some_and(|r| r.contains("signedBy")),
        "{trust}"
    );
    let origin = host.origin_of(&deps[0])?;
    assert_eq!(
        reference_line(&origin),
        format!("container-image-reference=ostree-image-signed:{signed}"),
        "{origin}"
    );
    let text = host.ok(&["status"])?;
    assert!(
        text.contains(&format!("Signature: verified, signed by {signer}")),
        "{text}"
    );

    // The tag moves to an unsigned image: the upgrade (and its check) is refused, nothing
    // changes.
    lookaside.push(&f.oci_ref(tags::BASE_V2), "dnfimage/signed:latest", None)?;
    let deployed = host.status()?["deployments"].clone();
    refused(&host, &["upgrade"], &deployed)?;
    refused(&host, &["upgrade", "--check"], &deployed)?;
    // A rebase to it without the flag is refused too: leaving the policy needs the flag.
    refused(&host, &["rebase", &signed], &deployed)?;

    // Opting out: deployed, recorded as unverified, shown so.
    let out = ok(&host, &["rebase", "--no-signature-verification", &signed])?;
    assert!(out.contains("not verified"), "{out}");
    let deps = host.deployments()?;
    assert_eq!(deps[0]["trust"]["enforced"], false, "{}", deps[0]);
    assert_eq!(deps[0]["trust"]["verified"], false, "{}", deps[0]);
    let unverified_ref = signed.trim_start_matches("docker://");
    assert_eq!(
        reference_line(&host.origin_of(&deps[0])?),
        format!("container-image-reference=ostree-unverified-registry:{unverified_ref}")
    );
    assert!(host.ok(&["status"])?.contains("Signature: not verified"));

    // The timer and `upgrade` keep that choice: another unsigned image is taken as it is.
    lookaside.push(&f.oci_ref(tags::DERIVED), "dnfimage/signed:latest", None)?;
    host.ok(&["upgrade"])?;
    let deps = host.deployments()?;
    assert_eq!(
        deps[0]["imageDigest"],
        f.image(tags::DERIVED)?.digest.as_str()
    );
    assert_eq!(deps[0]["trust"]["enforced"], false, "{}", deps[0]);
    assert_eq!(
        reference_line(&host.origin_of(&deps[0])?),
        format!("container-image-reference=ostree-unverified-registry:{unverified_ref}")
    );

    // Back to verified: signed again, a plain rebase holds it to the policy once more.
    lookaside.push(
        &f.oci_ref(tags::BASE_V1),
        "dnfimage/signed:latest",
        Some(&key),
    )?;
    host.ok(&["rebase", &signed])?;
    let deps = host.deployments()?;
    assert_eq!(deps[0]["trust"]["enforced"], true, "{}", deps[0]);
    assert_eq!(deps[0]["trust"]["signers"], json!([signer]), "{}", deps[0]);
    host.sysroot.fsck()?;
    Ok(())
}

#[test]
fn a_download_not_checked_is_not_deployed_for_an_enforcing_origin() -> Result<()> {
    let host = Host::new()?;
    let f = Fixtures::shared()?;
    host.ok(&["rebase", &host.latest])?;
    assert_eq!(host.deployments()?[0]["trust"]["enforced"], true);
    host.publish(tags::BASE_V2)?;
    host.ok(&["upgrade", "--download-only"])?;
    // The same image fetched again without checking: the cache's record now says so.
    host.ok(&[
        "image",
        "fetch",
        "--no-signature-verification",
        &host.latest,
    ])?;
    let before = host.status()?["deployments"].clone();
    let out = run(host.cli().args(["upgrade", "--from-downloaded"]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("was not checked against the signature policy")
            && stderr.contains("nothing was deployed"),
        "{stderr}"
    );
    assert_eq!(host.status()?["deployments"], before);
    // Downloaded again, and checked: deployed.
    host.ok(&["upgrade", "--download-only"])?;
    host.ok(&["upgrade", "--from-downloaded"])?;
    let deps = host.deployments()?;
    assert_eq!(
        deps[0]["imageDigest"],
        f.image(tags::BASE_V2)?.digest.as_str()
    );
    assert_eq!(deps[0]["trust"]["enforced"], true, "{}", deps[0]);
    Ok(())
}
