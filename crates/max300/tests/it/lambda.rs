//! `max300 lambda` as Lambda runs it: the binary started with no arguments beside a Lambda
//! Runtime API of our own (the documented `2018-06-01` interface), on DynamoDB and S3 in moto.
//! The IoT data plane is the one part played by a recorder: IoT Core has no emulator here.
//! The events are the AWS documentation's examples (`crates/cloud/tests/events`), carrying our
//! payloads; the answers are read as Lambda reads them, into `aws_lambda_events` and
//! `lambda_runtime` types.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::apigw::ApiGatewayV2httpResponse;
use aws_lambda_events::encodings::Body;
use aws_lambda_events::sqs::SqsBatchResponse;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lambda_runtime::Diagnostic;
use max300_protocol::message::{AckMsg, AckStatus, HeartbeatMsg, ReportMsg, ReportStatus, V1};
use max300_protocol::{Clock, DeviceId, Message, Mode, RateKw, StoreId, SystemClock};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::Proc;
use crate::aws::Aws;

/// An invocation's outcome: its request id, and the response or the error posted.
type Outcome = (String, Result<Value, Value>);

/// The Lambda Runtime API: hands out queued events one at a time and collects the results.
#[derive(Default)]
struct Runtime {
    queue: Mutex<VecDeque<(String, Value)>>,
    queued: Notify,
    results: Mutex<Option<mpsc::UnboundedSender<Outcome>>>,
}

async fn next(State(rt): State<Arc<Runtime>>) -> impl IntoResponse {
    loop {
        let notified = rt.queued.notified();
        if let Some((id, event)) = rt.queue.lock().unwrap().pop_front() {
            let deadline = SystemClock.now().as_millisecond() + 60_000;
            let mut headers = HeaderMap::new();
            headers.insert("Lambda-Runtime-Aws-Request-Id", id.parse().unwrap());
            headers.insert(
                "Lambda-Runtime-Deadline-Ms",
                deadline.to_string().parse().unwrap(),
            );
            headers.insert(
                "Lambda-Runtime-Invoked-Function-Arn",
                "arn:aws:lambda:eu-west-2:000000000000:function:max300"
                    .parse()
                    .unwrap(),
            );
            headers.insert(
                "Lambda-Runtime-Trace-Id",
                "Root=1-5e1b4151-5ac6c58f5c5a0b2a8a1b2c3d".parse().unwrap(),
            );
            return (headers, event.to_string());
        }
        notified.await;
    }
}

async fn respond(
    State(rt): State<Arc<Runtime>>,
    Path((id, kind)): Path<(String, String)>,
    body: Bytes,
) -> StatusCode {
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let result = if kind == "response" {
        Ok(value)
    } else {
        Err(value)
    };
    if let Some(tx) = rt.results.lock().unwrap().as_ref() {
        let _ = tx.send((id, result));
    }
    StatusCode::ACCEPTED
}

async fn init_error(State(rt): State<Arc<Runtime>>, body: Bytes) -> StatusCode {
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(tx) = rt.results.lock().unwrap().as_ref() {
        let _ = tx.send(("init".into(), Err(value)));
    }
    StatusCode::ACCEPTED
}

/// The Runtime API's routes.
fn runtime_api(runtime: Arc<Runtime>) -> Router {
    Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route("/2018-06-01/runtime/invocation/{id}/{kind}", post(respond))
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .with_state(runtime)
}

/// The variables Lambda sets for every function.
fn lambda_env(runtime_api: &str) -> Vec<(String, String)> {
    [
        ("AWS_LAMBDA_RUNTIME_API", runtime_api),
        ("AWS_LAMBDA_FUNCTION_NAME", "max300-tick"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/29/[$LATEST]abc"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into()
}

/// What the IoT data plane was asked to publish: (topic, qos, payload).
type Published = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

async fn publish(
    State(published): State<Published>,
    Path(topic): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    body: Bytes,
) -> StatusCode {
    let qos = query.get("qos").cloned().unwrap_or_default();
    published.lock().unwrap().push((topic, qos, body.to_vec()));
    StatusCode::OK
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr.to_string()
}

struct Function {
    runtime: Arc<Runtime>,
    results: mpsc::UnboundedReceiver<Outcome>,
    n: u32,
}

impl Function {
    async fn invoke(&mut self, event: Value) -> Result<Value, Value> {
        self.n += 1;
        let id = format!("req-{}", self.n);
        self.runtime
            .queue
            .lock()
            .unwrap()
            .push_back((id.clone(), event));
        self.runtime.queued.notify_waiters();
        let (got, result) = tokio::time::timeout(Duration::from_secs(60), self.results.recv())
            .await
            .expect("the function answered within 60 s")
            .expect("runtime open");
        assert_eq!(got, id, "the result names its invocation");
        result
    }
}

/// An example event of the AWS documentation (`crates/cloud/tests/events`).
fn example(name: &str) -> Value {
    let path = format!(
        "{}/../cloud/tests/events/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// The documentation's HTTP API request, made ours: method, path, query, headers and body.
fn http(method: &str, path: &str, query: &str, token: Option<&str>, body: Option<&str>) -> Value {
    let mut event = example("apigw-v2-request.json");
    let mut headers = json!({"content-type": "application/json"});
    if let Some(t) = token {
        headers["authorization"] = json!(format!("Bearer {t}"));
    }
    event["headers"] = headers;
    event["rawPath"] = json!(path);
    event["rawQueryString"] = json!(query);
    event
        .as_object_mut()
        .unwrap()
        .remove("queryStringParameters");
    event["requestContext"]["http"]["method"] = json!(method);
    event["requestContext"]["http"]["path"] = json!(path);
    event["body"] = json!(body);
    event["isBase64Encoded"] = json!(false);
    event
}

/// The documentation's IoT rule message, carrying `message` as received on `topic`.
fn rule_event(topic: &str, message: &Message) -> Value {
    let mut event = example("iot-rule.json");
    event["topic"] = json!(topic);
    event["payload"] = json!(STANDARD.encode(message.encode()));
    event
}

/// The documentation's SQS event with one record for each (message id, body).
fn sqs_batch(records: &[(&str, String)]) -> Value {
    let mut event = example("sqs-event.json");
    let template = event["Records"][0].clone();
    event["Records"] = records
        .iter()
        .map(|(id, body)| {
            let mut record = template.clone();
            record["messageId"] = json!(id);
            record["body"] = json!(body);
            record
        })
        .collect();
    event
}

/// An HTTP answer, as API Gateway reads it; and its body, as JSON.
fn http_response(answer: Value) -> (ApiGatewayV2httpResponse, Value) {
    let response: ApiGatewayV2httpResponse = serde_json::from_value(answer).unwrap();
    let body = match &response.body {
        Some(Body::Text(text)) => serde_json::from_str(text).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    (response, body)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs moto_server; .ci/run installs it"]
async fn the_lambda_handler_serves_ticks_http_and_iot_rule_feedback() {
    let aws = Aws::start().await;
    let dir = tempfile::tempdir().unwrap();

    let runtime = Arc::new(Runtime::default());
    let (tx, results) = mpsc::unbounded_channel();
    *runtime.results.lock().unwrap() = Some(tx);
    let runtime_api = serve(runtime_api(runtime.clone())).await;
    let published: Published = Arc::default();
    let data_plane = serve(
        Router::new()
            .route("/topics/{*topic}", post(publish))
            .with_state(published.clone()),
    )
    .await;
    let mut provider = Proc::start(
        "provider",
        &[
            "provider",
            "--http",
            "127.0.0.1:0",
            "--device-ids",
            "unit-a,unit-b",
        ]
        .map(String::from),
        dir.path(),
    );
    let provider_url = provider.expect_line("listening on");

    let token = "lambda-test-token-0123456789";
    let data_plane_url = format!("http://{data_plane}");
    let mut env = aws.env();
    env.extend(lambda_env(&runtime_api));
    env.extend(
        [
            ("MAX300_IOT_DATA_ENDPOINT", data_plane_url.as_str()),
            ("MAX300_PROVIDER", &provider_url),
            // Due all day, so the first tick fetches whatever the hour.
            ("MAX300_FETCH_AT", "00:00"),
            ("MAX300_API_TOKEN", token),
            ("MAX300_DATA_DIR", &dir.path().display().to_string()),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    // As Lambda starts `bootstrap`: no arguments.
    let lambda = Proc::start_with_env("lambda", &[], &env, dir.path());
    let mut function = Function {
        runtime,
        results,
        n: 0,
    };
    let store = aws.store();

    // A scheduled tick: the sweep, and tomorrow's fetch, published through the data plane.
    let tick = example("eventbridge-scheduled.json");
    let first = function.invoke(tick.clone()).await.unwrap();
    assert_eq!(first["fetch"], "done", "{first}");
    let commands = store.commands(None, None).await.unwrap();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(
        commands
            .iter()
            .all(|c| c.state == max300_cloud::CommandState::Sent),
        "{commands:?}"
    );
    let date = commands[0].schedule_date;
    assert!(store.ingested(date).await.unwrap());
    {
        let published = published.lock().unwrap();
        let schedules: Vec<_> = published
            .iter()
            .filter(|(topic, _, _)| topic.ends_with("/schedule"))
            .collect();
        assert_eq!(
            schedules.len(),
            2,
            "{:?}",
            published.iter().map(|p| &p.0).collect::<Vec<_>>()
        );
        for (topic, qos, payload) in schedules {
            assert_eq!(qos, "1");
            let Message::Schedule(s) = Message::decode(payload).unwrap() else {
                panic!("not a schedule on {topic}")
            };
            assert_eq!(topic, &format!("max300/{}/schedule", s.device_id));
        }
    }
    let raw = aws.objects("audit/raw/").await;
    assert_eq!(raw.len(), 1, "the fetched document is kept in S3: {raw:?}");
    assert!(raw[0].contains("-fetch-"), "{raw:?}");

    // Ticks again: nothing more to fetch.
    let again = function.invoke(tick.clone()).await.unwrap();
    assert_eq!(again["fetch"], "not_due", "{again}");
    assert_eq!(aws.objects("audit/raw/").await.len(), 1);

    // A function stopped in the middle of an ingestion leaves its run open: the next tick
    // replays it, under the date's lease (the same document: nothing new is made).
    let raw_key = raw[0].trim_start_matches("audit/");
    store
        .begin_ingestion(date, "fetch", raw_key, SystemClock.now())
        .await
        .unwrap();
    let replayed = function.invoke(tick.clone()).await.unwrap();
    assert_eq!(replayed["replayed"], 1, "{replayed}");
    assert_eq!(store.interrupted_ingestions().await.unwrap(), []);
    assert_eq!(store.commands(None, None).await.unwrap().len(), 2);

    // The HTTP API behind API Gateway: reads, and a write that needs the token.
    let listed = function
        .invoke(http(
            "GET",
            "/api/commands",
            &format!("date={date}"),
            None,
            None,
        ))
        .await
        .unwrap();
    let (listed, body) = http_response(listed);
    assert_eq!(listed.status_code, 200, "{listed:?}");
    assert_eq!(body.as_array().unwrap().len(), 2);
    let refused = function
        .invoke(http("POST", "/api/schedules", "", None, Some("{}")))
        .await
        .unwrap();
    let (refused, _) = http_response(refused);
    assert_eq!(refused.status_code, 401, "{refused:?}");

    // Feedback from IoT rules: an ack, a report and a heartbeat of unit-a.
    let cmd = commands
        .iter()
        .find(|c| c.device_id.as_str() == "unit-a")
        .unwrap();
    let detail = store.command(&cmd.message_id).await.unwrap().unwrap();
    let device = DeviceId::parse("unit-a").unwrap();
    let store_id = StoreId::parse("s-lambda").unwrap();
    let at = SystemClock.now();
    let ack = Message::Ack(AckMsg {
        v: V1,
        store_id: store_id.clone(),
        seq: 1,
        message_id: cmd.message_id.clone(),
        device_id: device.clone(),
        status: AckStatus::Accepted,
        reason: None,
        details: None,
        sha256: Some(detail.sha256.clone()),
        effective_period: Some(1),
        at,
        traceparent: None,
    });
    let handled = function
        .invoke(rule_event("max300/unit-a/ack", &ack))
        .await
        .unwrap();
    assert_eq!(handled["handled"], 1, "{handled}");
    let acked = store.command(&cmd.message_id).await.unwrap().unwrap();
    assert_eq!(
        acked.summary.state,
        max300_cloud::CommandState::Acknowledged
    );
    assert_eq!(acked.acked_sha256.as_deref(), Some(detail.sha256.as_str()));

    // A report counts only for a period that has started: today's, of a plan the operator
    // posts for today.
    let now = SystemClock.now();
    let tz = max300_protocol::day::time_zone("Europe/London").unwrap();
    let today = max300_protocol::Day::containing(now, &tz).unwrap();
    let posted = function
        .invoke(http(
            "POST",
            "/api/schedules",
            "",
            Some(token),
            Some(
                &json!({"schedule_date": today.date(), "timezone": "Europe/London",
                        "schedules": [{"device_id": "unit-a",
                                       "intervals": [{"period": 1, "mode": "idle", "rate_kw": 0}]}]})
                .to_string(),
            ),
        ))
        .await
        .unwrap();
    let (posted, body) = http_response(posted);
    assert_eq!(posted.status_code, 200, "{posted:?}");
    let todays: max300_protocol::MessageId =
        serde_json::from_value(body["accepted"][0]["message_id"].clone()).unwrap();
    let current = today.period_at(now).unwrap();
    let report = Message::Report(ReportMsg {
        v: V1,
        store_id: store_id.clone(),
        seq: 2,
        message_id: Some(todays.clone()),
        device_id: device.clone(),
        period: current,
        interval_start: today.period_start(current),
        mode: Mode::Idle,
        rate_kw: RateKw::ZERO,
        status: ReportStatus::Executed,
        applied_kw: Some(RateKw::ZERO),
        limited_by: None,
        reason: None,
        would_kw: None,
        soc_pct: Some(55.0),
        energy_kwh: None,
        error: None,
        at,
        traceparent: None,
    });
    let heartbeat = Message::Heartbeat(HeartbeatMsg {
        v: V1,
        device_id: device.clone(),
        at,
        uptime_s: 60,
        agent_version: "test".into(),
        active_message_id: Some(cmd.message_id.clone()),
        mode: Mode::Idle,
        rate_kw: RateKw::ZERO,
        soc_pct: Some(55.0),
        fallback: None,
        outbox: 0,
    });
    // Through SQS this time: a batch of rule messages, one of them broken. Only the broken
    // one is handed back (to be retried, and in the end dead-lettered).
    let batch = sqs_batch(&[
        (
            "m1",
            rule_event("max300/unit-a/report", &report).to_string(),
        ),
        (
            "m2",
            rule_event("max300/unit-a/heartbeat", &heartbeat).to_string(),
        ),
        ("m3", json!({"topic": "max300/unit-a/report"}).to_string()),
    ]);
    let handled = function.invoke(batch).await.unwrap();
    assert_eq!(handled["handled"], 2, "{handled}");
    let handed_back: SqsBatchResponse = serde_json::from_value(handled).unwrap();
    let ids: Vec<_> = handed_back
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(ids, ["m3"]);
    let reported = store.command(&todays).await.unwrap().unwrap();
    assert_eq!(
        reported.periods[current as usize - 1].status,
        max300_cloud::PeriodStatus::Executed
    );
    let seen = store.device(&device).await.unwrap().unwrap();
    assert_eq!(seen.soc_pct, Some(55.0));
    assert_eq!(seen.mode, Some(Mode::Idle));
    // Each handled message got its receipt through the data plane.
    let receipts: Vec<Vec<u64>> = published
        .lock()
        .unwrap()
        .iter()
        .filter(|(topic, _, _)| topic == "max300/unit-a/receipt")
        .map(|(_, _, payload)| match Message::decode(payload).unwrap() {
            Message::Receipt(r) => r.seqs,
            other => panic!("not a receipt: {other:?}"),
        })
        .collect();
    assert_eq!(receipts.concat(), [1, 2], "{receipts:?}");

    // An event of no known shape fails the invocation, and says why.
    let failed: Diagnostic = serde_json::from_value(
        function
            .invoke(json!({"hello": "world"}))
            .await
            .unwrap_err(),
    )
    .unwrap();
    assert!(
        failed.error_message.contains("not a Scheduled Event"),
        "{failed:?}"
    );

    // The first tick's line counts its publishes and its ingestion.
    let emf: Vec<Value> = lambda
        .lines
        .try_iter()
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    // One line per invocation that succeeded; a failed one counts in Lambda's own Errors.
    assert_eq!(emf.len(), 8, "{emf:?}");
    let tick_line = emf
        .iter()
        .find(|l| l["IngestionSucceeded"] == 1)
        .unwrap_or_else(|| panic!("no EMF line with the ingestion: {emf:?}"));
    assert_eq!(
        tick_line["_aws"]["CloudWatchMetrics"][0]["Namespace"],
        "MAX300"
    );
    assert_eq!(tick_line["Published"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lambda_handler_reports_a_failed_start_to_the_runtime_api() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(Runtime::default());
    let (tx, mut results) = mpsc::unbounded_channel();
    *runtime.results.lock().unwrap() = Some(tx);
    let runtime_api = serve(runtime_api(runtime)).await;
    // No MAX300_IOT_DATA_ENDPOINT: the function cannot publish, so it must not start.
    let mut env = lambda_env(&runtime_api);
    env.push(("MAX300_DATA_DIR".into(), dir.path().display().to_string()));
    let mut lambda = Proc::start_with_env("lambda", &[], &env, dir.path());
    let (id, result) = tokio::time::timeout(Duration::from_secs(30), results.recv())
        .await
        .expect("the failed start was reported within 30 s")
        .expect("runtime open");
    assert_eq!(id, "init");
    let reported: Diagnostic = serde_json::from_value(result.unwrap_err()).unwrap();
    assert_eq!(reported.error_type, "Runtime.InitError");
    assert!(
        reported.error_message.contains("iot_data_endpoint"),
        "{reported:?}"
    );
    let status = lambda.stop();
    assert!(!status.success(), "{status:?}");
}
