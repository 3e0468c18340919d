//! Fetch benchmark: the fetcher against `skopeo copy` of the same image in the same run, on
//! plain loopback and behind a proxy that behaves like a distant registry (50 ms per request,
//! ~10 MB/s per connection). Prints the times and the ratios.
//!
//! Run with `make bench` (release binaries). Options: `--layers N --mib M --runs R`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use dnfimage_integration::bench::{
    BenchRegistry, DISTANT_LABEL, Options, bench_layout, fresh_fetcher, median,
};
use dnfimage_integration::{Scratch, run_ok};
use dnfimage_interfaces::fetcher::{self, FetcherProxy};
use futures_util::StreamExt;

struct Params {
    layers: u32,
    mib: u64,
    runs: usize,
}

fn params() -> Result<Params> {
    let o = Options::parse(&["--layers", "--mib", "--runs"])?;
    Ok(Params {
        layers: o.get("--layers", 9)?,
        mib: o.get("--mib", 210)?,
        runs: o.get("--runs", 3)?,
    })
}

/// One fetch into an empty cache; returns seconds.
async fn time_fetch(scratch: &Scratch, conf: &Path, image: &str, concurrency: u64) -> Result<f64> {
    let _service = fresh_fetcher(scratch, conf)?;
    let mut conn = dnfimage_interfaces::connect(&scratch.runtime_dir(), fetcher::INTERFACE).await?;
    let start = Instant::now();
    let stream = conn.fetch(image, Some(concurrency), None).await?;
    futures_util::pin_mut!(stream);
    let mut done = false;
    while let Some(item) = stream.next().await {
        let reply = item?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        done |= reply.result.is_some();
    }
    anyhow::ensure!(done, "the fetch ended without a result");
    Ok(start.elapsed().as_secs_f64())
}

/// One `skopeo copy` into an empty OCI layout; returns seconds.
fn time_skopeo(scratch: &Scratch, conf: &Path, image: &str) -> Result<f64> {
    let dest = scratch.path().join("bench-skopeo");
    let _ = std::fs::remove_dir_all(&dest);
    let start = Instant::now();
    run_ok(
        Command::new("skopeo")
            .arg("--registries-conf")
            .arg(conf)
            .args(["copy", "--quiet", image])
            .arg(format!("oci:{}:bench", dest.display())),
    )?;
    Ok(start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let p = params()?;
    let layout = bench_layout(p.layers, p.mib)?;
    let scratch = Scratch::new()?;
    let bench = BenchRegistry::start(&scratch, &layout).await?;
    let (direct, slow, conf, size) = (&bench.direct, &bench.slow, &bench.conf, bench.size);
    println!(
        "image: {} layers, {:.1} MB compressed; {} runs each, median",
        p.layers,
        size as f64 / 1e6,
        p.runs
    );

    let mut rows = Vec::new();
    for (label, image) in [("loopback", direct), (DISTANT_LABEL, slow)] {
        let mut skopeo = Vec::new();
        let mut by_concurrency: Vec<Vec<f64>> = vec![Vec::new(); CONCURRENCY.len()];
        for _ in 0..p.runs {
            skopeo.push(time_skopeo(&scratch, conf, image)?);
            for (i, c) in CONCURRENCY.iter().enumerate() {
                by_concurrency[i].push(time_fetch(&scratch, conf, image, *c).await?);
            }
        }
        let s = median(skopeo);
        let t: Vec<f64> = by_concurrency.into_iter().map(median).collect();
        println!("{label}:");
        println!("  skopeo copy           {s:7.2} s");
        for (c, secs) in CONCURRENCY.iter().zip(&t) {
            println!(
                "  fetch concurrency={c:<2}  {secs:7.2} s   skopeo/fetch {:5.2}x   one-at-a-time/fetch {:5.2}x",
                s / secs,
                t[0] / secs
            );
        }
        rows.push((s, t));
    }
    let default = CONCURRENCY
        .iter()
        .position(|c| *c == fetcher::DEFAULT_CONCURRENCY)
        .context("the default concurrency is measured")?;
    let (loop_skopeo, loop_t) = &rows[0];
    let (_, proxy_t) = &rows[1];
    let loop_ratio = loop_skopeo / loop_t[default];
    let proxy_ratio = proxy_t[0] / proxy_t[default];
    println!(
        "targets at the default concurrency ({}): loopback no slower than skopeo: {} ({loop_ratio:.2}x); \
         behind the proxy >= 3x faster than one at a time: {} ({proxy_ratio:.2}x)",
        fetcher::DEFAULT_CONCURRENCY,
        if loop_ratio >= 0.95 { "met" } else { "NOT met" },
        if proxy_ratio >= 3.0 { "met" } else { "NOT met" },
    );
    Ok(())
}

/// The concurrencies measured; the first must be 1.
const CONCURRENCY: [u64; 3] = [1, 4, 8];
