//! The crate's error type: what can go wrong in a simulator, with its cause kept.

use std::path::PathBuf;

use thiserror::Error;

/// Everything the simulators can fail at.
#[derive(Debug, Error)]
pub enum SimError {
    /// A setting is out of range; the message starts with the setting's name.
    #[error("{0}")]
    Config(String),
    /// A log on disk cannot be opened, read or parsed.
    #[error("{}: {what}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// What failed: `cannot read`, `line 7`.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
