//! The fetcher end to end: the real service binary, a real registry, real skopeo, driven through
//! the CLI, the typed proxy, raw JSON, varlinkctl and the Python reference client.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_integration::proxy::{Shaping, SlowProxy};
use dnfimage_integration::{
    FetcherOptions, Scratch, ServiceProcess, assert_blobs_intact, bin, error_name, raw_call, run,
    run_ok,
};
use dnfimage_interfaces::fetcher::{self, FetchReply, FetcherError, FetcherProxy};
use dnfimage_testimage::{BenchOptions, Fixtures, PushedRefs, Registry, tags};
use futures_util::StreamExt;
use serde_json::{Value, json};

const FETCHER: &str = fetcher::INTERFACE;

/// A scratch directory, a registry holding the fixtures, and a fetcher that trusts it.
struct Setup {
    scratch: Scratch,
    registry: Registry,
    refs: PushedRefs,
    _fetcher: ServiceProcess,
}

fn setup() -> Result<Setup> {
    setup_with(FetcherOptions::default())
}

fn setup_with(mut opts: FetcherOptions) -> Result<Setup> {
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let refs = Fixtures::shared()?.push(&registry, "dnfimage/base")?;
    opts.registries_conf = Some(scratch.registries_conf(&registry.addr())?);
    let fetcher = ServiceProcess::fetcher(&scratch, &opts)?;
    Ok(Setup {
        scratch,
        registry,
        refs,
        _fetcher: fetcher,
    })
}

impl Setup {
    fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let out = run_ok(self.scratch.cli().arg("--json").args(args))?;
        serde_json::from_str(&out).with_context(|| format!("Parsing {out}"))
    }

    fn cache(&self) -> PathBuf {
        self.scratch.state_dir().join("cache")
    }

    fn socket(&self) -> PathBuf {
        self.scratch.socket(FETCHER)
    }
}

/// Runs the CLI expecting failure; returns its stderr.
fn cli_fails(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    anyhow::ensure!(
        !out.status.success(),
        "expected failure, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn call_error(socket: &Path, method: &str, params: Value) -> Result<(String, Value)> {
    let replies = raw_call(
        socket,
        &json!({"method": format!("{FETCHER}.{method}"), "parameters": params}),
    )?;
    let last = replies.last().context("no reply")?.clone();
    let name = error_name(&last)
        .with_context(|| format!("{method} did not fail: {last}"))?
        .to_string();
    Ok((name, last["parameters"].clone()))
}

#[test]
fn inspect_reports_digest_version_labels_and_layers() -> Result<()> {
    let s = setup()?;
    let image = Fixtures::shared()?.image(tags::BASE_V1)?;
    let doc = s.cli_json(&["image", "inspect", &s.refs.base_v1])?;
    assert_eq!(doc["apiVersion"], "dnfimage/v1");
    assert_eq!(doc["digest"], image.digest.as_str());
    assert_eq!(doc["version"], "1");
    assert_eq!(doc["bootable"], true);
    assert_eq!(doc["labels"]["containers.bootc"], "1");
    let layers = doc["layers"].as_array().context("layers")?;
    assert_eq!(
        layers
            .iter()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>(),
        image.layer_digests()
    );
    assert!(layers.iter().all(|l| l["cached"] == false));
    assert_eq!(doc["totalSize"], image.layers_size());

    // Not bootable: reported, not refused.
    let doc = s.cli_json(&["image", "inspect", &s.refs.not_bootable])?;
    assert_eq!(doc["bootable"], false);
    Ok(())
}

#[test]
fn check_counts_missing_layers_and_bytes() -> Result<()> {
    let s = setup()?;
    let f = Fixtures::shared()?;
    let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);
    run_ok(s.scratch.cli().args(["image", "fetch", &s.refs.base_v1]))?;

    let v1_layers: BTreeSet<_> = v1.layer_digests().into_iter().collect();
    let new_layers: Vec<_> = v2
        .manifest
        .layers()
        .iter()
        .filter(|l| !v1_layers.contains(&l.digest().to_string()))
        .collect();
    let doc = s.cli_json(&[
        "image",
        "check",
        &s.refs.base_v2,
        "--current-digest",
        &v1.digest,
    ])?;
    assert_eq!(doc["updateAvailable"], true);
    assert_eq!(doc["digest"], v2.digest.as_str());
    assert_eq!(doc["version"], "2");
    assert_eq!(doc["layersMissing"], new_layers.len());
    assert_eq!(
        doc["bytesMissing"],
        new_layers.iter().map(|l| l.size()).sum::<u64>()
    );
    assert_eq!(doc["bytesTotal"], v2.layers_size());

    // The answer is recorded; LastCheck gives it back without the network.
    let replies = raw_call(
        &s.socket(),
        &json!({"method": format!("{FETCHER}.LastCheck"), "parameters": {"image": s.refs.base_v2}}),
    )?;
    let check = &replies[0]["parameters"]["check"];
    assert_eq!(check["digest"], v2.digest.as_str(), "{check}");
    assert_eq!(check["currentDigest"], v1.digest.as_str());
    assert_eq!(check["updateAvailable"], true);
    let never = raw_call(
        &s.socket(),
        &json!({"method": format!("{FETCHER}.LastCheck"), "parameters": {"image": s.refs.derived}}),
    )?;
    assert!(never[0]["parameters"]["check"].is_null(), "{never:?}");

    // v1 was just fetched: no update, and exit 77 when asked.
    let out =
        run(s
            .scratch
            .cli()
            .args(["image", "check", &s.refs.base_v1, "--unchanged-exit-77"]))?;
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    Ok(())
}

#[test]
fn fetch_after_fetch_downloads_only_changed_layers() -> Result<()> {
    let s = setup()?;
    let f = Fixtures::shared()?;
    let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);

    let pos = s.registry.log_position()?;
    let r1 = s.cli_json(&["image", "fetch", &s.refs.base_v1])?;
    assert_eq!(r1["layersFetched"], v1.layer_digests().len());
    let fetched: BTreeSet<_> = s.registry.blob_requests_since(pos)?.into_iter().collect();
    let mut want: BTreeSet<_> = v1.layer_digests().into_iter().collect();
    want.insert(v1.manifest.config().digest().to_string());
    assert_eq!(fetched, want, "v1 fetch requested other blobs");

    let pos = s.registry.log_position()?;
    let r2 = s.cli_json(&["image", "fetch", &s.refs.base_v2])?;
    let requested = s.registry.blob_requests_since(pos)?;
    let v1_layers: BTreeSet<_> = v1.layer_digests().into_iter().collect();
    let mut want: BTreeSet<_> = v2
        .layer_digests()
        .into_iter()
        .filter(|d| !v1_layers.contains(d))
        .collect();
    assert_eq!(r2["layersFetched"], want.len());
    assert_eq!(r2["layersCached"], v2.layer_digests().len() - want.len());
    want.insert(v2.manifest.config().digest().to_string());
    assert_eq!(
        requested.iter().cloned().collect::<BTreeSet<_>>(),
        want,
        "v2 fetch requested blobs it already had"
    );
    assert_eq!(requested.len(), want.len(), "a blob was requested twice");

    // Everything cached: no blob requested at all.
    let pos = s.registry.log_position()?;
    let r3 = s.cli_json(&["image", "fetch", &s.refs.base_v2])?;
    assert_eq!(r3["layersFetched"], 0);
    assert_eq!(s.registry.blob_requests_since(pos)?, Vec::<String>::new());

    // The progress says where the image is stored as soon as its manifest is, for the
    // importer to follow the downloads.
    let replies = dnfimage_integration::importer_support::Call::start(
        &s.socket(),
        &format!("{FETCHER}.Fetch"),
        json!({"image": s.refs.base_v2}),
        true,
    )?
    .rest()?;
    let staged = replies
        .iter()
        .map(|r| &r["parameters"]["progress"]["staged"])
        .find(|v| !v.is_null())
        .context("no record says where the image is staged")?;
    assert_eq!(staged["layout"], s.cache().display().to_string());
    assert_eq!(staged["manifest"], v2.digest.as_str());

    // The cache is a valid OCI layout skopeo can read, under the reference the result names.
    let cache_ref = r2["cacheReference"].as_str().context("cacheReference")?;
    let inspected = run_ok(Command::new("skopeo").args(["inspect", cache_ref]))?;
    let inspected: Value = serde_json::from_str(&inspected)?;
    assert_eq!(
        inspected["Layers"].as_array().map(Vec::len),
        Some(v2.layer_digests().len())
    );
    assert_blobs_intact(&s.cache())?;

    let list = s.cli_json(&["image", "list"])?;
    let refs: BTreeSet<_> = list["images"]
        .as_array()
        .context("images")?
        .iter()
        .map(|i| i["reference"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        refs,
        BTreeSet::from([s.refs.base_v1.clone(), s.refs.base_v2.clone()])
    );
    Ok(())
}

#[test]
fn fetch_after_an_update_check_asks_the_registry_nothing_again() -> Result<()> {
    let s = setup()?;
    let f = Fixtures::shared()?;
    let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);
    let call = |method: &str, params: Value| -> Result<Value> {
        let replies = dnfimage_integration::importer_support::Call::start(
            &s.socket(),
            &format!("{FETCHER}.{method}"),
            params,
            method == "Fetch",
        )?
        .rest()?;
        let last = replies.last().context("no reply")?;
        anyhow::ensure!(error_name(last).is_none(), "{method} failed: {last}");
        Ok(last["parameters"].clone())
    };
    let manifests_since = |pos| -> Result<usize> {
        Ok(s.registry
            .requests_since(pos)?
            .iter()
            .filter(|r| r.path.contains("/manifests/"))
            .count())
    };
    let check = call(
        "CheckUpdate",
        json!({"image": s.refs.base_v2, "currentDigest": v1.digest}),
    )?;
    assert_eq!(check["updateAvailable"], true, "{check}");
    let pos = s.registry.log_position()?;
    let fetched = call("Fetch", json!({"image": s.refs.base_v2}))?;
    assert_eq!(fetched["result"]["digest"], v2.digest.as_str());
    // The layers only: the manifest and configuration are the ones the check read.
    assert_eq!(manifests_since(pos)?, 0);
    let config = v2.manifest.config().digest().to_string();
    assert!(!s.registry.blob_requests_since(pos)?.contains(&config));

    // Used once: the next fetch asks again.
    let pos = s.registry.log_position()?;
    call("Fetch", json!({"image": s.refs.base_v2}))?;
    assert!(manifests_since(pos)? > 0);
    // Nor with another verification.
    call(
        "CheckUpdate",
        json!({"image": s.refs.base_v2, "currentDigest": v1.digest}),
    )?;
    let pos = s.registry.log_position()?;
    call(
        "Fetch",
        json!({"image": s.refs.base_v2, "signatureVerification": false}),
    )?;
    assert!(manifests_since(pos)? > 0);
    assert_blobs_intact(&s.cache())?;
    Ok(())
}

#[test]
fn prune_keeps_named_images_and_their_blobs() -> Result<()> {
    let s = setup()?;
    let f = Fixtures::shared()?;
    let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);
    for r in [&s.refs.base_v1, &s.refs.base_v2] {
        run_ok(s.scratch.cli().args(["image", "fetch", r]))?;
    }
    let pruned = s.cli_json(&["image", "prune", "--keep", &s.refs.base_v2])?;
    assert_eq!(pruned["removedImages"], json!([s.refs.base_v1]));
    let v2_layers: BTreeSet<_> = v2.layer_digests().into_iter().collect();
    let only_v1 = v1
        .layer_digests()
        .into_iter()
        .filter(|d| !v2_layers.contains(d))
        .count();
    // v1's own layers, its config and its manifest.
    assert_eq!(pruned["removedBlobs"], only_v1 + 2);
    let list = s.cli_json(&["image", "list"])?;
    assert_eq!(list["images"].as_array().map(Vec::len), Some(1));
    // v2 is complete: fetching it again downloads nothing.
    let again = s.cli_json(&["image", "fetch", &s.refs.base_v2])?;
    assert_eq!(again["layersFetched"], 0);
    Ok(())
}

#[test]
fn corrupted_blob_in_registry_gives_digest_mismatch_and_keeps_nothing() -> Result<()> {
    let s = setup()?;
    let v1 = Fixtures::shared()?.image(tags::BASE_V1)?;
    // The largest layer, damaged in the registry's storage (same length, other bytes).
    let layer = v1
        .manifest
        .layers()
        .iter()
        .max_by_key(|l| l.size())
        .context("layers")?
        .digest()
        .to_string();
    let path = s.registry.blob_data_path(&layer);
    let mut bytes = std::fs::read(&path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes)?;

    let (name, params) = call_error(&s.socket(), "Fetch", json!({"image": s.refs.base_v1}))?;
    assert_eq!(name, format!("{FETCHER}.DigestMismatch"), "{params}");
    assert!(
        params["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&layer[7..19])
            || params["expected"] == layer.as_str(),
        "{params}"
    );
    let cache = s.cache();
    assert_blobs_intact(&cache)?;
    let hex = layer.trim_start_matches("sha256:");
    assert!(!cache.join("blobs/sha256").join(hex).exists());
    assert!(
        std::fs::read_dir(cache.join("tmp"))?.next().is_none(),
        "partial file left"
    );
    // The manifest and configuration, stored before the layers, went with the failed fetch.
    for digest in [v1.digest.clone(), v1.manifest.config().digest().to_string()] {
        let hex = digest.trim_start_matches("sha256:");
        assert!(
            !cache.join("blobs/sha256").join(hex).exists(),
            "{digest} kept"
        );
    }
    // Nothing recorded for the image.
    assert_eq!(s.cli_json(&["image", "list"])?["images"], json!([]));

    let stderr = cli_fails(s.scratch.cli().args(["image", "fetch", &s.refs.base_v1]))?;
    assert!(stderr.contains("Digest mismatch"), "{stderr}");
    Ok(())
}

#[test]
fn stopped_registry_gives_registry_unreachable() -> Result<()> {
    let mut s = setup()?;
    s.registry.stop();
    for method in ["Inspect", "Fetch"] {
        let (name, params) = call_error(&s.socket(), method, json!({"image": s.refs.base_v1}))?;
        assert_eq!(
            name,
            format!("{FETCHER}.RegistryUnreachable"),
            "{method}: {params}"
        );
    }
    let stderr = cli_fails(s.scratch.cli().args(["image", "check", &s.refs.base_v1]))?;
    assert!(stderr.contains("Cannot reach the registry"), "{stderr}");
    Ok(())
}

/// A fetcher with no registry, for images in local layouts.
fn local_fetcher() -> Result<(Scratch, ServiceProcess)> {
    let scratch = Scratch::new()?;
    let fetcher = ServiceProcess::fetcher(&scratch, &FetcherOptions::default())?;
    Ok((scratch, fetcher))
}

/// The service still answers: `GetInfo` and `ListCached` reply. Returns the cached references.
fn still_answers(socket: &Path) -> Result<Vec<String>> {
    let info = raw_call(socket, &json!({"method": "org.varlink.service.GetInfo"}))?;
    let last = info.last().context("no GetInfo reply")?;
    anyhow::ensure!(error_name(last).is_none(), "GetInfo failed: {last}");
    let listed = raw_call(socket, &json!({"method": format!("{FETCHER}.ListCached")}))?;
    let last = listed.last().context("no ListCached reply")?;
    anyhow::ensure!(error_name(last).is_none(), "ListCached failed: {last}");
    Ok(last["parameters"]["images"]
        .as_array()
        .context("images")?
        .iter()
        .filter_map(|i| i["reference"].as_str().map(str::to_string))
        .collect())
}

/// Bytes that compress badly, `n` of them.
fn noise(n: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn lying_manifests_get_typed_errors_and_keep_only_complete_blobs() -> Result<()> {
    use dnfimage_integration::layout::{self, RawImage};
    let (scratch, _fetcher) = local_fetcher()?;
    let socket = scratch.socket(FETCHER);
    let cache = scratch.state_dir().join("cache");
    let layouts = scratch.path().join("layouts");
    let write = |name: &str, image: &RawImage| -> Result<(String, String)> {
        let digest = layout::write(&layouts.join(name), &["v1".to_string()], image)?;
        Ok((format!("oci:{}:v1", layouts.join(name).display()), digest))
    };
    let honest = RawImage {
        config: layout::bootable_config(&[("org.opencontainers.image.version", "1")]),
        layers: vec![(noise(100_000, 1), None), (noise(50_000, 2), None)],
        ..Default::default()
    };
    // A good image first: its blobs must stay intact through what follows.
    let (good, _) = write("good", &honest)?;
    let replies = raw_call(
        &socket,
        &json!({"method": format!("{FETCHER}.Fetch"), "parameters": {"image": good}}),
    )?;
    let last = replies.last().context("no reply")?;
    assert!(error_name(last).is_none(), "{last}");
    let stored = assert_blobs_intact(&cache)?;
    assert_eq!(stored, 4, "two layers, the configuration, the manifest");

    let expect = |image: &str, methods: &[&str], want: &str| -> Result<Vec<Value>> {
        let mut all = Vec::new();
        for method in methods {
            let (name, params) = call_error(&socket, method, json!({ "image": image }))?;
            assert_eq!(
                name,
                format!("{FETCHER}.{want}"),
                "{method} {image}: {params}"
            );
            all.push(params);
        }
        assert_eq!(
            assert_blobs_intact(&cache)?,
            stored,
            "{image}: the cache changed"
        );
        assert!(
            std::fs::read_dir(cache.join("tmp"))?.next().is_none(),
            "{image}: partial file left"
        );
        assert_eq!(still_answers(&socket)?, vec![good.clone()], "{image}");
        Ok(all)
    };

    // A layer 3 MiB long whose manifest says 1 MiB: the write stops past 1 MiB.
    let long_layer = noise(3 << 20, 3);
    let (image, _) = write(
        "long-layer",
        &RawImage {
            layers: vec![(long_layer.clone(), Some(1 << 20))],
            ..honest.clone()
        },
    )?;
    let params = expect(&image, &["Fetch"], "DigestMismatch")?;
    assert_eq!(
        params[0]["expected"],
        layout::digest_of(&long_layer).as_str()
    );
    assert!(params[0]["actual"].is_null(), "{}", params[0]);
    let message = params[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("longer than the 1048576 bytes"),
        "{message}"
    );

    // A configuration longer than declared: refused while reading it, before any layer.
    let config = honest.config.clone();
    let (image, _) = write(
        "long-config",
        &RawImage {
            config_size: Some(config.len() as i64 - 10),
            ..honest.clone()
        },
    )?;
    let params = expect(
        &image,
        &["Inspect", "CheckUpdate", "Fetch"],
        "DigestMismatch",
    )?;
    assert_eq!(params[0]["expected"], layout::digest_of(&config).as_str());

    // A configuration over the cap, declared as it is: refused unread.
    let filler = "x".repeat(5 << 20);
    let big_config = layout::bootable_config(&[("filler", &filler)]);
    let (image, _) = write(
        "big-config",
        &RawImage {
            config: big_config.clone(),
            ..honest.clone()
        },
    )?;
    for params in expect(
        &image,
        &["Inspect", "CheckUpdate", "Fetch"],
        "MetadataTooLarge",
    )? {
        assert_eq!(params["image"], image.as_str());
        assert_eq!(params["blob"], "configuration");
        assert_eq!(params["size"], big_config.len());
        assert_eq!(params["limit"], 4 << 20);
    }

    // A manifest over the cap.
    let (image, _) = write(
        "big-manifest",
        &RawImage {
            annotations: [("filler".to_string(), filler.clone())].into(),
            ..honest.clone()
        },
    )?;
    for params in expect(&image, &["Inspect", "Fetch"], "MetadataTooLarge")? {
        assert_eq!(params["blob"], "manifest");
        assert_eq!(params["limit"], 4 << 20);
        assert!(params["size"].as_u64().unwrap_or(0) > 5 << 20, "{params}");
    }

    // A negative size.
    let (image, _) = write(
        "negative-size",
        &RawImage {
            layers: vec![(noise(10, 4), Some(-10))],
            ..honest.clone()
        },
    )?;
    let params = expect(&image, &["Inspect", "Fetch"], "Failed")?;
    let message = params[0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("Parsing the manifest"), "{message}");

    // The CLI says what happened.
    let stderr = cli_fails(scratch.cli().args([
        "image",
        "inspect",
        &format!("oci:{}:v1", layouts.join("big-config").display()),
    ]))?;
    assert!(
        stderr.contains("The configuration of") && stderr.contains("more than the 4.0 MiB"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn update_checks_stay_bounded_one_record_a_reference() -> Result<()> {
    use dnfimage_integration::layout::{self, RawImage};
    let (scratch, _fetcher) = local_fetcher()?;
    let socket = scratch.socket(FETCHER);
    let dir = scratch.path().join("layout");
    // One image under many tags: each tag is a reference of its own.
    const KEPT: usize = 64;
    let tags: Vec<String> = (0..=KEPT + 6).map(|i| format!("t{i}")).collect();
    layout::write(
        &dir,
        &tags,
        &RawImage {
            config: layout::bootable_config(&[]),
            layers: vec![(noise(1000, 5), None)],
            ..Default::default()
        },
    )?;
    let reference = |i: usize| format!("oci:{}:t{i}", dir.display());
    let check = |i: usize| -> Result<()> {
        let replies = raw_call(
            &socket,
            &json!({"method": format!("{FETCHER}.CheckUpdate"),
                    "parameters": {"image": reference(i)}}),
        )?;
        let last = replies.last().context("no reply")?;
        anyhow::ensure!(error_name(last).is_none(), "CheckUpdate {i}: {last}");
        Ok(())
    };
    let last_check = |i: usize| -> Result<Value> {
        let replies = raw_call(
            &socket,
            &json!({"method": format!("{FETCHER}.LastCheck"),
                    "parameters": {"image": reference(i)}}),
        )?;
        Ok(replies.last().context("no reply")?["parameters"]["check"].clone())
    };
    let recorded = || -> Result<Vec<String>> {
        let path = scratch.state_dir().join("cache/dnfimage-checks.json");
        let list: Vec<(String, Value)> = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("Parsing {}", path.display()))?;
        Ok(list.into_iter().map(|(r, _)| r).collect())
    };
    for i in 0..KEPT + 6 {
        check(i)?;
    }
    let references = recorded()?;
    assert_eq!(references.len(), KEPT);
    assert_eq!(
        references.iter().collect::<BTreeSet<_>>().len(),
        KEPT,
        "one record a reference"
    );
    for i in 0..6 {
        assert!(last_check(i)?.is_null(), "t{i} is remembered");
    }
    assert_eq!(
        last_check(KEPT + 5)?["reference"],
        reference(KEPT + 5).as_str()
    );

    // Checking one again keeps one record of it, now the most recent: the next new reference
    // pushes out the next oldest.
    check(6)?;
    assert_eq!(recorded()?.len(), KEPT);
    check(KEPT + 6)?;
    let references = recorded()?;
    assert_eq!(references.len(), KEPT);
    assert_eq!(references.last(), Some(&reference(KEPT + 6)));
    assert!(!last_check(6)?.is_null());
    assert!(last_check(7)?.is_null());
    Ok(())
}

/// Processes whose parent is `pid`, by command name.
fn children(pid: u32) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(stat) = std::fs::read_to_string(entry?.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may hold spaces and parentheses.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            found.push(head.split_once('(').map_or("", |(_, c)| c).to_string());
        }
    }
    Ok(found)
}

/// A registry that accepts connections and never answers: skopeo alone would wait forever, and
/// the service with it, answering no one. Inspect and CheckUpdate fail with
/// RegistryUnreachable after the fetcher's registry timeout; a caller that came meanwhile gets
/// its answer; no skopeo is left behind.
#[test]
fn silent_registry_times_out_and_frees_the_service() -> Result<()> {
    let scratch = Scratch::new()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().collect();
        drop(held);
    });
    let fetcher = ServiceProcess::fetcher(
        &scratch,
        &FetcherOptions {
            registries_conf: Some(scratch.registries_conf(&addr)?),
            registry_timeout: Some(3),
            ..Default::default()
        },
    )?;
    let socket = scratch.socket(FETCHER);
    let image = format!("docker://{addr}/dnfimage/base:v1");
    for method in ["Inspect", "CheckUpdate"] {
        let waiting = std::thread::spawn({
            let (socket, image) = (socket.clone(), image.clone());
            move || call_error(&socket, method, json!({ "image": image }))
        });
        // Another caller, while skopeo waits for the registry.
        std::thread::sleep(Duration::from_millis(500));
        let listed = raw_call(
            &socket,
            &json!({"method": format!("{FETCHER}.ListCached"), "parameters": {}}),
        )?;
        assert!(
            error_name(&listed[0]).is_none(),
            "ListCached during a silent {method}: {listed:?}"
        );
        let (name, params) = waiting
            .join()
            .map_err(|_| anyhow::anyhow!("the {method} caller panicked"))??;
        assert_eq!(
            name,
            format!("{FETCHER}.RegistryUnreachable"),
            "{method}: {params}"
        );
        assert!(
            params["message"]
                .as_str()
                .is_some_and(|m| m.contains("within 3 s")),
            "{method}: {params}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = children(fetcher.pid())?;
        if !left.iter().any(|c| c == "skopeo") {
            break;
        }
        assert!(Instant::now() < deadline, "skopeo left running: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn bad_references_and_missing_images_get_typed_errors() -> Result<()> {
    let s = setup()?;
    let missing = s.registry.docker_ref("dnfimage/base:no-such-tag");
    let cases = [
        ("docker://-v", "InvalidImageReference"),
        ("containers-storage:localhost/os", "InvalidImageReference"),
        ("oci:relative/dir", "InvalidImageReference"),
        ("quay.io/os tag", "InvalidImageReference"),
        ("quay.io/os@sha256:0123", "InvalidImageReference"),
        ("quay.io/OS:1", "InvalidImageReference"),
        // skopeo refuses this layout tag; the fetcher says so before starting it.
        ("oci:/nonexistent/layout:a__b", "InvalidImageReference"),
        (missing.as_str(), "ImageNotFound"),
        ("oci:/nonexistent/layout:v1", "ImageNotFound"),
    ];
    for (image, want) in cases {
        let (name, params) = call_error(&s.socket(), "Inspect", json!({ "image": image }))?;
        assert_eq!(name, format!("{FETCHER}.{want}"), "{image}: {params}");
    }
    // A reference past the length limit is refused for its length, and not echoed back whole.
    let long = format!("docker://quay.io/{}", "a".repeat(100 << 10));
    for method in ["Inspect", "CheckUpdate", "Fetch"] {
        let (name, params) = call_error(&s.socket(), method, json!({ "image": long }))?;
        assert_eq!(name, format!("{FETCHER}.InvalidImageReference"), "{params}");
        let message = params["message"].as_str().context("message")?;
        assert!(message.contains("bytes long"), "{message}");
        let image = params["image"].as_str().context("image")?;
        assert!(image.len() < 100, "{method}: {} bytes echoed", image.len());
    }
    let (name, _) = call_error(&s.socket(), "Fetch", json!({"image": s.refs.not_bootable}))?;
    assert_eq!(name, format!("{FETCHER}.NotBootable"));
    assert!(
        std::fs::read_dir(s.cache().join("blobs/sha256"))?
            .next()
            .is_none()
    );
    Ok(())
}

#[test]
fn oci_layout_and_archive_transports() -> Result<()> {
    let s = setup()?;
    let f = Fixtures::shared()?;
    let v1 = f.image(tags::BASE_V1)?;
    let layout = f.oci_ref(tags::BASE_V1);
    let r = s.cli_json(&["image", "fetch", &layout])?;
    assert_eq!(r["digest"], v1.digest.as_str());
    let archive = s.scratch.path().join("base.tar");
    run_ok(Command::new("skopeo").args([
        "copy",
        &layout,
        &format!("oci-archive:{}:{}", archive.display(), tags::BASE_V1),
    ]))?;
    let doc = s.cli_json(&[
        "image",
        "inspect",
        &format!("oci-archive:{}", archive.display()),
    ])?;
    assert_eq!(doc["version"], "1");
    assert!(
        doc["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .all(|l| l["cached"] == true)
    );
    Ok(())
}

#[test]
fn insufficient_space_fails_before_downloading() -> Result<()> {
    let scratch = Scratch::new()?;
    let small = scratch.path().join("small");
    std::fs::create_dir_all(&small)?;
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(&small),
    )?;
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let refs = Fixtures::shared()?.push(&registry, "dnfimage/base")?;
    let _fetcher = ServiceProcess::fetcher(
        &scratch,
        &FetcherOptions {
            registries_conf: Some(scratch.registries_conf(&registry.addr())?),
            state_dir: Some(small.clone()),
            ..Default::default()
        },
    )?;
    let (name, params) = call_error(
        &scratch.socket(FETCHER),
        "Fetch",
        json!({"image": refs.base_v1}),
    )?;
    assert_eq!(name, format!("{FETCHER}.InsufficientSpace"), "{params}");
    assert!(
        params["needed"].as_u64() > params["available"].as_u64(),
        "{params}"
    );
    assert!(
        std::fs::read_dir(small.join("cache/blobs/sha256"))?
            .next()
            .is_none()
    );
    let stderr = cli_fails(scratch.cli().args(["image", "fetch", &refs.base_v1]))?;
    assert!(stderr.contains("Not enough space"), "{stderr}");
    Ok(())
}

/// A bootable image big enough to take seconds through the slow proxy.
fn slow_image(registry: &Registry) -> Result<String> {
    static LAYOUT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = LAYOUT.get_or_init(|| {
        let dir = dnfimage_integration::bin_dir().join("dnfimage-fixtures/slow-24");
        if !dir.join("index.json").exists() {
            let tmp = dir.with_extension("tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            dnfimage_testimage::build_bench(
                &tmp,
                "slow",
                &BenchOptions {
                    layers: 6,
                    total_mib: 24,
                },
            )
            .expect("building the slow image");
            std::fs::rename(&tmp, &dir).expect("publishing the slow image");
        }
        dir
    });
    let dest = registry.docker_ref("dnfimage/slow:latest");
    dnfimage_testimage::skopeo_copy(&dnfimage_testimage::oci_ref(dir, "slow"), &dest)?;
    Ok(dest)
}

/// Starts a fetch through a 2 MB/s proxy and returns its stream once bytes are flowing.
async fn start_slow_fetch(
    conn: &mut dnfimage_interfaces::Connection,
    image: &str,
) -> Result<impl futures_util::Stream<Item = zlink::Result<Result<FetchReply, FetcherError>>>> {
    let stream = conn.fetch(image, Some(1), None).await?;
    let mut stream = Box::pin(stream);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "no bytes within 30 s");
        let item = stream.next().await.context("stream ended")??;
        let reply = item.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if reply.progress.as_ref().is_some_and(|p| p.bytes_done > 0) {
            return Ok(stream);
        }
    }
}

/// Fetches `image` on a new connection to the fetcher in `runtime_dir`; its result.
async fn fetch_to_the_end(
    runtime_dir: &Path,
    image: &str,
    concurrency: u64,
) -> Result<dnfimage_interfaces::fetcher::FetchResult> {
    let mut conn = dnfimage_interfaces::connect(runtime_dir, FETCHER).await?;
    let stream = conn.fetch(image, Some(concurrency), None).await?;
    futures_util::pin_mut!(stream);
    let mut result = None;
    while let Some(item) = stream.next().await {
        if let Some(r) = item?.map_err(|e| anyhow::anyhow!("{e:?}"))?.result {
            result = Some(r);
        }
    }
    result.context("no result")
}

struct SlowSetup {
    scratch: Scratch,
    _registry: Registry,
    proxy: SlowProxy,
    /// The slow image through the proxy.
    image: String,
    /// The same image straight from the registry.
    direct: String,
    /// A registries.conf trusting both.
    conf: PathBuf,
}

async fn slow_setup() -> Result<SlowSetup> {
    slow_setup_with(Shaping {
        request_delay: Duration::from_millis(10),
        bytes_per_second: 2_000_000,
        silent_after: None,
    })
    .await
}

async fn slow_setup_with(shaping: Shaping) -> Result<SlowSetup> {
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let direct = slow_image(&registry)?;
    let proxy = SlowProxy::start(&registry.addr(), shaping).await?;
    let image = direct.replace(&registry.addr(), &proxy.addr());
    let conf = scratch.path().join("registries.conf");
    std::fs::write(
        &conf,
        [proxy.addr(), registry.addr()]
            .map(|a| format!("[[registry]]\nlocation = \"{a}\"\ninsecure = true\n"))
            .concat(),
    )?;
    Ok(SlowSetup {
        scratch,
        _registry: registry,
        proxy,
        image,
        direct,
        conf,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_killed_midway_completes_on_next_call() -> Result<()> {
    let s = slow_setup().await?;
    let opts = FetcherOptions {
        registries_conf: Some(s.conf.clone()),
        ..Default::default()
    };
    let mut fetcher = ServiceProcess::fetcher(&s.scratch, &opts)?;
    let mut conn = dnfimage_interfaces::connect(&s.scratch.runtime_dir(), FETCHER).await?;
    let stream = start_slow_fetch(&mut conn, &s.image).await?;
    fetcher.kill();
    drop(stream);
    let cache = s.scratch.state_dir().join("cache");
    let complete_before = assert_blobs_intact(&cache)?;
    assert!(
        complete_before < 6 + 2,
        "the fetch was not midway: {complete_before} blobs"
    );

    let _fetcher = ServiceProcess::fetcher(&s.scratch, &opts)?;
    let result = fetch_to_the_end(&s.scratch.runtime_dir(), &s.image, 6).await?;
    assert_eq!(result.layers_fetched + result.layers_cached, 6);
    // The manifest and configuration are stored before the layers (the importer follows the
    // downloads from them): the killed fetch left them, complete, with its complete layers.
    assert_eq!(result.layers_cached as usize + 2, complete_before);
    assert_eq!(
        assert_blobs_intact(&cache)?,
        6 + 2,
        "6 layers, config, manifest"
    );
    let _ = &s.proxy;
    Ok(())
}

/// A registry that goes silent in the middle of blobs: the fetch ends with
/// RegistryUnreachable after the registry timeout instead of never, keeps only complete blobs,
/// leaves no skopeo behind; fetching again from a registry that answers resumes.
#[tokio::test(flavor = "multi_thread")]
async fn registry_silent_midway_ends_the_fetch_and_a_retry_resumes() -> Result<()> {
    // 6 layers of 4 MiB, and the registry silent after 10 MiB: some may arrive, most cannot.
    let s = slow_setup_with(Shaping {
        request_delay: Duration::ZERO,
        bytes_per_second: 100_000_000,
        silent_after: Some(10 << 20),
    })
    .await?;
    let fetcher = ServiceProcess::fetcher(
        &s.scratch,
        &FetcherOptions {
            registries_conf: Some(s.conf.clone()),
            registry_timeout: Some(3),
            ..Default::default()
        },
    )?;
    let dir = s.scratch.runtime_dir();
    let mut conn = dnfimage_interfaces::connect(&dir, FETCHER).await?;
    let stream = conn.fetch(&s.image, Some(4), None).await?;
    futures_util::pin_mut!(stream);
    let mut outcome = None;
    while let Some(item) = stream.next().await {
        match item? {
            Ok(reply) if reply.result.is_some() => outcome = Some(Ok(reply)),
            Ok(_) => {}
            Err(e) => outcome = Some(Err(e)),
        }
    }
    match outcome.context("no final reply")? {
        Err(FetcherError::RegistryUnreachable { message, .. }) => assert!(
            message.contains("nothing arrived for 3 s") && message.contains("resumes"),
            "{message}"
        ),
        other => anyhow::bail!("expected RegistryUnreachable, got {other:?}"),
    }
    let cache = s.scratch.state_dir().join("cache");
    let complete_before = assert_blobs_intact(&cache)?;
    assert!(complete_before < 6, "{complete_before} blobs complete");
    assert_eq!(std::fs::read_dir(cache.join("tmp"))?.count(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while children(fetcher.pid())?.iter().any(|c| c == "skopeo") {
        anyhow::ensure!(Instant::now() < deadline, "skopeo left running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let result = fetch_to_the_end(&dir, &s.direct, 4).await?;
    assert_eq!(result.layers_fetched + result.layers_cached, 6);
    // The failed fetch removed the manifest and configuration it stored first.
    assert_eq!(result.layers_cached as usize, complete_before);
    let _ = &s.proxy;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn second_fetch_is_refused_and_cancel_stops_the_first() -> Result<()> {
    let s = slow_setup().await?;
    let _fetcher = ServiceProcess::fetcher(
        &s.scratch,
        &FetcherOptions {
            registries_conf: Some(s.conf.clone()),
            ..Default::default()
        },
    )?;
    let dir = s.scratch.runtime_dir();
    let mut conn = dnfimage_interfaces::connect(&dir, FETCHER).await?;
    let mut stream = start_slow_fetch(&mut conn, &s.image).await?;

    {
        let mut second_conn = dnfimage_interfaces::connect(&dir, FETCHER).await?;
        let second = second_conn.fetch(&s.image, None, None).await?;
        futures_util::pin_mut!(second);
        let refused = second.next().await.context("no reply")??;
        assert!(
            matches!(refused, Err(FetcherError::AlreadyInProgress { ref image }) if image.contains("slow")),
            "{refused:?}"
        );
    }
    let mut other = dnfimage_interfaces::connect(&dir, FETCHER).await?;
    // Reads still work while the fetch runs.
    assert!(other.list_cached().await?.is_ok());

    let cancelled = other
        .cancel()
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(cancelled.cancelled.is_some_and(|c| c.contains("slow")));
    let started = Instant::now();
    let mut end = None;
    while let Some(item) = stream.next().await {
        if let Err(e) = item? {
            end = Some(e);
        }
    }
    assert!(
        matches!(end, Some(FetcherError::Cancelled { .. })),
        "{end:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_blobs_intact(&s.scratch.state_dir().join("cache"))?;
    // Nothing runs now: the next fetch is accepted.
    let mut conn = dnfimage_interfaces::connect(&dir, FETCHER).await?;
    let next = conn.fetch("docker://-bad", None, None).await?;
    futures_util::pin_mut!(next);
    let reply = next.next().await.context("no reply")??;
    assert!(
        matches!(reply, Err(FetcherError::InvalidImageReference { .. })),
        "{reply:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_fetch_cancels_it_and_exits_cleanly() -> Result<()> {
    let s = slow_setup().await?;
    let mut fetcher = ServiceProcess::fetcher(
        &s.scratch,
        &FetcherOptions {
            registries_conf: Some(s.conf.clone()),
            ..Default::default()
        },
    )?;
    let mut conn = dnfimage_interfaces::connect(&s.scratch.runtime_dir(), FETCHER).await?;
    let mut stream = start_slow_fetch(&mut conn, &s.image).await?;
    fetcher.signal(libc::SIGTERM);
    // The client still hears how its fetch ended.
    let mut end = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(Err(e)) => end = Some(e),
            Ok(Ok(_)) => {}
            Err(e) => anyhow::bail!("the stream broke instead of ending with Cancelled: {e}"),
        }
    }
    assert!(
        matches!(end, Some(FetcherError::Cancelled { .. })),
        "{end:?}"
    );
    let code = fetcher.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "log:\n{}", fetcher.log_text());
    assert!(
        fetcher.log_text().contains("cancelling"),
        "{}",
        fetcher.log_text()
    );
    assert_blobs_intact(&s.scratch.state_dir().join("cache"))?;
    assert!(!s.scratch.socket(FETCHER).exists(), "socket left behind");
    Ok(())
}

#[test]
fn unprivileged_caller_may_inspect_but_not_fetch() -> Result<()> {
    let s = setup_with(FetcherOptions {
        socket_mode: Some("666"),
        ..Default::default()
    })?;
    let as_nobody = |args: &[&str]| {
        let mut cmd = s.scratch.cli();
        cmd.args(args).uid(65534).gid(65534);
        cmd
    };
    let out = run_ok(&mut as_nobody(&["image", "inspect", &s.refs.base_v1]))?;
    assert!(out.contains("Bootable:     yes"), "{out}");
    for args in [
        vec!["image", "fetch", s.refs.base_v1.as_str()],
        vec!["image", "prune"],
    ] {
        let stderr = cli_fails(&mut as_nobody(&args))?;
        assert!(stderr.contains("Permission denied"), "{args:?}: {stderr}");
    }
    assert!(
        std::fs::read_dir(s.cache().join("blobs/sha256"))?
            .next()
            .is_none()
    );
    // Root may.
    run_ok(s.scratch.cli().args(["image", "fetch", &s.refs.base_v1]))?;
    Ok(())
}

#[test]
fn protocol_errors_are_replies_not_dropped_connections() -> Result<()> {
    use std::io::{Read, Write};
    let s = setup()?;
    let socket = s.socket();
    let cases = [
        (
            json!({"method": "org.dnfimage.Fetcher.Nope", "parameters": {}}),
            "org.varlink.service.MethodNotFound",
            "method",
        ),
        (
            json!({"method": "org.other.Iface.Get"}),
            "org.varlink.service.MethodNotFound",
            "method",
        ),
        (
            json!({"method": "org.varlink.service.Nope", "parameters": {}}),
            "org.varlink.service.MethodNotFound",
            "method",
        ),
        (
            json!({"method": "org.dnfimage.Fetcher.Inspect", "parameters": {}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "org.dnfimage.Fetcher.Inspect", "parameters": {"image": 5}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "org.dnfimage.Fetcher.Inspect", "parameters": {"image": "x", "extra": 1}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
        (
            json!({"method": "org.dnfimage.Fetcher.Fetch", "parameters": {"image": "x", "concurrency": "four"}}),
            "org.varlink.service.InvalidParameter",
            "parameter",
        ),
    ];
    // All on one connection: each error is a reply, and the connection stays usable.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let read_reply = |stream: &mut std::os::unix::net::UnixStream| -> Result<Value> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            anyhow::ensure!(stream.read(&mut byte)? == 1, "connection closed");
            if byte[0] == 0 {
                return Ok(serde_json::from_slice(&buf)?);
            }
            buf.push(byte[0]);
        }
    };
    for (call, want, field) in &cases {
        let mut bytes = serde_json::to_vec(call)?;
        bytes.push(0);
        stream.write_all(&bytes)?;
        let reply = read_reply(&mut stream)?;
        assert_eq!(error_name(&reply), Some(*want), "{call} -> {reply}");
        assert!(reply["parameters"][field].is_string(), "{call} -> {reply}");
    }
    stream.write_all(b"{\"method\":\"org.varlink.service.GetInfo\"}\0")?;
    let info = read_reply(&mut stream)?;
    assert_eq!(info["parameters"]["product"], "dnfimage-fetcher");
    Ok(())
}

#[test]
fn served_interface_matches_the_committed_idl() -> Result<()> {
    let s = setup()?;
    dnfimage_integration::assert_served_idl_matches(&s.socket(), FETCHER)
}

#[test]
fn socket_activated_service_exits_when_idle_and_is_activated_again() -> Result<()> {
    let scratch = Scratch::new()?;
    let socket = scratch.socket(FETCHER);
    let log = scratch.path().join("logs/activate.log");
    // Two activations in a row, as systemd would do for a socket unit.
    let script = format!(
        "for i in 1 2; do systemd-socket-activate -l {sock} --fdname=varlink \
         -E DNFIMAGE_STATE_DIR={state} -E DNFIMAGE_IDLE_TIMEOUT=1 -E DNFIMAGE_LOG=debug {bin}; \
         echo exited=$?; done",
        sock = socket.display(),
        state = scratch.state_dir().display(),
        bin = bin("dnfimage-fetcher").display(),
    );
    let out = std::fs::File::create(&log)?;
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let get_info = || -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match raw_call(&socket, &json!({"method": "org.varlink.service.GetInfo"})) {
                Ok(r) => return Ok(r[0].clone()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    let wait_exits = |n: usize| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::read_to_string(&log)?.matches("exited=0").count() < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no idle exit; log:\n{}",
                std::fs::read_to_string(&log)?
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    assert_eq!(get_info()?["parameters"]["product"], "dnfimage-fetcher");
    wait_exits(1)?;
    // A new client: the socket is listened on again and the service started again.
    assert_eq!(get_info()?["parameters"]["product"], "dnfimage-fetcher");
    wait_exits(2)?;
    let status = child.wait()?;
    assert!(status.success());
    let text = std::fs::read_to_string(&log)?;
    assert_eq!(text.matches("Idle, exiting").count(), 2, "{text}");
    assert!(
        !text.contains("dnfimage_runtime: Listening on"),
        "bound its own socket instead of the passed one: {text}"
    );
    Ok(())
}

#[test]
fn varlinkctl_introspects_calls_with_more_and_execs_the_service() -> Result<()> {
    let s = setup()?;
    let socket = s.socket();
    let socket = socket.to_str().context("socket path")?;
    let idl = run_ok(Command::new(dnfimage_integration::varlinkctl()).args([
        "introspect",
        socket,
        FETCHER,
    ]))?;
    assert!(idl.contains("method Fetch("), "{idl}");
    assert!(idl.contains("error DigestMismatch"), "{idl}");

    let params = json!({"image": s.refs.base_v1}).to_string();
    let out = run_ok(Command::new(dnfimage_integration::varlinkctl()).args([
        "call",
        "--more",
        "-j",
        socket,
        &format!("{FETCHER}.Fetch"),
        &params,
    ]))?;
    // `-j` prints JSON-SEQ: each record starts with an RS character.
    let out = out.replace('\u{1e}', "");
    let records: Vec<Value> = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .collect::<Result<_, _>>()?;
    assert!(records.len() >= 3, "{out}");
    assert!(
        records[..records.len() - 1]
            .iter()
            .all(|r| r["progress"].is_object())
    );
    assert_eq!(
        records.last().context("records")?["result"]["digest"],
        Fixtures::shared()?.image(tags::BASE_V1)?.digest.as_str()
    );

    // An error, as varlinkctl shows it.
    let out = run(Command::new(dnfimage_integration::varlinkctl()).args([
        "call",
        socket,
        &format!("{FETCHER}.Inspect"),
        "{\"image\":\"docker://-x\"}",
    ]))?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InvalidImageReference"),
        "{out:?}"
    );

    // exec: hands the service a connected socket (the Accept=yes path); its own state
    // directory, since the running fetcher holds the scratch one.
    let exec = |state: &Path| {
        run(Command::new(dnfimage_integration::varlinkctl())
            .args([
                "call",
                &format!("exec:{}", bin("dnfimage-fetcher").display()),
                "org.varlink.service.GetInfo",
                "{}",
            ])
            .env("DNFIMAGE_STATE_DIR", state)
            .env("DNFIMAGE_LOG", "debug"))
    };
    let out = exec(&s.scratch.path().join("exec-state"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("dnfimage-fetcher"),
        "{out:?}"
    );
    // On the live state directory the second instance refuses, touching nothing.
    let out = exec(&s.scratch.state_dir())?;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is in use by dnfimage-fetcher"),
        "{out:?}"
    );
    Ok(())
}

#[test]
fn python_reference_client_calls_inspect() -> Result<()> {
    let s = setup()?;
    let script = r#"
import sys, varlink
with varlink.Client(address="unix:" + sys.argv[1]) as client:
    with client.open("org.dnfimage.Fetcher") as fetcher:
        reply = fetcher.Inspect(sys.argv[2])
        print(reply["image"]["digest"])
"#;
    let out = run_ok(
        Command::new("python3")
            .args(["-c", script])
            .arg(s.socket())
            .arg(&s.refs.base_v1),
    )?;
    assert_eq!(out.trim(), Fixtures::shared()?.image(tags::BASE_V1)?.digest);
    Ok(())
}

/// Standard base64 (with padding), for the `auth` field of an auth.json.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_encodes_as_the_rfc_says() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), encoded);
    }
}

/// Writes an auth.json at `path` giving `user:password` for `registry`.
fn write_auth_json(path: &Path, registry: &str, user_password: &str) -> Result<()> {
    std::fs::create_dir_all(path.parent().context("parent")?)?;
    let auth = json!({"auths": {registry: {"auth": base64(user_password.as_bytes())}}});
    std::fs::write(path, auth.to_string())?;
    Ok(())
}

const AUTH_USER: &str = "dnfimage";
const AUTH_PASSWORD: &str = "correct horse battery staple";

/// A registry requiring credentials, holding the fixtures; and a fetcher for it started with
/// `authfile` and with `XDG_RUNTIME_DIR` set to `<scratch>/xdg` (empty).
fn auth_setup(authfile: Option<&str>) -> Result<(Scratch, Registry, PushedRefs, ServiceProcess)> {
    let scratch = Scratch::new()?;
    let registry =
        Registry::start_with_auth(&scratch.path().join("registry"), AUTH_USER, AUTH_PASSWORD)?;
    let refs = Fixtures::shared()?.push(&registry, "dnfimage/base")?;
    let xdg = scratch.path().join("xdg");
    std::fs::create_dir_all(&xdg)?;
    let fetcher = ServiceProcess::fetcher(
        &scratch,
        &FetcherOptions {
            registries_conf: Some(scratch.registries_conf(&registry.addr())?),
            authfile: authfile.map(|name| scratch.path().join(name)),
            env: vec![("XDG_RUNTIME_DIR", xdg.into_os_string())],
            ..Default::default()
        },
    )?;
    Ok((scratch, registry, refs, fetcher))
}

/// The cached references (`ListCached`).
fn cached(socket: &Path) -> Result<Vec<String>> {
    let replies = raw_call(socket, &json!({"method": format!("{FETCHER}.ListCached")}))?;
    let last = replies.last().context("no reply")?;
    Ok(last["parameters"]["images"]
        .as_array()
        .context("images")?
        .iter()
        .map(|i| i["reference"].as_str().unwrap_or_default().to_string())
        .collect())
}

#[test]
fn registry_requiring_credentials_takes_only_the_right_ones() -> Result<()> {
    // A configured auth file: missing, then wrong, then right.
    let (scratch, registry, refs, _fetcher) = auth_setup(Some("auth.json"))?;
    let socket = scratch.socket(FETCHER);
    let authfile = scratch.path().join("auth.json");
    let refused = |says: &str| -> Result<()> {
        for method in ["Inspect", "CheckUpdate", "Fetch"] {
            let (name, params) = call_error(&socket, method, json!({"image": refs.base_v1}))?;
            assert_eq!(
                name,
                format!("{FETCHER}.AuthenticationRequired"),
                "{method}: {params}"
            );
            let message = params["message"].as_str().unwrap_or_default();
            assert!(message.contains("authentication required"), "{params}");
            assert!(message.contains(says), "{method}: {params} lacks {says}");
        }
        assert_eq!(cached(&socket)?, Vec::<String>::new());
        Ok(())
    };
    refused(&format!(
        "the configured credentials file {} does not exist",
        authfile.display()
    ))?;
    write_auth_json(&authfile, &registry.addr(), &format!("{AUTH_USER}:wrong"))?;
    refused(&format!(
        "credentials from the configured file {}",
        authfile.display()
    ))?;
    // What a person reads.
    let stderr = cli_fails(scratch.cli().args(["image", "fetch", &refs.base_v1]))?;
    assert!(
        stderr.contains("The registry refused") && stderr.contains("skopeo login"),
        "{stderr}"
    );
    let tmp = scratch.state_dir().join("cache/tmp");
    assert!(std::fs::read_dir(&tmp).map_or(true, |mut d| d.next().is_none()));

    write_auth_json(
        &authfile,
        &registry.addr(),
        &format!("{AUTH_USER}:{AUTH_PASSWORD}"),
    )?;
    let v1 = Fixtures::shared()?.image(tags::BASE_V1)?;
    let fetched = run_ok(
        scratch
            .cli()
            .args(["--json", "image", "fetch", &refs.base_v1]),
    )?;
    let fetched: Value = serde_json::from_str(&fetched)?;
    assert_eq!(fetched["digest"], v1.digest.as_str(), "{fetched}");
    assert_eq!(cached(&socket)?, vec![refs.base_v1.clone()]);
    assert_blobs_intact(&scratch.state_dir().join("cache"))?;
    Ok(())
}

#[test]
fn credentials_in_the_containers_default_path_are_found() -> Result<()> {
    // Nothing configured: $XDG_RUNTIME_DIR/containers/auth.json, where `skopeo login` writes.
    let (scratch, registry, refs, _fetcher) = auth_setup(None)?;
    let socket = scratch.socket(FETCHER);
    let default = scratch.path().join("xdg/containers/auth.json");
    let (name, params) = call_error(&socket, "Fetch", json!({"image": refs.base_v1}))?;
    assert_eq!(
        name,
        format!("{FETCHER}.AuthenticationRequired"),
        "{params}"
    );
    let message = params["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("no credentials: none of {}", default.display()))
            && message.contains("/etc/ostree/auth.json"),
        "{params}"
    );
    // Logged in after the service started: its next call uses them.
    run_ok(
        Command::new("skopeo")
            .arg("login")
            .arg("--authfile")
            .arg(&default)
            .args(["--tls-verify=false", "--username", AUTH_USER, "--password"])
            .arg(AUTH_PASSWORD)
            .arg(registry.addr()),
    )?;
    let v1 = Fixtures::shared()?.image(tags::BASE_V1)?;
    let replies = raw_call(
        &socket,
        &json!({"method": format!("{FETCHER}.Fetch"), "parameters": {"image": refs.base_v1}}),
    )?;
    let last = replies.last().context("no reply")?;
    assert_eq!(
        last["parameters"]["result"]["digest"],
        v1.digest.as_str(),
        "{last}"
    );
    assert_eq!(cached(&socket)?, vec![refs.base_v1.clone()]);
    Ok(())
}

/// A registries.conf naming `mirror` a mirror of `primary`, both plain HTTP.
fn mirror_conf(scratch: &Scratch, primary: &Registry, mirror: &Registry) -> Result<PathBuf> {
    let path = scratch.path().join("registries-mirror.conf");
    std::fs::write(
        &path,
        format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
            primary.addr(),
            mirror.addr()
        ),
    )?;
    Ok(path)
}

#[test]
fn mirror_serves_while_the_primary_is_down_but_cannot_substitute_an_image() -> Result<()> {
    let scratch = Scratch::new()?;
    let mut primary = Registry::start(&scratch.path().join("primary"))?;
    let mirror = Registry::start(&scratch.path().join("mirror"))?;
    let fixtures = Fixtures::shared()?;
    let (v1, v2) = (
        fixtures.image(tags::BASE_V1)?,
        fixtures.image(tags::BASE_V2)?,
    );
    let on_primary = fixtures.push_as(&primary, tags::BASE_V1, "dnfimage/base:v1")?;
    fixtures.push_as(&mirror, tags::BASE_V1, "dnfimage/base:v1")?;
    fixtures.push_as(&mirror, tags::BASE_V2, "dnfimage/base:v2")?;
    let _fetcher = ServiceProcess::fetcher(
        &scratch,
        &FetcherOptions {
            registries_conf: Some(mirror_conf(&scratch, &primary, &mirror)?),
            ..Default::default()
        },
    )?;
    let socket = scratch.socket(FETCHER);
    primary.stop();

    // The mirror serves; the cache records the primary's reference and the image's digest.
    let pos = mirror.log_position()?;
    let out = run_ok(
        scratch
            .cli()
            .args(["--json", "image", "fetch", &on_primary]),
    )?;
    let fetched: Value = serde_json::from_str(&out)?;
    assert_eq!(fetched["digest"], v1.digest.as_str(), "{fetched}");
    let served: BTreeSet<_> = mirror.blob_requests_since(pos)?.into_iter().collect();
    assert!(
        v1.layer_digests().iter().all(|l| served.contains(l)),
        "the mirror did not serve the layers: {served:?}"
    );
    let list = run_ok(scratch.cli().args(["--json", "image", "list"]))?;
    let list: Value = serde_json::from_str(&list)?;
    assert_eq!(
        list["images"][0]["reference"],
        on_primary.as_str(),
        "{list}"
    );
    assert_eq!(list["images"][0]["digest"], v1.digest.as_str(), "{list}");

    // Empty the cache, then make the mirror answer v1's digest with v2's manifest.
    raw_call(
        &socket,
        &json!({"method": format!("{FETCHER}.Prune"), "parameters": {"keep": []}}),
    )?;
    assert_eq!(cached(&socket)?, Vec::<String>::new());
    std::fs::copy(
        mirror.blob_data_path(&v2.digest),
        mirror.blob_data_path(&v1.digest),
    )?;
    let pinned = format!("docker://{}/dnfimage/base@{}", primary.addr(), v1.digest);
    for method in ["Inspect", "CheckUpdate", "Fetch"] {
        let (name, params) = call_error(&socket, method, json!({"image": pinned}))?;
        assert_eq!(
            name,
            format!("{FETCHER}.DigestMismatch"),
            "{method}: {params}"
        );
        assert_eq!(params["expected"], v1.digest.as_str(), "{params}");
        // skopeo names no digest when it refuses the manifest; the fetcher's own check does.
        assert!(
            params["actual"].is_null() || params["actual"] == v2.digest.as_str(),
            "{params}"
        );
    }
    assert_eq!(cached(&socket)?, Vec::<String>::new());
    let blobs = scratch.state_dir().join("cache/blobs/sha256");
    let kept = std::fs::read_dir(&blobs).map_or(0, |d| d.count());
    assert_eq!(kept, 0, "blobs kept in {}", blobs.display());
    let stderr = cli_fails(scratch.cli().args(["image", "fetch", &pinned]))?;
    assert!(stderr.contains("Digest mismatch"), "{stderr}");

    // skopeo takes the mirror's answer without falling back: the same with the primary up.
    primary.restart()?;
    let (name, params) = call_error(&socket, "Fetch", json!({"image": pinned}))?;
    assert_eq!(name, format!("{FETCHER}.DigestMismatch"), "{params}");
    assert_eq!(cached(&socket)?, Vec::<String>::new());
    Ok(())
}
