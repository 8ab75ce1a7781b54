//! The simulated controller's write log on disk: one JSON line per write the controller took,
//! and one when its revert timer sent it idle by itself. Tests and audits read it back with
//! [`read_write_log`] to check, from the battery's own record, what ran and when.
//!
//! The file is opened in append mode, so an agent that is killed and started again keeps
//! adding to the same log, and each line goes to the kernel in one `write` before the apply
//! returns, so a SIGKILL never loses a line already logged.

use max300_protocol::error::Chain;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use max300_protocol::{Mode, RateKw, Setpoint};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::SimError;

/// One line of the write log.
///
/// ```json
/// {"at":"2026-11-30T00:00:00Z","mode":"charge","rate_kw":20.0,"real_ms":1234}
/// {"at":"2026-11-30T00:10:00Z","mode":"idle","rate_kw":0.0,"real_ms":31234,"revert":true}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WriteLogEntry {
    /// The clock instant the controller started running this setpoint.
    pub at: Timestamp,
    /// The mode it runs from then on.
    pub mode: Mode,
    /// The rate it runs at, kW.
    pub rate_kw: f64,
    /// Real milliseconds since this controller instance started. It starts again from 0 when
    /// the agent process restarts, so it orders lines within one run only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real_ms: Option<u64>,
    /// True when the revert timer sent the unit idle, rather than a write from the agent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revert: bool,
    /// True on the first line of a controller instance (an agent start): it runs idle.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start: bool,
}

impl WriteLogEntry {
    pub(crate) fn new(at: Timestamp, setpoint: Setpoint, real_ms: u64, revert: bool) -> Self {
        WriteLogEntry {
            at,
            mode: setpoint.mode(),
            rate_kw: setpoint.rate().kw(),
            real_ms: Some(real_ms),
            revert,
            start: false,
        }
    }

    pub(crate) fn started(at: Timestamp) -> Self {
        WriteLogEntry {
            at,
            mode: Mode::Idle,
            rate_kw: 0.0,
            real_ms: Some(0),
            revert: false,
            start: true,
        }
    }

    /// The setpoint this line says the controller ran, if the line holds a valid one.
    pub fn setpoint(&self) -> Option<Setpoint> {
        let rate = RateKw::try_from(self.rate_kw).ok()?;
        Setpoint::new(self.mode, rate).ok()
    }
}

/// Reads a whole write log, in the order it was written. A line that does not parse is an
/// error naming its line number: an audit must not skip what it cannot read.
pub fn read_write_log(path: impl AsRef<Path>) -> Result<Vec<WriteLogEntry>, SimError> {
    read_json_lines(path.as_ref())
}

/// Reads a JSON-lines log (blank lines aside), naming the file and line of anything unreadable.
pub(crate) fn read_json_lines<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Vec<T>, SimError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Log {
        path: path.to_owned(),
        what: "cannot read".into(),
        source: source.into(),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|source| SimError::Log {
                path: path.to_owned(),
                what: format!("line {}", i + 1),
                source: source.into(),
            })
        })
        .collect()
}

/// The appending end of a write log. Failures are logged, never returned: the log is a
/// record for tests and audits, and must not stop the controller from taking a setpoint.
#[derive(Debug)]
pub(crate) struct WriteLog {
    path: PathBuf,
    /// `None` after a failure; the next append opens the file again.
    file: Option<File>,
}

impl WriteLog {
    /// Opens (or creates) `path` for appending. The file exists from here on even if nothing
    /// is written, so a reader can tell "no writes" from "no log".
    pub(crate) fn open(path: PathBuf) -> WriteLog {
        let file = open_append(&path);
        WriteLog { path, file }
    }

    /// Appends one line. Blocking, but one small write to a local file per controller write,
    /// which is no more than the controller round trip it stands for.
    pub(crate) fn append(&mut self, entry: &WriteLogEntry) {
        if self.file.is_none() {
            self.file = open_append(&self.path);
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut line = match serde_json::to_vec(entry) {
            Ok(line) => line,
            Err(e) => {
                warn!(path = %self.path.display(), error = %Chain(&e), "write log: cannot encode a line");
                return;
            }
        };
        line.push(b'\n');
        // One write_all of the whole line: with O_APPEND it lands as one piece even when two
        // processes share the file, and `File` has no user-space buffer to lose on a SIGKILL.
        if let Err(e) = file.write_all(&line) {
            warn!(path = %self.path.display(), error = %Chain(&e), "write log: cannot append a line");
            self.file = None;
        }
    }
}

fn open_append(path: &Path) -> Option<File> {
    // The agent's span carries device_id, so these warnings name the unit.
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| warn!(path = %path.display(), error = %Chain(&e), "write log: cannot open"))
        .ok()
}
