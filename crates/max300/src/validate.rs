//! `max300 validate FILE`: check a provider document offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use max300_protocol::document::{Fleet, normalize};
use max300_protocol::{DeviceId, RateKw, day::time_zone};

/// `max300 validate`
#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    /// The provider document (JSON).
    pub file: PathBuf,
    /// The rate limit to check against, in kW.
    #[arg(long, default_value_t = 150.0)]
    pub max_rate_kw: f64,
    /// The fleet's zone.
    #[arg(long, default_value = "Europe/London")]
    pub timezone: String,
    /// Registered devices that a "*" schedule would go to (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
}

/// Prints every error with its place; exits 1 if anything was rejected.
pub fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let body = std::fs::read(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let mut fleet = Fleet::new(time_zone(&args.timezone).context("--timezone")?);
    fleet.default_max_rate = RateKw::try_from(args.max_rate_kw).context("--max-rate-kw")?;
    fleet.devices = args
        .devices
        .iter()
        .map(|id| {
            Ok((
                DeviceId::parse(id.as_str()).context("--devices")?,
                fleet.default_max_rate,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let out = match normalize(&body, &fleet) {
        Ok(out) => out,
        Err(e) => {
            println!("{}: {e}", args.file.display());
            return Ok(ExitCode::from(1));
        }
    };
    println!(
        "{} ({}): {} periods",
        out.day.date(),
        out.day.tz_name(),
        out.day.period_count()
    );
    for s in &out.schedules {
        println!(
            "  {}: ok, {} periods, {} filled with idle{}",
            s.schedule.device_id(),
            s.schedule.setpoints().len(),
            s.filled,
            if s.from_wildcard { " (from \"*\")" } else { "" }
        );
    }
    for r in &out.rejected {
        for line in r.to_string().lines() {
            println!("  {line}");
        }
    }
    println!(
        "{} accepted, {} rejected",
        out.schedules.len(),
        out.rejected.len()
    );
    Ok(if out.rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
