//! A simulated battery: state of charge integrated over clock time (with a ramp rate and a
//! round-trip efficiency), live limits at the ends of its range, and a revert timer on real
//! time, as a real controller has. It is the one battery model: an agent is handed one
//! in-process (`battery = "sim"`, see [`crate::run_agent`]), and `max300 battery-sim` serves
//! it over Modbus as a SunSpec map (see [`crate::sunspec`]). Its settings are the agent's
//! [`SimConfig`]; it can keep a [`write_log`] on disk for tests and audits.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::{SignedDuration, Timestamp};
use max300_agent::AgentConfig;
use max300_agent::battery::{Battery, BatteryError, BatteryStatus, SimConfig};
use max300_protocol::clock::monotonic;
use max300_protocol::{Clock, Mode, RateKw, Setpoint};

mod state_file;
pub mod write_log;

use state_file::{StateFile, load_energy};
use write_log::WriteLog;
pub use write_log::{WriteLogEntry, read_write_log};

/// How many writes [`SimBattery::writes`] keeps.
const WRITES_KEPT: usize = 1024;

/// A simulated controller. Cheap: one mutex, never held across an await.
#[derive(Debug)]
pub struct SimBattery {
    config: SimConfig,
    clock: Arc<dyn Clock>,
    max_charge: RateKw,
    max_discharge: RateKw,
    /// When this instance started (real time), the zero of the write log's `real_ms`.
    started: Instant,
    state: Mutex<SimState>,
}

#[derive(Debug)]
struct SimState {
    setpoint: Setpoint,
    /// The power flowing now, kW, charge positive: it follows the setpoint at the ramp rate.
    power_kw: f64,
    energy_kwh: f64,
    integrated_to: Timestamp,
    /// The revert timer (real time); zero disables it.
    revert: Duration,
    asserted_at: Instant,
    writes: VecDeque<(Timestamp, Setpoint)>,
    /// Held under the state lock, so the lines are in the order the writes took effect.
    write_log: Option<WriteLog>,
    state_file: Option<StateFile>,
}

impl SimBattery {
    /// The unit an agent with `battery = "sim"` drives: its `[sim]` settings and revert
    /// timer, with its write log and state of charge kept beside the agent's store (unless
    /// set), so both survive a restart of the agent and the fault suite can read the log.
    pub fn for_agent(config: &AgentConfig, clock: Arc<dyn Clock>) -> SimBattery {
        let mut sim = config.sim.clone();
        sim.write_log
            .get_or_insert_with(|| config.data_dir.join("battery-writes.jsonl"));
        sim.state_file
            .get_or_insert_with(|| config.data_dir.join("battery-state.json"));
        SimBattery::new(sim, clock, config.revert_timeout())
    }

    /// A unit at `initial_soc_pct`. `revert_timeout` is real time; zero disables it.
    pub fn new(config: SimConfig, clock: Arc<dyn Clock>, revert_timeout: Duration) -> SimBattery {
        let now = clock.now();
        let energy_kwh = config
            .state_file
            .as_deref()
            .and_then(load_energy)
            .unwrap_or(config.capacity_kwh * config.initial_soc_pct.clamp(0.0, 100.0) / 100.0)
            .clamp(0.0, config.capacity_kwh);
        // A new controller instance starts idle: say so, so an audit knows that whatever ran
        // before (in a process that was killed) stopped by now at the latest.
        let write_log = config.write_log.clone().map(|path| {
            let mut log = WriteLog::open(path);
            log.append(&WriteLogEntry::started(now));
            log
        });
        let state_file = config.state_file.clone().map(StateFile::new);
        let started = monotonic();
        SimBattery {
            max_charge: RateKw::try_from(config.max_charge_kw).unwrap_or(RateKw::ZERO),
            max_discharge: RateKw::try_from(config.max_discharge_kw).unwrap_or(RateKw::ZERO),
            config,
            clock,
            started,
            state: Mutex::new(SimState {
                setpoint: Setpoint::IDLE,
                power_kw: 0.0,
                energy_kwh,
                integrated_to: now,
                revert: revert_timeout,
                asserted_at: started,
                writes: VecDeque::new(),
                write_log,
                state_file,
            }),
        }
    }

    /// Every write so far (the last 1024), with the clock time it was made at.
    pub fn writes(&self) -> Vec<(Timestamp, Setpoint)> {
        self.lock().writes.iter().copied().collect()
    }

    /// The state of charge now, percent.
    pub fn soc_pct(&self) -> f64 {
        let mut state = self.lock();
        self.advance(&mut state);
        self.soc(&state)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves consistent numbers behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn soc(&self, state: &SimState) -> f64 {
        state.energy_kwh / self.config.capacity_kwh * 100.0
    }

    /// Brings the state up to now: the revert timer first (real time), then the energy.
    fn advance(&self, state: &mut SimState) {
        let now = self.clock.now();
        if !state.revert.is_zero() && state.setpoint != Setpoint::IDLE {
            let quiet = monotonic().saturating_duration_since(state.asserted_at);
            if quiet > state.revert {
                // The controller went idle when the timer ran out, some clock time ago.
                let ago = (quiet - state.revert).as_secs_f64() * self.clock.speed();
                let reverted_at = now
                    .checked_sub(SignedDuration::from_secs_f64(ago))
                    .unwrap_or(now)
                    .max(state.integrated_to);
                self.integrate(state, reverted_at);
                state.setpoint = Setpoint::IDLE;
                let real =
                    (state.asserted_at + state.revert).saturating_duration_since(self.started);
                self.log_write(state, reverted_at, Setpoint::IDLE, real, true);
            }
        }
        self.integrate(state, now);
    }

    /// Appends a line to the write log, if there is one.
    fn log_write(
        &self,
        state: &mut SimState,
        at: Timestamp,
        setpoint: Setpoint,
        real: Duration,
        revert: bool,
    ) {
        if let Some(log) = state.write_log.as_mut() {
            let real_ms = u64::try_from(real.as_millis()).unwrap_or(u64::MAX);
            log.append(&WriteLogEntry::new(at, setpoint, real_ms, revert));
        }
    }

    fn integrate(&self, state: &mut SimState, to: Timestamp) {
        // A clock that steps back moves no energy.
        let secs = to
            .duration_since(state.integrated_to)
            .as_secs_f64()
            .max(0.0);
        let (kwh, power) = ramped_energy(
            state.power_kw,
            state.setpoint.signed_kw(),
            self.config.ramp_kw_per_s,
            secs,
        );
        // Losses on the way in and on the way out: √η each.
        let eta = self.config.round_trip_efficiency.sqrt();
        let stored = if kwh >= 0.0 { kwh * eta } else { kwh / eta };
        let energy = state.energy_kwh + stored;
        // The unit stops by itself when full or empty.
        state.energy_kwh = energy.clamp(0.0, self.config.capacity_kwh);
        state.power_kw = power;
        state.integrated_to = to;
        if let Some(file) = state.state_file.as_mut() {
            file.save(state.energy_kwh, to);
        }
    }

    fn status(&self, state: &SimState) -> BatteryStatus {
        let soc_pct = self.soc(state);
        BatteryStatus {
            setpoint: state.setpoint,
            soc_pct,
            max_charge: if soc_pct >= 100.0 {
                RateKw::ZERO
            } else {
                self.max_charge
            },
            max_discharge: if soc_pct <= 0.0 {
                RateKw::ZERO
            } else {
                self.max_discharge
            },
            measured_kw: Some(state.power_kw),
        }
    }
}

/// The energy (kWh, charge positive) that flows in `secs` while the power moves from `from`
/// towards `to` at `ramp` kW/s (0: at once), and the power at the end.
fn ramped_energy(from: f64, to: f64, ramp: f64, secs: f64) -> (f64, f64) {
    let gap = to - from;
    if ramp <= 0.0 || gap == 0.0 {
        return (to * secs / 3600.0, to);
    }
    let reach = gap.abs() / ramp;
    if secs <= reach {
        let end = from + gap.signum() * ramp * secs;
        ((from + end) / 2.0 * secs / 3600.0, end)
    } else {
        (
            ((from + to) / 2.0 * reach + to * (secs - reach)) / 3600.0,
            to,
        )
    }
}

impl SimBattery {
    /// Sets the revert timer (real time; zero disables it), as a controller's register does.
    pub fn set_revert_timeout(&self, revert: Duration) {
        let mut state = self.lock();
        self.advance(&mut state);
        state.revert = revert;
    }

    /// The power flowing now, kW, charge positive (it trails the setpoint at the ramp rate).
    pub fn power_kw(&self) -> f64 {
        let mut state = self.lock();
        self.advance(&mut state);
        state.power_kw
    }

    /// [`Battery::apply`] without the async: the unit answers at once.
    pub fn apply_now(&self, setpoint: Setpoint) -> Result<(), BatteryError> {
        let mut state = self.lock();
        self.advance(&mut state);
        let limits = self.status(&state);
        let limit = match setpoint.mode() {
            Mode::Charge => limits.max_charge,
            Mode::Discharge => limits.max_discharge,
            Mode::Idle => RateKw::ZERO,
        };
        if setpoint.rate() > limit {
            return Err(BatteryError::Device(format!(
                "{setpoint} exceeds the live limit of {limit} kW"
            )));
        }
        state.setpoint = setpoint;
        state.asserted_at = monotonic();
        if state.writes.len() == WRITES_KEPT {
            state.writes.pop_front();
        }
        let now = state.integrated_to;
        state.writes.push_back((now, setpoint));
        // Only writes the controller took are logged: a refused one never ran.
        let real = state.asserted_at.saturating_duration_since(self.started);
        self.log_write(&mut state, now, setpoint, real, false);
        Ok(())
    }

    /// [`Battery::read`] without the async.
    pub fn read_now(&self) -> BatteryStatus {
        let mut state = self.lock();
        self.advance(&mut state);
        self.status(&state)
    }
}

#[async_trait]
impl Battery for SimBattery {
    async fn apply(&self, setpoint: Setpoint) -> Result<(), BatteryError> {
        self.apply_now(setpoint)
    }

    async fn read(&self) -> Result<BatteryStatus, BatteryError> {
        Ok(self.read_now())
    }
}

/// The contract every [`Battery`] meets; the tests of both implementations (this one, and
/// the agent's SunSpec controller against [`crate::sunspec`]) run it.
#[cfg(test)]
pub(crate) async fn contract(battery: &dyn Battery) {
    let charge = Setpoint::new(Mode::Charge, RateKw::from_watts(10_000)).unwrap();
    battery.apply(charge).await.unwrap();
    let status = battery.read().await.unwrap();
    assert_eq!(status.setpoint, charge, "reads back what was applied");
    assert!(
        (0.0..=100.0).contains(&status.soc_pct),
        "{}",
        status.soc_pct
    );

    let discharge = Setpoint::new(Mode::Discharge, RateKw::from_watts(5_000)).unwrap();
    battery.apply(discharge).await.unwrap();
    assert_eq!(battery.read().await.unwrap().setpoint, discharge);

    battery.apply(Setpoint::IDLE).await.unwrap();
    assert_eq!(battery.read().await.unwrap().setpoint, Setpoint::IDLE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use max300_protocol::ManualClock;

    fn t0() -> Timestamp {
        "2026-11-30T00:00:00Z".parse().unwrap()
    }

    fn kw(mode: Mode, kw: f64) -> Setpoint {
        Setpoint::new(mode, RateKw::try_from(kw).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn the_sim_meets_the_battery_contract() {
        let clock = Arc::new(ManualClock::new(t0()));
        let sim = SimBattery::new(SimConfig::default(), clock, Duration::from_secs(30));
        contract(&sim).await;
        assert_eq!(sim.writes().len(), 3);
    }

    #[tokio::test]
    async fn soc_integrates_applied_power_over_clock_time() {
        let clock = Arc::new(ManualClock::new(t0()));
        let sim = SimBattery::new(SimConfig::default(), clock.clone(), Duration::ZERO);
        sim.apply(kw(Mode::Charge, 60.0)).await.unwrap();
        clock.advance(SignedDuration::from_secs(1800));
        // 60 kW for half an hour is 30 kWh, 10 % of 300 kWh.
        let soc = sim.read().await.unwrap().soc_pct;
        assert!((soc - 60.0).abs() < 1e-9, "{soc}");
        sim.apply(kw(Mode::Discharge, 150.0)).await.unwrap();
        clock.advance(SignedDuration::from_secs(3600));
        let soc = sim.read().await.unwrap().soc_pct;
        assert!((soc - 10.0).abs() < 1e-9, "{soc}");
    }

    #[tokio::test]
    async fn losses_and_the_ramp_show_in_the_state_of_charge() {
        let config = SimConfig {
            round_trip_efficiency: 0.81,
            ramp_kw_per_s: 1.0,
            ..SimConfig::default()
        };
        let clock = Arc::new(ManualClock::new(t0()));
        let sim = SimBattery::new(config, clock.clone(), Duration::ZERO);
        sim.apply(kw(Mode::Charge, 60.0)).await.unwrap();
        // 60 s to ramp up (an average of 30 kW), then 60 kW: 0.5 + 29 kWh in, 90 % of it kept.
        clock.advance(SignedDuration::from_secs(1800));
        assert_eq!(sim.power_kw(), 60.0);
        let stored = (0.5 + 29.0) * 0.9;
        let soc = sim.read().await.unwrap().soc_pct;
        assert!((soc - (50.0 + stored / 3.0)).abs() < 1e-9, "{soc}");
        // Half-way down the ramp to idle.
        sim.apply(Setpoint::IDLE).await.unwrap();
        clock.advance(SignedDuration::from_secs(30));
        assert_eq!(sim.power_kw(), 30.0);
    }

    #[tokio::test]
    async fn the_unit_stops_by_itself_when_full_and_refuses_more_charge() {
        let config = SimConfig {
            initial_soc_pct: 99.0,
            ..SimConfig::default()
        };
        let clock = Arc::new(ManualClock::new(t0()));
        let sim = SimBattery::new(config, clock.clone(), Duration::ZERO);
        sim.apply(kw(Mode::Charge, 150.0)).await.unwrap();
        clock.advance(SignedDuration::from_secs(3600));
        let status = sim.read().await.unwrap();
        assert_eq!(status.soc_pct, 100.0);
        assert_eq!(status.max_charge, RateKw::ZERO);
        assert!(sim.apply(kw(Mode::Charge, 1.0)).await.is_err());
    }

    #[tokio::test]
    async fn the_revert_timer_sends_an_unasserted_unit_idle() {
        let clock = Arc::new(ManualClock::new(t0()));
        let sim = SimBattery::new(SimConfig::default(), clock, Duration::from_millis(50));
        sim.apply(kw(Mode::Charge, 10.0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        sim.apply(kw(Mode::Charge, 10.0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(sim.read().await.unwrap().setpoint.mode(), Mode::Charge);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(sim.read().await.unwrap().setpoint, Setpoint::IDLE);
    }

    #[tokio::test]
    async fn the_write_log_keeps_every_write_in_order_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writes.jsonl");
        let config = SimConfig {
            max_charge_kw: 30.0,
            write_log: Some(path.clone()),
            ..SimConfig::default()
        };
        let clock = Arc::new(ManualClock::new(t0()));

        let first = SimBattery::new(config.clone(), clock.clone(), Duration::ZERO);
        first.apply(kw(Mode::Charge, 20.0)).await.unwrap();
        clock.advance(SignedDuration::from_secs(1800));
        // Above the controller's own limit: refused, so it never ran and is not logged.
        assert!(first.apply(kw(Mode::Charge, 40.0)).await.is_err());
        first.apply(kw(Mode::Discharge, 10.0)).await.unwrap();
        drop(first);

        // The agent process starts again: a new controller appends to the same file.
        clock.advance(SignedDuration::from_secs(1800));
        let second = SimBattery::new(config, clock.clone(), Duration::ZERO);
        second.apply(Setpoint::IDLE).await.unwrap();
        clock.advance(SignedDuration::from_secs(1800));
        second.apply(kw(Mode::Charge, 5.5)).await.unwrap();

        let log = read_write_log(&path).unwrap();
        let seen: Vec<_> = log
            .iter()
            .map(|e| (e.at, e.setpoint().unwrap(), e.start))
            .collect();
        let at = |secs| t0().checked_add(SignedDuration::from_secs(secs)).unwrap();
        assert_eq!(
            seen,
            vec![
                (at(0), Setpoint::IDLE, true),
                (at(0), kw(Mode::Charge, 20.0), false),
                (at(1800), kw(Mode::Discharge, 10.0), false),
                (at(3600), Setpoint::IDLE, true),
                (at(3600), Setpoint::IDLE, false),
                (at(5400), kw(Mode::Charge, 5.5), false),
            ]
        );
        assert!(log.iter().all(|e| e.real_ms.is_some()));
        // The in-memory record is per instance and unchanged.
        assert_eq!(second.writes().len(), 2);

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().nth(1).unwrap(),
            r#"{"at":"2026-11-30T00:00:00Z","mode":"charge","rate_kw":20.0,"real_ms":"#.to_owned()
                + &log[1].real_ms.unwrap().to_string()
                + "}"
        );
    }

    #[tokio::test]
    async fn a_restarted_unit_resumes_its_state_of_charge() {
        let dir = tempfile::tempdir().unwrap();
        let config = SimConfig {
            state_file: Some(dir.path().join("battery-state.json")),
            ..SimConfig::default()
        };
        let clock = Arc::new(ManualClock::new(t0()));
        let first = SimBattery::new(config.clone(), clock.clone(), Duration::ZERO);
        first.apply(kw(Mode::Charge, 30.0)).await.unwrap();
        clock.advance(SignedDuration::from_hours(1));
        assert!((first.soc_pct() - 60.0).abs() < 1e-9);
        drop(first);
        let second = SimBattery::new(config, clock, Duration::ZERO);
        assert!(
            (second.soc_pct() - 60.0).abs() < 1e-9,
            "{}",
            second.soc_pct()
        );
        assert_eq!(second.read().await.unwrap().setpoint, Setpoint::IDLE);
    }

    #[tokio::test]
    async fn the_write_log_records_the_revert_timer_sending_the_unit_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writes.jsonl");
        let config = SimConfig {
            write_log: Some(path.clone()),
            ..SimConfig::default()
        };
        let clock = Arc::new(ManualClock::new(t0()));
        let sim = SimBattery::new(config, clock, Duration::from_millis(20));
        sim.apply(kw(Mode::Charge, 10.0)).await.unwrap();
        // The timer runs on real time; wait for the unit to notice it, with a deadline.
        tokio::time::timeout(Duration::from_secs(10), async {
            while sim.read().await.unwrap().setpoint != Setpoint::IDLE {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the revert timer fires");

        let log = read_write_log(&path).unwrap();
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(log[0].start);
        assert!(!log[1].revert);
        assert!(log[2].revert);
        assert_eq!(log[2].setpoint(), Some(Setpoint::IDLE));
        // The revert is logged at the real time it happened, one timer after the write.
        assert!(
            log[2].real_ms.unwrap() >= log[1].real_ms.unwrap() + 20,
            "{log:?}"
        );
    }

    #[test]
    fn an_unreadable_write_log_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writes.jsonl");
        std::fs::write(
            &path,
            "{\"at\":\"2026-11-30T00:00:00Z\",\"mode\":\"idle\",\"rate_kw\":0.0}\nnot json\n",
        )
        .unwrap();
        let err = read_write_log(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
