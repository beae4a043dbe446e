//! The `deltasync` binary: parse the command line, then run a client
//! subcommand (`deltasync::cli`) or bind and serve.

use std::process::ExitCode;

use clap::Parser;
use deltasync::{
    Config, auth, cli,
    config::{Command, TokenCommand},
    shutdown, telemetry,
};

/// mimalloc: the server allocates many small, short-lived buffers per call
/// (protobuf and JSON values); it is measurably faster here than the system
/// allocator (see README, Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let mut config = Config::parse();
    match config.command.take() {
        Some(Command::Token(TokenCommand::New)) => {
            return match auth::token::new() {
                Ok(token) => {
                    use std::io::Write;
                    let hash = auth::token::hash_string(&token);
                    // A closed stdout is the reader's choice, not a panic.
                    let _ = writeln!(std::io::stdout(), "{token}\n{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("deltasync: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Client(command)) => return cli::run(*command).await,
        None => {}
    }
    telemetry::init(config.log_format);
    if let Err(e) = config.validate() {
        tracing::error!("invalid configuration: {e}");
        return ExitCode::FAILURE;
    }
    // Before anything slow: a SIGTERM from here on stops the server cleanly.
    let signal = shutdown::signal();
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(addr = %config.listen, cause = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "bound; opening the store");
    }
    match deltasync::serve(config, listener, signal).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
