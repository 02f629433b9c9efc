//! The `wick` command: every job of the library behind one binary (`wick --help`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

fn main() -> std::process::ExitCode {
    wick::keep_freed_memory();
    let cli = wick::cmd::Cli::parse();
    // The server's work arrives on its own threads; every other command computes on this one.
    if !matches!(cli.command, wick::cmd::Command::Serve(_)) {
        wick::cpu::join_thread_pool();
    }
    match wick::cmd::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The whole chain on one line: what failed, then why.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
