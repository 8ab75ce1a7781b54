//! The SunSpec client's pure parts: controller URLs, and the register encodings it shares
//! with the simulator's server (whose tests, in `max300-sim`, run this client against it).

use max300_protocol::{Mode, RateKw, Setpoint};

use super::*;
use map::{DerControl, Meter};

fn kw(mode: Mode, kw: f64) -> Setpoint {
    Setpoint::new(mode, RateKw::try_from(kw).unwrap()).unwrap()
}

fn sf(e: i8) -> map::ScaleFactor {
    map::ScaleFactor::new(e).unwrap()
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

#[test]
fn the_control_model_is_a_url_query_that_round_trips_and_names_bad_values() {
    let url: SunSpecUrl = "sunspec+tcp://10.0.0.7:1502/3?control=704".parse().unwrap();
    assert_eq!((url.unit(), url.control()), (3, ControlModel::Der));
    assert_eq!(url.to_string(), "sunspec+tcp://10.0.0.7:1502/3?control=704");
    let url: SunSpecUrl = "sunspec+tcp://[::1]?control=704".parse().unwrap();
    assert_eq!(url.to_string(), "sunspec+tcp://[::1]:502/1?control=704");
    assert_eq!(url.to_string().parse::<SunSpecUrl>().unwrap(), url);
    // The default is left out when printed.
    let url: SunSpecUrl = "sunspec+tcp://h:502/2?control=124".parse().unwrap();
    assert_eq!(url.control(), ControlModel::Storage);
    assert_eq!(url.to_string(), "sunspec+tcp://h:502/2");
    for (bad, says) in [
        ("sunspec+tcp://h:502/1?control=703", "control \"703\""),
        ("sunspec+tcp://h:502/1?control=703", "124 (storage) or 704"),
        ("sunspec+tcp://h:502/1?mode=704", "query \"mode=704\""),
        ("sunspec+tcp://h:502/x?control=704", "unit \"x\""),
    ] {
        let err = bad.parse::<SunSpecUrl>().unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn measured_power_is_scaled_and_turned_charge_positive() {
    // Model 103: W = -5000 × 10^1 W is 50 kW flowing in from the AC side: charging.
    let mut block = vec![0xFFFF; 52];
    block[0] = 103;
    block[map::inverter::W] = (-5000i16) as u16;
    block[map::inverter::W_SF] = sf(1).to_register();
    assert_eq!(Meter::Inverter.measured_kw(&block).unwrap(), Some(50.0));
    block[map::inverter::W] = 1234;
    block[map::inverter::W_SF] = sf(-1).to_register();
    assert_eq!(Meter::Inverter.measured_kw(&block).unwrap(), Some(-0.1234));
    block[map::inverter::W] = map::NOT_IMPLEMENTED_I16;
    assert_eq!(Meter::Inverter.measured_kw(&block).unwrap(), None);
    // Model 802 the same way, at its own offsets.
    let mut block = vec![0xFFFF; 64];
    block[0] = 802;
    block[map::battery::W] = 300;
    block[map::battery::W_SF] = sf(2).to_register();
    assert_eq!(Meter::Battery.measured_kw(&block).unwrap(), Some(-30.0));
    block[map::battery::W_SF] = map::NOT_IMPLEMENTED_I16;
    assert_eq!(Meter::Battery.measured_kw(&block).unwrap(), None);
    // And the simulator's side writes what the client reads.
    let raw = map::measured_to_w(-49.995, sf(1));
    assert_eq!(raw as i16, 5000);
    assert_eq!(map::measured_to_w(400.0, sf(1)) as i16, -32767, "clamped");
}

#[test]
fn wset_is_signed_injection_positive_with_its_scale_factor() {
    let charge = DerControl::encode(kw(Mode::Charge, 50.0), sf(1), 30).unwrap();
    assert_eq!(charge.w_set, -5000);
    assert_eq!(charge.setting(), [1, 1, 0xFFFF, (-5000i32) as u16]);
    assert_eq!(charge.timer(), [0, 30]);
    assert_eq!(charge.setpoint(sf(1)).unwrap(), kw(Mode::Charge, 50.0));
    // 12 345 W in 10 W steps rounds half away from zero, and reads back as run.
    let discharge = DerControl::encode(kw(Mode::Discharge, 12.345), sf(1), 70_000).unwrap();
    assert_eq!(discharge.w_set, 1235);
    assert_eq!(discharge.timer(), [1, 4_464]);
    assert_eq!(
        discharge.setpoint(sf(1)).unwrap(),
        kw(Mode::Discharge, 12.35)
    );
    // In 0.1 W steps the value needs both words.
    let big = DerControl::encode(kw(Mode::Charge, 150.0), sf(-1), 1).unwrap();
    assert_eq!(big.w_set, -1_500_000);
    let idle = DerControl::encode(Setpoint::IDLE, sf(1), 30).unwrap();
    assert_eq!((idle.w_set_ena, idle.w_set), (1, 0));
    assert_eq!(idle.setpoint(sf(1)).unwrap(), Setpoint::IDLE);
    let percent = DerControl {
        w_set_mod: 0,
        ..charge
    };
    let err = percent.setpoint(sf(1)).unwrap_err().to_string();
    assert!(err.contains("WSetMod: 0"), "{err}");
    assert_eq!(
        charge.differences(&discharge)[0],
        ("WSet (high word)", 0xFFFF, 0)
    );
}

#[test]
fn the_713_state_of_charge_uses_its_scale_factor() {
    let mut block = vec![0u16; 9];
    block[0] = 713;
    block[map::der_storage::SOC] = 523;
    block[map::der_storage::PCT_SF] = sf(-1).to_register();
    assert_eq!(map::der_soc_pct(&block).unwrap(), 52.3);
    block[map::der_storage::SOC] = map::NOT_IMPLEMENTED_U16;
    let err = map::der_soc_pct(&block).unwrap_err().to_string();
    assert!(err.contains("713 SoC: not implemented"), "{err}");
}
