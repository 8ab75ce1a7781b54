//! `max300 up --days 1`: a whole simulated day on one machine.

use crate::run;

fn play(date: &str, periods: u32) {
    play_with(date, periods, &[]);
}

/// Plays one day with `up` and checks the summary; returns stdout.
fn play_with(date: &str, periods: u32, extra: &[&str]) -> String {
    let mut args = vec![
        "up",
        "--devices",
        "3",
        "--speed",
        "3000",
        "--days",
        "1",
        "--date",
        date,
        "--http",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    let out = run(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = text
        .lines()
        .find(|l| l.starts_with(date))
        .unwrap_or_else(|| panic!("no summary row for {date}: {text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // date, periods, commands, completed, late, executed, failed, skipped, pending
    assert_eq!(cells[1], periods.to_string(), "{row}");
    assert_eq!(cells[2], "3", "{row}");
    assert_eq!(cells[3], "3", "{row}");
    assert_eq!(cells[5], (3 * periods).to_string(), "{row}");
    assert_eq!(&cells[6..], ["0", "0", "0"], "{row}");
    assert!(text.contains("result: every period executed"), "{text}");
    text.into_owned()
}

#[test]
fn up_plays_the_autumn_clock_change_with_50_periods() {
    play("2026-10-25", 50);
}

#[test]
fn up_plays_a_day_with_its_units_driven_over_modbus() {
    let text = play_with("2026-11-30", 48, &["--modbus"]);
    assert!(
        text.contains("batteries: battery-sim over Modbus TCP at 127.0.0.1:"),
        "{text}"
    );
}

#[test]
fn up_plays_the_spring_clock_change_with_46_periods() {
    play("2027-03-28", 46);
}
