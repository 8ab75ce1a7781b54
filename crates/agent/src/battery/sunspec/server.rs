//! The simulated unit served as a SunSpec Modbus TCP map, for `max300 battery-sim`: common
//! model 1 and storage model 124 over [`SimBattery`] (one per unit id), with the revert timer
//! taken from `InOutWRte_RvrtTms`, a JSON-lines log of every register write, and faults that
//! can be switched on while it serves: no answer, Modbus exceptions, a stuck setpoint.
//!
//! ```text
//!  40000 "SunS" │ 40002 model 1 (66) │ 40070 model 124 (24) │ 40096 end (0xFFFF, 0)
//! ```
//!
//! Writable: `StorCtl_Mod` (0 idle, 1 charge, 2 discharge), `OutWRte`, `InWRte`,
//! `InOutWRte_WinTms` and `InOutWRte_RvrtTms`. Every write the unit takes restarts its revert
//! timer; when the timer runs out the unit goes idle and the control registers read 0.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
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

use super::map::{self, Control, ScaleFactor, cha_st, offset};
use crate::AgentError;
use crate::battery::{SimBattery, SimConfig};

/// Registers in the map: marker, model 1, model 124, end.
const MAP_LEN: u16 = 2 + (2 + map::COMMON_LEN) + map::STORAGE_BLOCK + 2;
/// Model 124's offset from the base.
const STORAGE_AT: u16 = 2 + 2 + map::COMMON_LEN;
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
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Fault::None),
            "silent" => Ok(Fault::Silent),
            "exception" => Ok(Fault::Exception),
            "stuck" => Ok(Fault::Stuck),
            other => Err(format!(
                "{other:?} is not a fault: none, silent, exception or stuck"
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
    /// Not answered (the silent fault).
    Silent,
}

/// Reads a simulator log, in order; a line that does not parse is an error naming it.
pub fn read_sim_log(path: impl AsRef<Path>) -> Result<Vec<SimLogEntry>, AgentError> {
    crate::battery::write_log::read_json_lines(path.as_ref())
}

/// The registers a unit's controller holds (the rest of the map is computed on each read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Held {
    stor_ctl_mod: u16,
    out_w_rte: u16,
    in_w_rte: u16,
    win_tms: u16,
    rvrt_tms: u16,
}

impl Held {
    fn get(&self, off: usize) -> Option<u16> {
        Some(match off {
            offset::STOR_CTL_MOD => self.stor_ctl_mod,
            offset::OUT_W_RTE => self.out_w_rte,
            offset::IN_W_RTE => self.in_w_rte,
            offset::WIN_TMS => self.win_tms,
            offset::RVRT_TMS => self.rvrt_tms,
            _ => return None,
        })
    }

    fn set(&mut self, off: usize, value: u16) {
        match off {
            offset::STOR_CTL_MOD => self.stor_ctl_mod = value,
            offset::OUT_W_RTE => self.out_w_rte = value,
            offset::IN_W_RTE => self.in_w_rte = value,
            offset::WIN_TMS => self.win_tms = value,
            offset::RVRT_TMS => self.rvrt_tms = value,
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
}

fn register_name(off: usize) -> &'static str {
    match off {
        offset::STOR_CTL_MOD => "StorCtl_Mod",
        offset::OUT_W_RTE => "OutWRte",
        offset::IN_W_RTE => "InWRte",
        offset::WIN_TMS => "InOutWRte_WinTms",
        offset::RVRT_TMS => "InOutWRte_RvrtTms",
        _ => "read-only",
    }
}

#[derive(Debug)]
struct Unit {
    id: u8,
    battery: SimBattery,
    /// Locked around every change to the battery, so registers and battery agree.
    held: Mutex<Held>,
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
    fault: Mutex<(Fault, Option<Timestamp>)>,
    log: Mutex<Option<std::fs::File>>,
    log_path: Option<PathBuf>,
    started: Instant,
}

impl SunSpecSim {
    /// Units idle at their initial state of charge, with their revert timers off until the
    /// first write of `InOutWRte_RvrtTms`.
    pub fn new(config: SimServerConfig, clock: Arc<dyn Clock>) -> Result<SunSpecSim, String> {
        config.sim.validate()?;
        if config.units == 0 {
            return Err("units: must be at least 1".into());
        }
        if !map::BASES.contains(&config.base) {
            return Err(format!("base: {} is not 40000, 0 or 50000", config.base));
        }
        let w = config.sim.max_charge_kw * 1000.0;
        // The smallest scale factor at which WChaMax fits a register.
        let w_sf = (0..=10)
            .filter_map(ScaleFactor::new)
            .find(|sf| sf.raw(w, 1, 65534).is_some())
            .ok_or_else(|| {
                format!(
                    "max_charge_kw: {} does not fit WChaMax",
                    config.sim.max_charge_kw
                )
            })?;
        let w_cha_max = w_sf.value(w_sf.raw(w, 1, 65534).unwrap_or(1));
        let units = (1..=config.units)
            .map(|id| Unit {
                id,
                battery: SimBattery::new(config.sim.clone(), clock.clone(), Duration::ZERO),
                held: Mutex::new(Held::default()),
            })
            .collect();
        let log = match &config.write_log {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("write_log {}: {e}", path.display()))?,
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
            warn!(error = %e, "battery-sim: write log line lost");
        }
    }

    /// The whole map of `unit` as it reads now.
    fn image(&self, unit: &Unit, held: &Held) -> Vec<u16> {
        let status = unit.battery.read_now();
        let power = unit.battery.power_kw();
        let mut regs = Vec::with_capacity(usize::from(MAP_LEN));
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
        regs.extend([map::END, 0]);
        regs
    }

    /// Answers one request: `Ok(None)` is no answer at all.
    fn handle(&self, unit: u8, request: Request<'_>) -> Result<Option<Response>, ExceptionCode> {
        let fault = self.fault();
        let Some(u) = self.unit(unit) else {
            return Err(ExceptionCode::GatewayTargetDevice);
        };
        match request {
            Request::ReadHoldingRegisters(addr, count) => {
                match fault {
                    Fault::Silent => return Ok(None),
                    Fault::Exception => return Err(ExceptionCode::ServerDeviceFailure),
                    Fault::None | Fault::Stuck => {}
                }
                let start = addr
                    .checked_sub(self.base)
                    .ok_or(ExceptionCode::IllegalDataAddress)?;
                let end = start
                    .checked_add(count)
                    .filter(|end| count > 0 && *end <= MAP_LEN)
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
        let offsets: Option<Vec<usize>> = (0..values.len())
            .map(|i| {
                let a = u32::from(addr) + i as u32;
                let off = a.checked_sub(u32::from(self.base + STORAGE_AT))?;
                let off = usize::try_from(off).ok()?;
                before.get(off).map(|_| off)
            })
            .collect();
        let mut next = before;
        let result = match offsets {
            None => Err(ExceptionCode::IllegalDataAddress),
            Some(offsets) if !values.is_empty() => {
                for (off, v) in offsets.iter().zip(values) {
                    next.set(*off, *v);
                }
                let setpoint = map::decode(&next.control(), self.w_cha_max, self.rate_sf);
                match (fault, setpoint) {
                    (Fault::Silent, _) => Ok(WriteOutcome::Silent),
                    (Fault::Exception, _) => Err(ExceptionCode::ServerDeviceFailure),
                    (_, Err(_)) => Err(ExceptionCode::IllegalDataValue),
                    (Fault::Stuck, Ok(_)) => Ok(WriteOutcome::Stuck),
                    (Fault::None, Ok(setpoint)) => {
                        unit.battery
                            .set_revert_timeout(Duration::from_secs(u64::from(next.rvrt_tms)));
                        match unit.battery.apply_now(setpoint) {
                            Ok(()) => Ok(WriteOutcome::Ok),
                            Err(e) => {
                                debug!(unit = unit.id, error = %e, "battery-sim: write refused");
                                Err(ExceptionCode::IllegalDataValue)
                            }
                        }
                    }
                }
            }
            Some(_) => Err(ExceptionCode::IllegalDataValue),
        };
        let outcome = match &result {
            Ok(o) => *o,
            Err(_) => WriteOutcome::Refused,
        };
        if outcome == WriteOutcome::Ok {
            *held = next;
        }
        let running = unit.battery.read_now().setpoint;
        let registers = (0..values.len())
            .filter_map(|i| {
                let off =
                    (u32::from(addr) + i as u32).checked_sub(u32::from(self.base + STORAGE_AT))?;
                Some((register_name(off as usize).to_owned(), values[i]))
            })
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
                let commanded = map::decode(&held.control(), self.w_cha_max, self.rate_sf)
                    .unwrap_or(Setpoint::IDLE);
                if commanded != Setpoint::IDLE && unit.battery.read_now().setpoint == Setpoint::IDLE
                {
                    held.stor_ctl_mod = 0;
                    held.out_w_rte = 0;
                    held.in_w_rte = 0;
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
    let on_error = |e: io::Error| debug!(error = %e, "battery-sim: connection ended");
    let served = tokio::select! {
        r = server.serve(&on_connected, on_error) => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    shutdown.cancel();
    let _ = watch.await;
    served
}
