//! The importer end to end: the real service binary on a test sysroot made with `ostree admin`,
//! importing the fixture images (and damaged, derived and large variants of them) from OCI
//! layouts, checked with the `ostree` command line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_integration::importer_support::{
    self as support, BIG_FILLER_BYTES, Call, Tmpfs, big_base, blob_path, copy_layout, derive,
    layer_digests, random_file, refs,
};
use dnfimage_integration::sysroot::{STATEROOT, TestSysroot};
use dnfimage_integration::{Scratch, ServiceProcess, error_name, raw_call, run, run_ok};
use dnfimage_interfaces::importer::{self, ImporterProxy};
use dnfimage_testimage::{DERIVED_CONTENT, DERIVED_FILE, Fixtures, tags};
use futures_util::StreamExt;
use serde_json::{Value, json};

const IMPORTER: &str = importer::INTERFACE;
const IMAGE_REFS: &str = "ostree/container/image/";
const LAYER_REFS: &str = "ostree/container/blob/";

/// Where the tests say the images come from.
fn registry_ref(tag: &str) -> String {
    format!("docker://registry.example:5000/dnfimage/base:{tag}")
}

/// The ostree reference ostree-ext records `image` under.
fn image_ref_name(image: &str) -> String {
    ostree_ext::refescape::prefix_escape_for_ref("ostree/container/image", image)
        .expect("an image reference can be escaped")
}

/// A scratch directory, a sysroot in it, and the importer serving that sysroot. Fields drop in
/// order: the service stops before its sysroot goes.
struct Setup {
    service: ServiceProcess,
    sysroot: TestSysroot,
    scratch: Scratch,
}

fn start(scratch: &Scratch, sysroot: &Path) -> Result<ServiceProcess> {
    ServiceProcess::start(
        scratch,
        "importer",
        IMPORTER,
        &[
            "--sysroot".as_ref(),
            sysroot.as_os_str(),
            "--socket-mode".as_ref(),
            "666".as_ref(),
        ],
    )
}

fn setup() -> Result<Setup> {
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let service = start(&scratch, sysroot.path())?;
    Ok(Setup {
        service,
        sysroot,
        scratch,
    })
}

/// How an import ended: its progress records, then its result or its error (name, parameters).
struct Outcome {
    progress: Vec<Value>,
    end: Result<Value, (String, Value)>,
    elapsed: Duration,
}

impl Outcome {
    fn result(self) -> Result<Value> {
        self.end
            .map_err(|(name, params)| anyhow::anyhow!("the import failed: {name} {params}"))
    }

    fn error(self) -> Result<(String, Value)> {
        match self.end {
            Ok(r) => anyhow::bail!("the import succeeded: {r}"),
            Err(e) => Ok(e),
        }
    }
}

impl Setup {
    fn socket(&self) -> PathBuf {
        self.scratch.socket(IMPORTER)
    }

    fn repo(&self) -> PathBuf {
        self.sysroot.repo()
    }

    fn restart(&mut self) -> Result<()> {
        self.service.kill();
        self.service = start(&self.scratch, self.sysroot.path())?;
        Ok(())
    }

    fn start_import(&self, source: &str, image: &str) -> Result<Call> {
        Call::start(
            &self.socket(),
            &format!("{IMPORTER}.Import"),
            json!({"source": source, "image": image}),
            true,
        )
    }

    fn import(&self, source: &str, image: &str) -> Result<Outcome> {
        let started = Instant::now();
        let replies = self.start_import(source, image)?.rest()?;
        let elapsed = started.elapsed();
        let (last, progress) = replies.split_last().context("no reply")?;
        let end = match error_name(last) {
            Some(name) => Err((name.to_string(), last["parameters"].clone())),
            None => Ok(last["parameters"]["result"].clone()),
        };
        Ok(Outcome {
            progress: progress
                .iter()
                .map(|r| r["parameters"]["progress"].clone())
                .collect(),
            end,
            elapsed,
        })
    }

    fn call(&self, method: &str, params: Value) -> Result<Value> {
        let replies = raw_call(
            &self.socket(),
            &json!({"method": format!("{IMPORTER}.{method}"), "parameters": params}),
        )?;
        let last = replies.last().context("no reply")?;
        anyhow::ensure!(error_name(last).is_none(), "{method} failed: {last}");
        Ok(last["parameters"].clone())
    }

    fn list_images(&self) -> Result<Vec<Value>> {
        Ok(self.call("ListImages", json!({}))?["images"]
            .as_array()
            .context("images")?
            .clone())
    }

    fn prune(&self, keep: &[&str]) -> Result<Value> {
        let replies = Call::start(
            &self.socket(),
            &format!("{IMPORTER}.Prune"),
            json!({"keep": keep}),
            true,
        )?
        .rest()?;
        let last = replies.last().context("no reply")?;
        anyhow::ensure!(error_name(last).is_none(), "Prune failed: {last}");
        Ok(last["parameters"]["result"].clone())
    }

    fn refs(&self) -> Result<Vec<String>> {
        refs(&self.repo())
    }

    fn refs_under(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .refs()?
            .into_iter()
            .filter(|r| r.starts_with(prefix))
            .collect())
    }

    fn cat(&self, commit: &str, path: &str) -> Result<String> {
        support::cat(&self.repo(), commit, path)
    }

    fn exists(&self, commit: &str, path: &str) -> Result<bool> {
        support::exists(&self.repo(), commit, path)
    }
}

/// The size `ostree ls` gives for the file `path` of `commit`.
fn file_size(s: &Setup, commit: &str, path: &str) -> Result<u64> {
    let line = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", s.repo().display()))
            .args(["ls", commit, path]),
    )?;
    line.split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("No size in {line:?}"))
}

fn fixture_source(tag: &str) -> Result<String> {
    Ok(Fixtures::shared()?.oci_ref(tag))
}

fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_default()
}

/// The layers of `tag` in `layout` with their sizes.
fn layer_sizes(layout: &Path, tag: &str) -> Result<Vec<(String, u64)>> {
    Ok(support::manifest(layout, tag)?["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .map(|l| (str_of(l, "digest").to_string(), u64_of(l, "size")))
        .collect())
}

/// Checks that progress records are well-formed and consistent with the result.
fn check_progress(progress: &[Value], result: &Value) {
    assert!(!progress.is_empty(), "no progress records");
    assert_eq!(progress[0]["phase"], "preparing", "{}", progress[0]);
    let mut layers_done = 0;
    let mut phases = vec![];
    for p in progress {
        let done = u64_of(p, "layersDone");
        assert!(done >= layers_done, "layersDone went back: {p}");
        layers_done = done;
        assert!(u64_of(p, "bytesDone") <= u64_of(p, "bytesTotal"), "{p}");
        if let Some(d) = p["layerBytesDone"].as_u64() {
            assert!(d <= u64_of(p, "layerBytesTotal"), "{p}");
        }
        assert!(!str_of(p, "message").is_empty(), "{p}");
        let phase = str_of(p, "phase").to_string();
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
    }
    let imported = u64_of(result, "layersImported");
    assert_eq!(layers_done, imported, "layers done vs imported");
    if imported > 0 {
        assert_eq!(phases, ["preparing", "importing", "committing"]);
        let last = progress.last().unwrap_or(&Value::Null);
        assert_eq!(u64_of(last, "bytesDone"), u64_of(result, "bytesImported"));
        let per_layer: BTreeSet<&str> = progress
            .iter()
            .filter_map(|p| p["layer"].as_str())
            .collect();
        assert_eq!(
            per_layer.len() as u64,
            imported,
            "every imported layer is reported"
        );
    }
}

#[test]
fn imports_v1_then_only_the_changed_layers_of_v2_under_the_registry_reference() -> Result<()> {
    let f = Fixtures::shared()?;
    let s = setup()?;
    let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);
    let (v1_ref, v2_ref) = (registry_ref("v1"), registry_ref("v2"));

    let out = s.import(&fixture_source(tags::BASE_V1)?, &v1_ref)?;
    let progress = out.progress.clone();
    let v1_time = out.elapsed;
    let r1 = out.result()?;
    eprintln!("import of base v1 (cold): {v1_time:?}");
    check_progress(&progress, &r1);
    assert_eq!(r1["reference"], v1_ref.as_str());
    assert_eq!(r1["digest"], v1.digest.as_str());
    assert_eq!(r1["version"], "1");
    assert_eq!(
        u64_of(&r1, "layersImported"),
        v1.layer_digests().len() as u64
    );
    assert_eq!(u64_of(&r1, "layersSkipped"), 0);
    assert_eq!(u64_of(&r1, "bytesImported"), v1.layers_size());
    assert_eq!(r1["warnings"], json!([]));
    let c1 = str_of(&r1, "commit").to_string();
    assert!(s.cat(&c1, "/usr/lib/os-release")?.contains("VERSION=\"1\""));
    assert_eq!(s.cat(&c1, "/usr/etc/hostname")?, "dnfimage-test\n");
    assert!(s.exists(&c1, "/usr/bin/busybox")?);

    // Recorded under the registry reference only, never under the cache path.
    assert_eq!(s.refs_under(IMAGE_REFS)?, [image_ref_name(&v1_ref)]);
    assert!(
        s.refs()?.iter().all(|r| !r.contains("oci")),
        "{:?}",
        s.refs()?
    );
    let run_parse = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", s.repo().display()))
            .args(["rev-parse", &image_ref_name(&v1_ref)]),
    )?;
    assert_eq!(run_parse.trim(), c1);

    // v2 through the typed client: only the layers v1 lacks are imported.
    let v1_layers: BTreeSet<String> = v1.layer_digests().into_iter().collect();
    let new_layers: Vec<_> = v2
        .manifest
        .layers()
        .iter()
        .filter(|l| !v1_layers.contains(&l.digest().to_string()))
        .collect();
    assert_eq!(new_layers.len(), 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let (r2, records) = rt.block_on(async {
        let mut conn = dnfimage_interfaces::connect(&s.scratch.runtime_dir(), IMPORTER).await?;
        let source = fixture_source(tags::BASE_V2)?;
        let stream = conn.import(&source, &v2_ref).await?;
        futures_util::pin_mut!(stream);
        let (mut result, mut records) = (None, 0);
        while let Some(item) = stream.next().await {
            let reply = item?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            records += usize::from(reply.progress.is_some());
            if reply.result.is_some() {
                result = reply.result;
            }
        }
        anyhow::Ok((result.context("no result")?, records))
    })?;
    let v2_time = started.elapsed();
    eprintln!("import of base v2 after v1: {v2_time:?}");
    assert!(records > 0);
    assert_eq!(r2.layers_imported, 2);
    assert_eq!(r2.layers_skipped, v2.layer_digests().len() as u64 - 2);
    assert_eq!(
        r2.bytes_imported,
        new_layers.iter().map(|l| l.size()).sum::<u64>()
    );
    assert_eq!(r2.digest, v2.digest);
    assert_eq!(r2.version.as_deref(), Some("2"));
    assert!(
        s.cat(&r2.commit, "/usr/lib/os-release")?
            .contains("VERSION=\"2\"")
    );

    let images = s.list_images()?;
    let listed: Vec<(&str, &str, &str, bool)> = images
        .iter()
        .map(|i| {
            (
                str_of(i, "reference"),
                str_of(i, "digest"),
                str_of(i, "commit"),
                i["deployed"] == true,
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (v1_ref.as_str(), v1.digest.as_str(), c1.as_str(), false),
            (
                v2_ref.as_str(),
                v2.digest.as_str(),
                r2.commit.as_str(),
                false
            ),
        ]
    );
    assert_eq!(images[0]["version"], "1");
    assert_eq!(images[0]["created"], "2024-01-01T00:00:00Z");

    // Importing again writes nothing.
    let again = s
        .import(&fixture_source(tags::BASE_V2)?, &v2_ref)?
        .result()?;
    assert_eq!(u64_of(&again, "layersImported"), 0);
    assert_eq!(
        u64_of(&again, "layersSkipped"),
        v2.layer_digests().len() as u64
    );
    assert_eq!(str_of(&again, "commit"), r2.commit);
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn derived_image_brings_its_extra_file() -> Result<()> {
    let f = Fixtures::shared()?;
    let s = setup()?;
    s.import(&fixture_source(tags::BASE_V1)?, &registry_ref("v1"))?
        .result()?;
    let derived_ref = "docker://registry.example:5000/dnfimage/derived:latest";
    let r = s
        .import(&fixture_source(tags::DERIVED)?, derived_ref)?
        .result()?;
    let base_layers = f.image(tags::BASE_V1)?.layer_digests().len() as u64;
    assert_eq!(u64_of(&r, "layersImported"), 1);
    assert_eq!(u64_of(&r, "layersSkipped"), base_layers);
    assert_eq!(r["warnings"], json!([]));
    let commit = str_of(&r, "commit");
    assert_eq!(s.cat(commit, &format!("/{DERIVED_FILE}"))?, DERIVED_CONTENT);
    assert!(
        s.cat(commit, "/usr/lib/os-release")?
            .contains("VERSION=\"1\"")
    );
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn refuses_what_it_cannot_import_and_writes_nothing() -> Result<()> {
    let s = setup()?;
    let image = registry_ref("x");
    let cases: &[(String, &str, &str)] = &[
        (
            fixture_source(tags::NOT_BOOTABLE)?,
            image.as_str(),
            "NotBootable",
        ),
        (
            "docker://registry.example/os:1".into(),
            image.as_str(),
            "InvalidImageReference",
        ),
        (
            "oci:relative/path:x".into(),
            image.as_str(),
            "InvalidImageReference",
        ),
        (
            fixture_source(tags::BASE_V1)?,
            "containers-storage:os",
            "InvalidImageReference",
        ),
        // A digest must be whole: skopeo could never find this one.
        (
            fixture_source(tags::BASE_V1)?,
            "registry.example/os@sha256:0123",
            "InvalidImageReference",
        ),
        (
            format!("oci:/{}", "a".repeat(100 << 10)),
            image.as_str(),
            "InvalidImageReference",
        ),
        (
            fixture_source("no-such-tag")?,
            image.as_str(),
            "ImageNotFound",
        ),
        (
            "oci:/nonexistent/layout:x".into(),
            image.as_str(),
            "ImageNotFound",
        ),
    ];
    for (source, image, want) in cases {
        let (name, params) = s.import(source, image)?.error()?;
        assert_eq!(
            name,
            format!("{IMPORTER}.{want}"),
            "{source} {image}: {params}"
        );
        if *want == "NotBootable" {
            assert_eq!(params["image"], *image);
        }
    }
    assert_eq!(s.refs()?, Vec::<String>::new());
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn damaged_layers_are_corrupt_layer_errors_and_leave_no_reference() -> Result<()> {
    let f = Fixtures::shared()?;
    let s = setup()?;
    let layout = s.scratch.path().join("layout");
    copy_layout(&f.oci_dir, &[tags::BASE_V1], &layout)?;
    let image = registry_ref("v1");
    let source = oci_ref(&layout, tags::BASE_V1);
    let (big, size) = layer_sizes(&layout, tags::BASE_V1)?
        .into_iter()
        .max_by_key(|l| l.1)
        .context("no layers")?;
    let blob = blob_path(&layout, &big);
    let original = std::fs::read(&blob)?;

    // Truncated: found before anything is written.
    std::fs::write(&blob, &original[..original.len() / 2])?;
    let (name, params) = s.import(&source, &image)?.error()?;
    assert_eq!(name, format!("{IMPORTER}.CorruptLayer"), "{params}");
    assert_eq!(params["layer"], big.as_str());
    assert_eq!(params["image"], image.as_str());
    assert_eq!(s.refs()?, Vec::<String>::new());

    // Same size, one byte changed in the middle: found while importing.
    let mut damaged = original.clone();
    damaged[original.len() / 2] ^= 0x55;
    std::fs::write(&blob, &damaged)?;
    assert_eq!(damaged.len() as u64, size);
    let (name, params) = s.import(&source, &image)?.error()?;
    assert_eq!(name, format!("{IMPORTER}.CorruptLayer"), "{params}");
    assert_eq!(params["layer"], big.as_str());
    assert!(s.refs_under(IMAGE_REFS)?.is_empty());
    let blob_refs = s.refs_under(LAYER_REFS)?;
    assert!(
        blob_refs
            .iter()
            .all(|r| !r.contains(big.trim_start_matches("sha256:"))),
        "{blob_refs:?}"
    );
    s.sysroot.fsck()?;

    // Repaired: the import completes.
    std::fs::write(&blob, &original)?;
    s.import(&source, &image)?.result()?;

    // A derived layer replaced by another valid layer of the same size: its tar stream is
    // committed before skopeo finds the digest wrong, and the reference must not survive.
    let root = s.scratch.path().join("derived-root");
    random_file(&root.join("usr/share/dnfimage-test/data"), 8192)?;
    let layer = derive(&layout, tags::BASE_V1, "derived-big", &root)?;
    let layer_blob = blob_path(&layout, &layer);
    let layer_size = std::fs::metadata(&layer_blob)?.len();
    let other_root = s.scratch.path().join("other-root");
    std::fs::create_dir_all(other_root.join("usr/share/dnfimage-test"))?;
    std::fs::write(other_root.join("usr/share/dnfimage-test/data"), b"other\n")?;
    derive(&layout, tags::BASE_V1, "other", &other_root)?;
    let other_layer = layer_digests(&layout, "other")?.pop().context("layer")?;
    let mut replacement = std::fs::read(blob_path(&layout, &other_layer))?;
    assert!(replacement.len() as u64 <= layer_size);
    // gzip readers stop at the end of the member: the padding is never read.
    replacement.resize(layer_size as usize, 0);
    let good = std::fs::read(&layer_blob)?;
    std::fs::write(&layer_blob, &replacement)?;
    let derived_ref = registry_ref("derived");
    let (name, params) = s
        .import(&oci_ref(&layout, "derived-big"), &derived_ref)?
        .error()?;
    assert_eq!(name, format!("{IMPORTER}.CorruptLayer"), "{params}");
    assert_eq!(params["layer"], layer.as_str());
    assert_eq!(s.refs_under(IMAGE_REFS)?, [image_ref_name(&image)]);
    let layer_hex = layer.trim_start_matches("sha256:");
    assert!(
        s.refs()?.iter().all(|r| !r.contains(layer_hex)),
        "a reference to the damaged layer survived: {:?}",
        s.refs()?
    );
    s.sysroot.fsck()?;
    std::fs::write(&layer_blob, &good)?;
    let r = s
        .import(&oci_ref(&layout, "derived-big"), &derived_ref)?
        .result()?;
    assert_eq!(u64_of(&r, "layersImported"), 1);
    assert_eq!(
        file_size(&s, str_of(&r, "commit"), "/usr/share/dnfimage-test/data")?,
        8192
    );
    Ok(())
}

#[test]
fn content_outside_usr_is_reported_as_dropped_or_moved() -> Result<()> {
    let f = Fixtures::shared()?;
    let s = setup()?;
    let layout = s.scratch.path().join("layout");
    copy_layout(&f.oci_dir, &[tags::BASE_V1], &layout)?;
    let root = s.scratch.path().join("root");
    for (path, content) in [
        ("opt/app/bin/tool", "#!/bin/sh\n"),
        ("opt/app/README", "app\n"),
        ("var/lib/app/state", "fresh\n"),
        ("usr/share/app/ok", "kept\n"),
    ] {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        std::fs::write(p, content)?;
    }
    let layer = derive(&layout, tags::BASE_V1, "app", &root)?;
    let image = "docker://registry.example:5000/dnfimage/app:1";
    let out = s.import(&oci_ref(&layout, "app"), image)?;
    let warned: Vec<Value> = out
        .progress
        .iter()
        .filter(|p| !p["warning"].is_null())
        .map(|p| p["warning"].clone())
        .collect();
    let r = out.result()?;
    let warnings = r["warnings"].as_array().context("warnings")?.clone();
    assert_eq!(warned, warnings, "every warning is streamed as it is found");
    let summary: Vec<Value> = warnings
        .iter()
        .map(|w| json!([w["kind"], w["path"], w["movedTo"], w["files"], w["layer"]]))
        .collect();
    assert_eq!(
        summary,
        [
            json!(["dropped", "/opt", null, 2, layer]),
            json!(["moved", "/var", "/usr/share/factory/var", 1, layer]),
        ]
    );
    assert!(warnings.iter().all(|w| !str_of(w, "message").is_empty()));
    let commit = str_of(&r, "commit");
    assert_eq!(s.cat(commit, "/usr/share/app/ok")?, "kept\n");
    assert_eq!(
        s.cat(commit, "/usr/share/factory/var/lib/app/state")?,
        "fresh\n"
    );
    assert!(!s.exists(commit, "/opt/app/README")?);
    assert!(!s.exists(commit, "/var/lib/app/state")?);

    // The warnings stay with the image.
    let images = s.list_images()?;
    let listed = images
        .iter()
        .find(|i| i["reference"] == image)
        .context("not listed")?;
    assert_eq!(listed["warnings"], json!(warnings));
    Ok(())
}

#[test]
fn each_derived_layer_is_read_for_dropped_content_once() -> Result<()> {
    let f = Fixtures::shared()?;
    let s = setup()?;
    let layout = s.scratch.path().join("layout");
    copy_layout(&f.oci_dir, &[tags::BASE_V1], &layout)?;
    let write = |root: &Path, path: &str, content: &str| -> Result<()> {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        Ok(std::fs::write(p, content)?)
    };
    let root = s.scratch.path().join("root");
    write(&root, "opt/app/bin/tool", "#!/bin/sh\n")?;
    write(&root, "var/lib/app/state", "fresh\n")?;
    let app = derive(&layout, tags::BASE_V1, "app", &root)?;
    let root2 = s.scratch.path().join("root2");
    write(&root2, "srv/www/index.html", "<p>\n")?;
    write(&root2, "usr/share/app2/ok", "kept\n")?;
    let app2 = derive(&layout, "app", "app2", &root2)?;

    let first = s
        .import(&oci_ref(&layout, "app"), &registry_ref("app"))?
        .result()?;
    // The layer the second image shares is gone from the source: the second import neither
    // imports it again (its commit is in the repository) nor reads it for its warnings.
    std::fs::remove_file(blob_path(&layout, &app))?;
    let out = s.import(&oci_ref(&layout, "app2"), &registry_ref("app2"))?;
    let progress = out.progress.clone();
    let r = out.result()?;
    assert_eq!(u64_of(&r, "layersImported"), 1);
    let summary: Vec<Value> = r["warnings"]
        .as_array()
        .context("warnings")?
        .iter()
        .map(|w| json!([w["kind"], w["path"], w["files"], w["layer"]]))
        .collect();
    assert_eq!(
        summary,
        [
            json!(["dropped", "/opt", 1, app]),
            json!(["moved", "/var", 1, app]),
            json!(["dropped", "/srv", 1, app2]),
        ]
    );
    // The shared layer's warnings are the ones its first import gave.
    assert_eq!(r["warnings"][0], first["warnings"][0]);
    assert_eq!(r["warnings"][1], first["warnings"][1]);
    assert!(
        progress.iter().any(|p| str_of(p, "message").contains(
            "Checking 2 derived layers for content the commit does not hold (1 read during the \
             import, 1 known from earlier imports)"
        )),
        "{progress:?}"
    );
    let commit = str_of(&r, "commit");
    assert_eq!(s.cat(commit, "/usr/share/app2/ok")?, "kept\n");
    s.sysroot.fsck()?;
    Ok(())
}

/// Starts importing `source`, and kills the service (SIGKILL) once `layer` is partly imported.
fn kill_while_importing(s: &mut Setup, source: &str, image: &str, layer: &str) -> Result<()> {
    let mut call = s.start_import(source, image)?;
    loop {
        let reply = call
            .next_reply()?
            .context("the import ended before the layer was partly imported")?;
        anyhow::ensure!(error_name(&reply).is_none(), "the import failed: {reply}");
        let p = &reply["parameters"]["progress"];
        anyhow::ensure!(
            !p.is_null(),
            "the import completed before it could be killed"
        );
        if p["layer"] == layer && u64_of(p, "layerBytesDone") > 0 {
            anyhow::ensure!(
                u64_of(p, "layerBytesDone") < u64_of(p, "layerBytesTotal"),
                "the layer was complete before it could be killed: {p}"
            );
            s.service.kill();
            return Ok(());
        }
    }
}

#[test]
fn killed_in_a_chunked_layer_leaves_no_image_and_the_next_import_completes() -> Result<()> {
    let (layout, tag) = big_base()?;
    let mut s = setup()?;
    let image = registry_ref("big");
    let source = oci_ref(&layout, tag);
    let layers = layer_sizes(&layout, tag)?;
    let (big, _) = layers
        .iter()
        .max_by_key(|l| l.1)
        .context("no layers")?
        .clone();
    kill_while_importing(&mut s, &source, &image, &big)?;

    assert!(s.refs_under(IMAGE_REFS)?.is_empty(), "{:?}", s.refs()?);
    let digests: BTreeSet<String> = layers.iter().map(|l| l.0.replace(':', "_3A_")).collect();
    let left = s.refs_under(LAYER_REFS)?;
    for r in &left {
        assert!(
            digests.contains(&r[LAYER_REFS.len()..]),
            "{r} is not a layer of the image"
        );
        assert!(
            !r.contains(big.trim_start_matches("sha256:")),
            "the killed layer has a reference"
        );
    }
    s.sysroot.fsck()?;

    s.restart()?;
    let out = s.import(&source, &image)?;
    let elapsed = out.elapsed;
    let r = out.result()?;
    eprintln!(
        "import of the {} MiB image after a kill: {elapsed:?}",
        BIG_FILLER_BYTES >> 20
    );
    assert_eq!(u64_of(&r, "layersSkipped"), left.len() as u64);
    assert_eq!(
        u64_of(&r, "layersImported") + u64_of(&r, "layersSkipped"),
        layers.len() as u64
    );
    assert_eq!(s.refs_under(IMAGE_REFS)?, [image_ref_name(&image)]);
    s.sysroot.fsck()?;
    Ok(())
}

/// Files in the large derived layer.
const DERIVED_FILES: usize = 4000;

#[test]
fn killed_in_a_derived_layer_leaves_no_reference_to_it() -> Result<()> {
    let f = Fixtures::shared()?;
    let mut s = setup()?;
    let layout = s.scratch.path().join("layout");
    copy_layout(&f.oci_dir, &[tags::BASE_V1], &layout)?;
    let root = s.scratch.path().join("root");
    // Files of 7680 bytes make tar entries of 8192 bytes, the size of the buffers the layer
    // goes through on its way to `ostree commit`: the stream the killed import leaves that
    // process ends between two entries, which libarchive takes for a complete archive.
    for i in 0..DERIVED_FILES {
        random_file(
            &root.join(format!("usr/share/big/{:02}/{i:04}", i % 16)),
            7680,
        )?;
    }
    let layer = derive(&layout, tags::BASE_V1, "big-derived", &root)?;
    s.import(&oci_ref(&layout, tags::BASE_V1), &registry_ref("v1"))?
        .result()?;
    let image = registry_ref("big-derived");
    let source = oci_ref(&layout, "big-derived");
    kill_while_importing(&mut s, &source, &image, &layer)?;

    // Starting again cleans up whatever the killed import's `ostree commit` left.
    s.restart()?;
    let layer_hex = layer.trim_start_matches("sha256:");
    assert!(
        s.refs()?.iter().all(|r| !r.contains(layer_hex)),
        "a reference to the half-imported layer survived: {:?}",
        s.refs()?
    );
    assert_eq!(
        s.refs_under(IMAGE_REFS)?,
        [image_ref_name(&registry_ref("v1"))]
    );
    s.sysroot.fsck()?;

    let r = s.import(&source, &image)?.result()?;
    assert_eq!(u64_of(&r, "layersImported"), 1);
    let listing = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", s.repo().display()))
            .args(["ls", "-R", str_of(&r, "commit"), "/usr/share/big"]),
    )?;
    let files = listing.lines().filter(|l| l.starts_with('-')).count();
    assert_eq!(
        files, DERIVED_FILES,
        "every file of the layer is in the commit"
    );
    s.sysroot.fsck()?;
    Ok(())
}

/// What a killed import can leave in the worst case, made by hand: the `ostree commit` child
/// that imports a derived layer outlives the service and, a moment later, commits the part of
/// the layer it got (libarchive takes a stream cut between two entries for a whole archive).
#[test]
fn restart_waits_for_an_orphaned_layer_commit_and_removes_what_it_left() -> Result<()> {
    let f = Fixtures::shared()?;
    let mut s = setup()?;
    s.import(&fixture_source(tags::BASE_V1)?, &registry_ref("v1"))?
        .result()?;
    let layer = f
        .image(tags::DERIVED)?
        .layer_digests()
        .pop()
        .context("no layers")?;
    let layer_ref = ostree_ext::refescape::prefix_escape_for_ref("ostree/container/blob", &layer)?;
    let journal = s.repo().join("dnfimage-import-journal.json");
    // The journal the killed import wrote before it started.
    std::fs::write(
        &journal,
        serde_json::to_vec(&json!({
            "image": registry_ref("derived"),
            "pending": [layer_ref],
            "completed": [],
        }))?,
    )?;
    // The importer is killed; its orphan, which inherited the importer's lock (as ostree-ext's
    // `ostree commit` children do), still runs and commits part of the layer in a second.
    s.service.kill();
    let lock = hold_importer_lock_of_a_dead_process(&s.repo())?;
    let partial = s.scratch.path().join("partial");
    std::fs::create_dir_all(partial.join("usr/share"))?;
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(concat!(
            r#"exec -a ostree perl -e 'sleep 1; exec "ostree", "--repo=$ENV{REPO}", "commit", "#,
            r#""--branch", $ARGV[2], "--tree=dir=$ENV{TREE}" or die' commit --branch "$0""#
        ))
        .arg(&layer_ref)
        .env("REPO", s.repo())
        .env("TREE", &partial)
        .stdout(std::process::Stdio::null());
    dnfimage_integration::pass_as_fd3(&mut cmd, std::os::fd::AsRawFd::as_raw_fd(&lock));
    let mut orphan = cmd.spawn()?;
    drop(lock);

    // The new importer waits for the lock, i.e. for the orphan, before it serves.
    s.service = start(&s.scratch, s.sysroot.path())?;
    let status = orphan.try_wait()?;
    if status.is_none() {
        // Our own child: stop it before failing.
        let _ = orphan.kill();
        let _ = orphan.wait();
        anyhow::bail!("the service served before the orphaned commit ended");
    }
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(!s.refs()?.contains(&layer_ref), "{:?}", s.refs()?);
    assert!(!journal.exists());
    assert!(
        s.service.log_text().contains("Waiting for the processes"),
        "{}",
        s.service.log_text()
    );
    let r = s
        .import(&fixture_source(tags::DERIVED)?, &registry_ref("derived"))?
        .result()?;
    assert_eq!(u64_of(&r, "layersImported"), 1);
    assert_eq!(
        s.cat(str_of(&r, "commit"), &format!("/{DERIVED_FILE}"))?,
        DERIVED_CONTENT
    );
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn cancel_stops_an_import_and_a_second_one_is_refused_meanwhile() -> Result<()> {
    let (layout, tag) = big_base()?;
    let s = setup()?;
    let image = registry_ref("big");
    let source = oci_ref(&layout, tag);
    let (big, _) = layer_sizes(&layout, tag)?
        .into_iter()
        .max_by_key(|l| l.1)
        .context("no layers")?;
    let mut call = s.start_import(&source, &image)?;
    loop {
        let reply = call.next_reply()?.context("the import ended")?;
        let p = &reply["parameters"]["progress"];
        anyhow::ensure!(!p.is_null(), "the import ended first: {reply}");
        if p["layer"] == big.as_str() && u64_of(p, "layerBytesDone") > 0 {
            break;
        }
    }
    let (name, params) = s
        .import(&fixture_source(tags::BASE_V1)?, &registry_ref("v1"))?
        .error()?;
    assert_eq!(name, format!("{IMPORTER}.AlreadyInProgress"));
    assert!(str_of(&params, "operation").contains(&image), "{params}");
    // Reads answer meanwhile.
    let started = Instant::now();
    assert!(s.list_images()?.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "ListImages took {:?}",
        started.elapsed()
    );

    let cancelled = s.call("Cancel", json!({}))?;
    assert!(
        str_of(&cancelled, "cancelled").contains(&image),
        "{cancelled}"
    );
    let started = Instant::now();
    let last = call.rest()?.pop().context("no end")?;
    assert_eq!(
        error_name(&last),
        Some(format!("{IMPORTER}.Cancelled").as_str()),
        "{last}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cancel took {:?}",
        started.elapsed()
    );
    assert!(s.refs_under(IMAGE_REFS)?.is_empty());
    // Layers imported in full before the cancel stay (layers are imported several at once),
    // and are all a later import reuses.
    let kept = s.refs_under(LAYER_REFS)?.len() as u64;
    s.sysroot.fsck()?;
    assert!(s.call("Cancel", json!({}))?["cancelled"].is_null());

    let r = s
        .import(&fixture_source(tags::BASE_V1)?, &registry_ref("v1"))?
        .result()?;
    assert!(u64_of(&r, "layersSkipped") <= kept, "{r} ({kept} kept)");
    assert!(u64_of(&r, "layersImported") > 0, "{r}");
    Ok(())
}

#[test]
fn sigterm_during_an_import_cancels_it_and_exits_cleanly() -> Result<()> {
    let (layout, tag) = big_base()?;
    let mut s = setup()?;
    let image = registry_ref("big");
    let (big, _) = layer_sizes(&layout, tag)?
        .into_iter()
        .max_by_key(|l| l.1)
        .context("no layers")?;
    let mut call = s.start_import(&oci_ref(&layout, tag), &image)?;
    loop {
        let reply = call.next_reply()?.context("the import ended")?;
        let p = &reply["parameters"]["progress"];
        anyhow::ensure!(!p.is_null(), "the import ended first: {reply}");
        if p["layer"] == big.as_str() && u64_of(p, "layerBytesDone") > 0 {
            break;
        }
    }
    s.service.signal(libc::SIGTERM);
    // The client still hears how its import ended.
    let last = call.rest()?.pop().context("no end")?;
    assert_eq!(
        error_name(&last),
        Some(format!("{IMPORTER}.Cancelled").as_str()),
        "{last}"
    );
    let code = s.service.wait_exit(Duration::from_secs(40));
    assert_eq!(code, Some(0), "log:\n{}", s.service.log_text());
    assert!(!s.socket().exists(), "socket left behind");
    assert!(s.refs_under(IMAGE_REFS)?.is_empty());
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn imports_from_an_oci_archive() -> Result<()> {
    let f = Fixtures::shared()?;
    let s = setup()?;
    let archive = s.scratch.path().join("base.tar");
    dnfimage_testimage::skopeo_copy(
        &f.oci_ref(tags::BASE_V1),
        &format!("oci-archive:{}:v1", archive.display()),
    )?;
    let r = s
        .import(
            &format!("oci-archive:{}:v1", archive.display()),
            &registry_ref("v1"),
        )?
        .result()?;
    assert_eq!(r["digest"], f.image(tags::BASE_V1)?.digest.as_str());
    assert_eq!(u64_of(&r, "layersImported"), 6);
    assert!(
        s.cat(str_of(&r, "commit"), "/usr/lib/os-release")?
            .contains("VERSION=\"1\"")
    );
    Ok(())
}

/// Commits the tree of `base` again with `base` as parent, under `branch` (as the layerer does).
fn layered_commit(s: &Setup, base: &str, branch: &str) -> Result<String> {
    Ok(run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", s.repo().display()))
            .args(["commit", "--branch", branch, "--parent", base])
            .arg(format!("--tree=ref={base}"))
            .arg("--subject=layered"),
    )?
    .trim()
    .to_string())
}

#[test]
fn prune_removes_what_no_deployment_needs() -> Result<()> {
    let f = Fixtures::shared()?;
    let s = setup()?;
    let (v1_ref, v2_ref) = (registry_ref("v1"), registry_ref("v2"));
    let c1 = str_of(
        &s.import(&fixture_source(tags::BASE_V1)?, &v1_ref)?
            .result()?,
        "commit",
    )
    .to_string();
    let c2 = str_of(
        &s.import(&fixture_source(tags::BASE_V2)?, &v2_ref)?
            .result()?,
        "commit",
    )
    .to_string();
    // The deployment runs a layered commit on v2; another layered commit (on v1) is unused.
    let deployed = layered_commit(&s, &c2, "dnfimage/layered/deployed")?;
    layered_commit(&s, &c1, "dnfimage/layered/stale")?;
    run_ok(
        Command::new("ostree")
            .args(["admin", "deploy", &format!("--os={STATEROOT}")])
            .arg(format!("--sysroot={}", s.sysroot.path().display()))
            .arg(&deployed),
    )?;
    let status_before = s.sysroot.admin_status()?;
    let flags: Vec<(String, bool)> = s
        .list_images()?
        .iter()
        .map(|i| (str_of(i, "reference").to_string(), i["deployed"] == true))
        .collect();
    assert_eq!(flags, [(v1_ref.clone(), false), (v2_ref.clone(), true)]);

    let pruned = s.prune(&[])?;
    assert_eq!(pruned["removedImages"], json!([v1_ref]));
    assert_eq!(u64_of(&pruned, "removedCommits"), 1);
    let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);
    let only_v1 = v1
        .layer_digests()
        .into_iter()
        .filter(|d| !v2.layer_digests().contains(d))
        .count() as u64;
    assert_eq!(u64_of(&pruned, "removedLayers"), only_v1);
    assert!(u64_of(&pruned, "removedObjects") > 0, "{pruned}");
    assert!(u64_of(&pruned, "freedBytes") > 0, "{pruned}");
    let images = s.list_images()?;
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["reference"], v2_ref.as_str());
    assert_eq!(images[0]["deployed"], true);
    assert!(
        run(Command::new("ostree")
            .arg(format!("--repo={}", s.repo().display()))
            .args(["show", &c1]))?
        .status
        .code()
            != Some(0),
        "v1's commit is still in the repository"
    );
    let left = s.refs()?;
    assert!(
        left.contains(&"dnfimage/layered/deployed".to_string()),
        "{left:?}"
    );
    assert!(
        !left.contains(&"dnfimage/layered/stale".to_string()),
        "{left:?}"
    );
    assert_eq!(s.sysroot.admin_status()?, status_before);
    s.sysroot.fsck()?;

    // Kept by name: nothing goes; v1 comes back with only its own layers imported again.
    let r = s
        .import(&fixture_source(tags::BASE_V1)?, &v1_ref)?
        .result()?;
    assert_eq!(u64_of(&r, "layersImported"), only_v1);
    let pruned = s.prune(&["registry.example:5000/dnfimage/base:v1"])?;
    assert_eq!(pruned["removedImages"], json!([]));
    assert_eq!(u64_of(&pruned, "removedLayers"), 0);
    assert_eq!(s.list_images()?.len(), 2);
    s.sysroot.fsck()?;
    Ok(())
}

/// A layered deployment's image commit stays when an upgrade moved the image's reference on:
/// the layerer builds on it again after a rollback, and the prune does not follow parents.
#[test]
fn prune_keeps_the_image_commit_under_a_layered_deployment() -> Result<()> {
    let f = Fixtures::shared()?;
    let s = setup()?;
    let image = registry_ref("latest");
    let c2 = str_of(
        &s.import(&fixture_source(tags::BASE_V2)?, &image)?
            .result()?,
        "commit",
    )
    .to_string();
    let deployed = layered_commit(&s, &c2, "dnfimage/layered/deployed")?;
    run_ok(
        Command::new("ostree")
            .args(["admin", "deploy", &format!("--os={STATEROOT}")])
            .arg(format!("--sysroot={}", s.sysroot.path().display()))
            .arg(&deployed),
    )?;
    // The reference moves on to another image, as an upgrade that is not deployed yet does.
    let c1 = str_of(
        &s.import(&fixture_source(tags::BASE_V1)?, &image)?
            .result()?,
        "commit",
    )
    .to_string();
    assert_ne!(c1, c2);

    let pruned = s.prune(&[])?;
    assert_eq!(pruned["removedImages"], json!([image]));
    let show = |commit: &str| {
        run(Command::new("ostree")
            .arg(format!("--repo={}", s.repo().display()))
            .args(["show", commit]))
    };
    assert_eq!(
        show(&c2)?.status.code(),
        Some(0),
        "the image commit under the deployment is gone"
    );
    assert_ne!(
        show(&c1)?.status.code(),
        Some(0),
        "v1's commit is still there"
    );
    // Its layers stay too, so that importing the image again writes nothing.
    let v2 = f.image(tags::BASE_V2)?;
    let layers = s.refs_under("ostree/container/blob")?;
    assert_eq!(layers.len(), v2.layer_digests().len(), "{layers:?}");
    s.sysroot.fsck()?;
    let again = s
        .import(&fixture_source(tags::BASE_V2)?, &image)?
        .result()?;
    assert_eq!(u64_of(&again, "layersImported"), 0, "{again}");
    Ok(())
}

#[test]
fn refuses_an_import_the_filesystem_cannot_hold_before_writing() -> Result<()> {
    // Outside the scratch directory, which goes before the filesystem is unmounted.
    let mount_point = tempfile::tempdir()?;
    let small = Tmpfs::mount(mount_point.path(), 8 << 20)?;
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&mount_point.path().join("sysroot"))?;
    let service = start(&scratch, sysroot.path())?;
    let s = Setup {
        service,
        sysroot,
        scratch,
    };
    let (name, params) = s
        .import(&fixture_source(tags::BASE_V1)?, &registry_ref("v1"))?
        .error()?;
    assert_eq!(name, format!("{IMPORTER}.InsufficientSpace"), "{params}");
    assert!(str_of(&params, "path").ends_with("ostree/repo"), "{params}");
    let size = Fixtures::shared()?.image(tags::BASE_V1)?.layers_size();
    assert!(u64_of(&params, "needed") >= size, "{params}");
    assert!(
        u64_of(&params, "available") < u64_of(&params, "needed"),
        "{params}"
    );
    assert_eq!(s.refs()?, Vec::<String>::new());
    s.sysroot.fsck()?;
    drop(s);
    drop(small);
    drop(mount_point);
    Ok(())
}

#[test]
fn served_interface_matches_the_committed_idl() -> Result<()> {
    let s = setup()?;
    dnfimage_integration::assert_served_idl_matches(&s.socket(), IMPORTER)
}

#[test]
fn state_changing_methods_are_for_root_and_bad_calls_get_errors() -> Result<()> {
    let s = setup()?;
    let varlinkctl = dnfimage_integration::varlinkctl();
    let socket = s.socket();
    let as_nobody = |method: &str, params: &str| -> Result<String> {
        let out = run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&varlinkctl)
            .args(["call", "--more"])
            .arg(&socket)
            .arg(format!("{IMPORTER}.{method}"))
            .arg(params))?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    for (method, params) in [
        (
            "Import",
            r#"{"source":"oci:/x:y","image":"docker://r/x:1"}"#,
        ),
        ("Prune", "{}"),
    ] {
        let out = as_nobody(method, params)?;
        assert!(out.contains("PermissionDenied"), "{method}: {out}");
    }
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&varlinkctl)
        .arg("call")
        .arg(&socket)
        .arg(format!("{IMPORTER}.ListImages"))
        .arg("{}"))?;
    assert!(out.status.success(), "ListImages as nobody: {out:?}");

    let replies = raw_call(
        &socket,
        &json!({"method": format!("{IMPORTER}.Import"), "parameters": {"source": 1}}),
    )?;
    assert_eq!(
        error_name(&replies[0]),
        Some("org.varlink.service.InvalidParameter")
    );
    let replies = raw_call(
        &socket,
        &json!({"method": format!("{IMPORTER}.Export"), "parameters": {}}),
    )?;
    assert_eq!(
        error_name(&replies[0]),
        Some("org.varlink.service.MethodNotFound")
    );
    Ok(())
}

/// The importer's lock, taken as by an importer that has since died (its record names a process
/// that is gone): what a killed importer's children hold.
fn hold_importer_lock_of_a_dead_process(repo: &std::path::Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = repo.join("dnfimage-importer.lock");
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    #[allow(unsafe_code)]
    // SAFETY: flock only reads the descriptor we pass.
    let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    anyhow::ensure!(r == 0, "flock: {}", std::io::Error::last_os_error());
    let mut gone = Command::new("true").spawn()?;
    let pid = gone.id();
    gone.wait()?;
    std::fs::write(&path, format!("dnfimage-importer (pid {pid})\n"))?;
    Ok(lock)
}

/// Waits until a process reads from the file `inotify` watches (or fails after a minute, so
/// that a broken importer fails the test rather than hanging it).
fn wait_for_a_read(inotify: &std::os::fd::OwnedFd) -> Result<()> {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut fds = [PollFd::new(inotify, PollFlags::IN)];
    let ready = poll(&mut fds, 60_000)?;
    anyhow::ensure!(ready == 1, "nobody read the partial blob within a minute");
    let mut buf = [0u8; 4096];
    anyhow::ensure!(rustix::io::read(inotify, &mut buf)? > 0, "no inotify event");
    Ok(())
}

/// Starts writing blob `digest` of `layout` as the fetcher does, under `tmp/HEX.partial`, and
/// returns the file, its path and an inotify fd that reports reads of it. The file is created
/// empty and watched before anything is written, so that no read is missed.
fn start_partial(
    layout: &Path,
    digest: &str,
) -> Result<(std::fs::File, PathBuf, std::os::fd::OwnedFd)> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let hex = digest.trim_start_matches("sha256:");
    let path = layout.join("tmp").join(format!("{hex}.partial"));
    let file = std::fs::File::create(&path)?;
    let fd = inotify::init(CreateFlags::CLOEXEC)?;
    inotify::add_watch(&fd, &path, WatchFlags::ACCESS)?;
    Ok((file, path, fd))
}

#[test]
fn imports_layers_while_they_download_and_stops_when_a_download_does() -> Result<()> {
    use std::io::Write;
    let f = Fixtures::shared()?;
    let s = setup()?;
    let layout = s.scratch.path().join("layout");
    copy_layout(&f.oci_dir, &[tags::BASE_V1], &layout)?;
    let root = s.scratch.path().join("root");
    random_file(&root.join("usr/share/app/data"), 3 << 20)?;
    let layer = derive(&layout, tags::BASE_V1, "app", &root)?;
    let manifest = dnfimage_testimage::read_image(&layout, "app")?.digest;
    // The derived layer is not there yet: it "downloads" below.
    let blob = blob_path(&layout, &layer);
    let bytes = std::fs::read(&blob)?;
    std::fs::remove_file(&blob)?;
    std::fs::create_dir_all(layout.join("tmp"))?;
    let start = || {
        Call::start(
            &s.socket(),
            &format!("{IMPORTER}.ImportLayers"),
            json!({"layout": layout, "manifest": manifest}),
            true,
        )
    };
    let until_started = |call: &mut Call| -> Result<()> {
        loop {
            let reply = call.next_reply()?.context("ImportLayers ended")?;
            anyhow::ensure!(error_name(&reply).is_none(), "it failed: {reply}");
            let p = &reply["parameters"]["progress"];
            if p["layer"] == layer.as_str() {
                return Ok(());
            }
        }
    };
    let layer_refs = |s: &Setup| -> Result<Vec<String>> {
        let hex = layer.trim_start_matches("sha256:").to_string();
        Ok(s.refs_under(LAYER_REFS)?
            .into_iter()
            .filter(|r| r.contains(&hex))
            .collect())
    };

    // Waiting for a download that has not started: a cancel stops it.
    let mut call = start()?;
    until_started(&mut call)?;
    assert_eq!(
        s.call("Cancel", json!({}))?["cancelled"]
            .as_str()
            .context("nothing was cancelled")?,
        format!("Importing the layers of {manifest} in {}", layout.display())
    );
    let last = call.rest()?.pop().context("no end")?;
    assert_eq!(
        error_name(&last),
        Some(format!("{IMPORTER}.Cancelled").as_str()),
        "{last}"
    );
    assert!(layer_refs(&s)?.is_empty());

    // A download that stops halfway (its partial file removed): the layer fails.
    let mut call = start()?;
    until_started(&mut call)?;
    let (mut partial, path, watch) = start_partial(&layout, &layer)?;
    partial.write_all(&bytes[..bytes.len() / 2])?;
    wait_for_a_read(&watch)?;
    std::fs::remove_file(&path)?;
    let last = call.rest()?.pop().context("no end")?;
    assert_eq!(
        error_name(&last),
        Some(format!("{IMPORTER}.Failed").as_str())
    );
    assert!(
        last["parameters"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped after")),
        "{last}"
    );
    assert!(layer_refs(&s)?.is_empty());
    s.sysroot.fsck()?;

    // A download followed to its end: half, a read, the rest, renamed into place.
    let mut call = start()?;
    until_started(&mut call)?;
    let (mut partial, path, watch) = start_partial(&layout, &layer)?;
    partial.write_all(&bytes[..bytes.len() / 2])?;
    wait_for_a_read(&watch)?;
    partial.write_all(&bytes[bytes.len() / 2..])?;
    partial.sync_all()?;
    std::fs::rename(&path, &blob)?;
    let last = call.rest()?.pop().context("no end")?;
    assert!(error_name(&last).is_none(), "{last}");
    let result = &last["parameters"]["result"];
    assert_eq!(u64_of(result, "layersImported"), 1, "{result}");
    assert_eq!(layer_refs(&s)?.len(), 1);

    // The import of the image finds every layer there.
    let r = s
        .import(&oci_ref(&layout, "app"), &registry_ref("app"))?
        .result()?;
    assert_eq!(u64_of(&r, "layersImported"), 0, "{r}");
    assert_eq!(
        file_size(&s, str_of(&r, "commit"), "/usr/share/app/data")?,
        3 << 20
    );
    s.sysroot.fsck()?;

    // What is not an image layout, or not a digest, is refused before anything runs.
    for (layout, manifest) in [
        (json!("relative/dir"), json!(manifest)),
        (json!(s.scratch.path()), json!(manifest)),
        (json!(layout), json!("sha256:abc")),
    ] {
        let replies = raw_call(
            &s.socket(),
            &json!({"method": format!("{IMPORTER}.ImportLayers"),
                    "parameters": {"layout": layout, "manifest": manifest}}),
        )?;
        let last = replies.last().context("no reply")?;
        assert_eq!(
            error_name(last),
            Some(format!("{IMPORTER}.InvalidImageReference").as_str()),
            "{last}"
        );
    }
    Ok(())
}
