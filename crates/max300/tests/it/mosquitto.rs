//! Against Debian's mosquitto, configured by `max300 certs mosquitto`: mutual TLS, the
//! certificate's CN as the user, and per-device topics. These need the `mosquitto` and
//! `mosquitto-clients` packages, which `.ci/run` installs; plain `cargo test` skips them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::aws::Aws;
use crate::processes::{Day, Tls, play_a_day};
use crate::{Proc, free_port, run};

/// A mosquitto process with a fresh CA, certificates and config; killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    pki: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        Mosquitto::start_with_broker_host("127.0.0.1")
    }

    /// With a broker certificate valid for `host` only.
    fn start_with_broker_host(host: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let other = dir.path().join("other-ca");
        let ok = |out: Output| {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            )
        };
        ok(run(&[
            "certs",
            "init",
            pki.to_str().unwrap(),
            "--broker-host",
            host,
        ]));
        for id in ["unit-a", "unit-b"] {
            ok(run(&[
                "certs",
                "device",
                id,
                "--dir",
                pki.to_str().unwrap(),
            ]));
        }
        ok(run(&[
            "certs",
            "device",
            "unit-old",
            "--dir",
            pki.to_str().unwrap(),
            "--not-after",
            "2020-01-01",
        ]));
        ok(run(&["certs", "init", other.to_str().unwrap()]));
        ok(run(&[
            "certs",
            "device",
            "unit-a",
            "--dir",
            other.to_str().unwrap(),
        ]));
        let port = free_port();
        ok(run(&[
            "certs",
            "mosquitto",
            pki.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ]));
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto")
            .args(["-c", pki.join("mosquitto.conf").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto; .ci/run does it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Mosquitto {
            child,
            port,
            pki,
            _dir: dir,
        }
    }

    /// TLS flags of mosquitto_sub/pub for `stem` (a device id or `cloud`) from `pki`.
    fn client(&self, pki: &Path, stem: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "-h".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            self.port.to_string(),
            "--cafile".to_owned(),
            self.pki.join("ca.pem").display().to_string(),
        ];
        if let Some(stem) = stem {
            args.extend([
                "--cert".to_owned(),
                pki.join(format!("{stem}.pem")).display().to_string(),
                "--key".to_owned(),
                pki.join(format!("{stem}.key")).display().to_string(),
            ]);
        }
        args
    }

    fn publish(&self, who: &str, topic: &str) {
        let status = Command::new("mosquitto_pub")
            .args(self.client(&self.pki, Some(who)))
            .args(["-t", topic, "-m", "{}", "-q", "1"])
            .status()
            .unwrap();
        assert!(status.success(), "{who} could not even connect to publish");
    }

    /// Subscribes as `who` to `topics`, and while waiting for the first message, publishes
    /// (as `publisher`) to `first` and then `last`, over and over. Returns the topic that
    /// arrived. `first` always goes out before `last`, so if `first` were let through it would
    /// be what arrives.
    fn race(&self, who: &str, topics: &[&str], publisher: &str, first: &str, last: &str) -> String {
        let mut sub = Command::new("mosquitto_sub");
        sub.args(self.client(&self.pki, Some(who)))
            .args(["-v", "-C", "1", "-W", "20", "-q", "1"]);
        for t in topics {
            sub.args(["-t", t]);
        }
        let mut sub = sub
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if let Ok(Some(_)) = sub.try_wait() {
                break;
            }
            self.publish(publisher, first);
            self.publish(publisher, last);
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = sub.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace().next().unwrap_or("").to_owned()
    }

    /// Whether a client with these credentials gets a working connection.
    fn connects(&self, pki: &Path, stem: Option<&str>) -> bool {
        let out = Command::new("mosquitto_sub")
            .args(self.client(pki, stem))
            .args(["-t", "max300/nothing", "-C", "1", "-W", "2"])
            .output()
            .unwrap();
        // 27 is mosquitto_sub's "timed out waiting for a message": the connection held.
        out.status.code() == Some(27)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs mosquitto; .ci/run installs it"]
fn a_device_cannot_subscribe_to_another_devices_schedule() {
    let m = Mosquitto::start();
    let arrived = m.race(
        "unit-a",
        &["max300/unit-b/schedule", "max300/unit-a/schedule"],
        "cloud",
        "max300/unit-b/schedule",
        "max300/unit-a/schedule",
    );
    assert_eq!(arrived, "max300/unit-a/schedule");
}

#[test]
#[ignore = "needs mosquitto; .ci/run installs it"]
fn a_device_cannot_publish_another_devices_report_or_ack() {
    let m = Mosquitto::start();
    for channel in ["report", "ack"] {
        let arrived = m.race(
            "cloud",
            &[&format!("max300/+/{channel}")],
            "unit-a",
            &format!("max300/unit-b/{channel}"),
            &format!("max300/unit-a/{channel}"),
        );
        assert_eq!(arrived, format!("max300/unit-a/{channel}"), "{channel}");
    }
}

#[test]
#[ignore = "needs mosquitto; .ci/run installs it"]
fn a_client_without_a_certificate_is_refused() {
    let m = Mosquitto::start();
    assert!(
        m.connects(&m.pki, Some("unit-a")),
        "the control case connects"
    );
    assert!(!m.connects(&m.pki, None));
}

#[test]
#[ignore = "needs mosquitto; .ci/run installs it"]
fn a_certificate_from_another_ca_is_refused() {
    let m = Mosquitto::start();
    let other = m.pki.parent().unwrap().join("other-ca");
    assert!(!m.connects(&other, Some("unit-a")));
}

#[test]
#[ignore = "needs mosquitto; .ci/run installs it"]
fn an_expired_certificate_is_refused() {
    let m = Mosquitto::start();
    assert!(!m.connects(&m.pki, Some("unit-old")));
}

/// Starts `max300 agent` or `max300 cloud` against `mqtt` with the certificates in `pki`,
/// and returns its log once it says `expect` (or after ten seconds).
fn refusal(service: &str, mqtt: &str, pki: &Path, stem: &str, expect: &str) -> String {
    let logs = tempfile::tempdir().unwrap();
    let file = |f: String| pki.join(f).display().to_string();
    let mut args: Vec<String> = vec![
        service.into(),
        "--mqtt".into(),
        mqtt.into(),
        "--ca".into(),
        file("ca.pem".into()),
        "--cert".into(),
        file(format!("{stem}.pem")),
        "--key".into(),
        file(format!("{stem}.key")),
        "--data-dir".into(),
        logs.path().join("data").display().to_string(),
        "--clock-speed".into(),
        "60".into(),
    ];
    if service == "agent" {
        args.extend(["--device-id".into(), stem.into()]);
    } else {
        args.extend(["--http".into(), "127.0.0.1:0".into()]);
    }
    let mut p = Proc::start(service, &args, logs.path());
    let log = logs.path().join(format!("{service}.log"));
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(expect) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    p.stop();
    text
}

#[test]
#[ignore = "needs mosquitto; .ci/run installs it"]
fn the_agent_and_the_cloud_refuse_a_broker_certified_by_another_ca() {
    let m = Mosquitto::start();
    let other = m.pki.parent().unwrap().join("other-ca");
    let mqtt = format!("mqtts://127.0.0.1:{}", m.port);
    let expect = "not signed by the configured CA";
    let agent = refusal("agent", &mqtt, &other, "unit-a", expect);
    assert!(agent.contains(expect), "{agent}");
    let cloud = refusal("cloud", &mqtt, &other, "cloud", expect);
    assert!(cloud.contains(expect), "{cloud}");
}

#[test]
#[ignore = "needs mosquitto; .ci/run installs it"]
fn the_agent_and_the_cloud_refuse_a_broker_certificate_for_another_host() {
    let m = Mosquitto::start_with_broker_host("broker.invalid");
    let mqtt = format!("mqtts://127.0.0.1:{}", m.port);
    let expect = "does not name the host";
    let agent = refusal("agent", &mqtt, &m.pki, "unit-a", expect);
    assert!(agent.contains(expect), "{agent}");
    let cloud = refusal("cloud", &mqtt, &m.pki, "cloud", expect);
    assert!(cloud.contains(expect), "{cloud}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs mosquitto; .ci/run installs it"]
async fn the_day_runs_over_mosquitto_with_mutual_tls() {
    let m = Mosquitto::start();
    let logs = tempfile::tempdir().unwrap();
    let mqtt = format!("mqtts://127.0.0.1:{}", m.port);
    play_a_day(
        logs.path(),
        &mqtt,
        Day {
            tls: Some(Tls { dir: &m.pki }),
            ..Day::default()
        },
    )
    .await;
}

/// The day of [`the_day_runs_over_mosquitto_with_mutual_tls`], with the cloud on DynamoDB and
/// S3 (moto); then the items and objects are checked in the emulated services.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs mosquitto and moto_server; .ci/run installs them"]
async fn the_day_runs_on_dynamodb_and_s3_over_mosquitto_with_mutual_tls() {
    play_a_day_on_aws(1, false).await;
}

/// Two cloud instances on one table and one broker, sharing the feedback; one is killed
/// mid-day. Every period is still recorded once, no command is stuck, and each date's
/// ingestion ran once.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs mosquitto and moto_server; .ci/run installs them"]
async fn two_cloud_instances_share_a_day_and_one_dies_mid_day() {
    play_a_day_on_aws(2, true).await;
}

/// A day over mosquitto with mutual TLS, with `clouds` instances on DynamoDB and S3.
async fn play_a_day_on_aws(clouds: usize, kill_one_mid_day: bool) {
    let m = Mosquitto::start();
    let aws = Aws::start().await;
    let logs = tempfile::tempdir().unwrap();
    let mqtt = format!("mqtts://127.0.0.1:{}", m.port);
    play_a_day(
        logs.path(),
        &mqtt,
        Day {
            tls: Some(Tls { dir: &m.pki }),
            cloud_env: aws.env(),
            clouds,
            kill_one_mid_day,
            ..Day::default()
        },
    )
    .await;
    check_the_day_in_aws(&aws).await;
}

/// What a played day leaves in DynamoDB and S3.
async fn check_the_day_in_aws(aws: &Aws) {
    use max300_cloud::{CommandState, PeriodStatus};
    let store = aws.store();
    let date: jiff::civil::Date = "2026-11-30".parse().unwrap();
    let day = store.commands(None, Some(date)).await.unwrap();
    assert_eq!(day.len(), 2, "{day:?}");
    for c in &day {
        assert_eq!(c.state, CommandState::Completed, "{c:?}");
        let detail = store.command(&c.message_id).await.unwrap().unwrap();
        assert_eq!(detail.periods.len(), 48);
        assert!(
            detail
                .periods
                .iter()
                .all(|p| p.status == PeriodStatus::Executed),
            "{detail:?}"
        );
        // Once each: one stored report per period, however often it was sent.
        let from = detail.periods[0].start;
        let to = from + jiff::SignedDuration::from_hours(24);
        let reports = store.reports(&c.device_id, from, to).await.unwrap();
        assert_eq!(reports.len(), 48, "{}", c.device_id);
    }
    // Nothing stuck: everything committed was published, no ingestion was left half-done.
    let all = store.commands(None, None).await.unwrap();
    assert!(
        all.iter().all(|c| c.state != CommandState::Created),
        "{all:?}"
    );
    assert_eq!(store.interrupted_ingestions().await.unwrap(), []);
    assert!(store.ingested(date).await.unwrap());
    // One fetch per date: the day's, and the next day's at 16:00. Each fetch keeps its raw
    // document, so a second run of either would show here.
    let fetched: Vec<String> = aws
        .objects("audit/raw/")
        .await
        .into_iter()
        .filter(|k| k.contains("-fetch-"))
        .collect();
    assert_eq!(fetched.len(), 2, "{fetched:?}");
}
