//! The same day with separate processes: `max300 broker`, `provider`, `cloud` and two
//! `agent`s, sharing one scaled clock.

use std::time::Duration;

use max300_protocol::{Clock, SystemClock};
use serde_json::Value;

use crate::{Proc, free_port, metric, scrape};

const SPEED: &str = "2000";

fn clock_flags(start: &str, anchor: &str) -> Vec<String> {
    vec![
        "--clock-start".into(),
        start.into(),
        "--clock-anchor".into(),
        anchor.into(),
        "--clock-speed".into(),
        SPEED.into(),
    ]
}

fn args(list: &[&str], clock: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| s.to_string())
        .chain(clock.iter().cloned())
        .collect()
}

async fn get(url: &str) -> Value {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn separate_processes_play_a_day_and_the_api_follows_every_period() {
    play_a_day_on_the_embedded_broker(0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_malformed_messages_does_not_hold_up_the_other_units() {
    play_a_day_on_the_embedded_broker(10_000).await;
}

/// `max300 broker` as a process, then [`play_a_day`] against it.
async fn play_a_day_on_the_embedded_broker(flood: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!("mqtt://127.0.0.1:{}", free_port());
    let mut broker = Proc::start(
        "broker",
        &args(&["broker", "--mqtt", &mqtt], &[]),
        dir.path(),
    );
    broker.expect_line("listening on");
    play_a_day(
        dir.path(),
        &mqtt,
        Day {
            flood,
            ..Day::default()
        },
    )
    .await;
    broker.stop();
}

/// Certificates for mutual TLS: the CA, and a folder with `cloud.pem/.key` and `ID.pem/.key`.
pub struct Tls<'a> {
    /// The folder of `max300 certs init`.
    pub dir: &'a std::path::Path,
}

impl Tls<'_> {
    fn flags(&self, stem: &str) -> Vec<String> {
        let f = |name: String| self.dir.join(name).display().to_string();
        vec![
            "--ca".into(),
            f("ca.pem".into()),
            "--cert".into(),
            f(format!("{stem}.pem")),
            "--key".into(),
            f(format!("{stem}.key")),
        ]
    }
}

/// How [`play_a_day`] plays.
#[derive(Default)]
pub struct Day<'a> {
    /// Certificates, for `mqtts://`.
    pub tls: Option<Tls<'a>>,
    /// Malformed messages published on unit-a's report topic while the day plays.
    pub flood: u32,
    /// Extra environment for each cloud (e.g. the AWS backends).
    pub cloud_env: Vec<(String, String)>,
    /// Cloud instances sharing the feedback (`--shared-group`); 0 means 1.
    pub clouds: usize,
    /// Kill (SIGKILL) the first cloud once the day is under way; the API is followed
    /// through the next.
    pub kill_one_mid_day: bool,
}

/// Runs the provider, the cloud and two agents (`unit-a`, `unit-b`) as processes against the
/// broker at `mqtt`, and follows one day through the API to the end.
///
/// With `flood > 0`, a client on unit-a's report topic publishes that many malformed messages
/// while the day plays; every unit's periods must still run on time, and the cloud's metrics
/// must count the flood. With several clouds, each takes a share of the feedback, and the
/// counts that depend on which one handled what are not checked.
pub async fn play_a_day(logs: &std::path::Path, mqtt: &str, day: Day<'_>) {
    let Day {
        tls,
        flood,
        cloud_env,
        clouds,
        kill_one_mid_day,
    } = day;
    let dir = logs;
    // One hour of plan time before the day starts, for fetching and delivery.
    let start = "2026-11-29T23:00:00Z";
    let anchor = SystemClock.now().to_string();
    let clock = clock_flags(start, &anchor);
    let tls_flags = |stem: &str| tls.as_ref().map(|t| t.flags(stem)).unwrap_or_default();

    let mut provider = Proc::start(
        "provider",
        &args(
            &[
                "provider",
                "--http",
                "127.0.0.1:0",
                "--device-ids",
                "unit-a,unit-b",
                "--seed",
                "3",
            ],
            &clock,
        ),
        logs,
    );
    let provider_url = provider.expect_line("listening on");

    let shared = clouds > 1;
    let mut cloud_procs = Vec::new();
    let mut apis = Vec::new();
    for i in 0..clouds.max(1) {
        let name = if shared {
            format!("cloud-{i}")
        } else {
            "cloud".into()
        };
        let cloud_dir = dir.join(&name).display().to_string();
        let mut flags = vec![
            "cloud",
            "--mqtt",
            mqtt,
            "--http",
            "127.0.0.1:0",
            "--provider",
            &provider_url,
            "--data-dir",
            &cloud_dir,
        ];
        if shared {
            flags.extend(["--shared-group", "max300-cloud", "--client-id", &name]);
        }
        let mut cloud = Proc::start_with_env(
            &name,
            &args(&flags, &[clock.clone(), tls_flags("cloud")].concat()),
            &cloud_env,
            logs,
        );
        apis.push(cloud.expect_line("listening on"));
        cloud_procs.push(cloud);
    }
    let mut api = apis[0].clone();
    let flooder = (flood > 0).then(|| {
        let url = mqtt.parse().unwrap();
        let api = api.clone();
        tokio::spawn(async move {
            // Once both units hold their plan, so the flood hits a day in progress rather
            // than racing the first delivery through a one-hour start.
            for _ in 0..600 {
                let list = get(&format!("{api}/api/commands?date=2026-11-30")).await;
                let acked = list.as_array().is_some_and(|l| {
                    l.len() == 2 && l.iter().all(|c| c["state"] == "acknowledged")
                });
                if acked {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let config = max300_mqtt::SessionConfig::new(url, "flooder", vec![]);
            let (session, _events) =
                max300_mqtt::connect(config, tokio_util::sync::CancellationToken::new()).unwrap();
            session.wait_connected().await;
            for i in 0..flood {
                let garbage = format!("{{not json {i}").into_bytes();
                session
                    .publish(
                        "max300/unit-a/report".into(),
                        garbage,
                        max300_mqtt::Qos::AtLeastOnce,
                    )
                    .await
                    .unwrap();
            }
            session
        })
    });

    // unit-a serves its own metrics too.
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let mut agents = Vec::new();
    for id in ["unit-a", "unit-b"] {
        let data = dir.join(id).display().to_string();
        let mut flags = vec![
            "agent",
            "--device-id",
            id,
            "--mqtt",
            mqtt,
            "--data-dir",
            &data,
        ];
        if id == "unit-a" {
            flags.extend(["--metrics", &agent_metrics]);
        }
        agents.push(Proc::start(
            id,
            &args(&flags, &[clock.clone(), tls_flags(id)].concat()),
            logs,
        ));
    }
    let executed = |text: &str| {
        metric(
            text,
            "max300_period_results_total",
            &[r#"status="executed""#],
        )
    };
    let mut mid_day_metrics = None;

    // Follow the day through the API. A 48-period day takes 43 s at 2000×.
    let mut seen_mid_day = false;
    let mut done = false;
    for _ in 0..240 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let list = get(&format!("{api}/api/commands?date=2026-11-30")).await;
        let list = list.as_array().unwrap();
        if list.len() < 2 {
            continue;
        }
        let mut completed = 0;
        for summary in list {
            let id = summary["message_id"].as_str().unwrap();
            let detail = get(&format!("{api}/api/commands/{id}")).await;
            let periods = detail["periods"].as_array().unwrap();
            assert_eq!(periods.len(), 48);
            let executed = periods.iter().filter(|p| p["status"] == "executed").count();
            let pending = periods.iter().filter(|p| p["status"] == "pending").count();
            assert_eq!(
                executed + pending,
                48,
                "no period failed or was skipped: {detail}"
            );
            if executed > 0 && pending > 0 {
                if kill_one_mid_day && api == apis[0] {
                    // The broker shares the feedback out: each instance has applied some.
                    for a in &apis {
                        let text = scrape(&format!("{a}/metrics")).await;
                        let applied = metric(
                            &text,
                            "max300_inbound_messages_total",
                            &[r#"outcome="applied""#],
                        );
                        assert!(applied > 0.0, "{a} handled no feedback: {text}");
                    }
                    // Mid-day, with acks, reports and receipts in flight.
                    cloud_procs[0].child.kill().unwrap();
                    cloud_procs[0].child.wait().unwrap();
                    api = apis[1].clone();
                    continue;
                }
                assert_eq!(detail["state"], "acknowledged", "{detail}");
                assert!(detail["history"].as_array().unwrap().len() >= 3, "{detail}");
                seen_mid_day = true;
                if mid_day_metrics.is_none() {
                    mid_day_metrics = Some(scrape(&format!("{api}/metrics")).await);
                }
            }
            if detail["state"] == "completed" {
                assert_eq!(executed, 48);
                let states: Vec<&str> = detail["history"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h["state"].as_str().unwrap())
                    .collect();
                assert_eq!(states, ["created", "sent", "acknowledged", "completed"]);
                assert_eq!(detail["acked_sha256"], detail["sha256"]);
                completed += 1;
            }
        }
        if completed == 2 {
            done = true;
            break;
        }
    }
    let logs_hint = format!("logs in {}", logs.display());
    assert!(
        seen_mid_day,
        "never saw a command part-way through its day; {logs_hint}"
    );
    assert!(done, "the commands did not complete; {logs_hint}");

    // One service's counts follow the day; shared between several, each has a part.
    if !shared {
        // The metrics were scraped mid-day, and they moved with the day.
        let mid = mid_day_metrics.unwrap();
        let end = scrape(&format!("{api}/metrics")).await;
        for name in [
            "max300_commands",
            "max300_inbound_messages",
            "max300_mqtt_dropped",
            "max300_ingestion_runs",
            "max300_ingestion_rejections",
            "max300_publishes",
            "max300_resends",
            "max300_ack_latency_seconds",
            "max300_period_results",
            "max300_commands_late",
            "max300_commands_expired",
            "max300_alerts",
            "max300_devices",
            "max300_heartbeat_age_seconds",
        ] {
            assert!(
                end.contains(&format!("# TYPE {name} ")),
                "{name} is missing: {end}"
            );
        }
        assert!(executed(&mid) >= 1.0, "{mid}");
        assert!(
            executed(&end) >= 96.0 && executed(&end) > executed(&mid),
            "period results moved from {} to {}",
            executed(&mid),
            executed(&end)
        );
        assert_eq!(
            metric(&end, "max300_commands", &[r#"state="completed""#]),
            2.0,
            "{end}"
        );
        // Each day's fetch (the day's and, from 16:00, the next day's) and its acks.
        assert!(metric(&end, "max300_ack_latency_seconds_count", &[]) >= 2.0);
        assert!(metric(&end, "max300_ingestion_runs_total", &[r#"outcome="ok""#]) >= 1.0);
        assert!(metric(&end, "max300_publishes_total", &[r#"kind="receipt""#]) >= 90.0);
        assert_eq!(metric(&end, "max300_devices", &[r#"status="online""#]), 2.0);
        let agent = scrape(&format!("http://{agent_metrics}/metrics")).await;
        assert!(
            metric(&agent, "max300_agent_boundary_lateness_seconds_count", &[]) >= 48.0,
            "{agent}"
        );
        assert!(metric(&agent, "max300_agent_battery_write_seconds_count", &[]) >= 1.0);
        assert!(
            agent.contains("# TYPE max300_agent_outbox_depth gauge"),
            "{agent}"
        );
    }

    // Every period was handled on time: a period is reported when it ends (with the energy
    // it delivered), at the boundary that runs the next one, within 15 minutes of plan time
    // (under half a second of real time) of that boundary.
    for id in ["unit-a", "unit-b"] {
        let reports = get(&format!("{api}/api/devices/{id}/reports?date=2026-11-30")).await;
        for r in reports.as_array().unwrap() {
            let start: jiff::Timestamp = r["interval_start"].as_str().unwrap().parse().unwrap();
            let end = start + jiff::SignedDuration::from_mins(30);
            let at: jiff::Timestamp = r["at"].as_str().unwrap().parse().unwrap();
            let late = at.duration_since(end);
            assert!(
                late >= jiff::SignedDuration::ZERO && late < jiff::SignedDuration::from_mins(15),
                "{id} period {}: reported {late} after its end",
                r["period"]
            );
        }
    }
    if let Some(flooder) = flooder {
        let _session = flooder.await.unwrap();
        let count = |text: &str, outcome: &str| {
            let label = format!("outcome=\"{outcome}\"");
            metric(text, "max300_inbound_messages_total", &[&label]) as u32
        };
        let (mut invalid, mut throttled) = (0, 0);
        for _ in 0..100 {
            let text = scrape(&format!("{api}/metrics")).await;
            (invalid, throttled) = (count(&text, "invalid"), count(&text, "throttled"));
            if invalid + throttled >= flood {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Each flooded message was either refused as malformed or throttled, and counted
        // (a few of the flooding device's own messages may be throttled with them; its outbox
        // sends them again).
        assert!(
            invalid + throttled >= flood,
            "the flood shows in the metrics: {invalid} + {throttled}"
        );
        assert!(invalid <= flood);
        assert!(throttled > 0, "the flooding device was throttled");
    }

    let devices = get(&format!("{api}/api/devices")).await;
    let ids: Vec<&str> = devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["unit-a", "unit-b"]);

    // Every service stops cleanly on SIGTERM.
    let living = cloud_procs.iter_mut().skip(usize::from(kill_one_mid_day));
    for p in agents.iter_mut().chain(living).chain([&mut provider]) {
        let status = p.stop();
        assert!(status.success(), "{} exited with {status}", p.name);
    }
}
