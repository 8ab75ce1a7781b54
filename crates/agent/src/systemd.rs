//! systemd's notify protocol: `READY=1` once the agent runs, and `WATCHDOG=1` from its main
//! loop, so that a loop stuck (on a controller that never answers, say) is killed and
//! restarted by systemd rather than left holding the battery in a stale setpoint.
//!
//! Without `NOTIFY_SOCKET` (not under systemd, or `Type=exec`) every call does nothing.

use max300_protocol::error::Chain;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::{debug, warn};

/// Where to notify, and how often the watchdog wants to hear from us.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

/// What the environment says, parsed: the socket's address (a path, or `@name` for the
/// abstract namespace) and the watchdog period, if it is meant for this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyEnv {
    /// `NOTIFY_SOCKET`.
    pub socket: String,
    /// From `WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or names this process.
    pub watchdog: Option<Duration>,
}

impl NotifyEnv {
    /// Parses the variables systemd sets; `None` when there is nothing to notify.
    pub fn parse(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Option<NotifyEnv> {
        let socket = socket.filter(|s| !s.is_empty())?.to_owned();
        let ours = watchdog_pid.is_none_or(|p| p.parse::<u32>().ok() == Some(pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Some(NotifyEnv { socket, watchdog })
    }
}

impl Notifier {
    /// From this process's environment.
    pub fn from_env() -> Notifier {
        let var = |k: &str| std::env::var(k).ok();
        let env = NotifyEnv::parse(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        );
        env.map_or_else(Notifier::default, |env| Notifier::new(&env))
    }

    fn new(env: &NotifyEnv) -> Notifier {
        let addr = match env.socket.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&env.socket),
        };
        let target = addr
            .and_then(|addr| Ok((UnixDatagram::unbound()?, addr)))
            .map_err(|e| warn!(socket = %env.socket, error = %Chain(&e), "NOTIFY_SOCKET unusable: not notifying systemd"))
            .ok();
        Notifier {
            target,
            watchdog: env.watchdog,
        }
    }

    /// How often to pet the watchdog: half its period, as systemd advises.
    pub fn pet_every(&self) -> Option<Duration> {
        self.watchdog
            .filter(|_| self.target.is_some())
            .map(|w| w / 2)
    }

    /// The agent is up.
    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=following its plans");
    }

    /// The main loop is alive.
    pub fn pet(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, state: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(state.as_bytes(), addr)
        {
            debug!(error = %Chain(&e), "systemd notification not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_systemd_sets() {
        assert_eq!(NotifyEnv::parse(None, Some("1000"), None, 7), None);
        assert_eq!(NotifyEnv::parse(Some(""), None, None, 7), None);
        let env = NotifyEnv::parse(Some("/run/x"), Some("30000000"), Some("7"), 7).unwrap();
        assert_eq!(env.watchdog, Some(Duration::from_secs(30)));
        let other = NotifyEnv::parse(Some("@x"), Some("30000000"), Some("8"), 7).unwrap();
        assert_eq!(other.watchdog, None, "the watchdog is another process's");
        let bad = NotifyEnv::parse(Some("/run/x"), Some("soon"), None, 7).unwrap();
        assert_eq!(bad.watchdog, None);
    }

    #[test]
    fn notifies_a_socket_and_pets_at_half_the_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let env = NotifyEnv {
            socket: path.display().to_string(),
            watchdog: Some(Duration::from_secs(10)),
        };
        let n = Notifier::new(&env);
        assert_eq!(n.pet_every(), Some(Duration::from_secs(5)));
        n.ready();
        n.pet();
        let mut buf = [0u8; 128];
        let got = systemd.recv(&mut buf).unwrap();
        assert!(
            std::str::from_utf8(&buf[..got])
                .unwrap()
                .starts_with("READY=1")
        );
        let got = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"WATCHDOG=1");
        assert_eq!(Notifier::default().pet_every(), None);
        Notifier::default().ready();
    }
}
