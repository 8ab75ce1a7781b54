//! The simulated unit's state of charge on disk, so a restarted unit resumes where it was.
//!
//! It is saved at every reading and every write: a few times a boundary per unit, and a
//! fault suite or `max300 up` runs hundreds of units in one process on the runtime's
//! threads. So the file is kept open and overwritten in place with one fixed-width `write`:
//! no new file, no rename. A rename over the old file made ext4 flush the data and, mounted
//! with `discard`, wait for the old blocks' discard, on an async worker thread, which held
//! up other units' boundaries by a good part of a second on a loaded machine. A single small
//! `write` at offset 0 goes to the page cache whole, so a SIGKILL never leaves half a record;
//! the padding covers whatever a longer earlier record (or the old compact format) left.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use max300_protocol::error::Chain;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Every record is this long, so each one covers the last; a JSON reader skips the padding.
const RECORD: usize = 128;

#[derive(Serialize, Deserialize)]
struct SavedState {
    energy_kwh: f64,
    at: Timestamp,
}

/// The stored energy, kWh, if the file holds a finite one.
pub(crate) fn load_energy(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let saved: SavedState = serde_json::from_str(&text).ok()?;
    saved.energy_kwh.is_finite().then_some(saved.energy_kwh)
}

/// The open state file.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    /// `None` after a failure; the next save opens the file again.
    file: Option<File>,
}

impl StateFile {
    pub(crate) fn new(path: PathBuf) -> StateFile {
        StateFile { path, file: None }
    }

    /// Overwrites the record; a failure is logged, and the unit runs on (in memory).
    pub(crate) fn save(&mut self, energy_kwh: f64, at: Timestamp) {
        if let Err(e) = self.write(energy_kwh, at) {
            warn!(path = %self.path.display(), error = %Chain(&e), "battery state not saved");
            self.file = None;
        }
    }

    fn write(&mut self, energy_kwh: f64, at: Timestamp) -> std::io::Result<()> {
        let mut record = serde_json::to_vec(&SavedState { energy_kwh, at })?;
        // Newer records are never shorter than RECORD, so no tail of an older one survives.
        record.resize(record.len().max(RECORD - 1), b' ');
        record.push(b'\n');
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&self.path)?,
            ),
        };
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Timestamp {
        "2026-11-30T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_shorter_record_replaces_a_longer_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("battery-state.json");
        let mut state = StateFile::new(path.clone());
        state.save(123.456_789_012_345_67, t0());
        state.save(0.5, t0());
        assert_eq!(load_energy(&path), Some(0.5));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RECORD as u64);
    }

    #[test]
    fn a_file_in_the_earlier_compact_format_is_read_and_then_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("battery-state.json");
        std::fs::write(
            &path,
            r#"{"energy_kwh":150.12345678901234,"at":"2026-11-30T00:00:00.123456789Z"}"#,
        )
        .unwrap();
        assert_eq!(load_energy(&path), Some(150.123_456_789_012_34));
        StateFile::new(path.clone()).save(7.0, t0());
        assert_eq!(load_energy(&path), Some(7.0));
    }

    #[test]
    fn a_unit_whose_state_cannot_be_saved_runs_on_and_saves_once_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("battery-state.json");
        let mut state = StateFile::new(path.clone());
        state.save(1.0, t0());
        assert_eq!(load_energy(&path), None);
        std::fs::create_dir(dir.path().join("missing")).unwrap();
        state.save(2.0, t0());
        assert_eq!(load_energy(&path), Some(2.0));
    }
}
