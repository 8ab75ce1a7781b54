//! The HTTP API and the feedback consumer, with the real service on port 0 and the embedded
//! broker; a raw MQTT client plays a device.

use std::sync::Arc;
use std::time::Duration;

use max300_cloud::{Cloud, CloudConfig};
use max300_mqtt::{Event, Qos, Session, SessionConfig};
use max300_protocol::message::{AckMsg, AckStatus, V1};
use max300_protocol::{Clock, DeviceId, ManualClock, Message, StoreId};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::eve;

struct TestApp {
    api: String,
    mqtt_port: u16,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
    http: reqwest::Client,
    clock: Arc<ManualClock>,
    _cloud: Cloud,
}

impl TestApp {
    async fn start(token: Option<&str>) -> TestApp {
        TestApp::start_in(tempfile::tempdir().unwrap(), token).await
    }

    /// Starts on an existing data dir, as after a restart.
    async fn start_in(dir: tempfile::TempDir, token: Option<&str>) -> TestApp {
        let broker = max300_mqtt::broker::start("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let mut config = CloudConfig::load(None, &[]).unwrap();
        config.data_dir = dir.path().to_path_buf();
        config.mqtt = format!("mqtt://{broker}");
        config.http = "127.0.0.1:0".into();
        config.api_token = token.map(str::to_owned);
        let clock = Arc::new(ManualClock::new(eve()));
        let shutdown = CancellationToken::new();
        let cloud = Cloud::start(config, clock.clone() as Arc<dyn Clock>, shutdown.clone())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), cloud.session.wait_connected())
            .await
            .expect("the cloud connects to the broker");
        TestApp {
            api: format!("http://{}", cloud.addr),
            mqtt_port: broker.port(),
            dir,
            shutdown,
            http: reqwest::Client::new(),
            clock,
            _cloud: cloud,
        }
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.api))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// An MQTT session playing `device`, subscribed to its inbound topics.
    async fn device(&self, device: &str) -> (Session, mpsc::Receiver<Message>) {
        let url = format!("mqtt://127.0.0.1:{}", self.mqtt_port)
            .parse()
            .unwrap();
        let id = DeviceId::parse(device).unwrap();
        let filters = max300_protocol::Topics::default().device_filters(&id);
        let config = SessionConfig::new(url, device, filters);
        let (session, mut events) = max300_mqtt::connect(config, self.shutdown.clone()).unwrap();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::Message(inbound) = event {
                    if let Ok(m) = &inbound.message {
                        let _ = tx.send(m.clone()).await;
                    }
                    inbound.ack().await;
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), session.wait_connected())
            .await
            .unwrap();
        (session, rx)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn next(rx: &mut mpsc::Receiver<Message>) -> Message {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message within 10 s")
        .expect("the channel is open")
}

fn document(rate: f64) -> String {
    json!({
        "schedule_date": "2026-11-30", "timezone": "Europe/London",
        "schedules": [
            {"device_id": "d1", "intervals": [{"period": 1, "mode": "charge", "rate_kw": rate}]},
            {"device_id": "d2", "intervals": [{"period": 2, "mode": "charge", "rate_kw": 999}]}
        ]
    })
    .to_string()
}

#[tokio::test]
async fn posting_a_document_publishes_accepted_commands_and_names_rejections() {
    let app = TestApp::start(None).await;
    let (_client, mut inbox) = app.device("d1").await;

    let (status, body) = app.post("/api/schedules", document(50.0)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["schedule_date"], "2026-11-30");
    assert_eq!(body["accepted"][0]["device_id"], "d1");
    assert_eq!(body["accepted"][0]["version"], 1);
    assert_eq!(
        body["rejected"],
        json!([{"device_id": "d2", "errors": ["schedules[1].intervals[0].rate_kw: 999 exceeds max_rate_kw 150"]}])
    );
    let Message::Schedule(msg) = next(&mut inbox).await else {
        panic!("expected a schedule")
    };
    assert_eq!(msg.message_id.as_str(), body["accepted"][0]["message_id"]);
    assert_eq!(msg.intervals.len(), 48);
    msg.to_schedule()
        .expect("a valid plan with a matching sha256");

    let (_, again) = app.post("/api/schedules", document(50.0)).await;
    assert_eq!(again["accepted"], json!([]));
    assert_eq!(again["unchanged"][0]["version"], 1);
    let (_, changed) = app.post("/api/schedules", document(40.0)).await;
    assert_eq!(changed["accepted"][0]["version"], 2);

    let (_, list) = app.get("/api/commands?device_id=d1&date=2026-11-30").await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[0]["state"], "sent");

    // The raw document and the rejection are in the audit folder.
    let audit = app.dir.path().join("audit");
    let count = |sub: &str| walk(&audit.join(sub));
    assert_eq!(count("raw"), 3);
    assert_eq!(count("rejections"), 3);
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn acks_move_the_command_and_are_receipted() {
    let app = TestApp::start(None).await;
    let (client, mut inbox) = app.device("d1").await;
    let (_, body) = app.post("/api/schedules", document(50.0)).await;
    let id = body["accepted"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let Message::Schedule(msg) = next(&mut inbox).await else {
        panic!("expected a schedule")
    };

    let ack = Message::Ack(AckMsg {
        v: V1,
        store_id: StoreId::parse("s1").unwrap(),
        seq: 7,
        message_id: msg.message_id.clone(),
        device_id: DeviceId::parse("d1").unwrap(),
        status: AckStatus::Accepted,
        reason: None,
        details: None,
        sha256: Some(msg.sha256.clone()),
        effective_period: Some(1),
        at: eve(),
        traceparent: None,
    });
    client
        .publish("max300/d1/ack".into(), ack.encode(), Qos::AtLeastOnce)
        .await
        .unwrap();
    let Message::Receipt(receipt) = next(&mut inbox).await else {
        panic!("expected a receipt")
    };
    assert_eq!(receipt.seqs, vec![7]);

    let (status, detail) = app.get(&format!("/api/commands/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(detail["state"], "acknowledged");
    assert_eq!(detail["acked_sha256"], msg.sha256);
    assert_eq!(detail["periods"][0]["status"], "pending");

    // A duplicate is receipted again and changes nothing.
    client
        .publish("max300/d1/ack".into(), ack.encode(), Qos::AtLeastOnce)
        .await
        .unwrap();
    let Message::Receipt(again) = next(&mut inbox).await else {
        panic!("expected a receipt")
    };
    assert_eq!(again.seqs, vec![7]);
    let (_, detail) = app.get(&format!("/api/commands/{id}")).await;
    assert_eq!(detail["history"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn spoofed_and_garbled_messages_are_dropped_without_harm() {
    let app = TestApp::start(None).await;
    let (client, mut inbox) = app.device("d1").await;
    let (_, body) = app.post("/api/schedules", document(50.0)).await;
    let id = body["accepted"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _ = next(&mut inbox).await;

    // d2's topic carrying an ack that claims to be from d1, then garbage, then a real ack.
    let spoof = json!({"type":"ack","v":1,"store_id":"s2","seq":1,"message_id":id,"device_id":"d1",
                       "status":"accepted","at":"2026-11-29T16:00:00Z"});
    client
        .publish(
            "max300/d2/ack".into(),
            spoof.to_string().into_bytes(),
            Qos::AtLeastOnce,
        )
        .await
        .unwrap();
    client
        .publish("max300/d1/ack".into(), "{not json".into(), Qos::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish("max300/d1/report".into(), vec![0xff; 10], Qos::AtLeastOnce)
        .await
        .unwrap();
    let real = json!({"type":"ack","v":1,"store_id":"s1","seq":2,"message_id":id,"device_id":"d1",
                      "status":"rejected","reason":"rate_above_max","at":"2026-11-29T16:00:00Z"});
    client
        .publish(
            "max300/d1/ack".into(),
            real.to_string().into_bytes(),
            Qos::AtLeastOnce,
        )
        .await
        .unwrap();
    let Message::Receipt(receipt) = next(&mut inbox).await else {
        panic!("expected a receipt")
    };
    assert_eq!(receipt.seqs, vec![2], "only the real ack is receipted");
    let (_, detail) = app.get(&format!("/api/commands/{id}")).await;
    assert_eq!(detail["state"], "rejected");
}

#[tokio::test]
async fn bad_requests_get_json_errors_with_the_right_status() {
    let app = TestApp::start(None).await;
    let (status, body) = app.post("/api/schedules", "<xml/>").await;
    assert_eq!(status, 422);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a JSON object"),
        "{body}"
    );

    let wrong_zone = json!({"schedule_date":"2026-11-30","timezone":"Europe/Paris","schedules":[]});
    let (status, body) = app.post("/api/schedules", wrong_zone.to_string()).await;
    assert_eq!(status, 422);
    assert!(
        body["error"].as_str().unwrap().contains("Europe/London"),
        "{body}"
    );

    let (status, body) = app.post("/api/ingest?date=2026-11-30", "").await;
    assert_eq!(status, 409, "no provider configured: {body}");
    let (status, _) = app.post("/api/ingest?date=tomorrow", "").await;
    assert_eq!(status, 400);

    let (status, body) = app.get("/api/commands/01NOPE").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("does not exist"));
    let (status, _) = app.get("/api/commands?date=30-11-2026").await;
    assert_eq!(status, 400);
    let (status, _) = app.get("/api/devices/bad%20id").await;
    assert_eq!(status, 400);

    let r = app
        .http
        .post(format!("{}/api/devices", app.api))
        .json(&json!({"device_id": "d/1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = app
        .http
        .post(format!("{}/api/devices", app.api))
        .json(&json!({"device_id": "d1", "max_rate_kw": 80}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (_, device) = app.get("/api/devices/d1").await;
    assert_eq!(device["max_rate_kw"], 80.0);
    assert_eq!(device["online"], false);

    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
}

#[tokio::test]
async fn writes_need_the_token_when_one_is_set() {
    let token = "a-long-enough-test-token";
    let app = TestApp::start(Some(token)).await;
    let (status, body) = app.post("/api/schedules", document(50.0)).await;
    assert_eq!(status, 401, "{body}");
    let r = app
        .http
        .post(format!("{}/api/schedules", app.api))
        .bearer_auth(token)
        .body(document(50.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (status, _) = app.get("/api/commands").await;
    assert_eq!(status, 200, "reads are open unless protect_reads is set");
}

#[tokio::test]
async fn an_unacknowledged_command_is_published_again_after_the_ack_timeout() {
    let app = TestApp::start(None).await;
    let (_client, mut inbox) = app.device("d1").await;
    let (_, body) = app.post("/api/schedules", document(50.0)).await;
    let Message::Schedule(first) = next(&mut inbox).await else {
        panic!("expected a schedule")
    };
    app.clock.advance(jiff::SignedDuration::from_secs(61));
    let Message::Schedule(again) = next(&mut inbox).await else {
        panic!("expected a resend")
    };
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.sha256, first.sha256);
    let id = body["accepted"][0]["message_id"].as_str().unwrap();
    let (_, detail) = app.get(&format!("/api/commands/{id}")).await;
    assert_eq!(detail["publishes"], 2);
    assert_eq!(detail["state"], "sent");
}

#[tokio::test]
async fn an_operator_cancel_sends_a_control_message_and_ends_the_command() {
    let app = TestApp::start(None).await;
    let (_client, mut inbox) = app.device("d1").await;
    let (_, body) = app.post("/api/schedules", document(50.0)).await;
    let id = body["accepted"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _ = next(&mut inbox).await;

    let (status, answer) = app.post(&format!("/api/commands/{id}/cancel"), "").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "cancelled");
    let Message::Control(control) = next(&mut inbox).await else {
        panic!("expected a control")
    };
    assert_eq!(control.target_message_id.as_str(), id);
    assert_eq!(control.message_id.as_str(), answer["control_message_id"]);
    let (_, detail) = app.get(&format!("/api/commands/{id}")).await;
    assert_eq!(detail["state"], "cancelled");

    let (status, again) = app.post(&format!("/api/commands/{id}/cancel"), "").await;
    assert_eq!(status, 409, "{again}");
    let (status, _) = app.post("/api/commands/01NOPE/cancel", "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_interrupted_ingestion_is_run_again_at_start_up() {
    use max300_cloud::store::CommandStore as _;
    let dir = tempfile::tempdir().unwrap();
    // A run that kept its raw document and started, then the service died.
    let raw = dir.path().join("audit/raw/2026-11-29/interrupted.json");
    std::fs::create_dir_all(raw.parent().unwrap()).unwrap();
    std::fs::write(&raw, document(50.0)).unwrap();
    {
        let store = max300_cloud::SqliteStore::open(&dir.path().join("cloud.sqlite")).unwrap();
        store
            .begin_ingestion(
                "2026-11-30".parse().unwrap(),
                "fetch",
                "raw/2026-11-29/interrupted.json",
                eve(),
            )
            .await
            .unwrap();
    }
    let app = TestApp::start_in(dir, None).await;
    let mut found = false;
    for _ in 0..50 {
        let (_, list) = app.get("/api/commands?date=2026-11-30").await;
        if list.as_array().is_some_and(|l| !l.is_empty()) {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found, "the replay created the command");
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 200);
}
