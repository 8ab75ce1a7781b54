//! `max300`: the one binary. It parses the command line, loads config, sets up tracing and
//! calls into the libraries; the business logic lives in the crates.
//!
//! # Layout
//! - `cli`: the command line and the layering of flags over config files and env. Commands
//!   of the simulator (`provider`, `battery-sim`, `fleet`, `bench`) are thin calls into
//!   `max300-sim`.
//! - `clock`: the `--clock-*` flags.
//! - `up`: everything on one machine, with a summary: the composition of broker, cloud,
//!   sample provider and agents on simulated batteries.
//! - `validate`: offline checking of a provider document.
//! - `certs`: a development CA and the broker, cloud and device certificates.
//! - `lambda`: the Lambda Runtime API client around the cloud's Lambda handler.
//! - `malloc`: glibc's allocator set for a service (arenas, mmap threshold).

#[cfg(feature = "cloud")]
mod certs;
mod cli;
mod clock;
#[cfg(feature = "aws")]
mod lambda;
mod malloc;
#[cfg(all(feature = "cloud", feature = "broker", feature = "sim"))]
mod up;
mod validate;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

fn main() -> ExitCode {
    malloc::tuned();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Lambda starts its `bootstrap` with no arguments: that is `max300 lambda`.
    if cfg!(feature = "aws")
        && args.len() == 1
        && std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
    {
        args.push("lambda".into());
    }
    let cli = cli::Cli::parse_from(args);
    // Built before the async runtime: the exporter's blocking HTTP client must not be made
    // (or dropped) inside it.
    let traces = match init_tracing(
        cli.log_format.as_deref(),
        cli.command.default_log_filter(),
        cli.otlp_endpoint.as_deref(),
        cli.command.service_name(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
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
    let code = match runtime.block_on(cli.command.run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Tasks still holding spans end them as the runtime goes; then the last batch is sent.
    drop(runtime);
    if let Some(provider) = traces
        && let Err(e) = provider.shutdown()
    {
        eprintln!("warning: traces not all exported: {e}");
    }
    code
}

/// Text on a terminal, JSON lines otherwise (or when asked); `RUST_LOG` overrides the level.
/// With an OTLP endpoint, spans of our own crates (at info and above) also go out as
/// OpenTelemetry traces, whatever the log level; the provider returned must be shut down
/// before the process exits, or the last batch is lost.
fn init_tracing(
    format: Option<&str>,
    default_filter: &str,
    otlp_endpoint: Option<&str>,
    service_name: &'static str,
) -> anyhow::Result<Option<SdkTracerProvider>> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = match format {
        Some("json") => true,
        Some(_) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    let (otel, provider) = match otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let provider = otlp_provider(endpoint, service_name)?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("max300"))
                .with_filter(Targets::new().with_target("max300", Level::INFO));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .init();
    Ok(provider)
}

/// OTLP/HTTP (protobuf) to `{endpoint}/v1/traces`, in batches from a thread of its own.
fn otlp_provider(endpoint: &str, service_name: &'static str) -> anyhow::Result<SdkTracerProvider> {
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        anyhow::bail!("--otlp-endpoint {endpoint:?}: expected an http:// or https:// URL");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .with_context(|| format!("--otlp-endpoint {endpoint}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build())
}
