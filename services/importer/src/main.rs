//! `dnfimage-importer`: serves `org.dnfimage.Importer`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // First, before any thread exists: the activation fds and their environment variables.
    let activation = match dnfimage_runtime::activation::take() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let args = dnfimage_importer::Args::parse();
    dnfimage_runtime::init_logging();
    dnfimage_runtime::run_main(|| dnfimage_importer::run(args, activation))
}
