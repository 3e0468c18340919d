//! `dnfimage-importer`: serves `org.dnfimage.Importer`.

fn main() -> std::process::ExitCode {
    dnfimage_runtime::service_main(|| {}, dnfimage_importer::run)
}
