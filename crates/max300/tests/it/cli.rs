//! `max300 validate`, `max300 config` and `max300 ingest`.

use crate::run;

fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn validate_prints_every_error_with_its_place_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "bad.json",
        r#"{"schedule_date":"2026-11-30","timezone":"Europe/London","schedules":[
            {"device_id":"max300-0001","intervals":[{"period":1,"mode":"charge","rate_kw":50}]},
            {"device_id":"max300-0002","intervals":[{"period":3,"mode":"hover","rate_kw":5},
                                                   {"start":"2026-11-30T00:10:00Z","mode":"idle"}]},
            {"device_id":"max300-0004","intervals":[{"period":2,"mode":"charge","rate_kw":412}]}]}"#,
    );
    let out = run(&["validate", &file]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("max300-0001: ok, 48 periods, 47 filled with idle"),
        "{text}"
    );
    assert!(
        text.contains("max300-0002: schedules[1].intervals[0].mode: \"hover\" is not charge, discharge or idle"),
        "{text}"
    );
    assert!(text.contains("max300-0002: schedules[1].intervals[1].start: \"2026-11-30T00:10:00Z\" is not a period boundary"), "{text}");
    assert!(
        text.contains(
            "max300-0004: schedules[2].intervals[0].rate_kw: 412 exceeds max_rate_kw 150"
        ),
        "{text}"
    );
    assert!(text.contains("1 accepted, 2 rejected"), "{text}");
}

#[test]
fn validate_accepts_a_good_clock_change_document() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "good.json",
        r#"{"schedule_date":"2026-10-25","timezone":"Europe/London","schedules":[
            {"device_id":"max300-0001","intervals":[{"period":50,"mode":"discharge","rate_kw":10}]}]}"#,
    );
    let out = run(&["validate", &file]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("2026-10-25 (Europe/London): 50 periods"),
        "{text}"
    );
    assert!(
        text.contains("max300-0001: ok, 50 periods, 49 filled with idle"),
        "{text}"
    );
}

#[test]
fn validate_rejects_a_document_that_is_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "junk.json", "<html>oops</html>");
    let out = run(&["validate", &file]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not a JSON object"));
}

#[test]
fn prints_the_embedded_default_configs() {
    for which in ["cloud", "agent"] {
        let out = run(&["config", "print-default", which]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("mqtt = \"mqtt://127.0.0.1:1883\""),
            "{which}: {text}"
        );
    }
}

#[test]
fn the_embedded_broker_refuses_a_public_address() {
    let out = run(&["broker", "--mqtt", "mqtt://0.0.0.0:1883"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback only"));
}

/// The program runs with one malloc arena a core and a fixed mmap threshold (it starts itself
/// again with both in its environment), under the same pid and arguments; an operator's own
/// malloc settings stand, and none is added to them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_program_runs_with_one_malloc_arena_a_core_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let cores = std::thread::available_parallelism()
        .unwrap()
        .get()
        .to_string();
    let ours = [
        format!("MALLOC_ARENA_MAX={cores}"),
        "MALLOC_MMAP_THRESHOLD_=1048576".to_owned(),
    ];
    let operators = ["MALLOC_ARENA_MAX=7".to_owned()];
    for (set, want, not) in [
        (None, &ours[..], None),
        (Some("7"), &operators[..], Some("MALLOC_MMAP_THRESHOLD_")),
    ] {
        let env: Vec<(String, String)> = set
            .map(|n| ("MALLOC_ARENA_MAX".to_owned(), n.to_owned()))
            .into_iter()
            .collect();
        let args = ["provider", "--http", "127.0.0.1:0", "--devices", "1"].map(String::from);
        let mut provider = crate::Proc::start_with_env("provider", &args, &env, dir.path());
        // Serving: the same process, by now past its start.
        provider.expect_line("listening on");
        let pid = provider.child.id();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        let vars: Vec<&str> = environ.split('\0').collect();
        for v in want {
            assert!(vars.contains(&v.as_str()), "{v} not in {environ}");
        }
        if let Some(not) = not {
            assert!(!vars.iter().any(|v| v.starts_with(not)), "{environ}");
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let cmdline: Vec<&str> = cmdline.split_terminator('\0').skip(1).collect();
        assert_eq!(cmdline, args, "{cmdline:?}");
        provider.stop();
    }
}

#[test]
fn ingest_fetches_publishes_and_says_how_far_it_got() {
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!("mqtt://127.0.0.1:{}", crate::free_port());
    let mut broker = crate::Proc::start(
        "broker",
        &["broker".into(), "--mqtt".into(), mqtt.clone()],
        dir.path(),
    );
    broker.expect_line("listening on");
    let mut provider = crate::Proc::start(
        "provider",
        &[
            "provider".into(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--devices".into(),
            "3".into(),
        ],
        dir.path(),
    );
    let url = provider.expect_line("listening on");
    let data = dir.path().join("cloud").display().to_string();
    let out = run(&[
        "ingest",
        "--provider",
        &url,
        "--mqtt",
        &mqtt,
        "--data-dir",
        &data,
        "--date",
        "2026-11-30",
        "--log-format",
        "json",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("2026-11-30: 3 accepted, 0 unchanged, 0 rejected"),
        "{stdout}"
    );
    // Not a terminal: the stages are plain lines, in order. (A display may skip a stage that
    // passed faster than it looked.)
    let order = [
        "fetching 2026-11-30…",
        "normalizing…",
        "committing…",
        "publishing…",
    ];
    let seen: Vec<usize> = stderr
        .lines()
        .filter(|l| l.ends_with('…') && !l.starts_with("connecting"))
        .map(|l| {
            order
                .iter()
                .position(|o| *o == l)
                .unwrap_or_else(|| panic!("unexpected stage {l:?}"))
        })
        .collect();
    assert!(!seen.is_empty(), "no progress shown: {stderr}");
    assert!(
        seen.is_sorted_by(|a, b| a < b),
        "stages out of order: {stderr}"
    );
}

/// Runs a bench that must succeed; its closing line.
fn bench(args: &[&str]) -> String {
    let out = run(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().last().unwrap_or_default().to_owned()
}

#[test]
fn bench_dashboard_measures_every_page_and_closes_with_one_line() {
    let last = bench(&["bench", "dashboard", "--devices", "20", "--requests", "2"]);
    assert!(last.starts_with("bench dashboard: devices 20, "), "{last}");
    for page in ["/ p50", "/api/fleet p50", "/day p50", "/metrics p50"] {
        assert!(last.contains(page), "{page} is missing: {last}");
    }
    let bad = run(&["bench", "dashboard", "--devices", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--devices"));
}

#[test]
fn bench_ingest_sends_every_command_and_closes_with_one_line() {
    let last = bench(&["bench", "ingest", "--devices", "50"]);
    assert!(
        last.starts_with("bench ingest: devices 50, ") && last.contains("fetch to all sent"),
        "{last}"
    );
}

#[test]
fn bench_ingest_with_today_measures_the_evening_ingestion_of_a_fleet_at_work() {
    let last = bench(&["bench", "ingest", "--devices", "50", "--with-today"]);
    // Every one of tomorrow's 50 is counted, not today's too.
    assert!(
        last.starts_with("bench ingest: devices 50, ") && last.contains("fetch to all sent"),
        "{last}"
    );
    let both = run(&[
        "bench",
        "ingest",
        "--devices",
        "5",
        "--with-today",
        "--fleet",
    ]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("--with-today and --fleet"));
}

#[test]
fn bench_agent_measures_memory_lateness_and_acks_and_closes_with_one_line() {
    // A day at 20000x is 4.3 s of real time; the fleet's 4 boundaries at 5000x under 2 s.
    let last = bench(&[
        "bench",
        "agent",
        "--agents",
        "3",
        "--days",
        "1",
        "--speed",
        "20000",
        "--fleet-speed",
        "5000",
        "--fleet-periods",
        "4",
        "--schedules",
        "10",
    ]);
    assert!(last.starts_with("bench agent: rss after start "), "{last}");
    for figure in [
        "1-day max ",
        " MB, last ",
        "lateness 1 agent p50 ",
        "3 agents p50 ",
        "schedule to ack p50 ",
        "missed boundaries ",
    ] {
        assert!(last.contains(figure), "{figure} is missing: {last}");
    }
    assert!(!last.contains("NaN"), "a figure had no samples: {last}");
    for (flag, value) in [("--agents", "0"), ("--days", "0"), ("--speed", "0")] {
        let bad = run(&["bench", "agent", flag, value]);
        assert!(!bad.status.success());
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}

#[test]
fn bench_ingest_with_a_fleet_reports_every_command_acknowledged() {
    let last = bench(&["bench", "ingest", "--devices", "50", "--fleet"]);
    assert!(
        last.starts_with("bench ingest: devices 50, ")
            && last.contains("acknowledged 50 of 50, fetch to all acknowledged"),
        "{last}"
    );
}

#[test]
fn a_small_fleet_acks_its_plan_and_every_boundarys_reports_are_recorded_and_receipted() {
    // 20 units and the real cloud on the embedded broker (port 0), both on one scaled clock
    // at 1800x: a period is a second of real time, and the bench waits on the clock, not on
    // sleeps. It exits non-zero unless every report of every boundary is in the store and
    // every one the fleet sent is receipted, and (watched) unless every fetch of the fleet
    // page and /metrics succeeded.
    let last = bench(&[
        "bench",
        "day",
        "--devices",
        "20",
        "--speed",
        "1800",
        "--boundaries",
        "3",
        "--jitter-ms",
        "200",
        "--watch",
    ]);
    assert!(
        last.starts_with("bench day: devices 20, broker embedded, speed 1800, boundaries 3: "),
        "{last}"
    );
    assert_eq!(
        last.matches("recorded 20 of 20").count(),
        3,
        "every boundary's reports are recorded: {last}"
    );
    assert_eq!(
        last.matches("receipted 20/20").count(),
        3,
        "every report is receipted: {last}"
    );
    assert!(last.contains("; watched: "), "{last}");
}

#[test]
fn fleet_refuses_an_impossible_size_or_an_absent_broker_with_a_clear_message() {
    let stderr = |args: &[&str]| {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let broker = format!("mqtt://127.0.0.1:{}", crate::free_port());
    let text = stderr(&["fleet", "--devices", "0", "--mqtt", &broker]);
    assert!(text.contains("--devices: 0 is not within 1..="), "{text}");
    let text = stderr(&["fleet", "--devices", "1000000", "--mqtt", &broker]);
    assert!(
        text.contains("1000000 connections need about") && text.contains("open files"),
        "{text}"
    );
    let text = stderr(&["fleet", "--devices", "3", "--mqtt", &broker]);
    assert!(
        text.contains("max300-0001: cannot connect to mqtt://127.0.0.1:"),
        "{text}"
    );
}

#[test]
fn under_systemd_the_agent_says_ready_and_pets_the_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&socket).unwrap();
    systemd
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // No broker: the agent is up (and ready) while it keeps trying to connect.
    let mqtt = format!("mqtt://127.0.0.1:{}", crate::free_port());
    let data = dir.path().join("unit").display().to_string();
    let _agent = crate::Proc::start_with_env(
        "agent",
        &[
            "agent".into(),
            "--device-id".into(),
            "unit-1".into(),
            "--mqtt".into(),
            mqtt,
            "--data-dir".into(),
            data,
        ],
        &[
            ("NOTIFY_SOCKET".into(), socket.display().to_string()),
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        dir.path(),
    );
    let mut buf = [0u8; 256];
    let mut said = Vec::new();
    while said.iter().filter(|s: &&String| *s == "WATCHDOG=1").count() < 3 {
        let n = systemd
            .recv(&mut buf)
            .expect("the agent notifies within 10 s");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(said[0].starts_with("READY=1"), "ready first: {said:?}");
}

#[test]
fn bench_plot_runs_ingest_per_size_and_draws_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("plot").join("ingest.svg");
    let out = svg.display().to_string();
    let last = bench(&[
        "bench",
        "plot",
        "--devices",
        "20,60",
        "--runs",
        "1",
        "--out",
        &out,
    ]);
    assert!(
        last.starts_with("bench plot: broker embedded, medians of 1 runs: 20 devices ")
            && last.contains(", 60 devices "),
        "{last}"
    );
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(drawn.matches("<circle").count(), 4, "{drawn}");
    assert!(drawn.contains("N = 60"), "{drawn}");
}
