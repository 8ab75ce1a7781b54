//! The simulated unit served as a SunSpec Modbus TCP map, for `max300 battery-sim`: common
//! model 1, storage model 124, the measuring inverter model 103 (unless left out) and, when
//! asked for, the DER models 704 and 713, all over [`SimBattery`] (one per unit id); a
//! JSON-lines log of every register write, and faults that can be switched on while it
//! serves: no answer, Modbus exceptions, a stuck setpoint, no power delivered. The register
//! map is the agent's own ([`max300_agent::battery::sunspec::map`]), so client and server
//! cannot drift apart.
//!
//! ```text
//!  40000 "SunS" │ 40002 model 1 (66) │ 40070 model 124 (24)
//!   │ 40096 model 103 (50)                          unless the meter is left out
//!   │ 40148 model 704 (65) │ 40215 model 713 (7)   with the DER models
//!   │ end (0xFFFF, 0)
//! ```
//!
//! Writable in 124: `StorCtl_Mod` (0 idle, 1 charge, 2 discharge), `OutWRte`, `InWRte`,
//! `InOutWRte_WinTms` and `InOutWRte_RvrtTms`. Writable in 704: `WSetEna`, `WSetMod` (1,
//! watts), `WSet` (int32, positive discharging) and `WSetRvrtTms` (uint32). The model written
//! last decides what the unit runs. Every write the unit takes restarts its revert timer
//! (`InOutWRte_RvrtTms` or `WSetRvrtTms`); when it runs out the unit goes idle and the
//! control registers read 0 (in 704: `WSet` takes `WSetRvrt`, 0).
//!
//! Model 103's `W` is the unit's real (ramped) power in the generator convention: positive
//! while discharging. Its other points are "not implemented", except a plausible frequency
//! and operating state.

use max300_protocol::error::Chain;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use max300_protocol::clock::monotonic;
use max300_protocol::{Clock, Mode, Setpoint};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use max300_agent::battery::sunspec::map::{
    self, Control, DerControl, Meter, ScaleFactor, cha_st, der_ctl, der_storage, offset,
};
use max300_agent::battery::{BatteryError, SimConfig};

use crate::SimError;
use crate::battery::SimBattery;

/// Model 124's offset from the base.
const STORAGE_AT: u16 = 2 + 2 + map::COMMON_LEN;
/// `WSet` is in 10 W steps, so a client that forgets the scale factor is off tenfold.
const W_SET_SF: i8 = 1;
/// `SoC` and `SoH` of model 713 are in 0.1 %.
const PERCENT_SF: i8 = -1;
/// How often the units are checked for a revert timer that ran out (real time).
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// The rates are in 0.01 %.
const RATE_SF: i8 = -2;
/// The state of charge is in 0.1 %.
const SOC_SF: i8 = -1;

/// A fault the simulator can play.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Answers every request.
    #[default]
    None,
    /// Answers nothing: requests are read and dropped.
    Silent,
    /// Answers every request with exception 0x04 (server device failure).
    Exception,
    /// Acknowledges writes but keeps the setpoint it had.
    Stuck,
    /// Takes and holds every write (the registers read back what was written), but the
    /// battery delivers nothing: it idles, so the measured power is 0 and the state of
    /// charge stays.
    NoPower,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Fault::None),
            "silent" => Ok(Fault::Silent),
            "exception" => Ok(Fault::Exception),
            "stuck" => Ok(Fault::Stuck),
            "no_power" => Ok(Fault::NoPower),
            other => Err(format!(
                "{other:?} is not a fault: none, silent, exception, stuck or no_power"
            )),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::None => "none",
            Fault::Silent => "silent",
            Fault::Exception => "exception",
            Fault::Stuck => "stuck",
            Fault::NoPower => "no_power",
        })
    }
}

/// The simulator's settings.
#[derive(Clone, Debug)]
pub struct SimServerConfig {
    /// Unit ids 1..=units, each its own battery.
    pub units: u8,
    /// Where the SunSpec block starts: 40000, 0 or 50000.
    pub base: u16,
    /// Each unit's battery.
    pub sim: SimConfig,
    /// The reserve shown as `MinRsvPct`, percent.
    pub reserve_pct: f64,
    /// Appends every register write (and every revert) as one JSON line.
    pub write_log: Option<PathBuf>,
    /// The measuring model served after 124 (103 on a real inverter; 802 on some battery
    /// systems); `None` serves no measured power.
    pub meter: Option<Meter>,
    /// Serves models 704 (DER AC controls) and 713 (DER storage capacity) after it.
    pub der_models: bool,
}

/// One line of the simulator's log.
///
/// ```json
/// {"kind":"write","at":"2026-11-30T00:00:01Z","real_ms":812,"unit":1,"addr":40082,
///  "values":[0,3333,0,2],"registers":{"InOutWRte_RvrtTms":2,"InOutWRte_WinTms":0,"InWRte":3333,"OutWRte":0},
///  "changed":true,"outcome":"ok","mode":"charge","rate_kw":49.995}
/// {"kind":"revert","at":"2026-11-30T03:10:00Z","real_ms":5123,"unit":1}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SimLogEntry {
    /// The simulator started; every unit idles.
    Start {
        /// Plan time.
        at: Timestamp,
        /// Real milliseconds since the simulator started.
        real_ms: u64,
        /// How many units it serves.
        units: u8,
    },
    /// A write request arrived.
    Write {
        /// Plan time.
        at: Timestamp,
        /// Real milliseconds since the simulator started.
        real_ms: u64,
        /// The unit id.
        unit: u8,
        /// The first register's address.
        addr: u16,
        /// The words written.
        values: Vec<u16>,
        /// The words by SunSpec name.
        registers: BTreeMap<String, u16>,
        /// Whether any register now holds another value than before.
        changed: bool,
        /// What the unit did with it.
        outcome: WriteOutcome,
        /// The mode the unit runs after it.
        mode: Mode,
        /// The rate it runs at after it, kW.
        rate_kw: f64,
    },
    /// The revert timer ran out: the unit went idle by itself.
    Revert {
        /// Plan time when it was noticed (within 50 ms of real time).
        at: Timestamp,
        /// Real milliseconds since the simulator started.
        real_ms: u64,
        /// The unit id.
        unit: u8,
    },
}

/// What became of a write request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOutcome {
    /// Taken.
    Ok,
    /// Refused with an exception (bad address, bad value, above a live limit, or the fault).
    Refused,
    /// Acknowledged but not taken (the stuck-setpoint fault).
    Stuck,
    /// Held in the registers, but the battery delivers nothing (the no-power fault).
    NoPower,
    /// Not answered (the silent fault).
    Silent,
}

/// Reads a simulator log, in order; a line that does not parse is an error naming it.
pub fn read_sim_log(path: impl AsRef<Path>) -> Result<Vec<SimLogEntry>, SimError> {
    crate::battery::write_log::read_json_lines(path.as_ref())
}

/// The control model a register belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Source {
    /// Model 124.
    #[default]
    Storage,
    /// Model 704.
    Der,
}

/// The registers a unit's controller holds (the rest of the map is computed on each read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    stor_ctl_mod: u16,
    out_w_rte: u16,
    in_w_rte: u16,
    win_tms: u16,
    rvrt_tms: u16,
    w_set_ena: u16,
    w_set_mod: u16,
    w_set: [u16; 2],
    w_set_rvrt_tms: [u16; 2],
    /// The model written last: it decides what the unit runs.
    source: Source,
}

impl Default for Held {
    fn default() -> Held {
        Held {
            stor_ctl_mod: 0,
            out_w_rte: 0,
            in_w_rte: 0,
            win_tms: 0,
            rvrt_tms: 0,
            w_set_ena: 0,
            w_set_mod: der_ctl::MOD_WATTS,
            w_set: [0, 0],
            w_set_rvrt_tms: [0, 0],
            source: Source::Storage,
        }
    }
}

impl Held {
    fn get(&self, model: Source, off: usize) -> Option<u16> {
        Some(match (model, off) {
            (Source::Storage, offset::STOR_CTL_MOD) => self.stor_ctl_mod,
            (Source::Storage, offset::OUT_W_RTE) => self.out_w_rte,
            (Source::Storage, offset::IN_W_RTE) => self.in_w_rte,
            (Source::Storage, offset::WIN_TMS) => self.win_tms,
            (Source::Storage, offset::RVRT_TMS) => self.rvrt_tms,
            (Source::Der, der_ctl::W_SET_ENA) => self.w_set_ena,
            (Source::Der, der_ctl::W_SET_MOD) => self.w_set_mod,
            (Source::Der, o) if o == der_ctl::W_SET || o == der_ctl::W_SET + 1 => {
                self.w_set[o - der_ctl::W_SET]
            }
            (Source::Der, o)
                if o == der_ctl::W_SET_RVRT_TMS || o == der_ctl::W_SET_RVRT_TMS + 1 =>
            {
                self.w_set_rvrt_tms[o - der_ctl::W_SET_RVRT_TMS]
            }
            _ => return None,
        })
    }

    fn set(&mut self, model: Source, off: usize, value: u16) {
        match (model, off) {
            (Source::Storage, offset::STOR_CTL_MOD) => self.stor_ctl_mod = value,
            (Source::Storage, offset::OUT_W_RTE) => self.out_w_rte = value,
            (Source::Storage, offset::IN_W_RTE) => self.in_w_rte = value,
            (Source::Storage, offset::WIN_TMS) => self.win_tms = value,
            (Source::Storage, offset::RVRT_TMS) => self.rvrt_tms = value,
            (Source::Der, der_ctl::W_SET_ENA) => self.w_set_ena = value,
            (Source::Der, der_ctl::W_SET_MOD) => self.w_set_mod = value,
            (Source::Der, o) if o == der_ctl::W_SET || o == der_ctl::W_SET + 1 => {
                self.w_set[o - der_ctl::W_SET] = value
            }
            (Source::Der, o)
                if o == der_ctl::W_SET_RVRT_TMS || o == der_ctl::W_SET_RVRT_TMS + 1 =>
            {
                self.w_set_rvrt_tms[o - der_ctl::W_SET_RVRT_TMS] = value
            }
            _ => {}
        }
    }

    fn control(&self) -> Control {
        Control {
            stor_ctl_mod: self.stor_ctl_mod,
            out_w_rte: self.out_w_rte,
            in_w_rte: self.in_w_rte,
            rvrt_tms: self.rvrt_tms,
        }
    }

    fn der(&self) -> DerControl {
        DerControl {
            w_set_ena: self.w_set_ena,
            w_set_mod: self.w_set_mod,
            w_set: map::join(self.w_set[0], self.w_set[1]) as i32,
            rvrt_tms: map::join(self.w_set_rvrt_tms[0], self.w_set_rvrt_tms[1]),
        }
    }

    /// The revert timer of the model written last, s.
    fn revert_s(&self) -> u64 {
        match self.source {
            Source::Storage => u64::from(self.rvrt_tms),
            Source::Der => u64::from(self.der().rvrt_tms),
        }
    }

    /// Goes idle as a revert does: the rates to 0, or `WSet` to `WSetRvrt` (0).
    fn revert(&mut self) {
        match self.source {
            Source::Storage => {
                self.stor_ctl_mod = 0;
                self.out_w_rte = 0;
                self.in_w_rte = 0;
            }
            Source::Der => self.w_set = [0, 0],
        }
    }
}

fn register_name(model: Source, off: usize) -> &'static str {
    match (model, off) {
        (Source::Storage, offset::STOR_CTL_MOD) => "StorCtl_Mod",
        (Source::Storage, offset::OUT_W_RTE) => "OutWRte",
        (Source::Storage, offset::IN_W_RTE) => "InWRte",
        (Source::Storage, offset::WIN_TMS) => "InOutWRte_WinTms",
        (Source::Storage, offset::RVRT_TMS) => "InOutWRte_RvrtTms",
        (Source::Der, der_ctl::W_SET_ENA) => "WSetEna",
        (Source::Der, der_ctl::W_SET_MOD) => "WSetMod",
        (Source::Der, o) if o == der_ctl::W_SET => "WSet (high word)",
        (Source::Der, o) if o == der_ctl::W_SET + 1 => "WSet (low word)",
        (Source::Der, o) if o == der_ctl::W_SET_RVRT_TMS => "WSetRvrtTms (high word)",
        (Source::Der, o) if o == der_ctl::W_SET_RVRT_TMS + 1 => "WSetRvrtTms (low word)",
        _ => "read-only",
    }
}

/// Where the models sit, as offsets from the base.
#[derive(Clone, Copy, Debug)]
struct Layout {
    meter: Option<(Meter, u16)>,
    der: Option<(u16, u16)>,
    /// Registers in the map, end marker included.
    len: u16,
}

impl Layout {
    fn new(meter: Option<Meter>, der_models: bool) -> Layout {
        let mut at = STORAGE_AT + map::STORAGE_BLOCK;
        let meter = meter.map(|m| {
            let here = at;
            at += 2 + m.model_len();
            (m, here)
        });
        let der = der_models.then(|| {
            let ctl = at;
            let cap = ctl + 2 + der_ctl::LEN;
            at = cap + 2 + der_storage::LEN;
            (ctl, cap)
        });
        Layout {
            meter,
            der,
            len: at + 2,
        }
    }

    /// The control model and offset from its ID of a register `off` from the base.
    fn locate(&self, off: u32) -> Option<(Source, usize)> {
        let within = |start: u16, len: u16| {
            off.checked_sub(u32::from(start))
                .filter(|o| *o < u32::from(len) + 2)
                .and_then(|o| usize::try_from(o).ok())
        };
        if let Some(o) = within(STORAGE_AT, map::STORAGE_LEN) {
            return Some((Source::Storage, o));
        }
        let (ctl, _) = self.der?;
        within(ctl, der_ctl::LEN).map(|o| (Source::Der, o))
    }
}

#[derive(Debug)]
struct Unit {
    id: u8,
    battery: SimBattery,
    /// Locked around every change to the battery, so registers and battery agree.
    held: Mutex<Held>,
    /// The no-power fault sent the battery idle behind the registers' back: until the next
    /// write it takes, an idle battery is no revert.
    starved: AtomicBool,
}

/// The simulated controllers behind one Modbus TCP listener.
#[derive(Debug)]
pub struct SunSpecSim {
    clock: Arc<dyn Clock>,
    base: u16,
    units: Vec<Unit>,
    w_cha_max: f64,
    w_sf: ScaleFactor,
    rate_sf: ScaleFactor,
    soc_min_pct: f64,
    capacity_kwh: f64,
    layout: Layout,
    /// `W_SF` of the meter model.
    meter_sf: ScaleFactor,
    /// `WH_SF` of model 713.
    wh_sf: ScaleFactor,
    fault: Mutex<(Fault, Option<Timestamp>)>,
    log: Mutex<Option<std::fs::File>>,
    log_path: Option<PathBuf>,
    started: Instant,
}

impl SunSpecSim {
    /// Units idle at their initial state of charge, with their revert timers off until the
    /// first write of `InOutWRte_RvrtTms`.
    pub fn new(config: SimServerConfig, clock: Arc<dyn Clock>) -> Result<SunSpecSim, SimError> {
        config.sim.validate().map_err(SimError::Config)?;
        if config.units == 0 {
            return Err(SimError::Config("units: must be at least 1".into()));
        }
        if !map::BASES.contains(&config.base) {
            return Err(SimError::Config(format!(
                "base: {} is not 40000, 0 or 50000",
                config.base
            )));
        }
        let w = config.sim.max_charge_kw * 1000.0;
        // The smallest scale factor at which WChaMax fits a register.
        let w_sf = (0..=10)
            .filter_map(ScaleFactor::new)
            .find(|sf| sf.raw(w, 1, 65534).is_some())
            .ok_or_else(|| {
                SimError::Config(format!(
                    "max_charge_kw: {} does not fit WChaMax",
                    config.sim.max_charge_kw
                ))
            })?;
        let w_cha_max = w_sf.value(w_sf.raw(w, 1, 65534).unwrap_or(1));
        // The smallest scale factors at which the measured power (int16) and the capacity
        // (uint16) fit.
        let peak = config.sim.max_charge_kw.max(config.sim.max_discharge_kw) * 1000.0;
        let meter_sf = (0..=10)
            .filter_map(ScaleFactor::new)
            .find(|sf| sf.raw(peak, 0, i32::from(i16::MAX)).is_some())
            .ok_or_else(|| {
                SimError::Config(format!("max_discharge_kw: {peak} W does not fit W"))
            })?;
        let wh = config.sim.capacity_kwh * 1000.0;
        let wh_sf = (0..=10)
            .filter_map(ScaleFactor::new)
            .find(|sf| sf.raw(wh, 0, 65534).is_some())
            .ok_or_else(|| SimError::Config(format!("capacity_kwh: {wh} Wh does not fit WHRtg")))?;
        let units = (1..=config.units)
            .map(|id| Unit {
                id,
                battery: SimBattery::new(config.sim.clone(), clock.clone(), Duration::ZERO),
                held: Mutex::new(Held::default()),
                starved: AtomicBool::new(false),
            })
            .collect();
        let log = match &config.write_log {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SimError::Log {
                        path: path.clone(),
                        what: "cannot open".into(),
                        source: source.into(),
                    })?,
            ),
            None => None,
        };
        let sim = SunSpecSim {
            base: config.base,
            units,
            w_cha_max,
            w_sf,
            rate_sf: ScaleFactor::new(RATE_SF).unwrap_or(w_sf),
            soc_min_pct: config.reserve_pct,
            capacity_kwh: config.sim.capacity_kwh,
            layout: Layout::new(config.meter, config.der_models),
            meter_sf,
            wh_sf,
            fault: Mutex::new((Fault::None, None)),
            log: Mutex::new(log),
            log_path: config.write_log,
            started: monotonic(),
            clock,
        };
        sim.append(&SimLogEntry::Start {
            at: sim.clock.now(),
            real_ms: 0,
            units: config.units,
        });
        Ok(sim)
    }

    /// Plays `fault` from plan time `from` on (at once when `None`); `Fault::None` ends it.
    pub fn set_fault(&self, fault: Fault, from: Option<Timestamp>) {
        *lock(&self.fault) = (fault, from);
    }

    /// The fault playing now.
    pub fn fault(&self) -> Fault {
        let (fault, from) = *lock(&self.fault);
        match from {
            Some(t) if self.clock.now() < t => Fault::None,
            _ => fault,
        }
    }

    /// What unit `id` runs now, and its state of charge.
    pub fn unit_status(&self, id: u8) -> Option<(Setpoint, f64)> {
        let unit = self.unit(id)?;
        let status = unit.battery.read_now();
        Some((status.setpoint, status.soc_pct))
    }

    /// The write log's path, if there is one.
    pub fn write_log(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    fn unit(&self, id: u8) -> Option<&Unit> {
        self.units.get(usize::from(id).checked_sub(1)?)
    }

    fn real_ms(&self) -> u64 {
        u64::try_from(
            monotonic()
                .saturating_duration_since(self.started)
                .as_millis(),
        )
        .unwrap_or(u64::MAX)
    }

    fn append(&self, entry: &SimLogEntry) {
        use std::io::Write as _;
        let mut log = lock(&self.log);
        let Some(file) = log.as_mut() else {
            return;
        };
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        // One write of the whole line, so a kill never leaves half of one.
        if let Err(e) = file.write_all(&line) {
            warn!(error = %Chain(&e), "battery-sim: write log line lost");
        }
    }

    /// The whole map of `unit` as it reads now.
    fn image(&self, unit: &Unit, held: &Held) -> Vec<u16> {
        let status = unit.battery.read_now();
        let power = unit.battery.power_kw();
        let mut regs = Vec::with_capacity(usize::from(self.layout.len));
        regs.extend(map::MARKER);
        // Model 1: Mn, Md, Opt, Vr, SN, DA, pad.
        regs.extend([map::COMMON, map::COMMON_LEN]);
        regs.extend(string_registers("MAX300", 16));
        regs.extend(string_registers("battery-sim", 16));
        regs.extend(string_registers("", 8));
        regs.extend(string_registers(env!("CARGO_PKG_VERSION"), 8));
        regs.extend(string_registers(&format!("SIM-{:04}", unit.id), 16));
        regs.extend([u16::from(unit.id), 0x8000]);
        // Model 124.
        let soc_sf = ScaleFactor::new(SOC_SF).unwrap_or(self.rate_sf);
        let soc = status.soc_pct;
        let cha_st = if soc <= 0.0 {
            cha_st::EMPTY
        } else if soc >= 100.0 {
            cha_st::FULL
        } else if power > 0.0 {
            cha_st::CHARGING
        } else if power < 0.0 {
            cha_st::DISCHARGING
        } else {
            cha_st::HOLDING
        };
        let raw = |sf: ScaleFactor, v: f64| sf.raw(v, 0, 65534).unwrap_or(0) as u16;
        let mut model = [map::NOT_IMPLEMENTED_U16; map::STORAGE_BLOCK as usize];
        model[0] = map::STORAGE;
        model[1] = map::STORAGE_LEN;
        model[offset::W_CHA_MAX] = raw(self.w_sf, self.w_cha_max);
        model[offset::STOR_CTL_MOD] = held.stor_ctl_mod;
        model[7] = raw(soc_sf, self.soc_min_pct);
        model[offset::CHA_STATE] = raw(soc_sf, soc);
        model[offset::CHA_ST] = cha_st;
        model[offset::OUT_W_RTE] = held.out_w_rte;
        model[offset::IN_W_RTE] = held.in_w_rte;
        model[offset::WIN_TMS] = held.win_tms;
        model[offset::RVRT_TMS] = held.rvrt_tms;
        model[16] = 0;
        model[17] = 1; // ChaGriSet: grid
        model[offset::W_CHA_MAX_SF] = self.w_sf.to_register();
        model[19] = map::NOT_IMPLEMENTED_I16;
        model[20] = map::NOT_IMPLEMENTED_I16;
        model[21] = soc_sf.to_register();
        model[offset::CHA_STATE_SF] = soc_sf.to_register();
        model[23] = map::NOT_IMPLEMENTED_I16;
        model[24] = map::NOT_IMPLEMENTED_I16;
        model[offset::IN_OUT_W_RTE_SF] = self.rate_sf.to_register();
        regs.extend(model);
        if let Some((meter, _)) = self.layout.meter {
            regs.extend(self.meter_model(meter, power, soc, cha_st));
        }
        if self.layout.der.is_some() {
            regs.extend(self.der_ctl_model(held));
            regs.extend(self.der_storage_model(soc));
        }
        regs.extend([map::END, 0]);
        regs
    }

    /// Model 103 or 802 with the measured power; the points not simulated read "not
    /// implemented".
    fn meter_model(&self, meter: Meter, power_kw: f64, soc: f64, cha_st: u16) -> Vec<u16> {
        let mut model = vec![map::NOT_IMPLEMENTED_U16; usize::from(meter.model_len()) + 2];
        model[0] = meter.id();
        model[1] = meter.model_len();
        let (w, w_sf) = meter.points();
        model[w] = map::measured_to_w(power_kw, self.meter_sf);
        model[w_sf] = self.meter_sf.to_register();
        match meter {
            Meter::Inverter => {
                // int16 points and scale factors read 0x8000 when not implemented.
                for off in [
                    6, 13, 17, 19, 20, 21, 22, 23, 26, 28, 30, 31, 32, 33, 34, 35, 36, 37,
                ] {
                    model[off] = map::NOT_IMPLEMENTED_I16;
                }
                model[18] = model[w]; // VA: at unity power factor, as much as W
                model[19] = model[w_sf];
                model[16] = 5000; // Hz, × 10^-2
                model[17] = (-2i16) as u16;
                model[24] = 0; // WH: acc32, 0 is "not accumulated"
                model[25] = 0;
                // St: 4 (MPPT, i.e. running) while power flows, else 8 (standby).
                model[38] = if power_kw == 0.0 { 8 } else { 4 };
                model[40..52].fill(0); // no events
            }
            Meter::Battery => {
                for off in [44, 49] {
                    model[off] = map::NOT_IMPLEMENTED_I16;
                }
                model[52..63].fill(map::NOT_IMPLEMENTED_I16);
                let pct_sf = ScaleFactor::new(PERCENT_SF).unwrap_or(self.meter_sf);
                model[11] = pct_sf.raw(soc, 0, 65534).unwrap_or(0) as u16; // SoC
                model[56] = pct_sf.to_register(); // SoC_SF
                model[16] = cha_st;
                model[17] = 0; // LocRemCtl: remote
                model[21] = 4; // Typ: lithium-ion
                model[22] = 3; // State: connected
                model[26..34].fill(0); // no events
            }
        }
        model
    }

    /// Model 704 with the held active-power setting; the other functions read "not
    /// implemented" or disabled.
    fn der_ctl_model(&self, held: &Held) -> Vec<u16> {
        use der_ctl::*;
        let mut model = vec![map::NOT_IMPLEMENTED_U16; usize::from(LEN) + 2];
        model[0] = ID;
        model[1] = LEN;
        // Enable flags of the functions not simulated: disabled.
        for off in [2, 3, 8, 9, 14, 17, 35, 44, 52] {
            model[off] = 0;
        }
        // int16 points and scale factors: 0x8000.
        for off in [28, 29, 42, 43, 53, 54, 56, 57, 58] {
            model[off] = map::NOT_IMPLEMENTED_I16;
        }
        // int32 points: 0x80000000.
        for off in [38, 40] {
            model[off] = map::NOT_IMPLEMENTED_I16;
            model[off + 1] = 0;
        }
        model[W_SET_ENA] = held.w_set_ena;
        model[W_SET_MOD] = held.w_set_mod;
        model[W_SET..W_SET + 2].copy_from_slice(&held.w_set);
        // The revert goes to idle.
        model[W_SET_RVRT..W_SET_RVRT + 2].copy_from_slice(&[0, 0]);
        model[W_SET_ENA_RVRT] = 1;
        model[W_SET_RVRT_TMS..W_SET_RVRT_TMS + 2].copy_from_slice(&held.w_set_rvrt_tms);
        model[W_SET_SF] = self.w_set_sf().to_register();
        model
    }

    /// Model 713 from the battery's state.
    fn der_storage_model(&self, soc: f64) -> Vec<u16> {
        use der_storage::*;
        let pct_sf = ScaleFactor::new(PERCENT_SF).unwrap_or(self.wh_sf);
        let wh = self.capacity_kwh * 1000.0;
        let raw = |sf: ScaleFactor, v: f64| sf.raw(v, 0, 65534).unwrap_or(0) as u16;
        let mut model = vec![0; usize::from(LEN) + 2];
        model[0] = ID;
        model[1] = LEN;
        model[WH_RTG] = raw(self.wh_sf, wh);
        model[WH_AVAIL] = raw(self.wh_sf, wh * soc / 100.0);
        model[SOC] = raw(pct_sf, soc);
        model[SOH] = raw(pct_sf, 100.0);
        model[STA] = 0; // ok
        model[WH_SF] = self.wh_sf.to_register();
        model[PCT_SF] = pct_sf.to_register();
        model
    }

    fn w_set_sf(&self) -> ScaleFactor {
        ScaleFactor::new(W_SET_SF).unwrap_or(self.meter_sf)
    }

    /// The setpoint the held registers of the model written last stand for.
    fn commanded(&self, held: &Held) -> Result<Setpoint, BatteryError> {
        match held.source {
            Source::Storage => map::decode(&held.control(), self.w_cha_max, self.rate_sf),
            Source::Der => held.der().setpoint(self.w_set_sf()),
        }
    }

    /// Answers one request: `Ok(None)` is no answer at all.
    fn handle(&self, unit: u8, request: Request<'_>) -> Result<Option<Response>, ExceptionCode> {
        let fault = self.fault();
        let Some(u) = self.unit(unit) else {
            return Err(ExceptionCode::GatewayTargetDevice);
        };
        if fault == Fault::NoPower {
            self.starve(u);
        }
        match request {
            Request::ReadHoldingRegisters(addr, count) => {
                match fault {
                    Fault::Silent => return Ok(None),
                    Fault::Exception => return Err(ExceptionCode::ServerDeviceFailure),
                    Fault::None | Fault::Stuck | Fault::NoPower => {}
                }
                let start = addr
                    .checked_sub(self.base)
                    .ok_or(ExceptionCode::IllegalDataAddress)?;
                let end = start
                    .checked_add(count)
                    .filter(|end| count > 0 && *end <= self.layout.len)
                    .ok_or(ExceptionCode::IllegalDataAddress)?;
                let held = lock(&u.held);
                let image = self.image(u, &held);
                Ok(Some(Response::ReadHoldingRegisters(
                    image[usize::from(start)..usize::from(end)].to_vec(),
                )))
            }
            Request::WriteSingleRegister(addr, value) => self
                .write(u, addr, &[value], fault)
                .map(|taken| taken.then_some(Response::WriteSingleRegister(addr, value))),
            Request::WriteMultipleRegisters(addr, values) => {
                let n = values.len() as u16;
                self.write(u, addr, &values, fault)
                    .map(|taken| taken.then_some(Response::WriteMultipleRegisters(addr, n)))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }

    /// The no-power fault: from the moment it plays, the battery idles whatever the
    /// registers say.
    fn starve(&self, unit: &Unit) {
        let _held = lock(&unit.held);
        if unit.battery.read_now().setpoint != Setpoint::IDLE
            && let Err(e) = unit.battery.apply_now(Setpoint::IDLE)
        {
            warn!(unit = unit.id, error = %Chain(&e), "battery-sim: no_power could not idle the unit");
        }
        unit.starved.store(true, Ordering::Relaxed);
    }

    /// One write request; `Ok(false)` means no answer.
    fn write(
        &self,
        unit: &Unit,
        addr: u16,
        values: &[u16],
        fault: Fault,
    ) -> Result<bool, ExceptionCode> {
        let mut held = lock(&unit.held);
        let before = *held;
        let located: Vec<Option<(Source, usize)>> = (0..values.len())
            .map(|i| {
                let off = (u32::from(addr) + i as u32).checked_sub(u32::from(self.base))?;
                self.layout.locate(off)
            })
            .collect();
        // One request writes one model, and only its writable registers.
        let model = located.first().copied().flatten().map(|(m, _)| m);
        let offsets: Option<Vec<usize>> = located
            .iter()
            .map(|l| {
                l.filter(|(m, off)| Some(*m) == model && before.get(*m, *off).is_some())
                    .map(|(_, off)| off)
            })
            .collect();
        let mut next = before;
        let result = match (model, offsets) {
            (Some(model), Some(offsets)) if !values.is_empty() => {
                for (off, v) in offsets.iter().zip(values) {
                    next.set(model, *off, *v);
                }
                next.source = model;
                let setpoint = self.commanded(&next);
                match (fault, setpoint) {
                    (Fault::Silent, _) => Ok(WriteOutcome::Silent),
                    (Fault::Exception, _) => Err(ExceptionCode::ServerDeviceFailure),
                    (_, Err(_)) => Err(ExceptionCode::IllegalDataValue),
                    (Fault::Stuck, Ok(_)) => Ok(WriteOutcome::Stuck),
                    (Fault::NoPower, Ok(_)) => Ok(WriteOutcome::NoPower),
                    (Fault::None, Ok(setpoint)) => {
                        unit.battery
                            .set_revert_timeout(Duration::from_secs(next.revert_s()));
                        match unit.battery.apply_now(setpoint) {
                            Ok(()) => {
                                unit.starved.store(false, Ordering::Relaxed);
                                Ok(WriteOutcome::Ok)
                            }
                            Err(e) => {
                                debug!(unit = unit.id, error = %Chain(&e), "battery-sim: write refused");
                                Err(ExceptionCode::IllegalDataValue)
                            }
                        }
                    }
                }
            }
            (Some(_), Some(_)) => Err(ExceptionCode::IllegalDataValue),
            _ => Err(ExceptionCode::IllegalDataAddress),
        };
        let outcome = match &result {
            Ok(o) => *o,
            Err(_) => WriteOutcome::Refused,
        };
        if matches!(outcome, WriteOutcome::Ok | WriteOutcome::NoPower) {
            *held = next;
        }
        let running = unit.battery.read_now().setpoint;
        let registers = located
            .iter()
            .zip(values)
            .filter_map(|(l, v)| l.map(|(m, off)| (register_name(m, off).to_owned(), *v)))
            .collect();
        self.append(&SimLogEntry::Write {
            at: self.clock.now(),
            real_ms: self.real_ms(),
            unit: unit.id,
            addr,
            values: values.to_vec(),
            registers,
            changed: *held != before,
            outcome,
            mode: running.mode(),
            rate_kw: running.rate().kw(),
        });
        result.map(|o| o != WriteOutcome::Silent)
    }

    /// Notices units whose revert timer ran out: their control registers go to 0, and the
    /// log says so. Runs until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for unit in &self.units {
                let mut held = lock(&unit.held);
                let commanded = self.commanded(&held).unwrap_or(Setpoint::IDLE);
                if commanded != Setpoint::IDLE
                    && !unit.starved.load(Ordering::Relaxed)
                    && unit.battery.read_now().setpoint == Setpoint::IDLE
                {
                    held.revert();
                    drop(held);
                    self.append(&SimLogEntry::Revert {
                        at: self.clock.now(),
                        real_ms: self.real_ms(),
                        unit: unit.id,
                    });
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks in a way that leaves a half-made change.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `text` as `n` registers, two ASCII bytes each, NUL-padded.
fn string_registers(text: &str, n: usize) -> Vec<u16> {
    let mut bytes: Vec<u8> = text.bytes().take(n * 2).collect();
    bytes.resize(n * 2, 0);
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

struct Service {
    sim: Arc<SunSpecSim>,
}

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        std::future::ready(self.sim.handle(req.slave, req.request))
    }
}

/// Serves `sim` on `listener` until `shutdown`, with its revert watch.
pub async fn serve(
    sim: Arc<SunSpecSim>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let watch = tokio::spawn(sim.clone().watch(shutdown.clone()));
    let server = Server::new(listener);
    let on_connected = |stream, _addr| {
        let service = Service { sim: sim.clone() };
        async move { Ok(Some((service, stream))) }
    };
    let on_error = |e: io::Error| debug!(error = %Chain(&e), "battery-sim: connection ended");
    let served = tokio::select! {
        r = server.serve(&on_connected, on_error) => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    shutdown.cancel();
    let _ = watch.await;
    served
}

#[cfg(test)]
mod tests;
