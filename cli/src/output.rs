//! What the CLI prints: text for people, JSON (with `apiVersion`) for scripts, and progress
//! (a bar on a terminal, plain lines otherwise, always on stderr).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Result;
use dnfimage_interfaces::fetcher::{
    CachedImage, CheckUpdateReply, FetchProgress, FetchResult, ImageInfo, PruneReply,
};
use serde::Serialize;

/// The `apiVersion` of every JSON document the CLI prints.
pub const API_VERSION: &str = "dnfimage/v1";

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

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
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
            "Update available: {image} {}",
            reply.version.as_deref().unwrap_or("")
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
            "Fetched {} {}: {} layers downloaded ({}), {} already cached",
            result.digest,
            result.version.as_deref().unwrap_or(""),
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

    /// A progress display for a long operation.
    pub fn progress(&self, what: &str) -> ProgressView {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_prefix(what.to_string());
            bar
        });
        ProgressView {
            bar,
            last_line: None,
        }
    }
}

/// A bar on a terminal, else a line per change (at most one a second for bytes).
pub struct ProgressView {
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<(Instant, String)>,
}

impl ProgressView {
    /// Shows a fetch progress record.
    pub fn update(&mut self, p: &FetchProgress) {
        if let Some(bar) = &self.bar {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(format!(
                "{}/{} layers  {}",
                p.layers_done, p.layers_total, p.message
            ));
            return;
        }
        let line = format!(
            "[{:?}] {}/{} layers, {}/{}: {}",
            p.phase,
            p.layers_done,
            p.layers_total,
            bytes(p.bytes_done),
            bytes(p.bytes_total),
            p.message
        );
        let due = match &self.last_line {
            None => true,
            Some((at, prev)) => {
                let milestone = !p.message.starts_with("Fetching layer");
                (milestone && *prev != line) || at.elapsed() >= Duration::from_secs(1)
            }
        };
        if due {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
