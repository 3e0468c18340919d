//! `dnfimage-deployer`: serves `org.dnfimage.Deployer`.

fn main() -> std::process::ExitCode {
    dnfimage_runtime::service_main(|| {}, dnfimage_deployer::run)
}
