//! Logs and traces of a whole simulated day (`max300 up`): one command can be followed by its
//! `message_id` through the JSON logs, and by its trace through OTLP, from its ingestion to
//! the device's ack and reports.

use std::collections::BTreeSet;
use std::process::Output;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::Value;

use crate::max300;

/// `max300 up` for one day of two units, with extra environment; returns once it exited.
fn play_a_day(extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "up",
        "--devices",
        "2",
        "--speed",
        "3000",
        "--days",
        "1",
        "--date",
        "2026-11-30",
        "--http",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let out = max300()
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .expect("max300 runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn one_commands_message_id_runs_through_the_json_logs_of_ingestion_publish_ack_and_report() {
    let out = play_a_day(
        &["--log-format", "json"],
        &[("RUST_LOG", "info,max300_cloud::feedback=debug,rumqttd=off")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let events: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.len() * 10 > stderr.lines().count() * 9,
        "the log is JSON lines:\n{stderr}"
    );
    let created = events
        .iter()
        .find(|e| e["message"] == "command created")
        .unwrap_or_else(|| panic!("no \"command created\" event in {} lines", events.len()));
    let message_id = created["message_id"].as_str().expect("a message_id field");
    let device_id = created["device_id"].as_str().expect("a device_id field");
    let about = |message: &str| {
        events.iter().find(|e| {
            e["message"] == message && e["message_id"] == message_id && e["device_id"] == device_id
        })
    };
    for (step, message) in [
        ("ingestion", "command created"),
        ("publish", "command published"),
        ("device accepting it", "schedule accepted"),
        ("ack", "ack"),
        ("report", "report"),
    ] {
        assert!(
            about(message).is_some(),
            "no {step} event ({message:?}) with message_id {message_id} and device_id {device_id}"
        );
    }
}

/// One span as the receiver saw it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
    attributes: Vec<(String, String)>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// A small OTLP/HTTP receiver: `POST /v1/traces` with protobuf bodies.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            post(
                |State(spans): State<Arc<Mutex<Vec<Received>>>>, body: Bytes| async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut spans = spans.lock().unwrap();
                    for rs in request.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .map(text)
                            .unwrap_or_default();
                        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                            spans.push(Received {
                                service: service.clone(),
                                trace_id: span.trace_id,
                                span_id: span.span_id,
                                parent_span_id: span.parent_span_id,
                                name: span.name,
                                attributes: span
                                    .attributes
                                    .iter()
                                    .map(|kv| (kv.key.clone(), text(kv)))
                                    .collect(),
                            });
                        }
                    }
                    StatusCode::OK
                },
            ),
        )
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_covers_a_commands_ingestion_ack_and_reports() {
    let (endpoint, spans) = receiver().await;
    let out = tokio::task::spawn_blocking(move || {
        play_a_day(
            &["--otlp-endpoint", &endpoint],
            &[("RUST_LOG", "warn,rumqttd=off")],
        )
    })
    .await
    .unwrap();
    // The process flushed its spans before it exited, and each export was answered.
    let spans = spans.lock().unwrap().clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!spans.is_empty(), "no spans received; stderr:\n{stderr}");
    assert!(spans.iter().all(|s| s.service == "max300"), "service.name");

    let command = spans
        .iter()
        .find(|s| s.name == "command" && s.attribute("outcome") == Some("created"))
        .unwrap_or_else(|| {
            let names: BTreeSet<_> = spans.iter().map(|s| s.name.as_str()).collect();
            panic!("no command span among {names:?}")
        });
    let message_id = command.attribute("message_id").expect("message_id");
    let device_id = command.attribute("device_id").expect("device_id");
    let trace: Vec<&Received> = spans
        .iter()
        .filter(|s| s.trace_id == command.trace_id)
        .collect();
    let ingest = trace
        .iter()
        .find(|s| s.name == "ingest")
        .expect("the ingestion span in the command's trace");
    assert!(
        ingest.parent_span_id.is_empty(),
        "the ingestion is the root"
    );
    assert_eq!(command.parent_span_id, ingest.span_id);
    // Spans named `name` about this command whose parent is one of `parents`.
    let children = |parents: &[&Received], name: &str| -> Vec<&Received> {
        trace
            .iter()
            .copied()
            .filter(|s| {
                s.name == name
                    && s.attribute("message_id") == Some(message_id)
                    && s.attribute("device_id") == Some(device_id)
                    && parents.iter().any(|p| p.span_id == s.parent_span_id)
            })
            .collect()
    };
    let publishes = children(&[command], "publish");
    assert!(!publishes.is_empty(), "a publish span under the command");
    let schedules = children(&publishes, "schedule");
    assert!(
        !schedules.is_empty(),
        "the agent's schedule span under a publish"
    );
    let acks = children(&schedules, "ack");
    assert!(!acks.is_empty(), "the cloud's ack span under the agent's");
    // The agent keeps the plan's trace context as it came (the publish that delivered it).
    let periods = children(&publishes, "period");
    let reports = children(&periods, "report");
    let reported: BTreeSet<_> = reports
        .iter()
        .filter_map(|r| r.attribute("period"))
        .collect();
    assert_eq!(
        reported.len(),
        48,
        "a report span for every period of the day, under its period span: {reported:?}"
    );
    // Both units' commands came from one ingestion, so they share its trace.
    let commands = trace.iter().filter(|s| s.name == "command").count();
    assert_eq!(commands, 2, "one command span per unit");
}

#[test]
fn an_otlp_endpoint_that_is_not_an_http_url_is_refused_at_start_up() {
    let out = max300()
        .args([
            "--otlp-endpoint",
            "localhost:4318",
            "config",
            "print-default",
            "agent",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--otlp-endpoint \"localhost:4318\": expected an http:// or https:// URL"),
        "{stderr}"
    );
}
