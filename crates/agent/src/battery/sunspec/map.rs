//! The SunSpec register map, pure: where the models sit, what model 124 (storage) holds, the
//! scale factors, and the conversion between a [`Setpoint`] and the control registers. Both
//! the Modbus client ([`super::SunSpecBattery`]) and the simulator's server use it, so the two
//! can only disagree about the wire, never about the meaning.
//!
//! ```text
//!  base      "SunS" (0x5375 0x6e53)
//!  base+2    model 1 (common): ID=1, L=66, then 66 registers
//!  then      model 124 (storage): ID=124, L=24
//!             +2 WChaMax  +5 StorCtl_Mod  +8 ChaState  +11 ChaSt
//!             +12 OutWRte  +13 InWRte  +14 InOutWRte_WinTms  +15 InOutWRte_RvrtTms
//!             +18 WChaMax_SF … +22 ChaState_SF … +25 InOutWRte_SF
//!  optional  model 103 (three-phase inverter): L=50, +14 W (int16), +15 W_SF
//!  optional  model 802 (battery base): L=62, +47 W (int16), +63 W_SF
//!  optional  model 704 (DER AC controls): L=65
//!             +22 WSetEna  +23 WSetMod  +24 WSet (int32, 2 registers)
//!             +31 WSetRvrtTms (uint32, 2 registers)  +55 WSet_SF
//!  optional  model 713 (DER storage capacity): L=7
//!             +2 WHRtg  +3 WHAvail  +4 SoC  +5 SoH  +6 Sta  +7 WH_SF  +8 Pct_SF
//!  …         end marker: ID=0xFFFF, L=0
//! ```
//!
//! Offsets count from the model's ID register. Multi-register points are big-endian: the
//! high word first.
//!
//! The model-124 control convention: idle is `StorCtl_Mod` 0 with both rates 0; charge is
//! bit 0 with `InWRte` in percent of `WChaMax`; discharge is bit 1 with `OutWRte` in percent of
//! `WChaMax`.
//!
//! Signs: SunSpec counts power as a generator does. Model 103's `W` is positive when power
//! goes out to the AC side (discharging), and model 704's `WSet` is positive for injection
//! and "may be negative for charging" (its JSON says so). Model 802's JSON does not state a
//! sign for `W`; it is read with the same convention (positive out of the battery). This
//! crate counts charge positive ([`Setpoint::signed_kw`]), so both are negated at this
//! boundary and nowhere else.

use max300_protocol::{Mode, RateKw, Setpoint};

use crate::battery::BatteryError;

/// The addresses where a SunSpec block may start, in the order they are probed.
pub const BASES: [u16; 3] = [40000, 0, 50000];
/// "SunS", the marker at the base.
pub const MARKER: [u16; 2] = [0x5375, 0x6e53];
/// The model id that ends the chain.
pub const END: u16 = 0xFFFF;
/// The common model.
pub const COMMON: u16 = 1;
/// The common model's length (registers after ID and L).
pub const COMMON_LEN: u16 = 66;
/// The storage control model.
pub const STORAGE: u16 = 124;
/// Model 124's length (registers after ID and L).
pub const STORAGE_LEN: u16 = 24;
/// Model 124 with its ID and L.
pub const STORAGE_BLOCK: u16 = STORAGE_LEN + 2;

/// Offsets in model 124, from its ID register.
pub mod offset {
    /// Setpoint for maximum charge, W (× `WChaMax_SF`).
    pub const W_CHA_MAX: usize = 2;
    /// Storage control mode: bit 0 charge, bit 1 discharge.
    pub const STOR_CTL_MOD: usize = 5;
    /// State of charge, percent (× `ChaState_SF`).
    pub const CHA_STATE: usize = 8;
    /// Charge status (1 off, 2 empty, 3 discharging, 4 charging, 5 full, 6 holding, 7 testing).
    pub const CHA_ST: usize = 11;
    /// Discharge rate, percent of `WChaMax` (× `InOutWRte_SF`).
    pub const OUT_W_RTE: usize = 12;
    /// Charge rate, percent of `WChaMax` (× `InOutWRte_SF`).
    pub const IN_W_RTE: usize = 13;
    /// Time window for a rate change, s.
    pub const WIN_TMS: usize = 14;
    /// The revert timer, s: the rates go back to their defaults when not written again.
    pub const RVRT_TMS: usize = 15;
    /// Scale factor of `WChaMax`.
    pub const W_CHA_MAX_SF: usize = 18;
    /// Scale factor of `ChaState`.
    pub const CHA_STATE_SF: usize = 22;
    /// Scale factor of `OutWRte` and `InWRte`.
    pub const IN_OUT_W_RTE_SF: usize = 25;
}

/// Model 103, the three-phase inverter: where the measured AC power is.
pub mod inverter {
    /// The model id.
    pub const ID: u16 = 103;
    /// Its length (registers after ID and L).
    pub const LEN: u16 = 50;
    /// AC power, W (× `W_SF`), positive out to the AC side.
    pub const W: usize = 14;
    /// Scale factor of `W`.
    pub const W_SF: usize = 15;
}

/// Model 802, the battery base model: where the measured battery power is.
pub mod battery {
    /// The model id.
    pub const ID: u16 = 802;
    /// Its length (registers after ID and L).
    pub const LEN: u16 = 62;
    /// Total power to or from the bank, W (× `W_SF`), positive out of the battery.
    pub const W: usize = 47;
    /// Scale factor of `W`.
    pub const W_SF: usize = 63;
}

/// Model 704, DER AC controls: the active power setpoint in watts.
pub mod der_ctl {
    /// The model id.
    pub const ID: u16 = 704;
    /// Its length (registers after ID and L).
    pub const LEN: u16 = 65;
    /// Set active power enable: 0 disabled, 1 enabled.
    pub const W_SET_ENA: usize = 22;
    /// Set active power mode: 0 percent of WMax, 1 watts.
    pub const W_SET_MOD: usize = 23;
    /// Active power setting, W (int32 × `WSet_SF`), positive injecting, negative charging.
    pub const W_SET: usize = 24;
    /// The value `WSet` reverts to, W (int32).
    pub const W_SET_RVRT: usize = 26;
    /// Whether `WSet` reverts.
    pub const W_SET_ENA_RVRT: usize = 30;
    /// The revert timer of `WSet`, s (uint32).
    pub const W_SET_RVRT_TMS: usize = 31;
    /// The time left on it, s (uint32).
    pub const W_SET_RVRT_REM: usize = 33;
    /// Scale factor of `WSet` and `WSetRvrt`.
    pub const W_SET_SF: usize = 55;
    /// `WSetMod` in watts.
    pub const MOD_WATTS: u16 = 1;
    /// The registers the client reads: ID up to `WSet_SF`.
    pub const READ_LEN: u16 = W_SET_SF as u16 + 1;
}

/// Model 713, DER storage capacity: the state of charge.
pub mod der_storage {
    /// The model id.
    pub const ID: u16 = 713;
    /// Its length (registers after ID and L).
    pub const LEN: u16 = 7;
    /// Energy rating, Wh (× `WH_SF`).
    pub const WH_RTG: usize = 2;
    /// Energy available, Wh (× `WH_SF`).
    pub const WH_AVAIL: usize = 3;
    /// State of charge, percent (× `Pct_SF`).
    pub const SOC: usize = 4;
    /// State of health, percent (× `Pct_SF`).
    pub const SOH: usize = 5;
    /// Storage status: 0 ok, 1 warning, 2 error.
    pub const STA: usize = 6;
    /// Scale factor of `WHRtg` and `WHAvail`.
    pub const WH_SF: usize = 7;
    /// Scale factor of `SoC` and `SoH`.
    pub const PCT_SF: usize = 8;
}

/// `ChaSt` values this crate reads or writes.
pub mod cha_st {
    /// The battery is empty: it cannot discharge.
    pub const EMPTY: u16 = 2;
    /// Discharging.
    pub const DISCHARGING: u16 = 3;
    /// Charging.
    pub const CHARGING: u16 = 4;
    /// The battery is full: it cannot charge.
    pub const FULL: u16 = 5;
    /// Holding (idle).
    pub const HOLDING: u16 = 6;
}

/// The "not implemented" value of a `uint16` point.
pub const NOT_IMPLEMENTED_U16: u16 = 0xFFFF;
/// The "not implemented" value of an `int16` or `sunssf` point.
pub const NOT_IMPLEMENTED_I16: u16 = 0x8000;

/// A SunSpec scale factor: a point's value is `raw × 10^sf`. Valid from −10 to 10.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleFactor(i8);

impl ScaleFactor {
    /// A scale factor from its exponent, if within −10..=10.
    pub fn new(exponent: i8) -> Option<ScaleFactor> {
        (-10..=10)
            .contains(&exponent)
            .then_some(ScaleFactor(exponent))
    }

    /// Reads a `sunssf` register; `name` names it in the error.
    pub fn from_register(name: &'static str, raw: u16) -> Result<ScaleFactor, BatteryError> {
        let exponent = raw as i16;
        i8::try_from(exponent)
            .ok()
            .and_then(ScaleFactor::new)
            .ok_or_else(|| {
                BatteryError::Device(format!(
                    "{name}: {exponent} is not a scale factor (implemented ones are -10..=10)"
                ))
            })
    }

    /// The exponent.
    pub fn exponent(self) -> i8 {
        self.0
    }

    /// As written in a `sunssf` register.
    pub fn to_register(self) -> u16 {
        i16::from(self.0) as u16
    }

    /// The value a raw register number stands for.
    pub fn value(self, raw: i32) -> f64 {
        // Dividing by an exact power of ten rounds once; multiplying by 0.01 would not.
        let e = i32::from(self.0);
        if e < 0 {
            f64::from(raw) / 10f64.powi(-e)
        } else {
            f64::from(raw) * 10f64.powi(e)
        }
    }

    /// The raw number closest to `value` (half away from zero), if it is finite and fits
    /// `lo..=hi`.
    pub fn raw(self, value: f64, lo: i32, hi: i32) -> Option<i32> {
        let e = i32::from(self.0);
        let raw = if e < 0 {
            value * 10f64.powi(-e)
        } else {
            value / 10f64.powi(e)
        }
        .round();
        (raw.is_finite() && raw >= f64::from(lo) && raw <= f64::from(hi)).then_some(raw as i32)
    }
}

/// The control registers of model 124 that the agent writes, as raw words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// `StorCtl_Mod`.
    pub stor_ctl_mod: u16,
    /// `OutWRte`.
    pub out_w_rte: u16,
    /// `InWRte`.
    pub in_w_rte: u16,
    /// `InOutWRte_RvrtTms`.
    pub rvrt_tms: u16,
}

impl Control {
    /// The four registers from `OutWRte` to `InOutWRte_RvrtTms` (with `WinTms` 0: at once).
    pub fn rates(&self) -> [u16; 4] {
        [self.out_w_rte, self.in_w_rte, 0, self.rvrt_tms]
    }

    /// The registers that differ from `other`, as (name, this, other).
    pub fn differences(&self, other: &Control) -> Vec<(&'static str, u16, u16)> {
        [
            ("StorCtl_Mod", self.stor_ctl_mod, other.stor_ctl_mod),
            ("OutWRte", self.out_w_rte, other.out_w_rte),
            ("InWRte", self.in_w_rte, other.in_w_rte),
            ("InOutWRte_RvrtTms", self.rvrt_tms, other.rvrt_tms),
        ]
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .collect()
    }
}

/// What model 124 says, decoded with its scale factors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Storage {
    /// `WChaMax` in watts: 100 % of both rates.
    pub w_cha_max: f64,
    /// `ChaState`, percent.
    pub soc_pct: f64,
    /// `ChaSt`.
    pub cha_st: u16,
    /// The control registers as they are.
    pub control: Control,
    /// `InOutWRte_SF`.
    pub rate_sf: ScaleFactor,
}

impl Storage {
    /// Decodes model 124 from its registers (ID first).
    pub fn decode(block: &[u16]) -> Result<Storage, BatteryError> {
        use offset::*;
        if block.len() < usize::from(STORAGE_BLOCK) || block[0] != STORAGE {
            return Err(BatteryError::Device(format!(
                "model 124: expected {STORAGE_BLOCK} registers starting with ID 124, got {} starting with {:?}",
                block.len(),
                block.first()
            )));
        }
        let w_sf = ScaleFactor::from_register("WChaMax_SF", block[W_CHA_MAX_SF])?;
        let soc_sf = ScaleFactor::from_register("ChaState_SF", block[CHA_STATE_SF])?;
        let rate_sf = ScaleFactor::from_register("InOutWRte_SF", block[IN_OUT_W_RTE_SF])?;
        let w_cha_max = match block[W_CHA_MAX] {
            NOT_IMPLEMENTED_U16 | 0 => {
                return Err(BatteryError::Device(format!(
                    "WChaMax: {} is not a usable power limit",
                    block[W_CHA_MAX]
                )));
            }
            raw => w_sf.value(i32::from(raw)),
        };
        let soc_pct = match block[CHA_STATE] {
            NOT_IMPLEMENTED_U16 => {
                return Err(BatteryError::Device(
                    "ChaState: not implemented (65535): no state of charge".into(),
                ));
            }
            raw => soc_sf.value(i32::from(raw)),
        };
        Ok(Storage {
            w_cha_max,
            soc_pct,
            cha_st: block[CHA_ST],
            control: Control {
                stor_ctl_mod: block[STOR_CTL_MOD],
                out_w_rte: block[OUT_W_RTE],
                in_w_rte: block[IN_W_RTE],
                rvrt_tms: block[RVRT_TMS],
            },
            rate_sf,
        })
    }

    /// The registers that make the controller run `setpoint`, with the revert timer.
    pub fn encode(&self, setpoint: Setpoint, rvrt_tms: u16) -> Result<Control, BatteryError> {
        encode(setpoint, self.w_cha_max, self.rate_sf, rvrt_tms)
    }

    /// The setpoint the control registers stand for, rounded to whole watts.
    pub fn setpoint(&self) -> Result<Setpoint, BatteryError> {
        decode(&self.control, self.w_cha_max, self.rate_sf)
    }

    /// The most the controller will charge at now: none when full.
    pub fn max_charge(&self) -> RateKw {
        if self.cha_st == cha_st::FULL {
            RateKw::ZERO
        } else {
            watts(self.w_cha_max)
        }
    }

    /// The most the controller will discharge at now: none when empty.
    pub fn max_discharge(&self) -> RateKw {
        if self.cha_st == cha_st::EMPTY {
            RateKw::ZERO
        } else {
            watts(self.w_cha_max)
        }
    }
}

fn watts(w: f64) -> RateKw {
    RateKw::from_watts(w.clamp(0.0, f64::from(u32::MAX)).round() as u32)
}

/// A rate as raw percent of `w_cha_max`, scaled by `sf`; refused above 100 %.
pub fn rate_to_raw(rate: RateKw, w_cha_max: f64, sf: ScaleFactor) -> Result<u16, BatteryError> {
    let pct = f64::from(rate.watts()) / w_cha_max * 100.0;
    let hundred = sf
        .raw(100.0, 0, i32::from(i16::MAX))
        .unwrap_or(i32::from(i16::MAX));
    // watts × 100 × 10^-sf / WChaMax in one division, so 12 345 W of 100 kW at 0.01 % is
    // exactly 1234.5 before rounding (to 1235), not 1234.4999….
    let e = i32::from(sf.exponent());
    let scaled = if e < 0 {
        f64::from(rate.watts()) * 100.0 * 10f64.powi(-e) / w_cha_max
    } else {
        f64::from(rate.watts()) * 100.0 / w_cha_max / 10f64.powi(e)
    }
    .round();
    (scaled.is_finite() && scaled >= 0.0 && scaled <= f64::from(hundred))
        .then_some(scaled as i32)
        .and_then(|raw| u16::try_from(raw).ok())
        .ok_or_else(|| {
            BatteryError::Device(format!(
                "{rate} kW is {pct:.2} % of WChaMax {w_cha_max} W: not writable with InOutWRte_SF {}",
                sf.exponent()
            ))
        })
}

/// A raw percent of `w_cha_max` as a rate in whole watts.
pub fn raw_to_rate(
    name: &'static str,
    raw: u16,
    w_cha_max: f64,
    sf: ScaleFactor,
) -> Result<RateKw, BatteryError> {
    let pct = sf.value(i32::from(raw as i16));
    if !(0.0..=100.0).contains(&pct) {
        return Err(BatteryError::Device(format!(
            "{name}: {} ({pct} %) is outside 0..=100 %",
            raw as i16
        )));
    }
    Ok(watts(pct / 100.0 * w_cha_max))
}

/// The control registers for `setpoint`.
pub fn encode(
    setpoint: Setpoint,
    w_cha_max: f64,
    sf: ScaleFactor,
    rvrt_tms: u16,
) -> Result<Control, BatteryError> {
    let raw = rate_to_raw(setpoint.rate(), w_cha_max, sf)?;
    let (stor_ctl_mod, out_w_rte, in_w_rte) = match setpoint.mode() {
        _ if raw == 0 => (0, 0, 0),
        Mode::Idle => (0, 0, 0),
        Mode::Charge => (1, 0, raw),
        Mode::Discharge => (2, raw, 0),
    };
    Ok(Control {
        stor_ctl_mod,
        out_w_rte,
        in_w_rte,
        rvrt_tms,
    })
}

/// The setpoint that control registers stand for.
pub fn decode(
    control: &Control,
    w_cha_max: f64,
    sf: ScaleFactor,
) -> Result<Setpoint, BatteryError> {
    Ok(match control.stor_ctl_mod {
        0 => Setpoint::IDLE,
        1 => Setpoint::normalized(
            Mode::Charge,
            raw_to_rate("InWRte", control.in_w_rte, w_cha_max, sf)?,
        ),
        2 => Setpoint::normalized(
            Mode::Discharge,
            raw_to_rate("OutWRte", control.out_w_rte, w_cha_max, sf)?,
        ),
        other => {
            return Err(BatteryError::Device(format!(
                "StorCtl_Mod: {other} is not idle (0), charge (1) or discharge (2)"
            )));
        }
    })
}

/// A model that measures the power flowing: model 802 (battery) is preferred over 103
/// (inverter) because it measures at the battery itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meter {
    /// Model 103: AC power at the inverter.
    Inverter,
    /// Model 802: DC power at the battery bank.
    Battery,
}

impl Meter {
    /// The meter a model id stands for, if it is one.
    pub fn from_id(id: u16) -> Option<Meter> {
        match id {
            inverter::ID => Some(Meter::Inverter),
            battery::ID => Some(Meter::Battery),
            _ => None,
        }
    }

    /// Its model id.
    pub fn id(self) -> u16 {
        match self {
            Meter::Inverter => inverter::ID,
            Meter::Battery => battery::ID,
        }
    }

    /// Its length (registers after ID and L).
    pub fn model_len(self) -> u16 {
        match self {
            Meter::Inverter => inverter::LEN,
            Meter::Battery => battery::LEN,
        }
    }

    /// The offsets of `W` and `W_SF`.
    pub fn points(self) -> (usize, usize) {
        match self {
            Meter::Inverter => (inverter::W, inverter::W_SF),
            Meter::Battery => (battery::W, battery::W_SF),
        }
    }

    /// The registers read for the measurement, from ID to the later of `W` and `W_SF`.
    pub fn read_len(self) -> u16 {
        let (w, sf) = self.points();
        w.max(sf) as u16 + 1
    }

    /// The measured power, kW, charge positive, from the model's registers (ID first);
    /// `None` when the device does not implement `W` or its scale factor.
    pub fn measured_kw(self, block: &[u16]) -> Result<Option<f64>, BatteryError> {
        let (w, sf) = self.points();
        if block.len() <= w.max(sf) || block[0] != self.id() {
            return Err(BatteryError::Device(format!(
                "model {}: expected {} registers starting with ID {}, got {} starting with {:?}",
                self.id(),
                self.read_len(),
                self.id(),
                block.len(),
                block.first()
            )));
        }
        if block[w] == NOT_IMPLEMENTED_I16 || block[sf] == NOT_IMPLEMENTED_I16 {
            return Ok(None);
        }
        let sf = ScaleFactor::from_register("W_SF", block[sf])?;
        // Watts to kW in the same single division as the scale factor, so 1234 × 10^-1 W is
        // exactly 0.1234 kW.
        let raw = f64::from(block[w] as i16);
        let e = i32::from(sf.exponent()) - 3;
        let kw = if e < 0 {
            raw / 10f64.powi(-e)
        } else {
            raw * 10f64.powi(e)
        };
        // Generator convention on the wire (positive out of the battery): negated here, from
        // 0.0 so that no power reads 0 rather than -0.
        Ok(Some(0.0 - kw))
    }
}

/// A measured power (kW, charge positive) as the `W` register of a meter with `sf`, in the
/// generator convention; clamped to what an `int16` holds besides "not implemented".
pub fn measured_to_w(power_kw: f64, sf: ScaleFactor) -> u16 {
    let lo = i32::from(i16::MIN) + 1;
    let hi = i32::from(i16::MAX);
    let w = -power_kw * 1000.0;
    let raw = sf.raw(w, lo, hi).unwrap_or(if w < 0.0 { lo } else { hi });
    raw as i16 as u16
}

/// The model-704 registers the agent writes, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DerControl {
    /// `WSetEna`.
    pub w_set_ena: u16,
    /// `WSetMod`.
    pub w_set_mod: u16,
    /// `WSet`, raw (× `WSet_SF`), positive injecting.
    pub w_set: i32,
    /// `WSetRvrtTms`, s.
    pub rvrt_tms: u32,
}

/// An `int32` or `uint32` point's two registers, high word first.
pub fn words(value: u32) -> [u16; 2] {
    [(value >> 16) as u16, value as u16]
}

/// Two registers, high word first, as a `uint32`.
pub fn join(hi: u16, lo: u16) -> u32 {
    (u32::from(hi) << 16) | u32::from(lo)
}

impl DerControl {
    /// Decodes model 704's control points and `WSet_SF` from its registers (ID first).
    pub fn decode(block: &[u16]) -> Result<(DerControl, ScaleFactor), BatteryError> {
        use der_ctl::*;
        if block.len() < usize::from(READ_LEN) || block[0] != ID {
            return Err(BatteryError::Device(format!(
                "model 704: expected {READ_LEN} registers starting with ID 704, got {} starting with {:?}",
                block.len(),
                block.first()
            )));
        }
        let sf = ScaleFactor::from_register("WSet_SF", block[W_SET_SF])?;
        Ok((
            DerControl {
                w_set_ena: block[W_SET_ENA],
                w_set_mod: block[W_SET_MOD],
                w_set: join(block[W_SET], block[W_SET + 1]) as i32,
                rvrt_tms: join(block[W_SET_RVRT_TMS], block[W_SET_RVRT_TMS + 1]),
            },
            sf,
        ))
    }

    /// The registers that make the controller run `setpoint` in watts, with the revert timer:
    /// enabled, and idle as `WSet` 0.
    pub fn encode(
        setpoint: Setpoint,
        sf: ScaleFactor,
        rvrt_tms: u32,
    ) -> Result<DerControl, BatteryError> {
        let watts = f64::from(setpoint.rate().watts());
        let injected = match setpoint.mode() {
            Mode::Idle => 0.0,
            Mode::Charge => -watts,
            Mode::Discharge => watts,
        };
        // i32::MIN is the int32 "not implemented" value, so it is never written.
        let w_set = sf.raw(injected, i32::MIN + 1, i32::MAX).ok_or_else(|| {
            BatteryError::Device(format!(
                "{setpoint}: {injected} W is not writable as WSet with WSet_SF {}",
                sf.exponent()
            ))
        })?;
        Ok(DerControl {
            w_set_ena: 1,
            w_set_mod: der_ctl::MOD_WATTS,
            w_set,
            rvrt_tms,
        })
    }

    /// The setpoint the registers stand for, rounded to whole watts: disabled is idle.
    pub fn setpoint(&self, sf: ScaleFactor) -> Result<Setpoint, BatteryError> {
        if self.w_set_ena == 0 {
            return Ok(Setpoint::IDLE);
        }
        if self.w_set_mod != der_ctl::MOD_WATTS {
            return Err(BatteryError::Device(format!(
                "WSetMod: {} is not watts (1); percent of WMax (0) is not used here",
                self.w_set_mod
            )));
        }
        if self.w_set == i32::MIN {
            return Err(BatteryError::Device(
                "WSet: not implemented (0x80000000)".into(),
            ));
        }
        let injected = sf.value(self.w_set);
        let mode = if injected < 0.0 {
            Mode::Charge
        } else {
            Mode::Discharge
        };
        Ok(Setpoint::normalized(mode, watts(injected.abs())))
    }

    /// `WSetEna`, `WSetMod` and `WSet`: four registers from `WSetEna` on.
    pub fn setting(&self) -> [u16; 4] {
        let [hi, lo] = words(self.w_set as u32);
        [self.w_set_ena, self.w_set_mod, hi, lo]
    }

    /// `WSetRvrtTms`: two registers.
    pub fn timer(&self) -> [u16; 2] {
        words(self.rvrt_tms)
    }

    /// The registers that differ from `other`, as (name, this, other).
    pub fn differences(&self, other: &DerControl) -> Vec<(&'static str, u16, u16)> {
        let [a_hi, a_lo] = words(self.w_set as u32);
        let [b_hi, b_lo] = words(other.w_set as u32);
        let [at_hi, at_lo] = self.timer();
        let [bt_hi, bt_lo] = other.timer();
        [
            ("WSetEna", self.w_set_ena, other.w_set_ena),
            ("WSetMod", self.w_set_mod, other.w_set_mod),
            ("WSet (high word)", a_hi, b_hi),
            ("WSet (low word)", a_lo, b_lo),
            ("WSetRvrtTms (high word)", at_hi, bt_hi),
            ("WSetRvrtTms (low word)", at_lo, bt_lo),
        ]
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .collect()
    }
}

/// The state of charge in model 713 (registers, ID first), percent.
pub fn der_soc_pct(block: &[u16]) -> Result<f64, BatteryError> {
    use der_storage::*;
    if block.len() <= PCT_SF || block[0] != ID {
        return Err(BatteryError::Device(format!(
            "model 713: expected {} registers starting with ID 713, got {} starting with {:?}",
            PCT_SF + 1,
            block.len(),
            block.first()
        )));
    }
    let sf = ScaleFactor::from_register("Pct_SF", block[PCT_SF])?;
    match block[SOC] {
        NOT_IMPLEMENTED_U16 => Err(BatteryError::Device(
            "model 713 SoC: not implemented (65535): no state of charge".into(),
        )),
        raw => Ok(sf.value(i32::from(raw))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sf(e: i8) -> ScaleFactor {
        ScaleFactor::new(e).unwrap()
    }

    #[test]
    fn scale_factors_outside_minus_ten_to_ten_are_refused_by_name() {
        assert_eq!(
            ScaleFactor::from_register("WChaMax_SF", 0xFFFE).unwrap(),
            sf(-2)
        );
        let err = ScaleFactor::from_register("ChaState_SF", NOT_IMPLEMENTED_I16).unwrap_err();
        assert!(err.to_string().contains("ChaState_SF: -32768"), "{err}");
        assert!(ScaleFactor::new(11).is_none());
    }

    #[test]
    fn a_rate_is_written_as_percent_of_wchamax_and_read_back_in_watts() {
        // 150 kW as 15000 × 10^1 W; rates in 0.01 %.
        let (w, rate_sf) = (sf(1).value(15000), sf(-2));
        assert_eq!(w, 150_000.0);
        let c = encode(
            Setpoint::new(Mode::Charge, RateKw::from_watts(50_000)).unwrap(),
            w,
            rate_sf,
            30,
        )
        .unwrap();
        assert_eq!(
            c,
            Control {
                stor_ctl_mod: 1,
                out_w_rte: 0,
                in_w_rte: 3333,
                rvrt_tms: 30
            }
        );
        // 33.33 % of 150 kW is 49 995 W: the register's resolution is 15 W.
        assert_eq!(decode(&c, w, rate_sf).unwrap().rate().watts(), 49_995);
        let d = encode(
            Setpoint::new(Mode::Discharge, RateKw::from_watts(150_000)).unwrap(),
            w,
            rate_sf,
            30,
        )
        .unwrap();
        assert_eq!((d.stor_ctl_mod, d.out_w_rte, d.in_w_rte), (2, 10000, 0));
        let err = rate_to_raw(RateKw::from_watts(150_001 + 10), w, rate_sf).unwrap_err();
        assert!(err.to_string().contains("WChaMax"), "{err}");
        assert_eq!(
            encode(Setpoint::IDLE, w, rate_sf, 30).unwrap().rates(),
            [0, 0, 0, 30]
        );
    }

    #[test]
    fn a_half_step_rounds_away_from_zero_exactly() {
        // 12.345 % in 0.01 % steps.
        assert_eq!(
            rate_to_raw(RateKw::from_watts(12_345), 100_000.0, sf(-2)).unwrap(),
            1235
        );
        assert_eq!(sf(-2).raw(12.345, 0, 10_000), Some(1235));
    }

    #[test]
    fn an_unknown_storage_mode_is_named() {
        let c = Control {
            stor_ctl_mod: 3,
            out_w_rte: 0,
            in_w_rte: 0,
            rvrt_tms: 0,
        };
        let err = decode(&c, 1000.0, sf(0)).unwrap_err().to_string();
        assert!(err.contains("StorCtl_Mod: 3"), "{err}");
    }

    proptest! {
        #[test]
        fn raw_values_survive_a_round_trip(e in -10i8..=10, raw in i16::MIN..=i16::MAX) {
            let s = sf(e);
            let back = s.raw(s.value(i32::from(raw)), i32::from(i16::MIN), i32::from(i16::MAX));
            prop_assert_eq!(back, Some(i32::from(raw)));
        }

        #[test]
        fn writing_rounds_to_the_nearest_step(e in -4i8..=4, value in -3000.0f64..3000.0) {
            let s = sf(e);
            let step = 10f64.powi(i32::from(e));
            if let Some(raw) = s.raw(value, i32::MIN, i32::MAX) {
                prop_assert!((s.value(raw) - value).abs() <= step / 2.0 + step * 1e-9);
            }
        }

        #[test]
        fn a_setpoint_reads_back_within_one_register_step(
            watts in 0u32..=150_000,
            charge in any::<bool>(),
        ) {
            let w = 150_000.0;
            let mode = if charge { Mode::Charge } else { Mode::Discharge };
            let sp = Setpoint::normalized(mode, RateKw::from_watts(watts));
            let c = encode(sp, w, sf(-2), 10).unwrap();
            let back = decode(&c, w, sf(-2)).unwrap();
            // One step of 0.01 % of 150 kW is 15 W; half a step either way, plus a watt of
            // rounding to whole watts.
            prop_assert!((i64::from(back.rate().watts()) - i64::from(watts)).abs() <= 8);
            if back != Setpoint::IDLE {
                prop_assert_eq!(back.mode(), mode);
            }
            // And encoding what was read gives the same registers: a re-assert writes what
            // the controller holds.
            prop_assert_eq!(encode(back, w, sf(-2), 10).unwrap(), c);
        }
    }
}
