//! `zebra-run`: runs compiled artifacts without MLIR or LLVM (see the library).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let mut out = std::io::stdout().lock();
    match zebra_run::run(zebra_run::Cli::parse(), &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
