//! `dnfimage-layerer`: serves `org.dnfimage.Layerer`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // First, before any thread exists: the activation fds and their environment variables,
    // then a mount namespace of our own for the build overlays.
    let activation = match dnfimage_runtime::activation::take() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    dnfimage_layerer::isolate_mounts();
    let args = dnfimage_layerer::Args::parse();
    dnfimage_runtime::init_logging();
    dnfimage_runtime::run_main(|| dnfimage_layerer::run(args, activation))
}
