//! Whether the system clock is synchronized, for `clock_sync = "ntp"`: systemd-timesyncd
//! marks a synchronized clock with a file; otherwise `timedatectl` is asked. No answer
//! counts as "not synchronized": a unit that cannot tell stays idle rather than run a plan
//! at the wrong time.

use std::time::Duration;

const TIMESYNCD_FLAG: &str = "/run/systemd/timesync/synchronized";

/// Whether the system's time sync says the clock is right.
pub async fn system_clock_synchronized() -> bool {
    if tokio::fs::try_exists(TIMESYNCD_FLAG).await.unwrap_or(false) {
        return true;
    }
    let asked = tokio::process::Command::new("timedatectl")
        .args(["show", "--property=NTPSynchronized", "--value"])
        // systemd's tools report their own failures to NOTIFY_SOCKET: that socket is ours.
        .env_remove("NOTIFY_SOCKET")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(5), asked).await {
        Ok(Ok(out)) => out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "yes",
        _ => false,
    }
}
