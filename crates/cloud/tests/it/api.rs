//! The HTTP API and the feedback consumer, with the real service on port 0 and the embedded
//! broker; a raw MQTT client plays a device.

use std::sync::Arc;
use std::time::Duration;

use max300_cloud::{Cloud, CloudConfig};
use max300_mqtt::{Event, Qos, Session, SessionConfig};
use max300_protocol::error::Chain;
use max300_protocol::message::{AckMsg, AckStatus, ScheduleMsg, V1};
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
    /// The service; taken when it is stopped for a restart.
    cloud: Option<Cloud>,
}

impl TestApp {
    async fn start(token: Option<&str>) -> TestApp {
        TestApp::start_in(tempfile::tempdir().unwrap(), token).await
    }

    /// Starts on an existing data dir, as after a restart.
    async fn start_in(dir: tempfile::TempDir, token: Option<&str>) -> TestApp {
        TestApp::start_with(dir, token, None).await
    }

    /// Starts with a schedule provider (no daily fetch: the test asks for each fetch).
    async fn start_with(
        dir: tempfile::TempDir,
        token: Option<&str>,
        provider: Option<String>,
    ) -> TestApp {
        let broker = max300_mqtt::broker::start("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let mut config = CloudConfig::load(None, &[]).unwrap();
        config.provider = provider;
        config.daily_fetch = false;
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
            cloud: Some(cloud),
        }
    }

    fn cloud(&self) -> &Cloud {
        self.cloud.as_ref().expect("the service runs")
    }

    /// Stops the service, waits for every task of it to end, and starts it again on the
    /// same data dir, as after a restart.
    async fn restart(mut self, provider: Option<String>) -> TestApp {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        self.shutdown.cancel();
        if let Some(cloud) = self.cloud.take() {
            cloud.wait().await;
        }
        TestApp::start_with(dir, None, provider).await
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

    /// Registers a device through the API.
    async fn register(&self, device: &str) {
        let r = self.http.post(format!("{}/api/devices", self.api));
        let r = r
            .json(&json!({ "device_id": device }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "registering {device}");
    }

    /// A `/metrics` scrape.
    async fn metrics(&self) -> String {
        let r = self.http.get(format!("{}/metrics", self.api)).send();
        r.await.unwrap().text().await.unwrap()
    }

    /// `device` connected, with a plan for it posted (d2's in the same document is refused):
    /// its session, its inbox, the command's id and the schedule it received.
    async fn planned(
        &self,
        device: &str,
    ) -> (Session, mpsc::Receiver<Message>, String, ScheduleMsg) {
        let (client, mut inbox) = self.device(device).await;
        let (_, body) = self.post("/api/schedules", document(50.0)).await;
        let id = body["accepted"][0]["message_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let Message::Schedule(msg) = next(&mut inbox).await else {
            panic!("expected a schedule")
        };
        (client, inbox, id, msg)
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
    let (client, mut inbox, id, msg) = app.planned("d1").await;

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

/// Item 4: an ack cannot make the store do unbounded work. Acks whose effective period is
/// not one of the plan's are receipted (the device's outbox lets them go), counted as
/// refused, and change nothing; the real ack behind them still applies.
#[tokio::test]
async fn a_hostile_ack_is_receipted_refused_and_changes_nothing() {
    let app = TestApp::start(None).await;
    let (client, mut inbox, id, msg) = app.planned("d1").await;
    let (_, before) = app.get(&format!("/api/commands/{id}")).await;
    let ack = |seq: u64, effective: u32| {
        Message::Ack(AckMsg {
            v: V1,
            store_id: StoreId::parse("s1").unwrap(),
            seq,
            message_id: msg.message_id.clone(),
            device_id: DeviceId::parse("d1").unwrap(),
            status: AckStatus::Accepted,
            reason: None,
            details: None,
            sha256: Some(msg.sha256.clone()),
            effective_period: Some(effective),
            at: eve(),
            traceparent: None,
        })
    };
    for (seq, effective) in [(1, 4_294_967_295), (2, 0), (3, 100)] {
        client
            .publish(
                "max300/d1/ack".into(),
                ack(seq, effective).encode(),
                Qos::AtLeastOnce,
            )
            .await
            .unwrap();
        let Message::Receipt(receipt) = next(&mut inbox).await else {
            panic!("expected a receipt")
        };
        assert_eq!(receipt.seqs, vec![seq]);
        let (_, after) = app.get(&format!("/api/commands/{id}")).await;
        assert_eq!(
            after, before,
            "effective_period {effective} changed the command"
        );
    }
    assert!(
        app.metrics()
            .await
            .contains(r#"max300_inbound_messages_total{type="ack",outcome="refused"} 3"#)
    );
    client
        .publish("max300/d1/ack".into(), ack(4, 1).encode(), Qos::AtLeastOnce)
        .await
        .unwrap();
    let Message::Receipt(receipt) = next(&mut inbox).await else {
        panic!("expected a receipt")
    };
    assert_eq!(receipt.seqs, vec![4]);
    let (_, after) = app.get(&format!("/api/commands/{id}")).await;
    assert_eq!(after["state"], "acknowledged");
}

/// Item 7: an unregistered device's messages are refused without a store lookup each, and
/// are not receipted: its outbox keeps them, and once it is registered they count.
#[tokio::test]
async fn an_unregistered_devices_messages_wait_in_its_outbox_until_it_is_registered() {
    let app = TestApp::start(None).await;
    let (client, mut inbox) = app.device("ghost").await;
    let hb = json!({"type":"heartbeat","v":1,"device_id":"ghost","at":"2026-11-29T16:00:00Z",
                    "uptime_s":1,"agent_version":"x","mode":"idle","rate_kw":0,"outbox":0});
    let ack = json!({"type":"ack","v":1,"store_id":"s1","seq":9,"message_id":"m-none",
                     "device_id":"ghost","status":"rejected","reason":"invalid",
                     "at":"2026-11-29T16:00:00Z"});
    for _ in 0..50 {
        for (topic, m) in [("max300/ghost/heartbeat", &hb), ("max300/ghost/ack", &ack)] {
            client
                .publish(topic.into(), m.to_string().into_bytes(), Qos::AtLeastOnce)
                .await
                .unwrap();
        }
    }
    let refused = read_until(
        || async {
            let text = app.metrics().await;
            metric_value(&text, r#"type="ack",outcome="unknown_device""#)
        },
        |n| *n >= 50,
    )
    .await;
    assert_eq!(refused, 50, "every ack of the stranger was refused");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), inbox.recv())
            .await
            .is_err(),
        "nothing was receipted"
    );
    let (status, _) = app.get("/api/devices/ghost").await;
    assert_eq!(status, 404, "nothing of the stranger was kept");
    // Registered, it is heard (after at most the second the miss is remembered for).
    app.register("ghost").await;
    let deadline = max300_protocol::clock::monotonic() + Duration::from_secs(10);
    loop {
        client
            .publish(
                "max300/ghost/ack".into(),
                ack.to_string().into_bytes(),
                Qos::AtLeastOnce,
            )
            .await
            .unwrap();
        if let Ok(Some(Message::Receipt(r))) =
            tokio::time::timeout(Duration::from_millis(200), inbox.recv()).await
        {
            assert_eq!(r.seqs, vec![9]);
            break;
        }
        assert!(
            max300_protocol::clock::monotonic() < deadline,
            "never heard"
        );
    }
}

fn metric_value(text: &str, labels: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with("max300_inbound_messages_total{") && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
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
    assert_eq!(
        ready,
        json!({"store": "ok", "broker": "connected", "subscription": null})
    );
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
    // The resend is recorded once it went out, so it may be read a moment before that.
    let detail = get_until(&app, &format!("/api/commands/{id}"), |d| {
        d["publishes"] == 2
    })
    .await;
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
    let (_, list) = read_until(
        || app.get("/api/commands?date=2026-11-30"),
        |(_, list)| list.as_array().is_some_and(|l| !l.is_empty()),
    )
    .await;
    assert!(
        list.as_array().is_some_and(|l| !l.is_empty()),
        "the replay created the command: {list}"
    );
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 200);
}

/// Item 2: a replayed ingestion never undoes a newer plan. Fetch A fails at the audit step
/// (and a crash, played here, left another run of A open), the retry of A succeeds, the
/// operator posts B, the cloud restarts: the units still run B.
#[tokio::test]
async fn a_replay_never_brings_back_a_plan_that_a_later_one_replaced() {
    use axum::routing::get;
    let provider = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/tomorrow", provider.local_addr().unwrap());
    let app = axum::Router::new().route("/tomorrow", get(|| async { document(50.0) }));
    tokio::spawn(async move { axum::serve(provider, app).await });

    let dir = tempfile::tempdir().unwrap();
    // The audit step after the commit (the rejected d2 is kept) fails: its folder is a file.
    let blocked = dir.path().join("audit/rejections");
    std::fs::create_dir_all(blocked.parent().unwrap()).unwrap();
    std::fs::write(&blocked, "not a folder").unwrap();
    let app = TestApp::start_with(dir, None, Some(url.clone())).await;
    let store = app.cloud().store.clone();
    let (status, failed) = app.post("/api/ingest?date=2026-11-30", "").await;
    assert_eq!(status, 500, "{failed}");
    assert_eq!(
        store.interrupted_ingestions().await.unwrap(),
        [],
        "an error closes its run as failed: nothing to replay"
    );
    // A crash in the middle of another fetch of A leaves its run open.
    let raws: Vec<_> = std::fs::read_dir(app.dir.path().join("audit/raw/2026-11-29"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    store
        .begin_ingestion(
            "2026-11-30".parse().unwrap(),
            "fetch",
            &format!("raw/2026-11-29/{}", raws[0]),
            eve(),
        )
        .await
        .unwrap();
    std::fs::remove_file(&blocked).unwrap();
    let (status, retried) = app.post("/api/ingest?date=2026-11-30", "").await;
    assert_eq!(status, 200, "{retried}");
    let (status, b) = app.post("/api/schedules", document(80.0)).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["accepted"][0]["version"], 2);

    let app = app.restart(Some(url)).await;
    let store = app.cloud().store.clone();
    let open = read_until(
        || async { store.interrupted_ingestions().await.unwrap() },
        Vec::is_empty,
    )
    .await;
    assert!(
        open.is_empty(),
        "the overtaken run is closed at start-up, not left open: {open:?}"
    );
    let d1 = DeviceId::parse("d1").unwrap();
    let current = store
        .current_commands(&d1, "2026-11-30".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].version, 2, "B stands");
    let (_, versions) = app.get("/api/commands?device_id=d1&date=2026-11-30").await;
    assert_eq!(
        versions.as_array().unwrap().len(),
        2,
        "no third version: {versions}"
    );
}

/// (what, topic, payload, the decode error must contain)
fn malformed() -> Vec<(&'static str, &'static str, Vec<u8>, &'static str)> {
    let ack = json!({"type":"ack","v":1,"store_id":"s1","seq":1,"message_id":"m1","device_id":"d1",
                     "status":"accepted","at":"2026-11-29T16:00:00Z"});
    let report = json!({"type":"report","v":1,"store_id":"s1","seq":2,"message_id":null,"device_id":"d1",
                        "period":1,"interval_start":"2026-11-30T00:00:00Z","mode":"idle","rate_kw":0,
                        "status":"skipped","at":"2026-11-30T00:00:00Z"});
    let hb = json!({"type":"heartbeat","v":1,"device_id":"d1","at":"2026-11-29T16:00:00Z","uptime_s":1,
                    "agent_version":"x","mode":"idle","rate_kw":0});
    let with = |base: &Value, key: &str, value: Value| {
        let mut v = base.clone();
        v[key] = value;
        v.to_string().into_bytes()
    };
    let without = |base: &Value, key: &str| {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(key);
        v.to_string().into_bytes()
    };
    let (a, r, h, s) = (
        "max300/d1/ack",
        "max300/d1/report",
        "max300/d1/heartbeat",
        "max300/d1/sync",
    );
    vec![
        (
            "broken JSON",
            a,
            b"{not json".to_vec(),
            "key must be a string",
        ),
        ("an empty payload", a, Vec::new(), "EOF while parsing"),
        ("a JSON array", a, b"[]".to_vec(), "missing field `type`"),
        ("no type", a, br#"{"v":1}"#.to_vec(), "missing field `type`"),
        (
            "an unknown type",
            a,
            br#"{"type":"reboot","v":1}"#.to_vec(),
            "unknown variant `reboot`",
        ),
        (
            "a missing seq",
            a,
            without(&ack, "seq"),
            "missing field `seq`",
        ),
        (
            "seq as a string",
            a,
            with(&ack, "seq", json!("7")),
            "invalid type: string \"7\", expected u64",
        ),
        (
            "a negative seq",
            a,
            with(&ack, "seq", json!(-1)),
            "invalid value: integer `-1`",
        ),
        (
            "protocol version 2",
            a,
            with(&ack, "v", json!(2)),
            "unsupported protocol version v=2",
        ),
        ("no version", a, without(&ack, "v"), "missing field `v`"),
        (
            "an unknown ack status",
            a,
            with(&ack, "status", json!("maybe")),
            "unknown variant `maybe`",
        ),
        (
            "a device id with a slash",
            a,
            with(&ack, "device_id", json!("a/b")),
            "device_id \"a/b\" is not valid",
        ),
        (
            "an empty message id",
            a,
            with(&ack, "message_id", json!("")),
            "message_id \"\" is not valid",
        ),
        (
            "an instant that is not one",
            a,
            with(&ack, "at", json!("yesterday")),
            "failed to parse",
        ),
        (
            "a negative rate",
            r,
            with(&report, "rate_kw", json!(-5)),
            "rate_kw -5 is negative",
        ),
        (
            "a rate as a string",
            r,
            with(&report, "rate_kw", json!("fast")),
            "expected f64",
        ),
        (
            "a period that does not fit",
            r,
            with(&report, "period", json!(1u64 << 40)),
            "expected u32",
        ),
        (
            "an unknown report status",
            r,
            with(&report, "status", json!("done")),
            "unknown variant `done`",
        ),
        (
            "an instant without an offset",
            r,
            with(&report, "interval_start", json!("2026-11-30T00:00:00")),
            "offset",
        ),
        (
            "a state of charge as a string",
            h,
            with(&hb, "soc_pct", json!("full")),
            "expected f64",
        ),
        (
            "an unknown mode",
            h,
            with(&hb, "mode", json!("boost")),
            "unknown variant `boost`",
        ),
        (
            "a sync whose have is not a list",
            s,
            br#"{"type":"sync","v":1,"device_id":"d1","have":{}}"#.to_vec(),
            "expected a sequence",
        ),
        (
            "an oversized payload",
            r,
            // Over the 128 KiB message limit, under the MQTT packet limit.
            vec![b' '; 140_000],
            "exceeds 131072",
        ),
        (
            "bytes that are not UTF-8",
            r,
            vec![0xff, 0xfe, 0x7b],
            "expected value",
        ),
        (
            "deep nesting",
            r,
            "[".repeat(1000).into_bytes(),
            "invalid type: sequence",
        ),
    ]
}

#[tokio::test]
async fn malformed_messages_each_get_a_clear_error_and_change_nothing() {
    let app = TestApp::start(None).await;
    let (device, mut inbox, id, plan) = app.planned("d1").await;
    let (_, before) = app.get(&format!("/api/commands/{id}")).await;

    let cases = malformed();
    for (what, _, payload, expected) in &cases {
        let err = Chain(&Message::decode(payload).expect_err(what)).to_string();
        assert!(err.contains(expected), "{what}: {err:?} lacks {expected:?}");
    }
    // Well-formed, but not acceptable where they arrive.
    let spoofed = json!({"type":"ack","v":1,"store_id":"s1","seq":1,"message_id":id,"device_id":"d1",
                         "status":"accepted","at":"2026-11-29T16:00:00Z"});
    let mut routed: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "a spoofed device id",
            "max300/d2/ack",
            spoofed.to_string().into_bytes(),
        ),
        (
            "an ack on the report topic",
            "max300/d1/report",
            spoofed.to_string().into_bytes(),
        ),
        (
            "a schedule from a device",
            "max300/d1/ack",
            Message::Schedule(plan.clone()).encode(),
        ),
    ];
    let stranger = json!({"type":"heartbeat","v":1,"device_id":"nobody","at":"2026-11-29T16:00:00Z",
                          "uptime_s":1,"agent_version":"x","mode":"idle","rate_kw":0});
    routed.push((
        "an unregistered device",
        "max300/nobody/heartbeat",
        stranger.to_string().into_bytes(),
    ));
    assert!(cases.len() + routed.len() >= 29);

    for (_, topic, payload, _) in &cases {
        device
            .publish(topic.to_string(), payload.clone(), Qos::AtLeastOnce)
            .await
            .unwrap();
    }
    for (_, topic, payload) in &routed {
        device
            .publish(topic.to_string(), payload.clone(), Qos::AtLeastOnce)
            .await
            .unwrap();
    }
    // The cloud still works: a real ack behind them is applied and receipted.
    let real = json!({"type":"ack","v":1,"store_id":"s1","seq":99,"message_id":id,"device_id":"d1",
                      "status":"accepted","sha256":plan.sha256,"effective_period":1,"at":"2026-11-29T16:00:00Z"});
    device
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
    assert_eq!(receipt.seqs, vec![99], "nothing malformed was receipted");

    // The broker keeps order within a topic filter, not across them (rumqttd serves each
    // filter from a log of its own): the heartbeat and report topics' messages may still be
    // on their way when the ack's receipt is in.
    let counted = |m: &str| {
        (
            sum_of(m, r#"outcome="invalid""#) as usize,
            sum_of(m, r#"outcome="unknown_device""#) as usize,
        )
    };
    let expected = (cases.len() + 3, 1);
    let metrics = read_until(
        || async { app.cloud().metrics.render() },
        |m| {
            let (invalid, unknown) = counted(m);
            invalid >= expected.0 && unknown >= expected.1
        },
    )
    .await;
    assert_eq!(counted(&metrics), expected, "{metrics}");
    let (_, after) = app.get(&format!("/api/commands/{id}")).await;
    assert_eq!(before["state"], "sent");
    assert_eq!(after["state"], "acknowledged", "only the real ack moved it");
    assert_eq!(after["periods"], before["periods"]);
    let metrics = app.metrics().await;
    assert_eq!(
        sum_of(&metrics, r#"outcome="invalid""#) as usize,
        cases.len() + 3,
        "the scrape agrees: {metrics}"
    );
    assert!(
        metrics.contains("max300_commands{state=\"acknowledged\"} 1"),
        "{metrics}"
    );
    let (_, devices) = app.get("/api/devices").await;
    let ids: Vec<&str> = devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d1"], "the unregistered device was not added");
}

#[tokio::test]
async fn malformed_documents_and_requests_get_json_errors_and_change_nothing() {
    let app = TestApp::start(None).await;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "HTML instead of JSON",
            "<html>".into(),
            422,
            "not a JSON object",
        ),
        (
            "truncated JSON",
            "{\"schedule_date\":".into(),
            422,
            "not a JSON object",
        ),
        (
            "no date",
            json!({"timezone":"Europe/London","schedules":[]}).to_string(),
            422,
            "schedule_date: missing",
        ),
        (
            "a date that is not one",
            json!({"schedule_date":"30/11/2026","timezone":"Europe/London","schedules":[]})
                .to_string(),
            422,
            "is not a date",
        ),
        (
            "another zone",
            json!({"schedule_date":"2026-11-30","timezone":"America/New_York","schedules":[]})
                .to_string(),
            422,
            "not the fleet's zone",
        ),
        (
            "schedules as an object",
            json!({"schedule_date":"2026-11-30","timezone":"Europe/London","schedules":{}})
                .to_string(),
            422,
            "expected an array",
        ),
    ];
    for (what, body, status, expected) in cases {
        let (got, answer) = app.post("/api/schedules", body).await;
        assert_eq!(got, status, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{what}: {error:?}");
    }
    let (got, _) = app
        .post("/api/schedules", vec![b' '; 65 * 1024 * 1024])
        .await;
    assert_eq!(got, 413, "a body over the 64 MiB limit");
    let (_, list) = app.get("/api/commands").await;
    assert_eq!(list, json!([]), "nothing was created");
}

/// The sum of the inbound-message counters whose labels contain `label`.
fn sum_of(metrics: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("max300_inbound_messages_total{") && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the fleet view satisfies `ok`, as the feedback consumer applies messages in
/// the background.
async fn fleet_until(app: &TestApp, ok: impl Fn(&Value) -> bool) -> Value {
    get_until(app, "/api/fleet", ok).await
}

/// Waits until what `path` answers satisfies `ok`: the service records what it did (a
/// publish, an applied message) in the background, after it did it.
async fn get_until(app: &TestApp, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let (status, body) = read_until(|| app.get(path), |(s, b)| *s != 200 || ok(b)).await;
    assert_eq!(status, 200, "{body}");
    assert!(ok(&body), "{path} never got there: {body}");
    body
}

/// Reads with `read` until `done` holds of what it read, for up to 10 s, and returns the last
/// read either way, for the caller to assert on: the service records what it did (a publish,
/// an applied message, a count) in the background, after it did it.
async fn read_until<T, F: std::future::Future<Output = T>>(
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = max300_protocol::clock::monotonic() + Duration::from_secs(10);
    loop {
        let value = read().await;
        if done(&value) || max300_protocol::clock::monotonic() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn line<'a>(fleet: &'a Value, device: &str) -> &'a Value {
    fleet["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device)
        .unwrap_or_else(|| panic!("{device} is not in {fleet}"))
}

#[tokio::test]
async fn the_fleet_view_raises_alerts_sorts_problems_first_and_follows_the_day() {
    let app = TestApp::start(None).await;
    let (client, mut inbox) = app.device("d1").await;
    app.register("d2").await;
    // d1's plan for tomorrow is accepted; d2's is refused (999 kW is over its limit).
    let (_, body) = app.post("/api/schedules", document(50.0)).await;
    assert_eq!(body["rejected"][0]["device_id"], "d2", "{body}");
    let Message::Schedule(plan) = next(&mut inbox).await else {
        panic!("expected a schedule")
    };
    let ack = json!({"type":"ack","v":1,"store_id":"s1","seq":1,"message_id":plan.message_id,
                     "device_id":"d1","status":"accepted","sha256":plan.sha256,"effective_period":1,
                     "at":"2026-11-29T16:00:00Z"});
    let hb = json!({"type":"heartbeat","v":1,"device_id":"d1","at":"2026-11-29T16:00:00Z","uptime_s":1,
                    "agent_version":"x","mode":"idle","rate_kw":0,"soc_pct":40.0,"outbox":0});
    for (topic, m) in [("max300/d1/ack", &ack), ("max300/d1/heartbeat", &hb)] {
        client
            .publish(topic.into(), m.to_string().into_bytes(), Qos::AtLeastOnce)
            .await
            .unwrap();
    }

    // 16:00: d2 was never heard from; nothing is due yet.
    let fleet = fleet_until(&app, |f| {
        f["devices"].as_array().unwrap().len() == 2
            && line(f, "d1")["tomorrow"]["state"] == "acknowledged"
            && line(f, "d1")["soc_pct"] == 40.0
    })
    .await;
    assert_eq!(fleet["today"], "2026-11-29");
    assert_eq!(fleet["tomorrow"], "2026-11-30");
    assert_eq!(
        fleet["devices"][0]["device_id"], "d2",
        "problems first: {fleet}"
    );
    assert_eq!(line(&fleet, "d2")["alerts"], json!(["offline"]));
    assert_eq!(line(&fleet, "d2")["tomorrow"], Value::Null);
    assert_eq!(line(&fleet, "d1")["alerts"], json!([]));
    assert_eq!(line(&fleet, "d1")["online"], true);
    assert_eq!(fleet["summary"]["alerts"]["offline"], 1);
    assert_eq!(fleet["summary"]["alerts"]["plan_missing"], 0);

    // 22:30: d2 still has no plan for tomorrow, and it is past plan_due_at (22:00).
    app.clock.set("2026-11-29T22:30:00Z".parse().unwrap());
    let (_, fleet) = app.get("/api/fleet").await;
    assert_eq!(
        line(&fleet, "d2")["alerts"],
        json!(["offline", "plan_missing"])
    );
    assert_eq!(
        line(&fleet, "d1")["alerts"],
        json!(["offline"]),
        "acknowledged, but silent for 6.5 h: {fleet}"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"max300_alerts{kind="plan_missing"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"max300_alerts{kind="offline"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("max300_ack_latency_seconds_count 1"),
        "{metrics}"
    );

    // 00:45 on the day: period 1 ran as planned, so d1 conforms 1 of 1.
    app.clock.set("2026-11-30T00:45:00Z".parse().unwrap());
    let report = json!({"type":"report","v":1,"store_id":"s1","seq":2,"message_id":plan.message_id,
                        "device_id":"d1","period":1,"interval_start":"2026-11-30T00:00:00Z",
                        "mode":"charge","rate_kw":50,"status":"executed","applied_kw":50,
                        "soc_pct":45.5,"energy_kwh":24.6,"at":"2026-11-30T00:30:01Z"});
    client
        .publish(
            "max300/d1/report".into(),
            report.to_string().into_bytes(),
            Qos::AtLeastOnce,
        )
        .await
        .unwrap();
    let fleet = fleet_until(&app, |f| line(f, "d1")["conformance"]["as_planned"] == 1).await;
    assert_eq!(
        line(&fleet, "d1")["conformance"],
        json!({"as_planned": 1, "due": 1, "ratio": 1.0})
    );
    assert_eq!(line(&fleet, "d1")["today"]["state"], "acknowledged");

    let (status, day) = app.get("/api/devices/d1/day?date=2026-11-30").await;
    assert_eq!(status, 200, "{day}");
    assert_eq!(day["period_count"], 48);
    let p1 = &day["periods"][0];
    assert_eq!(
        (
            &p1["status"],
            &p1["signed_kw"],
            &p1["planned_kwh"],
            &p1["delivered_kwh"],
            &p1["soc_pct"]
        ),
        (
            &json!("executed"),
            &json!(50.0),
            &json!(25.0),
            // What the unit says it delivered, not the plan.
            &json!(24.6),
            &json!(45.5)
        )
    );
    assert_eq!(day["periods"][1]["status"], "pending");
    assert_eq!(day["periods"][1]["local_start"], "00:30");
    assert_eq!(day["command"]["acked_sha256"], plan.sha256);
    assert_eq!(day["command"]["sends"].as_array().unwrap().len(), 1);
    assert_eq!(day["reports"][0]["period"], 1);

    // A clock-change day has 50 periods, and its repeated hour is told apart by the offset.
    let (_, dst) = app.get("/api/devices/d1/day?date=2026-10-25").await;
    assert_eq!(dst["period_count"], 50);
    assert_eq!(dst["command"], Value::Null);
    let (p3, p5) = (&dst["periods"][2], &dst["periods"][4]);
    assert_eq!(
        (&p3["local_start"], &p3["utc_offset"]),
        (&json!("01:00"), &json!("+01:00"))
    );
    assert_eq!(
        (&p5["local_start"], &p5["utc_offset"]),
        (&json!("01:00"), &json!("+00:00"))
    );
    assert_eq!(p3["status"], "none");

    // A report of a day the device has no command for is refused (a device cannot fill the
    // store with days of its own making), but answered, so its outbox lets it go.
    let idle = json!({"type":"report","v":1,"store_id":"s1","seq":3,"message_id":null,
                      "device_id":"d1","period":33,"interval_start":"2026-11-29T16:00:00Z",
                      "mode":"idle","rate_kw":0,"status":"skipped","reason":"no_schedule",
                      "at":"2026-11-29T16:00:02Z"});
    client
        .publish(
            "max300/d1/report".into(),
            idle.to_string().into_bytes(),
            Qos::AtLeastOnce,
        )
        .await
        .unwrap();
    loop {
        if let Message::Receipt(r) = next(&mut inbox).await
            && r.seqs.contains(&3)
        {
            break;
        }
    }
    let (_, eve_day) = app.get("/api/devices/d1/day?date=2026-11-29").await;
    assert_eq!(eve_day["periods"][32]["status"], "none", "{eve_day}");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"max300_inbound_messages_total{type="report",outcome="refused"} 1"#),
        "{metrics}"
    );
    assert_eq!(eve_day["periods"][31]["status"], "none");

    let (status, _) = app.get("/api/devices/nobody/day").await;
    assert_eq!(status, 404);
    let (status, err) = app.get("/api/devices/d1/day?date=2026-13-01").await;
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("date"), "{err}");
}

/// Device `d1`, registered and heard from at `soc` %, as the fleet view shows it: its client
/// and its inbox.
async fn unit_at_soc(app: &TestApp, soc: f64) -> (Session, mpsc::Receiver<Message>) {
    let (client, inbox) = app.device("d1").await;
    app.register("d1").await;
    let hb = json!({"type":"heartbeat","v":1,"device_id":"d1","at":"2026-11-29T16:00:00Z","uptime_s":1,
                    "agent_version":"x","mode":"idle","rate_kw":0,"soc_pct":soc,"outbox":0});
    client
        .publish(
            "max300/d1/heartbeat".into(),
            hb.to_string().into_bytes(),
            Qos::AtLeastOnce,
        )
        .await
        .unwrap();
    fleet_until(app, |f| line(f, "d1")["soc_pct"] == soc).await;
    (client, inbox)
}

#[tokio::test]
async fn a_plan_that_would_overcharge_a_unit_is_accepted_with_a_warning() {
    let app = TestApp::start(None).await;
    let (_client, mut inbox) = unit_at_soc(&app, 85.0).await;

    // 50 kW for half an hour is 25 kWh, about 8 % of 300 kWh: 85 % would pass soc_max (90 %).
    let (status, body) = app.post("/api/schedules", document(50.0)).await;
    assert_eq!(status, 200, "{body}");
    let id = body["accepted"][0]["message_id"].as_str().unwrap();
    assert_eq!(body["warnings"][0]["device_id"], "d1", "{body}");
    assert_eq!(body["warnings"][0]["message_id"], id);
    let warning = body["warnings"][0]["warning"].as_str().unwrap();
    assert!(
        warning.contains("soc_max in period 1"),
        "names the limit and the period: {warning}"
    );
    let Message::Schedule(_) = next(&mut inbox).await else {
        panic!("the plan is delivered all the same")
    };
    let (_, detail) = app.get(&format!("/api/commands/{id}")).await;
    assert_eq!(detail["warning"], warning, "kept with the command");
    let (_, day) = app.get("/api/devices/d1/day?date=2026-11-30").await;
    assert_eq!(day["command"]["warning"], warning);
}

#[tokio::test]
async fn tomorrows_plan_is_checked_from_where_the_rest_of_todays_leaves_the_unit() {
    let app = TestApp::start(None).await;
    let _unit = unit_at_soc(&app, 50.0).await;
    // This evening, 16:00-17:00: two periods of 60 kW out, 30 kWh each, about 10.7 % of
    // 300 kWh each with the default pack's losses: 50 % -> about 29 %.
    let evening: Vec<Value> = (33..=34)
        .map(|p| json!({"period": p, "mode": "discharge", "rate_kw": 60}))
        .collect();
    let today = json!({"schedule_date": "2026-11-29", "timezone": "Europe/London",
                       "schedules": [{"device_id": "d1", "intervals": evening}]});
    let (status, body) = app.post("/api/schedules", today.to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["warnings"],
        json!([]),
        "50 % -> 29 % is within the window"
    );
    // Tomorrow's first three periods at 60 kW: from about 29 %, the second reaches soc_min
    // (10 %). From the 50 % the unit reports now, all three would run (50 -> 18 %).
    let tomorrow = json!({"schedule_date": "2026-11-30", "timezone": "Europe/London",
        "schedules": [{"device_id": "d1", "intervals": (1..=3)
            .map(|p| json!({"period": p, "mode": "discharge", "rate_kw": 60}))
            .collect::<Vec<_>>()}]});
    let (status, body) = app.post("/api/schedules", tomorrow.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let warning = body["warnings"][0]["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("estimated 29 %") && warning.contains("soc_min in period 2"),
        "{body}"
    );
}

/// A document of `n` devices `s0001`… with one charge period each; `twice` lists the first
/// device again at the end.
fn fleet_document(n: usize, twice: bool) -> String {
    let mut entries: Vec<Value> = (1..=n)
        .map(|i| json!({"device_id": format!("s{i:04}"), "intervals": [{"period": 1 + i % 48, "mode": "Charge", "rate_kw": 5}]}))
        .collect();
    if twice {
        entries.push(json!({"device_id": "s0001", "intervals": []}));
    }
    json!({"schedule_date": "2026-11-30", "timezone": "Europe/London", "schedules": entries})
        .to_string()
}

/// A provider that serves `bodies` in turn, the last one from then on; a body of `None`
/// breaks off half-way through `full` (the connection is cut after its first half).
async fn provider_of(full: String, bodies: Vec<Option<String>>) -> String {
    use axum::body::Body;
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/tomorrow",
        get(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let body = bodies[n.min(bodies.len() - 1)].clone();
            let full = full.clone();
            async move {
                match body {
                    Some(body) => axum::response::Response::new(Body::from(body)),
                    None => {
                        let half = full.as_bytes()[..full.len() / 2].to_vec();
                        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                            vec![Ok(half), Err(std::io::Error::other("cut"))];
                        axum::response::Response::builder()
                            .header("content-length", full.len())
                            .body(Body::from_stream(futures_util::stream::iter(chunks)))
                            .unwrap()
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/tomorrow", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn raw_documents(app: &TestApp) -> Vec<String> {
    std::fs::read_dir(app.dir.path().join("audit/raw/2026-11-29"))
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// The document streams to the audit store as it arrives: a transfer cut half-way is begun
/// again, and only the whole document is kept.
#[tokio::test]
async fn a_fetch_cut_off_half_way_is_fetched_again_and_only_the_whole_document_kept() {
    let full = fleet_document(1200, false);
    let url = provider_of(full.clone(), vec![None, Some(full.clone())]).await;
    let app = TestApp::start_with(tempfile::tempdir().unwrap(), None, Some(url)).await;
    let (status, report) = app.post("/api/ingest?date=2026-11-30", "").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["accepted"].as_array().unwrap().len(), 1200);
    let raws = raw_documents(&app);
    assert_eq!(raws.len(), 1, "{raws:?}");
    let kept = std::fs::read_to_string(app.dir.path().join("audit/raw/2026-11-29").join(&raws[0]))
        .unwrap();
    assert_eq!(kept, full);
}

/// Read as a stream, a document broken at its last byte is still refused whole: nothing is
/// committed or published, though its devices came first.
#[tokio::test]
async fn a_document_broken_at_its_last_byte_commits_nothing() {
    let mut broken = fleet_document(1200, false);
    broken.pop();
    let url = provider_of(broken.clone(), vec![Some(broken)]).await;
    let app = TestApp::start_with(tempfile::tempdir().unwrap(), None, Some(url)).await;
    let (_client, mut inbox) = app.device("s0001").await;
    let (status, body) = app.post("/api/ingest?date=2026-11-30", "").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a JSON object"),
        "{body}"
    );
    let (_, commands) = app.get("/api/commands?date=2026-11-30").await;
    assert_eq!(commands, json!([]));
    assert_eq!(raw_documents(&app).len(), 1, "the raw document is kept");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), inbox.recv())
            .await
            .is_err(),
        "nothing was published"
    );
}

/// A device listed first and last is refused in both places, though the first entry was
/// read long before the second; every other device goes ahead.
#[tokio::test]
async fn a_device_listed_first_and_last_is_refused_and_the_rest_go_ahead() {
    let doc = fleet_document(1200, true);
    let url = provider_of(doc.clone(), vec![Some(doc)]).await;
    let app = TestApp::start_with(tempfile::tempdir().unwrap(), None, Some(url)).await;
    let (status, report) = app.post("/api/ingest?date=2026-11-30", "").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["accepted"].as_array().unwrap().len(), 1199);
    assert_eq!(
        report["accepted"][0]["device_id"], "s0002",
        "document order"
    );
    let rejected: Vec<&str> = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(rejected, ["s0001", "s0001"]);
    let (_, none) = app
        .get("/api/commands?device_id=s0001&date=2026-11-30")
        .await;
    assert_eq!(none, json!([]));
}

/// A store that fails to record the publishes of an ingestion fails the ingestion with its
/// error, however many batches are still to come: no stage waits for ever on one that
/// stopped.
#[tokio::test]
async fn an_ingestion_whose_publishes_cannot_be_recorded_fails_and_does_not_hang() {
    let app = TestApp::start(None).await;
    // Six batches of 500: more than the stages' channels hold.
    let schedules: Vec<Value> = (1..=3000)
        .map(|n| json!({"device_id": format!("u{n}"), "intervals": [{"period": 1, "mode": "charge", "rate_kw": 10}]}))
        .collect();
    let body = json!({
        "schedule_date": "2026-11-30", "timezone": "Europe/London", "schedules": schedules
    })
    .to_string();
    // Every record of a publish (a command leaving `created`) is refused, as a failing disk
    // would refuse it; the commits of the commands themselves go through.
    let db = rusqlite::Connection::open(app.dir.path().join("cloud.sqlite")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_sent BEFORE UPDATE OF state ON commands
         WHEN NEW.state <> 'created' BEGIN SELECT RAISE(ABORT, 'the disk refused the write'); END;",
    )
    .unwrap();
    let (status, answer) =
        tokio::time::timeout(Duration::from_secs(60), app.post("/api/schedules", body))
            .await
            .expect("the ingestion hung after its publishes could not be recorded");
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer.to_string().contains("the disk refused the write"),
        "{answer}"
    );
}
