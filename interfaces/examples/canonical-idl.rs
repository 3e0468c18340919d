//! Prints the canonical form of the interface description read on stdin; used to regenerate the
//! committed `*.varlink` files from a running service (see `make idl`).

use std::io::Read;

fn main() -> std::process::ExitCode {
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("error: Reading stdin: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match dnfimage_interfaces::idl::canonical(&text) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
