//! The agent's SunSpec client against the simulator's server, over real loopback sockets.

use std::sync::Arc;
use std::time::Duration;

use max300_agent::battery::sunspec::map::{self, Meter};
use max300_agent::battery::sunspec::{
    Chain, SunSpecBattery, SunSpecUrl, UNREACHABLE_BACKOFF, discover,
};
use max300_agent::battery::{Battery, BatteryError, SimConfig};
use max300_protocol::{ManualClock, Mode, RateKw, Setpoint};
use tokio_modbus::Slave;
use tokio_util::sync::CancellationToken;

use super::{Fault, SimLogEntry, SimServerConfig, SunSpecSim, WriteOutcome, read_sim_log};
use crate::battery::contract;

struct Served {
    sim: Arc<SunSpecSim>,
    clock: Arc<ManualClock>,
    url: SunSpecUrl,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(base: u16, units: u8) -> Served {
    serve_with(base, units, Some(Meter::Inverter), false).await
}

async fn serve_with(base: u16, units: u8, meter: Option<Meter>, der_models: bool) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new("2026-11-30T00:00:00Z".parse().unwrap()));
    let config = SimServerConfig {
        units,
        base,
        // A ramp, so the measured power trails the setpoint as on a real unit.
        sim: SimConfig {
            ramp_kw_per_s: 5.0,
            ..SimConfig::default()
        },
        reserve_pct: 10.0,
        write_log: Some(dir.path().join("sim.jsonl")),
        meter,
        der_models,
    };
    let sim = Arc::new(SunSpecSim::new(config, clock.clone()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    tokio::spawn(super::serve(sim.clone(), listener, stop.clone()));
    Served {
        sim,
        clock,
        url: format!("sunspec+tcp://127.0.0.1:{port}/{units}")
            .parse()
            .unwrap(),
        stop,
        _dir: dir,
    }
}

fn kw(mode: Mode, kw: f64) -> Setpoint {
    Setpoint::new(mode, RateKw::try_from(kw).unwrap()).unwrap()
}

#[tokio::test]
async fn the_sunspec_battery_meets_the_battery_contract_at_every_base() {
    for base in map::BASES {
        let served = serve(base, 1).await;
        let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(30));
        contract(&battery).await;
        let status = battery.read().await.unwrap();
        assert_eq!(status.max_charge, RateKw::from_watts(150_000));
        assert!((status.soc_pct - 50.0).abs() < 0.1, "{}", status.soc_pct);
    }
}

#[tokio::test]
async fn writes_land_in_model_124_with_scale_factors_and_the_unit_runs_them() {
    let served = serve(40000, 2).await;
    let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(7));
    battery.apply(kw(Mode::Charge, 50.0)).await.unwrap();
    // 50 kW of 150 kW in 0.01 %: 3333, which the unit runs as 49.995 kW.
    assert_eq!(
        served.sim.unit_status(2).unwrap().0,
        kw(Mode::Charge, 49.995)
    );
    assert_eq!(served.sim.unit_status(1).unwrap().0, Setpoint::IDLE);
    // Read back as written, since the registers hold what was written.
    assert_eq!(
        battery.read().await.unwrap().setpoint,
        kw(Mode::Charge, 50.0)
    );
    // A re-assert writes the rates again, not the mode.
    battery.apply(kw(Mode::Charge, 50.0)).await.unwrap();
    battery.apply(kw(Mode::Discharge, 150.0)).await.unwrap();

    let log = read_sim_log(served.sim.write_log().unwrap()).unwrap();
    let writes: Vec<_> = log
        .iter()
        .filter_map(|e| match e {
            SimLogEntry::Write {
                addr,
                values,
                changed,
                outcome,
                unit,
                ..
            } => Some((*unit, *addr, values.clone(), *changed, *outcome)),
            _ => None,
        })
        .collect();
    assert_eq!(
        writes,
        vec![
            (2, 40082, vec![0, 3333, 0, 7], true, WriteOutcome::Ok),
            (2, 40075, vec![1], true, WriteOutcome::Ok),
            (2, 40082, vec![0, 3333, 0, 7], false, WriteOutcome::Ok),
            (2, 40082, vec![10000, 0, 0, 7], true, WriteOutcome::Ok),
            (2, 40075, vec![2], true, WriteOutcome::Ok),
        ]
    );
}

#[tokio::test]
async fn a_stuck_setpoint_is_a_read_back_error_naming_the_register() {
    let served = serve(40000, 1).await;
    let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(30));
    battery.apply(kw(Mode::Charge, 30.0)).await.unwrap();
    served.sim.set_fault(Fault::Stuck, None);
    let err = battery.apply(kw(Mode::Discharge, 30.0)).await.unwrap_err();
    assert!(
        matches!(
            err,
            BatteryError::ReadBack {
                register: "StorCtl_Mod",
                wrote: 2,
                read: 1
            }
        ),
        "{err}"
    );
    assert_eq!(served.sim.unit_status(1).unwrap().0, kw(Mode::Charge, 30.0));
    // And the agent sees what actually runs.
    assert_eq!(battery.read().await.unwrap().setpoint.mode(), Mode::Charge);
}

#[tokio::test]
async fn a_silent_controller_and_exceptions_are_clear_errors() {
    let served = serve(40000, 1).await;
    let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(30));
    battery.read().await.unwrap();
    served.sim.set_fault(Fault::Exception, None);
    let err = battery.read().await.unwrap_err();
    assert!(
        matches!(&err, BatteryError::Device(m) if m.contains("read model 124 at 40070") && m.contains("0x04")),
        "{err}"
    );
    served.sim.set_fault(Fault::Silent, None);
    let err = battery.apply(kw(Mode::Charge, 10.0)).await.unwrap_err();
    assert!(
        matches!(&err, BatteryError::Transport { what, .. } if what.contains("no answer within 1000 ms")),
        "{err}"
    );
    // It answers again, but for a moment calls fail at once rather than wait for another
    // timeout, so the agent stays responsive.
    served.sim.set_fault(Fault::None, None);
    let asked = max300_protocol::clock::monotonic();
    let err = battery.read().await.unwrap_err().to_string();
    assert!(
        err.contains("no answer") && err.contains("not tried again"),
        "{err}"
    );
    assert!(asked.elapsed() < Duration::from_millis(200));
    // Then the next call reconnects and works.
    tokio::time::timeout(UNREACHABLE_BACKOFF * 5, async {
        while battery.apply(kw(Mode::Charge, 10.0)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the controller is driven again once it answers");
    assert_eq!(
        served.sim.unit_status(1).unwrap().0,
        kw(Mode::Charge, 10.005)
    );
}

/// Polls until the unit reads back idle. A revert timer runs on the unit's real time, so
/// the wait has a deadline rather than a clock to advance.
async fn until_idle(battery: &SunSpecBattery, why: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while battery.read().await.unwrap().setpoint != Setpoint::IDLE {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect(why);
}

#[tokio::test]
async fn a_unit_that_hears_nothing_goes_idle_after_its_revert_timer() {
    let served = serve(40000, 1).await;
    let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(1));
    battery.apply(kw(Mode::Discharge, 20.0)).await.unwrap();
    until_idle(&battery, "the revert timer sends the unit idle").await;
    let log = read_sim_log(served.sim.write_log().unwrap()).unwrap();
    let last_write = log
        .iter()
        .filter_map(|e| match e {
            SimLogEntry::Write { real_ms, .. } => Some(*real_ms),
            _ => None,
        })
        .next_back()
        .unwrap();
    let revert = log
        .iter()
        .find_map(|e| match e {
            SimLogEntry::Revert { real_ms, .. } => Some(*real_ms),
            _ => None,
        })
        .expect("a revert line");
    assert!(
        (1000..1600).contains(&(revert - last_write)),
        "reverted {} ms after the last write",
        revert - last_write
    );
}

#[tokio::test]
async fn a_map_without_sunspec_is_named() {
    // A listener that is not a SunSpec device: the sim serves unit 1 only, so unit 2's probes
    // are refused at every base.
    let served = serve(40000, 1).await;
    let url: SunSpecUrl = format!("sunspec+tcp://127.0.0.1:{}/2", served.url.port())
        .parse()
        .unwrap();
    let err = SunSpecBattery::new(url, Duration::from_secs(5))
        .read()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no SunSpec marker"), "{err}");
}

fn der_url(served: &Served) -> SunSpecUrl {
    format!("{}?control=704", served.url).parse().unwrap()
}

/// One write line: (addr, registers by name, outcome).
type WriteLine = (u16, Vec<(String, u16)>, WriteOutcome);

/// The simulator's write lines.
fn writes(served: &Served) -> Vec<WriteLine> {
    read_sim_log(served.sim.write_log().unwrap())
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            SimLogEntry::Write {
                addr,
                registers,
                outcome,
                ..
            } => Some((addr, registers.into_iter().collect(), outcome)),
            _ => None,
        })
        .collect()
}

async fn chain_of(served: &Served) -> Chain {
    let addr = format!("127.0.0.1:{}", served.url.port()).parse().unwrap();
    let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, Slave(1))
        .await
        .unwrap();
    discover(&mut ctx).await.unwrap()
}

#[tokio::test]
async fn discovery_notes_the_optional_models_when_they_are_there() {
    let bare = serve_with(40000, 1, None, false).await;
    assert_eq!(
        chain_of(&bare).await,
        Chain {
            storage: Some(40070),
            models: vec![1, 124],
            ..Chain::default()
        }
    );
    let full = serve_with(0, 1, Some(Meter::Inverter), true).await;
    assert_eq!(
        chain_of(&full).await,
        Chain {
            storage: Some(70),
            meter: Some((Meter::Inverter, 96)),
            der_ctl: Some(148),
            der_storage: Some(215),
            models: vec![1, 124, 103, 704, 713],
        }
    );
    let battery = serve_with(50000, 1, Some(Meter::Battery), false).await;
    assert_eq!(
        chain_of(&battery).await.meter,
        Some((Meter::Battery, 50096))
    );
}

#[tokio::test]
async fn the_measured_power_is_the_ramped_battery_power_charge_positive() {
    for meter in [Meter::Inverter, Meter::Battery] {
        let served = serve_with(40000, 1, Some(meter), false).await;
        let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(30));
        assert_eq!(battery.read().await.unwrap().measured_kw, Some(0.0));
        battery.apply(kw(Mode::Charge, 50.0)).await.unwrap();
        // 5 kW/s of plan time: half-way after 5 s, there after 10 s.
        served.clock.advance(jiff::SignedDuration::from_secs(5));
        let half = battery.read().await.unwrap().measured_kw.unwrap();
        assert!((half - 25.0).abs() < 0.02, "{meter:?}: {half}");
        served.clock.advance(jiff::SignedDuration::from_secs(60));
        // 49.995 kW runs (3333 of 10 000 of 150 kW); W is in 10 W steps.
        let full = battery.read().await.unwrap().measured_kw.unwrap();
        assert!((full - 49.995).abs() <= 0.0051, "{meter:?}: {full}");
        battery.apply(kw(Mode::Discharge, 20.0)).await.unwrap();
        served.clock.advance(jiff::SignedDuration::from_secs(60));
        let out = battery.read().await.unwrap().measured_kw.unwrap();
        assert!((out + 19.995).abs() <= 0.0051, "{meter:?}: {out}");
    }
}

#[tokio::test]
async fn a_device_without_a_meter_reads_no_measured_power() {
    let served = serve_with(40000, 1, None, false).await;
    let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(30));
    contract(&battery).await;
    assert_eq!(battery.read().await.unwrap().measured_kw, None);
}

#[tokio::test]
async fn control_704_meets_the_battery_contract() {
    let served = serve_with(40000, 1, Some(Meter::Inverter), true).await;
    let battery = SunSpecBattery::new(der_url(&served), Duration::from_secs(30));
    contract(&battery).await;
}

#[tokio::test]
async fn control_704_writes_signed_wset_with_its_scale_factor_and_reads_soc_from_713() {
    let served = serve_with(40000, 1, Some(Meter::Inverter), true).await;
    let battery = SunSpecBattery::new(der_url(&served), Duration::from_secs(7));
    battery.apply(kw(Mode::Charge, 50.0)).await.unwrap();
    assert_eq!(served.sim.unit_status(1).unwrap().0, kw(Mode::Charge, 50.0));
    battery.apply(kw(Mode::Discharge, 12.345)).await.unwrap();
    // 10 W steps: the unit runs 12.35 kW; the agent reads back what it wrote.
    assert_eq!(
        served.sim.unit_status(1).unwrap().0,
        kw(Mode::Discharge, 12.35)
    );
    let status = battery.read().await.unwrap();
    assert_eq!(status.setpoint, kw(Mode::Discharge, 12.345));
    assert!((status.soc_pct - 50.0).abs() < 0.1, "{}", status.soc_pct);
    served.clock.advance(jiff::SignedDuration::from_hours(1));
    let status = battery.read().await.unwrap();
    // An hour at 12.35 kW out of 300 kWh: 4.1 % less, in 0.1 % steps.
    assert!((45.0..46.0).contains(&status.soc_pct), "{}", status.soc_pct);
    assert_eq!(status.measured_kw, Some(-12.35));

    let timer = |hi, lo| {
        vec![
            ("WSetRvrtTms (high word)".to_owned(), hi),
            ("WSetRvrtTms (low word)".to_owned(), lo),
        ]
    };
    let setting = |w: i32| {
        vec![
            ("WSet (high word)".to_owned(), (w >> 16) as u16),
            ("WSet (low word)".to_owned(), w as u16),
            ("WSetEna".to_owned(), 1),
            ("WSetMod".to_owned(), 1),
        ]
    };
    assert_eq!(
        writes(&served),
        vec![
            (40070 + 78 + 31, timer(0, 7), WriteOutcome::Ok),
            (40070 + 78 + 22, setting(-5000), WriteOutcome::Ok),
            (40070 + 78 + 31, timer(0, 7), WriteOutcome::Ok),
            (40070 + 78 + 22, setting(1235), WriteOutcome::Ok),
        ]
    );
}

#[tokio::test]
async fn control_704_on_a_device_without_it_names_the_models_found() {
    let served = serve(40000, 1).await;
    let err = SunSpecBattery::new(der_url(&served), Duration::from_secs(5))
        .read()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("control=704: no model 704 (DER AC controls)")
            && err.contains("models found: [1, 124, 103]"),
        "{err}"
    );
}

#[tokio::test]
async fn a_stuck_704_setting_is_a_read_back_error_naming_the_register() {
    let served = serve_with(40000, 1, None, true).await;
    let battery = SunSpecBattery::new(der_url(&served), Duration::from_secs(30));
    battery.apply(kw(Mode::Charge, 30.0)).await.unwrap();
    served.sim.set_fault(Fault::Stuck, None);
    let err = battery.apply(kw(Mode::Discharge, 30.0)).await.unwrap_err();
    assert!(
        matches!(
            err,
            BatteryError::ReadBack {
                register: "WSet (high word)",
                wrote: 0,
                read: 0xFFFF
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn the_704_revert_timer_sends_the_unit_idle() {
    let served = serve_with(40000, 1, None, true).await;
    let battery = SunSpecBattery::new(der_url(&served), Duration::from_secs(1));
    battery.apply(kw(Mode::Discharge, 20.0)).await.unwrap();
    until_idle(&battery, "WSetRvrtTms sends the unit idle").await;
    assert_eq!(served.sim.unit_status(1).unwrap().0, Setpoint::IDLE);
}

#[tokio::test]
async fn no_power_holds_every_write_but_the_battery_delivers_nothing() {
    for der in [false, true] {
        let served = serve_with(40000, 1, Some(Meter::Inverter), der).await;
        let url = if der {
            der_url(&served)
        } else {
            served.url.clone()
        };
        let battery = SunSpecBattery::new(url, Duration::from_secs(30));
        battery.apply(kw(Mode::Discharge, 40.0)).await.unwrap();
        served.clock.advance(jiff::SignedDuration::from_secs(60));
        assert!(battery.read().await.unwrap().measured_kw.unwrap() < -39.0);
        served.sim.set_fault(Fault::NoPower, None);
        // The write is taken and reads back; nothing flows, and the charge stays.
        battery.apply(kw(Mode::Charge, 50.0)).await.unwrap();
        let before = battery.read().await.unwrap();
        served.clock.advance(jiff::SignedDuration::from_hours(1));
        let after = battery.read().await.unwrap();
        assert_eq!(after.setpoint, kw(Mode::Charge, 50.0), "der {der}");
        assert_eq!(after.measured_kw, Some(0.0), "der {der}");
        assert_eq!(after.soc_pct, before.soc_pct, "der {der}");
        assert_eq!(served.sim.unit_status(1).unwrap().0, Setpoint::IDLE);
        let last = writes(&served).pop().unwrap();
        assert_eq!(last.2, WriteOutcome::NoPower);
    }
    assert_eq!("no_power".parse::<Fault>().unwrap(), Fault::NoPower);
    assert_eq!(Fault::NoPower.to_string(), "no_power");
    let err = "none_power".parse::<Fault>().unwrap_err();
    assert!(err.contains("no_power"), "{err}");
}

#[tokio::test]
async fn a_refused_connection_keeps_the_io_error_as_its_cause() {
    // A port that was free a moment ago: nothing listens there now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url: SunSpecUrl = format!("sunspec+tcp://127.0.0.1:{port}/1").parse().unwrap();
    let battery = SunSpecBattery::new(url, Duration::from_secs(30));
    let err = battery.read().await.unwrap_err();
    let io = std::error::Error::source(&err)
        .and_then(|c| c.downcast_ref::<std::io::Error>())
        .unwrap_or_else(|| panic!("no io::Error under {err:?}"));
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
    let shown = max300_protocol::error::Chain(&err).to_string();
    assert!(
        shown.starts_with(&format!(
            "controller unreachable: 127.0.0.1:{port}: connect: "
        )),
        "{shown}"
    );
    // During the back-off the same cause comes back at once.
    let again = battery.read().await.unwrap_err();
    assert!(
        std::error::Error::source(&again).is_some(),
        "{again:?} lost its cause"
    );
}
