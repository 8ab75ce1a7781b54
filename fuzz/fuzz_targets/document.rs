//! The provider-document parser and normalization: any bytes, never a panic, and every
//! accepted schedule has exactly the date's period count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use max300_protocol::document::{Fleet, normalize};
use max300_protocol::{DeviceId, RateKw};

fuzz_target!(|data: &[u8]| {
    let mut fleet = Fleet::new(jiff::tz::TimeZone::get("Europe/London").expect("bundled tzdb"));
    fleet.devices = [("d1", 150_000), ("d3", 10_000)]
        .into_iter()
        .map(|(id, kw)| {
            (
                DeviceId::parse(id).expect("a valid id"),
                RateKw::from_watts(kw),
            )
        })
        .collect();
    if let Ok(out) = normalize(data, &fleet) {
        let n = out.day.period_count() as usize;
        for s in &out.schedules {
            assert_eq!(s.schedule.setpoints().len(), n);
        }
    }
});
