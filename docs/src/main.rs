//! `dnfimage-docs OUTDIR`: writes the manual pages and shell completions (see the library) under
//! OUTDIR. `scripts/install.sh` runs it; it builds nothing and reads nothing at run time.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: dnfimage-docs OUTDIR");
        return std::process::ExitCode::from(2);
    };
    match dnfimage_docs::generate(std::path::Path::new(&out)) {
        Ok(files) => {
            eprintln!(
                "dnfimage-docs: wrote {} files under {}",
                files.len(),
                std::path::Path::new(&out).display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
