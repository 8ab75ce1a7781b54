//! CPU time, to say where a window's wall time went: this process's, a child's, and the whole
//! machine's (every core, every process, the kernel's work for them). On a machine with few
//! cores the cloud shares them with the broker and the simulated fleet, and a figure that
//! misses its target may be bound by what the others take, not by the cloud.

use std::time::Duration;

/// CPU time of this process so far (user + system).
pub fn this_process() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return Duration::ZERO;
    };
    let secs = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    secs(usage.user_time()) + secs(usage.system_time())
}

/// CPU time of process `pid` so far (user + system), from `/proc/PID/stat`; None off Linux
/// or once it has gone.
pub fn process(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(ticks(process_ticks(&stat)?))
}

/// The busy and the total time of every core so far, from `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// Time spent running anything: user, system, interrupts, stolen by the hypervisor.
    pub busy: Duration,
    /// Busy and idle (including waiting for I/O).
    pub all: Duration,
}

impl Machine {
    /// Now, or None off Linux.
    pub fn now() -> Option<Machine> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let (busy, all) = machine_ticks(&stat)?;
        Some(Machine {
            busy: ticks(busy),
            all: ticks(all),
        })
    }

    /// What the cores did from `earlier` to this one.
    pub fn since(self, earlier: Machine) -> Machine {
        Machine {
            busy: self.busy.saturating_sub(earlier.busy),
            all: self.all.saturating_sub(earlier.all),
        }
    }
}

/// The CPU time spent so far by the machine, this process and one child.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    machine: Option<Machine>,
    this: Duration,
    child: Option<Duration>,
}

impl Sample {
    /// Now, with the child `child` (a process id) if there is one.
    pub fn now(child: Option<u32>) -> Sample {
        Sample {
            machine: Machine::now(),
            this: this_process(),
            child: child.and_then(process),
        }
    }

    /// Says what was spent from `earlier` to this sample, naming this process `this` and the
    /// child `child`: "the cores busy 3.91 of 4.20 s (93 %): the cloud 1.90 s, the fleet
    /// 1.20 s, the rest 0.81 s". What the rest is depends on the run (a broker, the kernel's
    /// interrupts, anything else on the machine).
    pub fn spent_since(&self, earlier: &Sample, this: &str, child: &str) -> String {
        use std::fmt::Write;
        let secs = |d: Duration| d.as_secs_f64();
        let own = self.this.saturating_sub(earlier.this);
        let theirs = self
            .child
            .zip(earlier.child)
            .map(|(a, b)| a.saturating_sub(b));
        let machine = self
            .machine
            .zip(earlier.machine)
            .map(|(now, then)| now.since(then));
        let mut text = String::new();
        if let Some(m) = machine {
            let share = if m.all.is_zero() {
                0.0
            } else {
                secs(m.busy) / secs(m.all) * 100.0
            };
            let _ = write!(
                text,
                "the cores busy {:.2} of {:.2} s ({share:.0} %): ",
                secs(m.busy),
                secs(m.all)
            );
        }
        let _ = write!(text, "{this} {:.2} s", secs(own));
        if let Some(t) = theirs {
            let _ = write!(text, ", {child} {:.2} s", secs(t));
        }
        if let Some(m) = machine {
            let rest = m.busy.saturating_sub(own + theirs.unwrap_or_default());
            let _ = write!(text, ", the rest {:.2} s", secs(rest));
        }
        text
    }
}

/// `/proc` counts in clock ticks (USER_HZ, 100 a second on Linux).
fn ticks(n: u64) -> Duration {
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Duration::from_nanos(n.saturating_mul(1_000_000_000) / per_second)
}

/// utime + stime in ticks from the text of a `/proc/PID/stat`. The command name (second
/// field) may hold spaces and parentheses, so the fields are counted after its last `)`.
fn process_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state (3), ppid … cmajflt (4–13), utime (14), stime (15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, all) in ticks from the text of `/proc/stat`'s first line, the sum over every core.
/// `guest` time is already counted in `user`, so it is not added again.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let n: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| n.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    let idle = at(3) + at(4);
    (n.len() >= 4).then_some((busy, busy + idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_time_is_read_past_a_name_with_spaces_and_parentheses() {
        let stat = "4138 (tokio (rt) worker) S 1 4138 4138 0 -1 4194304 5176 0 0 0 \
                    187 42 0 0 20 0 9 0 1936383 1094643712 11622 18446744073709551615";
        assert_eq!(process_ticks(stat), Some(229));
        assert_eq!(process_ticks("4138 (max300) S 1 2"), None);
    }

    #[test]
    fn the_machine_is_busy_except_when_idle_or_waiting_for_io() {
        let stat = "cpu  100 5 50 800 40 3 2 10 7 0\ncpu0 50 2 25 400 20 1 1 5 3 0\n";
        // user 100 + nice 5 + system 50 + irq 3 + softirq 2 + steal 10; guest is in user.
        assert_eq!(machine_ticks(stat), Some((170, 1010)));
        assert_eq!(machine_ticks("intr 1 2 3\n"), None);
    }

    #[test]
    fn a_window_is_split_into_this_process_the_child_and_the_rest() {
        let ms = Duration::from_millis;
        let at = |busy, all, this, child| Sample {
            machine: Some(Machine {
                busy: ms(busy),
                all: ms(all),
            }),
            this: ms(this),
            child: Some(ms(child)),
        };
        let text = at(4_000, 5_000, 2_000, 1_000).spent_since(
            &at(1_000, 1_000, 500, 200),
            "the cloud",
            "the fleet",
        );
        assert_eq!(
            text,
            "the cores busy 3.00 of 4.00 s (75 %): the cloud 1.50 s, the fleet 0.80 s, the rest 0.70 s"
        );
        let alone = Sample {
            machine: None,
            this: ms(900),
            child: None,
        };
        let before = Sample {
            this: ms(400),
            ..alone
        };
        assert_eq!(
            alone.spent_since(&before, "the cloud", "the fleet"),
            "the cloud 0.50 s"
        );
    }

    #[test]
    fn this_process_and_the_machine_have_spent_time() {
        assert!(this_process() > Duration::ZERO);
        let pid = std::process::id();
        assert!(process(pid).is_some_and(|t| t <= this_process() + Duration::from_millis(20)));
        let m = Machine::now().unwrap();
        assert!(m.busy > Duration::ZERO && m.busy <= m.all);
    }
}
