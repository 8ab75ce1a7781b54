//! `max300 up --days 1`: a whole simulated day on one machine.

use crate::run;

fn play(date: &str, periods: u32) {
    let out = run(&[
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
    ]);
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
}

#[test]
fn up_plays_the_autumn_clock_change_with_50_periods() {
    play("2026-10-25", 50);
}

#[test]
fn up_plays_the_spring_clock_change_with_46_periods() {
    play("2027-03-28", 46);
}
