//! Serving benchmark: how long the fetcher takes to answer `org.varlink.service.GetInfo` and
//! `Fetcher.ListCached` while a `Fetch` downloads the bench image through a proxy that behaves
//! like a distant registry, next to the same calls on the idle fetcher, in the same run. Each
//! row is 100 calls (`--calls`) one after another, each on a fresh connection or all on one connection;
//! prints the median and the worst round trip of each and the ratios fetch/idle. The fetch must
//! still be running when the last call is answered, or the run fails.
//!
//! Run with `make bench` (release binaries). Options: `--layers N --mib M --calls C`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result};
use dnfimage_integration::bench::{
    BenchRegistry, DISTANT_LABEL, Options, bench_layout, fresh_fetcher, median,
};
use dnfimage_integration::importer_support::Call;
use dnfimage_integration::{RawConnection, Scratch, error_name, raw_call};
use dnfimage_interfaces::fetcher::INTERFACE;
use serde_json::{Value, json};

/// The calls measured: (label, call).
fn measured() -> [(&'static str, Value); 2] {
    [
        (
            "GetInfo",
            json!({"method": "org.varlink.service.GetInfo", "parameters": {}}),
        ),
        (
            "ListCached",
            json!({"method": format!("{INTERFACE}.ListCached"), "parameters": {}}),
        ),
    ]
}

/// How the calls of a row reach the service: (label, a fresh connection for each call).
const CONNECTIONS: [(&str, bool); 2] = [("a connection each", true), ("one connection", false)];

/// Seconds of each of `count` round trips of `call`, one after another, each on a fresh
/// connection (the connect is timed) or all on one; `after_each` runs after each, untimed.
fn round_trips(
    socket: &Path,
    call: &Value,
    count: usize,
    fresh: bool,
    after_each: &dyn Fn() -> Result<()>,
) -> Result<Vec<f64>> {
    let mut shared = if fresh {
        None
    } else {
        Some(RawConnection::open(socket)?)
    };
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let replies = match &mut shared {
            Some(conn) => conn.call(call)?,
            None => raw_call(socket, call)?,
        };
        times.push(start.elapsed().as_secs_f64());
        let last = replies.last().context("no reply")?;
        anyhow::ensure!(error_name(last).is_none(), "{call} got {last}");
        after_each()?;
    }
    Ok(times)
}

/// Every row: (call label, connections label, seconds of each round trip).
type Rows = Vec<(&'static str, &'static str, Vec<f64>)>;

fn measure(socket: &Path, count: usize, after_each: &dyn Fn() -> Result<()>) -> Result<Rows> {
    let mut rows = Vec::new();
    for (name, call) in measured() {
        for (how, fresh) in CONNECTIONS {
            rows.push((
                name,
                how,
                round_trips(socket, &call, count, fresh, after_each)?,
            ));
        }
    }
    Ok(rows)
}

/// A `Fetch` whose replies a thread reads as they come, as a client shows progress.
struct RunningFetch {
    finished: Arc<AtomicBool>,
    /// Reads the replies; returns the last two: the last progress record and the end.
    reader: JoinHandle<Result<Vec<Value>>>,
}

impl RunningFetch {
    /// Starts fetching `image` and returns once a tenth of its bytes have arrived: the calls
    /// then meet the download in full flow, every layer under way, rather than its start.
    fn start(socket: &Path, image: &str) -> Result<Self> {
        let mut call = Call::start(
            socket,
            &format!("{INTERFACE}.Fetch"),
            json!({"image": image}),
            true,
        )?;
        let finished = Arc::new(AtomicBool::new(false));
        let (flowing, in_full_flow) = mpsc::channel();
        let reader = {
            let finished = Arc::clone(&finished);
            let mut flowing = Some(flowing);
            std::thread::spawn(move || {
                let mut last = Vec::new();
                let read = (|| -> Result<()> {
                    while let Some(reply) = call.next_reply()? {
                        let progress = &reply["parameters"]["progress"];
                        let (done, total) = (
                            progress["bytesDone"].as_u64().unwrap_or(0),
                            progress["bytesTotal"].as_u64().unwrap_or(0),
                        );
                        if total > 0
                            && done >= total / 10
                            && let Some(flowing) = flowing.take()
                        {
                            let _ = flowing.send(());
                        }
                        last.push(reply);
                        if last.len() > 2 {
                            last.remove(0);
                        }
                    }
                    Ok(())
                })();
                finished.store(true, Ordering::SeqCst);
                read.map(|()| last)
            })
        };
        if in_full_flow.recv().is_err() {
            let last = reader
                .join()
                .map_err(|_| anyhow::anyhow!("the fetch's reader panicked"))??;
            anyhow::bail!("the fetch ended before a tenth of the image arrived: {last:?}");
        }
        Ok(Self { finished, reader })
    }

    /// Fails when the fetch has ended.
    fn still_running(&self) -> Result<()> {
        anyhow::ensure!(
            !self.finished.load(Ordering::SeqCst),
            "the fetch ended before the calls did: give it more to download (--mib)"
        );
        Ok(())
    }

    /// Cancels the fetch; returns (bytes done, bytes in all) of its last progress record.
    fn cancel(self, socket: &Path) -> Result<(u64, u64)> {
        let cancelled = raw_call(
            socket,
            &json!({"method": format!("{INTERFACE}.Cancel"), "parameters": {}}),
        )?;
        anyhow::ensure!(error_name(&cancelled[0]).is_none(), "{cancelled:?}");
        let last = self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("the fetch's reader panicked"))??;
        let cancelled_name = format!("{INTERFACE}.Cancelled");
        anyhow::ensure!(
            last.last().and_then(error_name) == Some(cancelled_name.as_str()),
            "the fetch did not end cancelled: {last:?}"
        );
        let progress = &last[0]["parameters"]["progress"];
        Ok((
            progress["bytesDone"].as_u64().context("bytesDone")?,
            progress["bytesTotal"].as_u64().context("bytesTotal")?,
        ))
    }
}

fn ms(seconds: f64) -> f64 {
    seconds * 1000.0
}

fn main() -> Result<()> {
    let o = Options::parse(&["--layers", "--mib", "--calls"])?;
    let (layers, mib, calls): (u32, u64, usize) = (
        o.get("--layers", 4)?,
        o.get("--mib", 128)?,
        o.get("--calls", 100)?,
    );
    anyhow::ensure!(calls > 0, "--calls must be at least 1");
    let layout = bench_layout(layers, mib)?;
    let scratch = Scratch::new()?;
    // The proxy runs on this runtime's threads; the calls are made from this one.
    let runtime = tokio::runtime::Runtime::new()?;
    let bench = runtime.block_on(BenchRegistry::start(&scratch, &layout))?;
    let _fetcher = fresh_fetcher(&scratch, &bench.conf)?;
    let socket = scratch.socket(INTERFACE);

    let idle = measure(&socket, calls, &|| Ok(()))?;
    let fetch = RunningFetch::start(&socket, &bench.slow)?;
    let busy = measure(&socket, calls, &|| fetch.still_running())?;
    let (done, total) = fetch.cancel(&socket)?;

    println!(
        "fetcher: {} calls one after another, round trip in ms, median / worst; \
         during a Fetch of {} layers, {:.1} MB through the {DISTANT_LABEL}",
        calls,
        layers,
        bench.size as f64 / 1e6,
    );
    println!(
        "{:<30} {:>17} {:>17} {:>17}",
        "", "idle", "during the fetch", "ratio fetch/idle"
    );
    for ((name, how, idle), (_, _, busy)) in idle.into_iter().zip(busy) {
        let idle_worst = idle.iter().copied().fold(0.0, f64::max);
        let busy_worst = busy.iter().copied().fold(0.0, f64::max);
        let (idle_median, busy_median) = (median(idle), median(busy));
        println!(
            "{:<30} {:>7.2} / {:>7.2} {:>7.2} / {:>7.2} {:>6.1}x / {:>6.1}x",
            format!("{name}, {how}"),
            ms(idle_median),
            ms(idle_worst),
            ms(busy_median),
            ms(busy_worst),
            busy_median / idle_median,
            busy_worst / idle_worst,
        );
    }
    println!(
        "the fetch was still running after the last call (cancelled then, at {:.1} of {:.1} MB)",
        done as f64 / 1e6,
        total as f64 / 1e6
    );
    Ok(())
}
