use super::*;
use crate::day::time_zone;
use serde_json::json;

fn fleet() -> Fleet {
    Fleet::new(time_zone("Europe/London").unwrap())
}

fn doc(date: &str, schedules: serde_json::Value) -> Vec<u8> {
    json!({"schedule_date": date, "timezone": "Europe/London",
           "generated_at": "2026-11-29T15:45:00Z", "schedules": schedules})
    .to_string()
    .into_bytes()
}

fn one(intervals: serde_json::Value) -> Vec<u8> {
    doc(
        "2026-11-30",
        json!([{"device_id": "d1", "intervals": intervals}]),
    )
}

fn errors_of(input: &[u8]) -> Vec<String> {
    let out = normalize(input, &fleet()).unwrap();
    out.rejected
        .iter()
        .flat_map(|r| r.errors.iter().map(|e| e.to_string()))
        .collect()
}

fn accepted(input: &[u8]) -> NormalizedSchedule {
    let mut out = normalize(input, &fleet()).unwrap();
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    out.schedules.remove(0)
}

fn sp(mode: Mode, kw: u32) -> Setpoint {
    Setpoint::new(mode, RateKw::from_watts(kw * 1000)).unwrap()
}

#[test]
fn names_intervals_by_period_and_fills_gaps_with_idle() {
    let s = accepted(&one(json!([
        {"period": 1, "mode": "charge", "rate_kw": 50},
        {"period": 48, "mode": "discharge", "rate_kw": 20}
    ])));
    assert_eq!(s.schedule.setpoint(1), Some(sp(Mode::Charge, 50)));
    assert_eq!(s.schedule.setpoint(2), Some(Setpoint::IDLE));
    assert_eq!(s.schedule.setpoint(48), Some(sp(Mode::Discharge, 20)));
    assert_eq!(s.filled, 46);
}

#[test]
fn splits_a_span_given_by_instants_with_any_offset() {
    let s = accepted(&one(json!([
        {"start": "2026-11-30T01:00:00+00:00", "end": "2026-11-30T04:00:00+01:00", "mode": "discharge", "rate_kw": 80.5}
    ])));
    // 01:00Z to 03:00Z: periods 3..=6.
    let busy: Vec<u32> = s
        .schedule
        .periods()
        .filter(|p| p.setpoint != Setpoint::IDLE)
        .map(|p| p.period)
        .collect();
    assert_eq!(busy, vec![3, 4, 5, 6]);
    assert_eq!(s.schedule.setpoint(3).unwrap().rate().watts(), 80_500);
}

#[test]
fn strings_written_with_escapes_read_as_their_text() {
    // JSON may escape any character: "d\u0031" is "d1", "ch\u0061rge" is "charge".
    let input = br#"{"schedule_date": "2026-11-30", "timezone": "Europe\/London",
        "generated_at": "2026-11-29T15:45:00Z", "schedules": [{"device_id": "d\u0031",
        "intervals": [{"start": "2026-11-30T01:00:00\u002B00:00",
                       "end": "2026-11-30T02:00:00Z", "mode": "ch\u0061rge", "rate_kw": 5}]}]}"#;
    let s = accepted(input);
    assert_eq!(s.schedule.device_id().as_str(), "d1");
    assert_eq!(s.schedule.setpoint(3), Some(sp(Mode::Charge, 5)));
    assert_eq!(s.schedule.setpoint(4), Some(sp(Mode::Charge, 5)));
    assert_eq!(s.schedule.setpoint(5), Some(Setpoint::IDLE));
}

#[test]
fn a_start_without_end_covers_one_period() {
    let s = accepted(&one(
        json!([{"start": "2026-11-30T10:30:00Z", "mode": "CHARGE", "rate_kw": 5}]),
    ));
    assert_eq!(s.schedule.setpoint(22), Some(sp(Mode::Charge, 5)));
    assert_eq!(s.filled, 47);
}

#[test]
fn clock_change_days_have_50_and_46_periods() {
    let autumn = doc(
        "2026-10-25",
        json!([{"device_id": "d1", "intervals": [
            {"period": 50, "mode": "charge", "rate_kw": 1},
            // 01:30 happens twice: once in BST (+01:00), once in GMT.
            {"start": "2026-10-25T01:30:00+01:00", "mode": "charge", "rate_kw": 2},
            {"start": "2026-10-25T01:30:00+00:00", "mode": "charge", "rate_kw": 3}
        ]}]),
    );
    let s = accepted(&autumn);
    assert_eq!(s.schedule.setpoints().len(), 50);
    assert_eq!(s.schedule.day().start().to_string(), "2026-10-24T23:00:00Z");
    assert_eq!(s.schedule.setpoint(4).unwrap().rate().watts(), 2_000);
    assert_eq!(s.schedule.setpoint(6).unwrap().rate().watts(), 3_000);

    let spring = doc(
        "2027-03-28",
        json!([{"device_id": "d1", "intervals": [
            {"period": 46, "mode": "idle"}
        ]}]),
    );
    assert_eq!(accepted(&spring).schedule.setpoints().len(), 46);
    let too_far = doc(
        "2027-03-28",
        json!([{"device_id": "d1", "intervals": [
            {"period": 47, "mode": "idle"}
        ]}]),
    );
    assert_eq!(
        errors_of(&too_far),
        vec!["schedules[0].intervals[0].period: 47 is outside 1..=46 for 2027-03-28"]
    );
}

#[test]
fn rejects_a_rate_above_the_limit_naming_device_place_and_value() {
    let input = doc(
        "2026-11-30",
        json!([
            {"device_id": "max300-0001", "intervals": [{"period": 1, "mode": "charge", "rate_kw": 50}]},
            {"device_id": "max300-0002", "intervals": []},
            {"device_id": "max300-0003", "intervals": []},
            {"device_id": "max300-0004", "intervals": [{"period": 2, "mode": "charge", "rate_kw": 412}]}
        ]),
    );
    let out = normalize(&input, &fleet()).unwrap();
    assert_eq!(out.schedules.len(), 3, "the others go ahead");
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(
        out.rejected[0].to_string(),
        "max300-0004: schedules[3].intervals[0].rate_kw: 412 exceeds max_rate_kw 150"
    );
}

#[test]
fn honours_per_device_limits() {
    let mut f = fleet();
    f.devices = [(DeviceId::parse("d1").unwrap(), RateKw::from_watts(40_000))]
        .into_iter()
        .collect();
    let out = normalize(
        &one(json!([{"period": 1, "mode": "charge", "rate_kw": 40.0004}])),
        &f,
    )
    .unwrap();
    assert!(
        out.rejected.is_empty(),
        "rounded to whole watts it is 40 kW"
    );
    let out = normalize(
        &one(json!([{"period": 1, "mode": "charge", "rate_kw": 40.001}])),
        &f,
    )
    .unwrap();
    assert_eq!(
        out.rejected[0].errors[0].message,
        "40.001 exceeds max_rate_kw 40"
    );
}

#[test]
fn rejects_negative_non_finite_and_non_numeric_rates() {
    let errs = errors_of(&one(json!([
        {"period": 1, "mode": "charge", "rate_kw": -5},
        {"period": 2, "mode": "charge", "rate_kw": "fast"},
        {"period": 3, "mode": "charge"}
    ])));
    assert_eq!(
        errs,
        vec![
            "schedules[0].intervals[0].rate_kw: -5 is negative",
            "schedules[0].intervals[1].rate_kw: expected a number, got \"fast\"",
            "schedules[0].intervals[2].rate_kw: missing",
        ]
    );
    let raw = br#"{"schedule_date":"2026-11-30","timezone":"Europe/London","schedules":[
        {"device_id":"d1","intervals":[{"period":1,"mode":"charge","rate_kw":1e400}]}]}"#;
    assert_eq!(
        errors_of(raw),
        vec!["schedules[0].intervals[0].rate_kw: 1e400 is not finite"]
    );
}

#[test]
fn idle_means_zero() {
    let errs = errors_of(&one(json!([{"period": 1, "mode": "idle", "rate_kw": 3}])));
    assert_eq!(
        errs,
        vec!["schedules[0].intervals[0].rate_kw: idle takes rate_kw 0, got 3"]
    );
    accepted(&one(json!([{"period": 1, "mode": "Idle", "rate_kw": 0}])));
}

#[test]
fn rejects_unknown_modes() {
    let errs = errors_of(&one(json!([{"period": 1, "mode": "boost", "rate_kw": 3}])));
    assert_eq!(
        errs,
        vec!["schedules[0].intervals[0].mode: \"boost\" is not charge, discharge or idle"]
    );
}

#[test]
fn rejects_overlapping_intervals_and_duplicate_periods() {
    let errs = errors_of(&one(json!([
        {"start": "2026-11-30T00:00:00Z", "end": "2026-11-30T02:00:00Z", "mode": "charge", "rate_kw": 1},
        {"period": 3, "mode": "charge", "rate_kw": 1},
        {"period": 10, "mode": "idle"},
        {"period": 10, "mode": "idle"}
    ])));
    assert_eq!(
        errs,
        vec![
            "schedules[0].intervals[1]: period 3 overlaps schedules[0].intervals[0]",
            "schedules[0].intervals[3]: period 10 overlaps schedules[0].intervals[2]",
        ]
    );
}

#[test]
fn rejects_boundaries_off_the_grid_and_instants_outside_the_date() {
    let errs = errors_of(&one(json!([
        {"start": "2026-11-30T00:15:00Z", "mode": "charge", "rate_kw": 1},
        {"start": "2026-11-29T23:30:00Z", "mode": "charge", "rate_kw": 1},
        {"start": "2026-11-30T23:30:00Z", "end": "2026-12-01T00:30:00Z", "mode": "charge", "rate_kw": 1},
        {"start": "2026-11-30T05:00:00Z", "end": "2026-11-30T04:00:00Z", "mode": "charge", "rate_kw": 1},
        {"start": "yesterday", "mode": "charge", "rate_kw": 1}
    ])));
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(errs[0].starts_with(
        "schedules[0].intervals[0].start: \"2026-11-30T00:15:00Z\" is not a period boundary"
    ));
    assert!(errs[1].starts_with(
        "schedules[0].intervals[1].start: \"2026-11-29T23:30:00Z\" is outside 2026-11-30"
    ));
    assert!(errs[2].starts_with(
        "schedules[0].intervals[2].end: \"2026-12-01T00:30:00Z\" is outside 2026-11-30"
    ));
    assert!(
        errs[3].starts_with(
            "schedules[0].intervals[3].end: \"2026-11-30T04:00:00Z\" is not after start"
        )
    );
    assert!(
        errs[4].starts_with(
            "schedules[0].intervals[4].start: \"yesterday\" is not an RFC 3339 instant"
        )
    );
}

#[test]
fn needs_exactly_one_of_period_and_start() {
    let errs = errors_of(&one(json!([
        {"period": 1, "start": "2026-11-30T00:00:00Z", "mode": "idle"},
        {"mode": "idle"},
        {"period": 2, "end": "2026-11-30T02:00:00Z", "mode": "idle"}
    ])));
    assert_eq!(
        errs,
        vec![
            "schedules[0].intervals[0]: give either period or start, not both",
            "schedules[0].intervals[1]: missing: give period or start",
            "schedules[0].intervals[2].end: end goes with start, not with period",
        ]
    );
}

#[test]
fn rejects_numbers_that_do_not_fit_or_are_not_whole() {
    let raw = br#"{"schedule_date":"2026-11-30","timezone":"Europe/London","schedules":[
        {"device_id":"d1","intervals":[
          {"period":99999999999999999999999,"mode":"idle"},
          {"period":1.5,"mode":"idle"},
          {"period":"3","mode":"idle"},
          {"period":1,"mode":"charge","rate_kw":1e15}]}]}"#;
    assert_eq!(
        errors_of(raw),
        vec![
            "schedules[0].intervals[0].period: 99999999999999999999999 does not fit",
            "schedules[0].intervals[1].period: 1.5 is not a whole number",
            "schedules[0].intervals[2].period: expected a whole number, got \"3\"",
            "schedules[0].intervals[3].rate_kw: 1e15 does not fit",
        ]
    );
}

#[test]
fn accepts_whole_numbers_written_as_floats_and_a_byte_order_mark() {
    let mut input = b"\xEF\xBB\xBF".to_vec();
    input.extend(one(
        json!([{"period": 2.0, "mode": "charge", "rate_kw": 1}]),
    ));
    assert_eq!(
        accepted(&input).schedule.setpoint(2),
        Some(sp(Mode::Charge, 1))
    );
    let errs = errors_of(&one(json!([{"period": 4e3, "mode": "idle"}])));
    assert_eq!(
        errs,
        vec!["schedules[0].intervals[0].period: 4000.0 is outside 1..=48 for 2026-11-30"]
    );
}

#[test]
fn a_tiny_negative_rate_is_still_negative() {
    let errs = errors_of(&one(
        json!([{"period": 1, "mode": "charge", "rate_kw": -0.0004}]),
    ));
    assert_eq!(
        errs,
        vec!["schedules[0].intervals[0].rate_kw: -0.0004 is negative"]
    );
}

#[test]
fn rejects_a_device_listed_twice_and_keeps_the_others() {
    let input = doc(
        "2026-11-30",
        json!([
            {"device_id": "d1", "intervals": []},
            {"device_id": "d2", "intervals": []},
            {"device_id": "d1", "intervals": []}
        ]),
    );
    let out = normalize(&input, &fleet()).unwrap();
    assert_eq!(out.schedules.len(), 1);
    assert_eq!(
        out.rejected.len(),
        2,
        "both entries of d1 go: nothing is half-applied"
    );
    assert_eq!(
        out.rejected[0].to_string(),
        "d1: schedules[0].device_id: d1 is listed more than once"
    );
}

/// Once surveyed, a document without `"*"` keeps a count only of the ids listed more than
/// once (what refuses them), not of every id; one with `"*"` keeps every count, since the
/// wildcard stands for the registered devices not listed.
#[test]
fn the_survey_keeps_every_count_only_for_a_wildcard() {
    let outline = |schedules: serde_json::Value| {
        let mut survey = Survey::new(&fleet());
        survey.feed(&doc("2026-11-30", schedules)).unwrap();
        survey.finish().unwrap()
    };
    let entry = |id: &str| json!({"device_id": id, "intervals": []});
    let plain = outline(json!([entry("d1"), entry("d2"), entry("d3"), entry("d1")]));
    assert_eq!(plain.listed.counts.len(), 1);
    assert_eq!(plain.listed.count("d1"), 2);
    let wild = outline(json!([entry("d1"), entry("*"), entry("d2"), entry("d1")]));
    assert_eq!(wild.listed.counts.len(), 3);
    assert_eq!((wild.listed.count("d1"), wild.listed.count("d2")), (2, 1));
}

#[test]
fn rejects_device_ids_outside_the_allowed_shape() {
    let input = doc(
        "2026-11-30",
        json!([
            {"device_id": "a/b", "intervals": []},
            {"device_id": 7, "intervals": []},
            {"intervals": []},
            "not an object"
        ]),
    );
    let errs = errors_of(&input);
    assert_eq!(errs.len(), 4);
    assert!(errs[0].starts_with("schedules[0].device_id: device_id \"a/b\" is not valid"));
    assert_eq!(errs[1], "schedules[1].device_id: expected a string, got 7");
    assert_eq!(errs[2], "schedules[2].device_id: missing");
    assert_eq!(
        errs[3],
        "schedules[3]: expected an object, got \"not an object\""
    );
}

#[test]
fn the_wildcard_covers_registered_devices_without_their_own_schedule() {
    let mut f = fleet();
    f.devices = [
        ("d1", 150_000),
        ("d2", 150_000),
        ("d3", 150_000),
        ("small", 10_000),
    ]
    .into_iter()
    .map(|(id, w)| (DeviceId::parse(id).unwrap(), RateKw::from_watts(w)))
    .collect();
    let input = doc(
        "2026-11-30",
        json!([
            {"device_id": "d1", "intervals": [{"period": 1, "mode": "charge", "rate_kw": 1}]},
            {"device_id": "*", "intervals": [{"period": 2, "mode": "charge", "rate_kw": 20}]}
        ]),
    );
    let out = normalize(&input, &f).unwrap();
    let ids: Vec<&str> = out
        .schedules
        .iter()
        .map(|s| s.schedule.device_id().as_str())
        .collect();
    assert_eq!(ids, vec!["d1", "d2", "d3"]);
    assert!(out.schedules[1].from_wildcard);
    assert_eq!(
        out.schedules[1].schedule.setpoint(2),
        Some(sp(Mode::Charge, 20))
    );
    assert_eq!(
        out.rejected[0].to_string(),
        "small: schedules[1].intervals[0].rate_kw: 20 exceeds max_rate_kw 10"
    );
}

#[test]
fn rejects_the_whole_document_when_it_is_not_json_too_large_or_undated() {
    let f = fleet();
    let whole = |input: &[u8]| normalize(input, &f).unwrap_err().to_string();
    assert!(whole(b"{not json").contains("not a JSON object"));
    assert!(whole(b"[1,2]").contains("not a JSON object"));
    assert!(
        whole(br#"{"timezone":"Europe/London","schedules":[]}"#).contains("schedule_date: missing")
    );
    assert!(
        whole(br#"{"schedule_date":"2026-02-30","timezone":"Europe/London","schedules":[]}"#)
            .contains("schedule_date: \"2026-02-30\" is not a date")
    );
    assert!(
        whole(br#"{"schedule_date":"2026-11-30","schedules":[]}"#).contains("timezone: missing")
    );
    assert!(
        whole(br#"{"schedule_date":"2026-11-30","timezone":"Nowhere/Land","schedules":[]}"#)
            .contains("not a known zone")
    );
    assert!(
        whole(br#"{"schedule_date":"2026-11-30","timezone":"Europe/Paris","schedules":[]}"#)
            .contains("not the fleet's zone Europe/London")
    );
    assert!(
        whole(br#"{"schedule_date":"2026-11-30","timezone":"Europe/London","schedules":{}}"#)
            .contains("schedules: expected an array")
    );
    let mut small = fleet();
    small.max_document_bytes = 10;
    assert!(
        normalize(&one(json!([])), &small)
            .unwrap_err()
            .to_string()
            .contains("exceeds the limit")
    );
}

#[test]
fn the_same_content_gives_the_same_sha256() {
    let a = accepted(&one(
        json!([{"period": 1, "mode": "charge", "rate_kw": 50}]),
    ));
    let b = accepted(&one(json!([
        {"start": "2026-11-30T00:00:00Z", "end": "2026-11-30T00:30:00Z", "mode": "Charge", "rate_kw": 50.0},
        {"period": 2, "mode": "idle"}
    ])));
    assert_eq!(a.schedule.sha256(), b.schedule.sha256());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn date() -> impl Strategy<Value = String> {
        // Clock-change dates are over-represented on purpose.
        prop_oneof![
            Just("2026-10-25".to_owned()),
            Just("2027-03-28".to_owned()),
            Just("2027-10-31".to_owned()),
            (2020i16..2040, 1i8..=12, 1i8..=28)
                .prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}")),
        ]
    }

    fn interval() -> impl Strategy<Value = serde_json::Value> {
        let mode = prop_oneof![
            Just("charge"),
            Just("discharge"),
            Just("idle"),
            Just("IDLE"),
            Just("x")
        ];
        let rate = prop_oneof![
            (0u32..200_000).prop_map(|w| json!(f64::from(w) / 1000.0)),
            Just(json!(-1)),
            Just(json!("9")),
            Just(json!(null)),
        ];
        prop_oneof![
            (0i64..60, mode.clone(), rate.clone())
                .prop_map(|(p, m, r)| json!({"period": p, "mode": m, "rate_kw": r})),
            (-2i64..60, 1i64..6, 0i64..3, mode, rate).prop_map(|(p, len, off, m, r)| {
                let start =
                    jiff::Timestamp::from_second(1_795_996_800 + p * 1800 + off * 600).unwrap();
                let end = jiff::Timestamp::from_second(start.as_second() + len * 1800).unwrap();
                json!({"start": start.to_string(), "end": end.to_string(), "mode": m, "rate_kw": r})
            }),
            Just(json!("junk")),
        ]
    }

    proptest! {
        #[test]
        fn never_panics_and_always_yields_the_day_s_period_count(
            date in date(),
            schedules in proptest::collection::vec(
                (prop_oneof![Just("d1"), Just("d2"), Just("*"), Just("bad id")],
                 proptest::collection::vec(interval(), 0..8)),
                0..4),
        ) {
            let schedules: Vec<_> = schedules.into_iter()
                .map(|(id, ivs)| json!({"device_id": id, "intervals": ivs}))
                .collect();
            let input = doc(&date, json!(schedules));
            let mut f = fleet();
            f.devices = [(DeviceId::parse("d3").unwrap(), RateKw::from_watts(150_000))]
                .into_iter()
                .collect();
            let out = normalize(&input, &f).unwrap();
            let n = out.day.period_count();
            prop_assert!(matches!(n, 46 | 48 | 50));
            for s in &out.schedules {
                prop_assert_eq!(s.schedule.setpoints().len(), n as usize);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = normalize(&bytes, &fleet());
        }

        #[test]
        fn normalizing_the_normalized_form_changes_nothing(
            rates in proptest::collection::vec((0u8..3, 0u32..150_000), 48),
        ) {
            let intervals: Vec<_> = rates.iter().enumerate().map(|(i, (m, w))| {
                let mode = ["charge", "discharge", "idle"][usize::from(*m)];
                let kw = if mode == "idle" { 0.0 } else { f64::from(*w) / 1000.0 };
                json!({"period": i + 1, "mode": mode, "rate_kw": kw})
            }).collect();
            let first = accepted(&one(json!(intervals)));
            let again: Vec<_> = first.schedule.periods().map(|p| json!({
                "start": p.start.to_string(), "mode": p.setpoint.mode().as_str(), "rate_kw": p.setpoint.rate().kw()
            })).collect();
            let second = accepted(&one(json!(again)));
            prop_assert_eq!(first.schedule.sha256(), second.schedule.sha256());
            prop_assert_eq!(second.filled, 0);
        }

        /// Fed in chunks of any size, a document normalizes exactly as held whole.
        #[test]
        fn streaming_in_any_chunks_gives_the_same_result(size in 1usize..300, cut in 0usize..2000) {
            let input = doc("2026-11-30", json!([
                {"device_id": "d1", "intervals": [{"period": 1, "mode": "Charge", "rate_kw": 5}]},
                {"device_id": "*", "intervals": [{"start": "2026-11-30T10:00:00+00:00", "end": "2026-11-30T11:00:00+00:00", "mode": "DISCHARGE", "rate_kw": 3.5}]},
                {"device_id": "d1", "intervals": []},
                {"device_id": "d2", "intervals": [{"period": 99, "mode": "idle"}]},
                7,
                {"device_id": "d4 bad", "intervals": []},
                {"device_id": "d5", "intervals": [{"period": 2, "mode": "idle", "rate_kw": 0}]}
            ]));
            let mut f = fleet();
            f.devices = ["d1", "d3", "d6"]
                .into_iter()
                .map(|id| (DeviceId::parse(id).unwrap(), RateKw::from_watts(150_000)))
                .collect();
            let whole = normalize(&input, &f).unwrap();
            let cut = cut.min(input.len());
            let (a, b) = input.split_at(cut);
            let mut survey = Survey::new(&f);
            for chunk in a.chunks(size).chain(b.chunks(size)) {
                survey.feed(chunk).unwrap();
            }
            let outline = survey.finish().unwrap();
            let mut outcomes = Vec::new();
            let mut normalizer = Normalizer::new(&outline, &f);
            for chunk in input.chunks(size) {
                normalizer.feed(chunk, &mut |o| outcomes.push(o)).unwrap();
            }
            normalizer.finish().unwrap();
            let (mut schedules, mut rejected) = (Vec::new(), Vec::new());
            for o in outcomes {
                match o {
                    Outcome::Accepted(s) => schedules.push(s),
                    Outcome::Rejected(r) => rejected.push(r),
                }
            }
            prop_assert_eq!(&schedules, &whole.schedules);
            prop_assert_eq!(&rejected, &whole.rejected);
            // Seven entries, and "*" for d3 and d6.
            prop_assert_eq!(outline.most_schedules(&f), 7 + 2);
        }

        /// A document is refused as not JSON exactly when serde_json cannot read it.
        #[test]
        fn not_json_exactly_when_serde_json_says_so(
            edits in proptest::collection::vec((0usize..400, prop_oneof![
                Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b'\\'),
                Just(b','), Just(b':'), Just(b' '), Just(b'1'), Just(b'x'), Just(0xff)
            ], any::<bool>()), 1..4),
        ) {
            let mut input = doc("2026-11-30", json!([
                {"device_id": "d1", "intervals": [{"period": 1, "mode": "charge", "rate_kw": 5}], "note": ["a", {"b": null}]},
                {"device_id": "d2", "intervals": []}
            ]));
            for (at, byte, insert) in edits {
                let at = at % (input.len() + 1);
                if insert || at == input.len() {
                    input.insert(at, byte);
                } else {
                    input[at] = byte;
                }
            }
            let serde_ok = std::str::from_utf8(&input)
                .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
                && input.trim_ascii_start().starts_with(b"{");
            let ours = normalize(&input, &fleet());
            let not_json = matches!(&ours, Err(e) if e.to_string().contains("not a JSON object"));
            prop_assert_eq!(!not_json, serde_ok, "{:?}: {:?}", String::from_utf8_lossy(&input), ours.err());
        }
    }
}

#[test]
fn each_interval_that_is_not_an_object_or_repeats_a_field_is_named() {
    // Read element by element only when the one-pass read fails: the errors are the same.
    let input = String::from_utf8(one(json!([
        {"period": 1, "mode": "charge", "rate_kw": 5},
        "oops",
        {"period": 3, "mode": "charge", "rate_kw": 1},
        {"period": 4, "mode": "fly", "rate_kw": 1}
    ])))
    .unwrap()
    .replace(
        r#"{"mode":"charge","period":3"#,
        r#"{"mode":"charge","mode":"idle","period":3"#,
    );
    assert!(input.contains(r#""mode":"idle","period":3"#), "{input}");
    let errs = errors_of(input.as_bytes());
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert_eq!(
        errs[0],
        "schedules[0].intervals[1]: expected an object, got \"oops\""
    );
    assert!(
        errs[1].starts_with("schedules[0].intervals[2]: duplicate field `mode`"),
        "{}",
        errs[1]
    );
    assert_eq!(
        errs[2],
        "schedules[0].intervals[3].mode: \"fly\" is not charge, discharge or idle"
    );
    let errs = errors_of(&one(json!({"period": 1})));
    assert_eq!(
        errs,
        ["schedules[0].intervals: expected an array, got {\"period\":1}"]
    );
}
