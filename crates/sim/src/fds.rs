//! The process's open-file limit. A fleet holds one socket per device (and the embedded
//! broker one per client), so a large run needs the soft limit raised to the hard one, and a
//! run that cannot fit fails at start with the numbers rather than half-way with EMFILE.

use anyhow::Context;
use max300_protocol::error::Chain;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Files a process needs besides its sockets: the runtime, the store, logs, listeners.
pub const SPARE_FDS: u64 = 64;

/// Raises the soft limit on open files to the hard limit and returns the new soft limit.
pub fn raise_to_hard() -> anyhow::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    // An unlimited hard limit is still capped by the kernel's nr_open; this stays below it.
    let target = hard.min(1 << 20);
    if target <= soft {
        return Ok(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => Ok(target),
        Err(e) => {
            tracing::warn!(soft, hard, error = %Chain(&e), "open-file limit not raised");
            Ok(soft)
        }
    }
}

/// Fails unless `sockets` connections fit under the limit (after raising it), naming the
/// flag that asked for them.
pub fn ensure_room(sockets: usize, what: &str) -> anyhow::Result<()> {
    let limit = raise_to_hard()?;
    let need = sockets as u64 + SPARE_FDS;
    if need > limit {
        anyhow::bail!(
            "{what}: {sockets} connections need about {need} open files, but this process may \
             open {limit} (the hard limit of `ulimit -n`, which only root can raise); use fewer \
             devices or raise the hard limit"
        );
    }
    Ok(())
}
