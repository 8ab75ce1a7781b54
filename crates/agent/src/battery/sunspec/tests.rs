//! The SunSpec client against the simulator's server, over real loopback sockets.

use std::sync::Arc;
use std::time::Duration;

use max300_protocol::{ManualClock, Mode, RateKw, Setpoint};
use tokio_util::sync::CancellationToken;

use super::server::{Fault, SimLogEntry, SimServerConfig, SunSpecSim, WriteOutcome, read_sim_log};
use super::*;
use crate::battery::SimConfig;

struct Served {
    sim: Arc<SunSpecSim>,
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
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new("2026-11-30T00:00:00Z".parse().unwrap()));
    let config = SimServerConfig {
        units,
        base,
        sim: SimConfig::default(),
        reserve_pct: 10.0,
        write_log: Some(dir.path().join("sim.jsonl")),
    };
    let sim = Arc::new(SunSpecSim::new(config, clock).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    tokio::spawn(server::serve(sim.clone(), listener, stop.clone()));
    Served {
        sim,
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

#[test]
fn controller_urls_are_parsed_with_defaults_and_errors_named() {
    let url: SunSpecUrl = "sunspec+tcp://10.0.0.7:1502/3".parse().unwrap();
    assert_eq!((url.host(), url.port(), url.unit()), ("10.0.0.7", 1502, 3));
    let url: SunSpecUrl = "sunspec+tcp://inverter.local".parse().unwrap();
    assert_eq!((url.port(), url.unit()), (502, 1));
    let url: SunSpecUrl = "sunspec+tcp://[::1]:502/2".parse().unwrap();
    assert_eq!(
        (url.host(), url.to_string().as_str()),
        ("::1", "sunspec+tcp://[::1]:502/2")
    );
    for (bad, says) in [
        ("modbus://h:502/1", "expected sunspec+tcp://"),
        ("sunspec+tcp://:502/1", "host is missing"),
        ("sunspec+tcp://h:70000/1", "port \"70000\""),
        ("sunspec+tcp://h:502/0", "unit \"0\""),
        ("sunspec+tcp://h:502/x", "unit \"x\""),
    ] {
        let err = bad.parse::<SunSpecUrl>().unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[tokio::test]
async fn the_sunspec_battery_meets_the_battery_contract_at_every_base() {
    for base in map::BASES {
        let served = serve(base, 1).await;
        let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(30));
        crate::battery::contract(&battery).await;
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
    assert_eq!(
        err,
        BatteryError::ReadBack {
            register: "StorCtl_Mod",
            wrote: 2,
            read: 1
        },
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
        matches!(&err, BatteryError::Transport(m) if m.contains("no answer within 1000 ms")),
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

#[tokio::test]
async fn a_unit_that_hears_nothing_goes_idle_after_its_revert_timer() {
    let served = serve(40000, 1).await;
    let battery = SunSpecBattery::new(served.url.clone(), Duration::from_secs(1));
    battery.apply(kw(Mode::Discharge, 20.0)).await.unwrap();
    // The timer runs on real time: wait for the unit to notice it, with a deadline.
    tokio::time::timeout(Duration::from_secs(10), async {
        while battery.read().await.unwrap().setpoint != Setpoint::IDLE {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the revert timer sends the unit idle");
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
