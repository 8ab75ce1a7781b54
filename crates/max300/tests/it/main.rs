//! End-to-end tests of the `max300` binary: real processes, real sockets, real SQLite.

// Test helpers unwrap too: a panic there is the failure message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod aws;
mod browser;
mod cli;
mod faults;
mod lambda;
mod modbus;
mod mosquitto;
mod processes;
mod proxy;
mod session;
mod telemetry;
mod up;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The binary under test.
pub fn max300() -> Command {
    Command::new(env!("CARGO_BIN_EXE_max300"))
}

/// Runs the binary to completion.
pub fn run(args: &[&str]) -> Output {
    max300().args(args).output().expect("max300 runs")
}

/// A child process that is killed when dropped, with its stdout lines on a channel.
pub struct Proc {
    /// For messages and the log file.
    pub name: String,
    /// The process.
    pub child: Child,
    /// Its stdout, line by line.
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `max300 args…` with logs going to `log_dir/name.log`.
    pub fn start(name: &str, args: &[String], log_dir: &Path) -> Proc {
        Proc::start_with_env(name, args, &[], log_dir)
    }

    /// Starts `max300 args…` with extra environment variables. The log is appended to, so a
    /// restarted process keeps one log.
    pub fn start_with_env(
        name: &str,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("{name}.log")))
            .unwrap();
        let mut child = max300()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(e) => panic!(
                    "{}: no line starting with {prefix:?} ({e}); exit status {:?}",
                    self.name,
                    self.child.try_wait()
                ),
            }
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago (for servers that can't report a port 0 bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The sum of the samples of metric `name` (exact, with its suffix) whose labels contain
/// every one of `labels` (e.g. `outcome="invalid"`), in a Prometheus text scrape.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `GET url` as text.
pub async fn scrape(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}
