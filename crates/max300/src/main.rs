//! `max300`: the one binary. It parses the command line, loads config, sets up tracing and
//! calls into the libraries; the business logic lives in the crates.
//!
//! # Layout
//! - `cli`: the command line and the layering of flags over config files and env.
//! - `clock`: the `--clock-*` flags.
//! - `sample`: the sample schedule provider.
//! - `up`: everything on one machine, with a summary.
//! - `validate`: offline checking of a provider document.
//! - `bench`: benchmarks through the real components.
//! - `certs`: a development CA and the broker, cloud and device certificates.

#[cfg(all(feature = "cloud", feature = "broker"))]
mod bench;
#[cfg(feature = "cloud")]
mod certs;
mod cli;
mod clock;
#[cfg(feature = "cloud")]
mod sample;
#[cfg(all(feature = "cloud", feature = "agent", feature = "broker"))]
mod up;
mod validate;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_tracing(cli.log_format.as_deref(), cli.command.default_log_filter());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.command.run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Text on a terminal, JSON lines otherwise (or when asked); `RUST_LOG` overrides the level.
fn init_tracing(format: Option<&str>, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = match format {
        Some("json") => true,
        Some(_) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
