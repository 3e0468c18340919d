//! `dnfimage-layerer`: serves `org.dnfimage.Layerer`.

fn main() -> std::process::ExitCode {
    // A mount namespace of our own for the build overlays, before threads exist.

    dnfimage_runtime::service_main(dnfimage_layerer::isolate_mounts, dnfimage_layerer::run)
}
