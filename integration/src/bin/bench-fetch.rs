//! Fetch benchmark: the fetcher against `skopeo copy` of the same image in the same run, on
//! plain loopback and behind a proxy that behaves like a distant registry (50 ms per request,
//! ~10 MB/s per connection). Prints the times and the ratios.
//!
//! Run with `make bench` (release binaries). Options: `--layers N --mib M --runs R`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_integration::proxy::{Shaping, SlowProxy};
use dnfimage_integration::{FetcherOptions, Scratch, ServiceProcess, bin_dir, run_ok};
use dnfimage_interfaces::fetcher::{self, FetcherProxy};
use dnfimage_testimage::{BenchOptions, Registry};
use futures_util::StreamExt;

struct Params {
    layers: u32,
    mib: u64,
    runs: usize,
}

fn params() -> Result<Params> {
    let mut p = Params {
        layers: 9,
        mib: 210,
        runs: 3,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).context("every option takes a value")?;
        match pair[0].as_str() {
            "--layers" => p.layers = value.parse()?,
            "--mib" => p.mib = value.parse()?,
            "--runs" => p.runs = value.parse()?,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    Ok(p)
}

/// The bench image's OCI layout, built once and kept under target/.
fn bench_layout(p: &Params) -> Result<PathBuf> {
    let dir = bin_dir().join(format!("../dnfimage-fixtures/bench-{}x{}", p.layers, p.mib));
    if !dir.join("index.json").exists() {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let start = Instant::now();
        dnfimage_testimage::build_bench(
            &tmp,
            "bench",
            &BenchOptions {
                layers: p.layers,
                total_mib: p.mib,
            },
        )?;
        std::fs::rename(&tmp, &dir)?;
        eprintln!(
            "built the bench image in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(dir)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn registries_conf(dir: &Path, addrs: &[String]) -> Result<PathBuf> {
    let path = dir.join("bench-registries.conf");
    let text: String = addrs
        .iter()
        .map(|a| format!("[[registry]]\nlocation = \"{a}\"\ninsecure = true\n\n"))
        .collect();
    std::fs::write(&path, text)?;
    Ok(path)
}

/// One fetch into an empty cache; returns seconds.
async fn time_fetch(scratch: &Scratch, conf: &Path, image: &str, concurrency: u64) -> Result<f64> {
    let state = scratch.path().join("bench-state");
    let _ = std::fs::remove_dir_all(&state);
    let _service = ServiceProcess::fetcher(
        scratch,
        &FetcherOptions {
            registries_conf: Some(conf.to_path_buf()),
            state_dir: Some(state),
            ..Default::default()
        },
    )?;
    let mut conn = dnfimage_interfaces::connect(&scratch.runtime_dir(), fetcher::INTERFACE).await?;
    let start = Instant::now();
    let stream = conn.fetch(image, Some(concurrency)).await?;
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
    let layout = bench_layout(&p)?;
    let scratch = Scratch::new()?;
    let registry = Registry::start(&scratch.path().join("registry"))?;
    let direct = registry.docker_ref("bench/image:latest");
    dnfimage_testimage::skopeo_copy(&dnfimage_testimage::oci_ref(&layout, "bench"), &direct)?;
    let proxy = SlowProxy::start(
        &registry.addr(),
        Shaping {
            request_delay: Duration::from_millis(50),
            bytes_per_second: 10_000_000,
            silent_after: None,
        },
    )
    .await?;
    let slow = direct.replace(&registry.addr(), &proxy.addr());
    let conf = registries_conf(scratch.path(), &[registry.addr(), proxy.addr()])?;
    let size = dnfimage_testimage::read_image(&layout, "bench")?.layers_size();
    println!(
        "image: {} layers, {:.1} MB compressed; {} runs each, median",
        p.layers,
        size as f64 / 1e6,
        p.runs
    );

    let mut rows = Vec::new();
    for (label, image) in [("loopback", &direct), ("proxy 50ms/req 10MB/s/conn", &slow)] {
        let mut skopeo = Vec::new();
        let mut by_concurrency: Vec<Vec<f64>> = vec![Vec::new(); CONCURRENCY.len()];
        for _ in 0..p.runs {
            skopeo.push(time_skopeo(&scratch, &conf, image)?);
            for (i, c) in CONCURRENCY.iter().enumerate() {
                by_concurrency[i].push(time_fetch(&scratch, &conf, image, *c).await?);
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
