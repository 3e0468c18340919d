//! What the CLI prints: text for people, JSON (with `apiVersion`) for scripts, and progress
//! (a bar on a terminal, plain lines otherwise, always on stderr).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Result;
use dnfimage_interfaces::deployer::{
    ApplyLiveReply, DeployResult, Deployment, ImageTrust, StatusReply,
};
use dnfimage_interfaces::fetcher::{
    self, CachedImage, CheckUpdateReply, FetchResult, ImageInfo, PruneReply, UpdateCheck,
};
use dnfimage_interfaces::importer::{self, ImportResult};
use dnfimage_interfaces::layerer::PackageChanges;
use serde::Serialize;

/// The `apiVersion` of every JSON document the CLI prints.
pub const API_VERSION: &str = "dnfimage/v1";

/// The space the repository and the fetcher's cache take (`status --disk`); a part is null when
/// its service could not tell.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskUsage {
    /// The importer's answer about the repository.
    pub repository: Option<importer::GetDiskUsageReply>,
    /// The fetcher's answer about its cache.
    pub cache: Option<fetcher::GetDiskUsageReply>,
}

/// What `cleanup` did: the deployments removed and, with `--repo`, what the repository freed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cleaned {
    /// The deployments removed, as `status` showed them before.
    pub removed_deployments: Vec<Deployment>,
    /// What `--repo` removed from the repository; null without `--repo`.
    pub repository: Option<importer::PruneResult>,
}

/// Where and how results are printed.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    json: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a, T: Serialize> {
    api_version: &'static str,
    kind: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

/// `n` things for people: "1 image", "2 images".
pub fn count(n: u64, thing: &str) -> String {
    format!("{n} {thing}{}", if n == 1 { "" } else { "s" })
}

/// Bytes for people: "1.5 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn deployment(d: &Deployment) {
    let mut flags = Vec::new();
    for (on, name) in [
        (d.booted, "booted"),
        (d.staged, "staged"),
        (d.default, "default"),
        (d.rollback, "rollback"),
        (d.pinned, "pinned"),
        (d.finalization_locked, "finalization locked"),
    ] {
        if on {
            flags.push(name);
        }
    }
    let marker = if d.booted { '●' } else { ' ' };
    println!(
        "{marker} {} {}  {}{}",
        d.index,
        d.stateroot,
        d.image.as_deref().unwrap_or("(no image)"),
        if flags.is_empty() {
            String::new()
        } else {
            format!("  ({})", flags.join(", "))
        }
    );
    println!("      Version: {}", d.version.as_deref().unwrap_or("-"));
    if let Some(digest) = &d.image_digest {
        println!("       Digest: {digest}");
    }
    if let Some(trust) = &d.trust {
        println!("    Signature: {}", trust_words(trust));
    }
    if let Some(state) = &d.unlocked {
        println!("     Unlocked: {state} (/usr has an overlay until the next boot)");
    }
    if let Some(commit) = &d.live_commit {
        println!("  Live commit: {commit} (its additions applied live)");
    }
    println!("       Commit: {}", d.commit);
    println!("    Timestamp: {}", d.timestamp);
    println!("       Kernel: {}", d.kernel_version);
    println!("   Kernel args: {}", d.kernel_arguments.join(" "));
    let l = &d.layering;
    if !l.packages.is_empty() {
        println!("     Packages: {}", l.packages.join(" "));
    }
    if !l.inactive.is_empty() {
        println!("     Inactive: {} (now in the image)", l.inactive.join(" "));
    }
    if !l.override_remove.is_empty() {
        println!("      Removed: {}", l.override_remove.join(" "));
    }
    for p in &l.override_replace {
        println!("     Replaced: {} {}", p.name, p.version);
    }
}

/// How an image is held to the signature policy, in a few words: "verified, signed by
/// FPR (UID); policy docker scope …", "not verified: --no-signature-verification", …
pub fn trust_words(trust: &ImageTrust) -> String {
    if !trust.enforced {
        return "not verified: the origin opts out (ostree-unverified-…, as \
                --no-signature-verification records), so upgrades take unsigned images too; \
                `dnf-image rebase IMAGE` turns checking on"
            .into();
    }
    let policy = trust
        .requirement
        .as_deref()
        .map(|r| format!("; policy {r}"))
        .unwrap_or_default();
    if trust.verified {
        if trust.signers.is_empty() {
            format!("verified{policy}")
        } else {
            format!("verified, signed by {}{policy}", trust.signers.join(", "))
        }
    } else if trust.requirement.is_some() {
        format!("accepted without a signature{policy}")
    } else {
        "checked against the signature policy at each upgrade (nothing recorded yet)".into()
    }
}

/// What a deploy changed in the kernel arguments because of the images' kargs.d files (the
/// arguments `added` and `removed`), as one line; `None` when it changed nothing there.
fn image_kernel_arguments(added: &[String], removed: &[String]) -> Option<String> {
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("added {}", added.join(" ")));
    }
    if !removed.is_empty() {
        parts.push(format!("removed {}", removed.join(" ")));
    }
    (!parts.is_empty()).then(|| format!("Kernel arguments from the image: {}.", parts.join("; ")))
}

/// The first 12 characters of a digest's hex part (whole characters, whatever the text).
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.char_indices().nth(12).map_or(hex, |(i, _)| &hex[..i])
}

/// A JSON result that says whether the command then asked systemd to reboot (`--apply`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Rebooting<'a, T: Serialize> {
    #[serde(flatten)]
    body: &'a T,
    reboot_requested: bool,
}

impl Output {
    /// JSON when `json`, else text.
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    fn document<T: Serialize>(&self, kind: &str, body: &T) -> Result<()> {
        let doc = Document {
            api_version: API_VERSION,
            kind,
            body,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
        Ok(())
    }

    /// `image inspect`.
    pub fn image_info(&self, info: &ImageInfo) -> Result<()> {
        if self.json {
            return self.document("ImageInfo", info);
        }
        println!("Image:        {}", info.reference);
        println!("Digest:       {}", info.digest);
        println!("Version:      {}", info.version.as_deref().unwrap_or("-"));
        println!("Created:      {}", info.created.as_deref().unwrap_or("-"));
        println!("Platform:     {}/{}", info.os, info.architecture);
        println!("Bootable:     {}", if info.bootable { "yes" } else { "no" });
        println!(
            "Layers:       {} ({})",
            info.layers.len(),
            bytes(info.total_size)
        );
        for layer in &info.layers {
            println!(
                "  {}  {:>10}  {}",
                short(&layer.digest),
                bytes(layer.size),
                if layer.cached { "cached" } else { "" }
            );
        }
        Ok(())
    }

    /// `image check`.
    pub fn check(&self, image: &str, reply: &CheckUpdateReply) -> Result<()> {
        if self.json {
            return self.document("UpdateCheck", reply);
        }
        if !reply.update_available {
            println!("No update: {image} is still {}", reply.digest);
            return Ok(());
        }
        println!(
            "Update available: {image}{}",
            version_suffix(reply.version.as_deref())
        );
        println!("  Digest:   {}", reply.digest);
        println!(
            "  Download: {} of {} layers, {} (image {})",
            reply.layers_missing,
            reply.layers_total,
            bytes(reply.bytes_missing),
            bytes(reply.bytes_total)
        );
        Ok(())
    }

    /// `image fetch`.
    pub fn fetched(&self, result: &FetchResult) -> Result<()> {
        if self.json {
            return self.document("FetchResult", result);
        }
        println!(
            "Fetched {}{}: {} layers downloaded ({}), {} already cached",
            result.digest,
            version_suffix(result.version.as_deref()),
            result.layers_fetched,
            bytes(result.bytes_fetched),
            result.layers_cached
        );
        println!("Cached as {}", result.cache_reference);
        Ok(())
    }

    /// `image list`.
    pub fn cached(&self, images: &[CachedImage]) -> Result<()> {
        if self.json {
            #[derive(Serialize)]
            struct Images<'a> {
                images: &'a [CachedImage],
            }
            return self.document("CachedImageList", &Images { images });
        }
        if images.is_empty() {
            println!("The cache is empty.");
        }
        for image in images {
            println!(
                "{}  {}  {:>10}  {}  {}",
                short(&image.digest),
                image.version.as_deref().unwrap_or("-"),
                bytes(image.size),
                image.fetched,
                image.reference
            );
        }
        Ok(())
    }

    /// `image prune`.
    pub fn pruned(&self, reply: &PruneReply) -> Result<()> {
        if self.json {
            return self.document("PruneResult", reply);
        }
        for image in &reply.removed_images {
            println!("Removed {image}");
        }
        println!(
            "Deleted {} blobs, freed {}",
            reply.removed_blobs,
            bytes(reply.freed_bytes)
        );
        Ok(())
    }

    /// A line for people about a step that finished (stderr, so JSON stays clean).
    pub fn note(&self, text: &str) {
        eprintln!("{text}");
    }

    /// A warning for people (stderr).
    pub fn warn(&self, text: &str) {
        eprintln!("warning: {text}");
    }

    /// `status`; with `disk` (`--disk`), the space the repository and the cache take.
    pub fn status(
        &self,
        status: &StatusReply,
        update: Option<&UpdateCheck>,
        disk: Option<&DiskUsage>,
    ) -> Result<()> {
        if self.json {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct Status<'a> {
                #[serde(flatten)]
                status: &'a StatusReply,
                available_update: Option<&'a UpdateCheck>,
                #[serde(skip_serializing_if = "Option::is_none")]
                disk_usage: Option<&'a DiskUsage>,
            }
            return self.document(
                "Status",
                &Status {
                    status,
                    available_update: update,
                    disk_usage: disk,
                },
            );
        }
        if let Some(u) = update {
            println!(
                "Update available: {} {} ({} to download; checked {})",
                u.reference,
                named(u.version.as_deref(), &u.digest),
                bytes(u.bytes_missing),
                u.checked
            );
        }
        println!(
            "Sysroot: {}{}",
            status.sysroot,
            if status.booted { "" } else { " (not booted)" }
        );
        if let Some(op) = &status.operation {
            println!("Running: {op}");
        }
        if status.deployments.is_empty() {
            println!("No deployments. Use `dnf-image rebase IMAGE` to deploy one.");
        }
        for d in &status.deployments {
            deployment(d);
        }
        if let Some(disk) = disk {
            println!("Disk use:");
            match &disk.repository {
                Some(r) => println!(
                    "   Repository: {:>10}  {} ({}; `dnf-image cleanup --repo` frees what no \
                     deployment uses)",
                    bytes(r.bytes),
                    r.path,
                    count(r.objects, "object")
                ),
                None => println!("   Repository: unknown"),
            }
            match &disk.cache {
                Some(c) => println!(
                    "  Image cache: {:>10}  {} ({}, {})",
                    bytes(c.bytes),
                    c.path,
                    count(c.images, "image"),
                    count(c.blobs, "blob")
                ),
                None => println!("  Image cache: unknown"),
            }
        }
        Ok(())
    }

    /// The end of rebase, upgrade and kargs: what boots next.
    pub fn deployed(&self, before: &StatusReply, result: &DeployResult) -> Result<()> {
        self.deployed_then(before, result, false)
    }

    /// [`deployed`](Self::deployed), saying in JSON whether a reboot was requested
    /// (`rebootRequested`, `--apply`).
    pub fn deployed_then(
        &self,
        before: &StatusReply,
        result: &DeployResult,
        reboot_requested: bool,
    ) -> Result<()> {
        if self.json {
            return self.document(
                "DeployResult",
                &Rebooting {
                    body: result,
                    reboot_requested,
                },
            );
        }
        let d = &result.deployment;
        if !result.changed {
            println!("No change: deployment {} already has that.", d.index);
            return Ok(());
        }
        println!(
            "{} {} {}",
            if d.staged { "Staged" } else { "Deployed" },
            d.image.as_deref().unwrap_or(&d.commit),
            d.version
                .as_deref()
                .map(|v| format!("version {v}"))
                .unwrap_or_default()
        );
        if let Some(line) = image_kernel_arguments(
            &result.added_kernel_arguments,
            &result.removed_kernel_arguments,
        ) {
            println!("{line}");
        }
        if d.staged {
            println!(
                "It will be finalized at shutdown and boot next: `systemctl reboot` to use it."
            );
        } else if before.booted {
            println!(
                "Deployment {} boots next: `systemctl reboot` to use it.",
                d.index
            );
        } else {
            println!(
                "Deployment {} is now the default of {} (not booted: nothing to reboot).",
                d.index, before.sysroot
            );
        }
        Ok(())
    }

    /// The end of `upgrade --download-only`.
    pub fn downloaded(&self, result: &ImportResult) -> Result<()> {
        if self.json {
            return self.document("ImportResult", result);
        }
        println!(
            "Downloaded {} {} (commit {}); `dnf-image upgrade --from-downloaded` deploys it.",
            result.reference,
            named(result.version.as_deref(), &result.digest),
            short(&result.commit)
        );
        Ok(())
    }

    /// After `rollback`.
    pub fn next_boot_then(&self, what: &str, d: &Deployment, reboot_requested: bool) -> Result<()> {
        if self.json {
            return self.document(
                "Deployment",
                &Rebooting {
                    body: d,
                    reboot_requested,
                },
            );
        }
        println!(
            "{what}: deployment {} ({}{}) boots next.",
            d.index,
            d.image.as_deref().unwrap_or(&d.commit),
            version_suffix(d.version.as_deref())
        );
        Ok(())
    }

    /// After `apply-live`.
    pub fn applied_live(&self, reply: &ApplyLiveReply) -> Result<()> {
        if self.json {
            return self.document("ApplyLiveReply", reply);
        }
        let Some(commit) = reply
            .live_commit
            .as_deref()
            .filter(|_| reply.nothing_to_apply.is_none())
        else {
            println!(
                "Nothing to apply: {}.",
                reply
                    .nothing_to_apply
                    .as_deref()
                    .unwrap_or("the pending deployment adds nothing")
            );
            return Ok(());
        };
        println!(
            "Applied commit {} live: {} added{} in /usr until the next boot, which starts the \
             deployment itself.",
            short(commit),
            count(reply.added, "path"),
            if reply.replaced > 0 {
                format!(", {} replaced", count(reply.replaced, "file"))
            } else {
                String::new()
            }
        );
        if reply.removed_kept > 0 {
            println!(
                "{} the pending deployment removes stay until the reboot.",
                count(reply.removed_kept, "path")
            );
        }
        Ok(())
    }

    /// After `pin`.
    pub fn pinned(&self, d: &Deployment) -> Result<()> {
        if self.json {
            return self.document("Deployment", d);
        }
        println!(
            "Deployment {} is {}pinned.",
            d.index,
            if d.pinned { "" } else { "no longer " }
        );
        Ok(())
    }

    /// After `cleanup`.
    pub fn cleaned(&self, result: &Cleaned) -> Result<()> {
        if self.json {
            return self.document("CleanupResult", result);
        }
        if result.removed_deployments.is_empty() && result.repository.is_none() {
            println!("Nothing to clean up.");
        }
        for d in &result.removed_deployments {
            println!(
                "Removed deployment {} ({}{})",
                d.index,
                d.image.as_deref().unwrap_or(&d.commit),
                version_suffix(d.version.as_deref())
            );
        }
        if let Some(p) = &result.repository {
            for image in &p.removed_images {
                println!("Removed image {image} from the repository");
            }
            println!(
                "Repository: removed {}, {} and {}; freed {}",
                count(p.removed_commits, "layered commit"),
                count(p.removed_layers, "layer"),
                count(p.removed_objects, "object"),
                bytes(p.freed_bytes)
            );
        }
        Ok(())
    }

    /// `upgrade --check`: the check, and the package changes when the update is downloaded.
    pub fn check_with_changes(
        &self,
        image: &str,
        reply: &CheckUpdateReply,
        changes: Option<&PackageChanges>,
    ) -> Result<()> {
        if self.json {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct Check<'a> {
                #[serde(flatten)]
                check: &'a CheckUpdateReply,
                package_changes: Option<&'a PackageChanges>,
            }
            return self.document(
                "UpdateCheck",
                &Check {
                    check: reply,
                    package_changes: changes,
                },
            );
        }
        self.check(image, reply)?;
        if let Some(changes) = changes {
            self.package_changes(changes)?;
        }
        Ok(())
    }

    /// Package changes: upgraded, downgraded, added, removed.
    pub fn package_changes(&self, c: &PackageChanges) -> Result<()> {
        if self.json {
            return self.document("PackageChanges", c);
        }
        if c.upgraded.is_empty()
            && c.downgraded.is_empty()
            && c.added.is_empty()
            && c.removed.is_empty()
        {
            println!("No package changes.");
            return Ok(());
        }
        for (title, list) in [("Upgraded", &c.upgraded), ("Downgraded", &c.downgraded)] {
            if !list.is_empty() {
                println!("{title}:");
                for p in list {
                    println!("  {} {} -> {}", p.name, p.from_version, p.to_version);
                }
            }
        }
        for (title, list) in [("Added", &c.added), ("Removed", &c.removed)] {
            if !list.is_empty() {
                println!("{title}:");
                for p in list {
                    println!("  {} {}", p.name, p.version);
                }
            }
        }
        Ok(())
    }

    /// `kargs` without changes.
    pub fn kargs(&self, d: &Deployment) -> Result<()> {
        if self.json {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct Kargs<'a> {
                index: u64,
                kernel_arguments: &'a [String],
            }
            return self.document(
                "KernelArguments",
                &Kargs {
                    index: d.index,
                    kernel_arguments: &d.kernel_arguments,
                },
            );
        }
        println!("{}", d.kernel_arguments.join(" "));
        Ok(())
    }

    /// A progress display for a long operation.
    pub fn progress(&self, what: &str) -> ProgressView {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_prefix(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        ProgressView {
            what: what.to_string(),
            bar,
            last_line: None,
        }
    }
}

/// A bar on a terminal, else a line per change (at most one a second while only bytes move).
pub struct ProgressView {
    what: String,
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<(Instant, String)>,
}

impl ProgressView {
    /// Shows progress: `bytes` is (done, total) when the work is counted in bytes.
    pub fn set(&mut self, bytes_progress: Option<(u64, u64)>, message: &str) {
        if let Some(bar) = &self.bar {
            if let Some((done, total)) = bytes_progress {
                bar.set_length(total);
                bar.set_position(done);
            }
            bar.set_message(message.to_string());
            return;
        }
        let line = match bytes_progress {
            Some((done, total)) => format!(
                "{}: {} ({}/{})",
                self.what,
                message,
                bytes(done),
                bytes(total)
            ),
            None => format!("{}: {message}", self.what),
        };
        let due = match &self.last_line {
            None => true,
            Some((at, prev)) => {
                let same_message = prev.starts_with(&format!("{}: {message}", self.what));
                (!same_message) || at.elapsed() >= Duration::from_secs(1)
            }
        };
        if due
            && self
                .last_line
                .as_ref()
                .is_none_or(|(_, prev)| *prev != line)
        {
            eprintln!("{line}");
            self.last_line = Some((Instant::now(), line));
        }
    }

    /// Shows a one-off note.
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// An image by its version label when it has one ("version 2"), else by its digest.
pub(crate) fn named(version: Option<&str>, digest: &str) -> String {
    match version {
        Some(v) => format!("version {v}"),
        None => digest.to_string(),
    }
}

/// " version 2" after a name, or nothing when the image has no version label.
fn version_suffix(version: Option<&str>) -> String {
    version.map(|v| format!(" version {v}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_the_kernel_arguments_an_image_changed() {
        let v = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
        let cases: &[(&[&str], &[&str], Option<&str>)] = &[
            (&[], &[], None),
            (
                &["a=1", "b"],
                &[],
                Some("Kernel arguments from the image: added a=1 b."),
            ),
            (
                &["v=2"],
                &["v=1"],
                Some("Kernel arguments from the image: added v=2; removed v=1."),
            ),
            (
                &[],
                &["v=1"],
                Some("Kernel arguments from the image: removed v=1."),
            ),
        ];
        for (added, removed, want) in cases {
            assert_eq!(
                image_kernel_arguments(&v(added), &v(removed)).as_deref(),
                *want,
                "{added:?} {removed:?}"
            );
        }
    }

    #[test]
    fn versions_read_as_versions() {
        assert_eq!(named(Some("2"), "sha256:ab"), "version 2");
        assert_eq!(named(None, "sha256:ab"), "sha256:ab");
        assert_eq!(version_suffix(Some("41.1")), " version 41.1");
        assert_eq!(version_suffix(None), "");
    }

    #[test]
    fn formats_bytes() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (210 * 1024 * 1024, "210.0 MiB"),
        ];
        for (n, want) in cases {
            assert_eq!(bytes(n), want);
        }
    }

    #[test]
    fn counts_things() {
        assert_eq!(count(0, "blob"), "0 blobs");
        assert_eq!(count(1, "image"), "1 image");
        assert_eq!(count(2, "layered commit"), "2 layered commits");
    }

    #[test]
    fn shortens_digests_by_characters() {
        let cases = [
            ("sha256:0123456789abcdef", "0123456789ab"),
            ("0123456789abcdef", "0123456789ab"),
            ("sha256:abc", "abc"),
            ("", ""),
            ("ééééééééééééé", "éééééééééééé"),
            ("sha256:0123456789aé", "0123456789aé"),
        ];
        for (digest, want) in cases {
            assert_eq!(short(digest), want, "{digest}");
        }
    }
}
