//! `max300 bench plot`: runs `bench ingest` in a fresh process per fleet size (so each peak
//! memory is its own), takes the median of several runs and draws time and memory against N
//! as one SVG. The drawing is pure and hand-written: no plotting crate for two polylines.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Args;

/// `max300 bench plot`
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// Fleet sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000, 100_000])]
    pub devices: Vec<usize>,
    /// Runs per size; the plot shows their median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// An external broker (e.g. mosquitto) instead of the embedded one.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Where to write the SVG.
    #[arg(long, default_value = "docs/ingest-scaling.svg")]
    pub out: PathBuf,
}

/// One fleet size's medians.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Fleet size.
    pub devices: usize,
    /// Fetch to every command `sent`, seconds.
    pub secs: f64,
    /// Peak resident memory during the ingestion, MB.
    pub mb: f64,
}

/// Runs `bench ingest` per fleet size and draws the SVG.
pub async fn plot(args: PlotArgs) -> anyhow::Result<ExitCode> {
    if args.devices.is_empty() || args.devices.contains(&0) {
        bail!("--devices: give one or more fleet sizes above 0, e.g. 1000,10000,100000");
    }
    if args.runs == 0 {
        bail!("--runs: must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find this program to run bench ingest")?;
    let mut points = Vec::new();
    for &devices in &args.devices {
        let mut secs = Vec::new();
        let mut mb = Vec::new();
        for run in 1..=args.runs {
            let mut cmd = Command::new(&exe);
            cmd.args(["bench", "ingest", "--devices", &devices.to_string()]);
            if let Some(url) = &args.mqtt {
                cmd.args(["--mqtt", url]);
            }
            let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout.lines().last().unwrap_or_default();
            if !out.status.success() {
                bail!(
                    "bench ingest --devices {devices} (run {run}) failed: {}{}",
                    line,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let (s, m) = parse_closing_line(line)
                .with_context(|| format!("bench ingest printed {line:?}"))?;
            println!("  devices {devices}, run {run}: {s:.3} s, {m:.1} MB");
            secs.push(s);
            mb.push(m);
        }
        points.push(Point {
            devices,
            secs: median(&mut secs),
            mb: median(&mut mb),
        });
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let broker = args.mqtt.as_deref().unwrap_or("embedded");
    std::fs::write(&args.out, svg(&points, broker, args.runs))
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let figures: Vec<String> = points
        .iter()
        .map(|p| format!("{} devices {:.3} s {:.1} MB", p.devices, p.secs, p.mb))
        .collect();
    println!(
        "bench plot: broker {broker}, medians of {} runs: {}; plot {}",
        args.runs,
        figures.join(", "),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The time and the peak memory from `bench ingest`'s closing line.
fn parse_closing_line(line: &str) -> Option<(f64, f64)> {
    let number_after = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some((
        number_after("fetch to all sent ")?,
        number_after("peak memory ")?,
    ))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

const W: f64 = 360.0;
const H: f64 = 260.0;
const PAD: f64 = 48.0;

/// Two panels, N on a log axis: seconds to all `sent`, and peak MB.
pub fn svg(points: &[Point], broker: &str, runs: usize) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="#fff"/>
<text x="{cx}" y="16" text-anchor="middle" font-size="13">max300 bench ingest: fetch → every command sent (broker {broker}, median of {runs})</text>
"##,
        w = 2.0 * W,
        h = H + 20.0,
        cx = W,
    );
    panel(
        &mut out,
        0.0,
        points,
        |p| p.secs,
        "seconds",
        "#1f6feb",
        |v| format!("{v:.2} s"),
    );
    panel(
        &mut out,
        W,
        points,
        |p| p.mb,
        "peak memory, MB",
        "#d1242f",
        |v| format!("{v:.0} MB"),
    );
    out.push_str("</svg>\n");
    out
}

fn panel(
    out: &mut String,
    x0: f64,
    points: &[Point],
    value: impl Fn(&Point) -> f64,
    label: &str,
    colour: &str,
    fmt: impl Fn(f64) -> String,
) {
    let top = 30.0;
    let (left, right, bottom) = (x0 + PAD, x0 + W - 16.0, H - 10.0);
    let lo = points
        .iter()
        .map(|p| (p.devices as f64).log10())
        .fold(f64::INFINITY, f64::min);
    let hi = points
        .iter()
        .map(|p| (p.devices as f64).log10())
        .fold(f64::NEG_INFINITY, f64::max);
    let max = points
        .iter()
        .map(&value)
        .fold(0.0, f64::max)
        .max(f64::EPSILON)
        * 1.15;
    let x = |n: usize| {
        let span = (hi - lo).max(f64::EPSILON);
        left + ((n as f64).log10() - lo) / span * (right - left - 20.0) + 10.0
    };
    let y = |v: f64| bottom - v / max * (bottom - top - 16.0);
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/><line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>"##
    );
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="{colour}">{label}</text>"##,
        (left + right) / 2.0,
        top + 4.0
    );
    for tick in 0..=4 {
        let v = max * f64::from(tick) / 4.0 / 1.15;
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            left - 4.0,
            y(v) + 4.0,
            fmt(v)
        );
    }
    let path: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.devices), y(value(p))))
        .collect();
    let _ = writeln!(
        out,
        r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"##,
        path.join(" ")
    );
    for p in points {
        let (px, py) = (x(p.devices), y(value(p)));
        let _ = writeln!(
            out,
            r##"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{colour}"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#555">N = {}</text>"##,
            py - 8.0,
            fmt(value(p)),
            bottom + 14.0,
            p.devices
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_the_figures_from_the_closing_line() {
        let line = "bench ingest: devices 10000, document 4.7 MB, broker embedded, fetch to all sent 0.812 s (CPU: the cores busy 1.20 of 1.60 s (75 %): the cloud 1.10 s, the rest 0.10 s), peak memory 61.5 MB during the ingestion (80.1 MB before it)";
        assert_eq!(parse_closing_line(line), Some((0.812, 61.5)));
        assert_eq!(parse_closing_line("bench ingest: failed"), None);
    }

    #[test]
    fn draws_one_point_per_size_with_its_figures() {
        let points = [
            Point {
                devices: 1_000,
                secs: 0.1,
                mb: 20.0,
            },
            Point {
                devices: 10_000,
                secs: 0.8,
                mb: 60.0,
            },
        ];
        let svg = svg(&points, "embedded", 3);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("0.80 s") && svg.contains("60 MB") && svg.contains("N = 10000"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
