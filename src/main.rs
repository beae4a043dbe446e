//! The `deltasync` binary: parse the configuration, bind, serve.

use std::process::ExitCode;

use clap::Parser;
use deltasync::{
    Config, auth,
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
    let config = Config::parse();
    if let Some(Command::Token(TokenCommand::New)) = config.command {
        return match auth::token::new() {
            Ok(token) => {
                println!("{token}\n{}", auth::token::hash_string(&token));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    telemetry::init(config.log_format);
    if let Err(e) = config.validate() {
        tracing::error!("invalid configuration: {e}");
        return ExitCode::FAILURE;
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(addr = %config.listen, cause = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    match deltasync::serve(config, listener, shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
