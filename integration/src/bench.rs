//! What the benchmarks in `src/bin/` share: their options, the bench image, a registry serving it
//! directly and behind a proxy that behaves like a distant registry, a fetcher on an empty cache,
//! and medians.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_testimage::{BenchOptions, Registry};

use crate::proxy::{Shaping, SlowProxy};
use crate::{FetcherOptions, Scratch, ServiceProcess, bin_dir};

/// The `--name value` options a benchmark was given.
pub struct Options(BTreeMap<String, String>);

impl Options {
    /// The command line's options; each must be one of `known` and have a value.
    pub fn parse(known: &[&str]) -> Result<Self> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut given = BTreeMap::new();
        for pair in args.chunks(2) {
            let value = pair.get(1).context("every option takes a value")?;
            anyhow::ensure!(
                known.contains(&pair[0].as_str()),
                "unknown option {}",
                pair[0]
            );
            given.insert(pair[0].clone(), value.clone());
        }
        Ok(Self(given))
    }

    /// The value given for `name`, or `default`.
    pub fn get<T>(&self, name: &str, default: T) -> Result<T>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.0.get(name) {
            Some(value) => value
                .parse()
                .with_context(|| format!("Parsing {name} {value}")),
            None => Ok(default),
        }
    }
}

/// The median of `v` (of an even count, the upper one).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The bench image's OCI layout (`layers` layers of incompressible data, `mib` MiB in all,
/// tagged "bench"), built once and kept under target/.
pub fn bench_layout(layers: u32, mib: u64) -> Result<PathBuf> {
    let dir = bin_dir().join(format!("../dnfimage-fixtures/bench-{layers}x{mib}"));
    if !dir.join("index.json").exists() {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let start = Instant::now();
        dnfimage_testimage::build_bench(
            &tmp,
            "bench",
            &BenchOptions {
                layers,
                total_mib: mib,
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

/// A registry across the Internet: 50 ms per request, ~10 MB/s per connection.
pub const DISTANT: Shaping = Shaping {
    request_delay: Duration::from_millis(50),
    bytes_per_second: 10_000_000,
    silent_after: None,
};

/// How [`DISTANT`] reads in the benchmarks' output.
pub const DISTANT_LABEL: &str = "proxy 50ms/req 10MB/s/conn";

/// A registry serving the bench image, directly and behind a [`DISTANT`] proxy; stops when
/// dropped.
pub struct BenchRegistry {
    /// The image straight from the registry.
    pub direct: String,
    /// The same image through the proxy.
    pub slow: String,
    /// A registries.conf marking the registry and the proxy insecure (plain HTTP).
    pub conf: PathBuf,
    /// The sum of the image's layer sizes in bytes.
    pub size: u64,
    _proxy: SlowProxy,
    _registry: Registry,
}

impl BenchRegistry {
    /// Starts a registry in `scratch`, pushes the bench image at `layout` to it and puts the
    /// proxy in front of it. Needs a tokio runtime, on which the proxy runs.
    pub async fn start(scratch: &Scratch, layout: &Path) -> Result<Self> {
        let registry = Registry::start(&scratch.path().join("registry"))?;
        let direct = registry.docker_ref("bench/image:latest");
        dnfimage_testimage::skopeo_copy(&dnfimage_testimage::oci_ref(layout, "bench"), &direct)?;
        let proxy = SlowProxy::start(&registry.addr(), DISTANT).await?;
        let slow = direct.replace(&registry.addr(), &proxy.addr());
        let conf = scratch.path().join("bench-registries.conf");
        let text: String = [registry.addr(), proxy.addr()]
            .iter()
            .map(|a| format!("[[registry]]\nlocation = \"{a}\"\ninsecure = true\n\n"))
            .collect();
        std::fs::write(&conf, text)?;
        let size = dnfimage_testimage::read_image(layout, "bench")?.layers_size();
        Ok(Self {
            direct,
            slow,
            conf,
            size,
            _proxy: proxy,
            _registry: registry,
        })
    }
}

/// Starts a fetcher with `conf` on an empty state directory (`bench-state` in `scratch`, emptied
/// first).
pub fn fresh_fetcher(scratch: &Scratch, conf: &Path) -> Result<ServiceProcess> {
    let state = scratch.path().join("bench-state");
    let _ = std::fs::remove_dir_all(&state);
    ServiceProcess::fetcher(
        scratch,
        &FetcherOptions {
            registries_conf: Some(conf.to_path_buf()),
            state_dir: Some(state),
            ..Default::default()
        },
    )
}
