//! `dnfimage-fetcher`: serves `org.dnfimage.Fetcher`.

fn main() -> std::process::ExitCode {
    dnfimage_runtime::service_main(|| {}, dnfimage_fetcher::run)
}
