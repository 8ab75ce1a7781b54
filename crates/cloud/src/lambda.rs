//! The service as an AWS Lambda function: one handler for every event its triggers deliver,
//! told apart by their shape.
//!
//! - An EventBridge `Scheduled Event` is a tick: the sweep (resends, `late`, `expired`,
//!   `incomplete`), commands left unpublished, and tomorrow's fetch once it is due.
//! - An API Gateway HTTP API request (payload format 2.0) goes to the same axum router as the
//!   long-running service's.
//! - An IoT rule's event, `{"topic": ..., "payload": <base64>}` (rule SQL
//!   `SELECT topic() AS topic, encode(*, 'base64') AS payload FROM ...`), or an SQS batch of
//!   them, is device feedback.
//!
//! Commands and receipts go out through the IoT data plane ([`crate::publish::IotDataPlane`]),
//! and every invocation's counts come back as one CloudWatch Embedded Metric Format line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use max300_protocol::{Clock, Topics};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tower::ServiceExt;
use tracing::warn;

use crate::api::router;
use crate::app::{Core, open_store};
use crate::daily::{DailyFetch, Step, replay_interrupted};
use crate::feedback::{Delivered, Feedback};
use crate::ingest::Ingestor;
use crate::metrics::{Metrics, Totals};
use crate::publish::IotDataPlane;
use crate::sweeper::Sweeper;
use crate::{CloudConfig, CloudError, CommandStore};

/// How long a tick's hold on a date's fetch lasts: past it, another invocation may try.
const FETCH_LEASE: Duration = Duration::from_secs(300);

/// What an invocation's event is.
#[derive(Debug, PartialEq)]
pub enum Invocation {
    /// A scheduled tick.
    Tick,
    /// An HTTP API request.
    Http(HttpRequest),
    /// Device messages, from an IoT rule directly or through SQS.
    Feedback(Vec<RuleRecord>),
}

/// One device message as an IoT rule forwarded it.
#[derive(Debug, PartialEq)]
pub struct RuleRecord {
    /// Its SQS message id (`itemIdentifier` in `batchItemFailures`); none when the rule
    /// invoked the function directly.
    pub id: Option<String>,
    /// The topic and payload, or why the record is unusable.
    pub message: Result<(String, Vec<u8>), String>,
}

/// An API Gateway HTTP API request, payload format 2.0.
#[derive(Debug, PartialEq)]
pub struct HttpRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path and query, as the client sent them.
    pub uri: String,
    /// Headers; API Gateway joins repeated ones with commas.
    pub headers: Vec<(String, String)>,
    /// The body, decoded.
    pub body: Vec<u8>,
}

impl Invocation {
    /// Tells an event by its shape; an event of no known shape is an error that says what it
    /// lacked.
    pub fn parse(event: &Value) -> Result<Invocation, CloudError> {
        let bad = |why: String| Err(CloudError::Event(why));
        if event.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event") {
            return Ok(Invocation::Tick);
        }
        if let Some(http) = event.pointer("/requestContext/http") {
            if event.get("version").and_then(Value::as_str) != Some("2.0") {
                return bad("HTTP event: only API Gateway payload format 2.0 is served".into());
            }
            let method = http.get("method").and_then(Value::as_str).ok_or_else(|| {
                CloudError::Event("HTTP event: no requestContext.http.method".into())
            })?;
            let path = event
                .get("rawPath")
                .and_then(Value::as_str)
                .ok_or_else(|| CloudError::Event("HTTP event: no rawPath".into()))?;
            let query = event
                .get("rawQueryString")
                .and_then(Value::as_str)
                .unwrap_or("");
            let mut headers: Vec<(String, String)> = event
                .get("headers")
                .and_then(Value::as_object)
                .map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default();
            // Format 2.0 moves cookies out of the headers.
            if let Some(cookies) = event.get("cookies").and_then(Value::as_array) {
                let joined: Vec<&str> = cookies.iter().filter_map(Value::as_str).collect();
                if !joined.is_empty() {
                    headers.push(("cookie".into(), joined.join("; ")));
                }
            }
            let body = match event.get("body").and_then(Value::as_str) {
                None => Vec::new(),
                Some(b) if event.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) => {
                    STANDARD
                        .decode(b)
                        .map_err(|e| CloudError::Event(format!("HTTP event: body: {e}")))?
                }
                Some(b) => b.as_bytes().to_vec(),
            };
            let uri = if query.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{query}")
            };
            return Ok(Invocation::Http(HttpRequest {
                method: method.to_owned(),
                uri,
                headers,
                body,
            }));
        }
        if let Some(records) = event.get("Records").and_then(Value::as_array) {
            // One bad record fails only itself: it goes back to the queue (and in the end to
            // the dead-letter queue), never its batch.
            let messages = records
                .iter()
                .enumerate()
                .map(|(i, record)| {
                    let id = record
                        .get("messageId")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    let message =
                        if record.get("eventSource").and_then(Value::as_str) != Some("aws:sqs") {
                            Err(format!("Records[{i}]: not an SQS record"))
                        } else {
                            let body = record.get("body").and_then(Value::as_str).unwrap_or("");
                            serde_json::from_str::<Value>(body)
                                .map_err(|e| e.to_string())
                                .and_then(|inner| rule_message(&inner))
                                .map_err(|why| format!("Records[{i}].body: {why}"))
                        };
                    RuleRecord { id, message }
                })
                .collect();
            return Ok(Invocation::Feedback(messages));
        }
        if event.get("topic").is_some() {
            let message = rule_message(event).map_err(CloudError::Event)?;
            return Ok(Invocation::Feedback(vec![RuleRecord {
                id: None,
                message: Ok(message),
            }]));
        }
        bad(
            "not a Scheduled Event, an HTTP API request, an IoT rule message or an SQS batch"
                .into(),
        )
    }
}

/// An IoT rule's message: the topic it came on and its base64 payload.
fn rule_message(event: &Value) -> Result<(String, Vec<u8>), String> {
    let topic = event
        .get("topic")
        .and_then(Value::as_str)
        .ok_or("no \"topic\" (rule SQL: SELECT topic() AS topic, ...)")?;
    let payload = event
        .get("payload")
        .and_then(Value::as_str)
        .ok_or("no \"payload\" (rule SQL: ... encode(*, 'base64') AS payload)")?;
    let payload = STANDARD
        .decode(payload)
        .map_err(|e| format!("payload: not base64: {e}"))?;
    Ok((topic.to_owned(), payload))
}

/// The handler and everything it keeps between invocations of a warm function.
#[derive(Debug)]
pub struct LambdaService {
    store: Arc<dyn CommandStore>,
    router: Router,
    sweeper: Sweeper,
    ingestor: Arc<Ingestor>,
    daily: Option<DailyFetch>,
    feedback: Mutex<Feedback>,
    topics: Topics,
    timezone: TimeZone,
    owner: String,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl LambdaService {
    /// Builds the service from its config (in Lambda, `MAX300_*` variables): the store, the
    /// audit store and the IoT data plane, which is required.
    pub async fn start(
        config: CloudConfig,
        clock: Arc<dyn Clock>,
        owner: String,
    ) -> Result<LambdaService, CloudError> {
        config.validate()?;
        let endpoint = config.iot_data_endpoint.as_deref().ok_or_else(|| {
            CloudError::Config(
                "iot_data_endpoint: required by `max300 lambda` (MAX300_IOT_DATA_ENDPOINT); \
                 aws iot describe-endpoint --endpoint-type iot:Data-ATS"
                    .into(),
            )
        })?;
        let transport = Arc::new(IotDataPlane::connect(endpoint).await?);
        let store = open_store(&config.store_url()).await?;
        // Concurrent invocations are instances that share the work.
        let core = Core::build(&config, &clock, transport, store, Some(owner.clone())).await?;
        let sweeper = core.sweeper(&clock, Some(owner.clone()));
        let daily = (core.ingestor.can_fetch() && config.daily_fetch)
            .then(|| -> Result<_, CloudError> {
                Ok(DailyFetch {
                    timezone: core.timezone.clone(),
                    at: config.fetch_time()?,
                    owner: Some(owner.clone()),
                })
            })
            .transpose()?;
        let feedback = Feedback::new(
            core.ledger.clone(),
            core.publisher.clone(),
            clock.clone(),
            core.timezone.clone(),
            config.auto_register,
            core.metrics.clone(),
        );
        Ok(LambdaService {
            store: core.ledger.store().clone(),
            router: router(core.state, core.max_bytes),
            sweeper,
            ingestor: core.ingestor,
            daily,
            feedback: Mutex::new(feedback),
            topics: Topics::new(config.topic_root),
            timezone: core.timezone,
            owner,
            clock,
            metrics: core.metrics,
        })
    }

    /// Handles one invocation; returns the function's response and the invocation's metrics
    /// as an EMF line (to be written to stdout, where CloudWatch reads it).
    pub async fn handle(&self, event: &Value) -> Result<(Value, String), CloudError> {
        let before = self.metrics.totals();
        let response = match Invocation::parse(event)? {
            Invocation::Tick => self.tick().await?,
            Invocation::Http(request) => self.http(request).await?,
            Invocation::Feedback(records) => {
                let mut failures = Vec::new();
                let mut delivered = Vec::with_capacity(records.len());
                for record in records {
                    match record.message {
                        Ok((topic, payload)) => delivered
                            .push((record.id, Delivered::new(&self.topics, topic, &payload))),
                        Err(why) => {
                            warn!(sqs_message_id = ?record.id, error = %why, "feedback record unusable: handed back");
                            failures.extend(record.id);
                        }
                    }
                }
                let (ids, batch): (Vec<_>, Vec<_>) = delivered.into_iter().unzip();
                let handled = self.feedback.lock().await.handle_delivered(&batch).await;
                // A record the store could not take goes back to the queue for a retry;
                // one that was handled or refused (and receipted) does not.
                let mut count = 0;
                for (id, ok) in ids.into_iter().zip(handled) {
                    if ok {
                        count += 1;
                    } else {
                        failures.extend(id);
                    }
                }
                let failures: Vec<Value> = failures
                    .into_iter()
                    .map(|id| json!({ "itemIdentifier": id }))
                    .collect();
                json!({ "handled": count, "batchItemFailures": failures })
            }
        };
        let line = emf(&self.metrics.totals(), &before, self.clock.now());
        Ok((response, line))
    }

    async fn tick(&self) -> Result<Value, CloudError> {
        // The sweep also publishes what was committed and never published: the function
        // that made it stopped first.
        let swept = self.sweeper.sweep_once().await;
        // Runs interrupted by a stopped function, under their date's lease and fence; stale
        // ones are closed, not replayed.
        let replayed = replay_interrupted(
            &self.ingestor,
            &self.store,
            &self.clock,
            &self.timezone,
            Some(&self.owner),
        )
        .await;
        let fetch = match &self.daily {
            None => Ok("off"),
            Some(daily) => {
                let now = self.clock.now();
                let until = now + self.clock.clock_duration(FETCH_LEASE);
                daily
                    .step(now, false, until, &self.ingestor, &self.store)
                    .await
                    .map(|step| match step {
                        Step::Done => "done",
                        Step::NotYet => "not_due",
                        Step::Held => "held",
                    })
            }
        };
        // Each part ran; any failure fails the invocation, so it is counted and retried.
        let fetch = fetch?;
        swept?;
        let replayed = replayed?;
        Ok(json!({ "sweep": "ok", "replayed": replayed, "fetch": fetch }))
    }

    async fn http(&self, request: HttpRequest) -> Result<Value, CloudError> {
        let method = Method::from_bytes(request.method.as_bytes())
            .map_err(|e| CloudError::Event(format!("HTTP event: method: {e}")))?;
        let mut builder = Request::builder().method(method).uri(&request.uri);
        for (name, value) in &request.headers {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) else {
                warn!(header = %name, "unusable header dropped");
                continue;
            };
            builder = builder.header(name, value);
        }
        let req = builder
            .body(Body::from(request.body))
            .map_err(|e| CloudError::Event(format!("HTTP event: {e}")))?;
        let response = self
            .router
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| CloudError::Event(format!("HTTP: {e}")))?;
        let status = response.status().as_u16();
        let mut headers = BTreeMap::new();
        for (name, value) in response.headers() {
            if let Ok(v) = value.to_str() {
                headers
                    .entry(name.as_str().to_owned())
                    .and_modify(|all: &mut String| {
                        all.push(',');
                        all.push_str(v);
                    })
                    .or_insert_with(|| v.to_owned());
            }
        }
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .map_err(|e| CloudError::Event(format!("HTTP: response body: {e}")))?;
        let (body, base64) = match std::str::from_utf8(&body) {
            Ok(text) => (text.to_owned(), false),
            Err(_) => (STANDARD.encode(&body), true),
        };
        Ok(json!({
            "statusCode": status,
            "headers": headers,
            "body": body,
            "isBase64Encoded": base64,
        }))
    }
}

/// One CloudWatch Embedded Metric Format line: namespace `MAX300`, dimension `Service`, a
/// count for each metric (zeros too, so an alarm on "none in 24 h" sees data points).
pub fn emf(after: &Totals, before: &Totals, now: Timestamp) -> String {
    let counts = after.since(before);
    let mut root = serde_json::Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": now.as_millisecond(),
            "CloudWatchMetrics": [{
                "Namespace": "MAX300",
                "Dimensions": [["Service"]],
                "Metrics": counts.iter().map(|(name, _)| json!({"Name": name, "Unit": "Count"})).collect::<Vec<_>>(),
            }],
        }),
    );
    root.insert("Service".into(), json!("max300"));
    for (name, n) in counts {
        root.insert(name.into(), json!(n));
    }
    Value::Object(root).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_events_apart_by_their_shape() {
        let tick =
            json!({"version": "0", "detail-type": "Scheduled Event", "source": "aws.events"});
        assert_eq!(Invocation::parse(&tick).unwrap(), Invocation::Tick);

        let http = json!({
            "version": "2.0", "rawPath": "/api/commands", "rawQueryString": "device=d1",
            "headers": {"authorization": "Bearer x"}, "cookies": ["a=1", "b=2"],
            "requestContext": {"http": {"method": "GET", "path": "/api/commands"}},
            "body": STANDARD.encode(b"{}"), "isBase64Encoded": true,
        });
        let Invocation::Http(req) = Invocation::parse(&http).unwrap() else {
            panic!("not http")
        };
        assert_eq!(req.uri, "/api/commands?device=d1");
        assert_eq!(req.method, "GET");
        assert!(req.headers.contains(&("cookie".into(), "a=1; b=2".into())));
        assert_eq!(req.body, b"{}");

        let rule = json!({"topic": "max300/d1/ack", "payload": STANDARD.encode(b"{\"x\":1}")});
        let message = Ok(("max300/d1/ack".into(), b"{\"x\":1}".to_vec()));
        assert_eq!(
            Invocation::parse(&rule).unwrap(),
            Invocation::Feedback(vec![RuleRecord {
                id: None,
                message: message.clone()
            }])
        );
        let sqs = json!({"Records": [
            {"eventSource": "aws:sqs", "messageId": "m1", "body": rule.to_string()},
            {"eventSource": "aws:sqs", "messageId": "m2", "body": "{not json"},
        ]});
        let Invocation::Feedback(records) = Invocation::parse(&sqs).unwrap() else {
            panic!("not feedback")
        };
        assert_eq!(
            records[0],
            RuleRecord {
                id: Some("m1".into()),
                message
            }
        );
        assert_eq!(records[1].id.as_deref(), Some("m2"));
        assert!(
            records[1]
                .message
                .as_ref()
                .unwrap_err()
                .starts_with("Records[1].body")
        );
    }

    #[test]
    fn an_unknown_or_broken_event_says_what_is_wrong() {
        let err = Invocation::parse(&json!({"hello": 1}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a Scheduled Event"), "{err}");
        let err = Invocation::parse(&json!({"topic": "max300/d1/ack", "payload": "%%%"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not base64"), "{err}");
        let err = Invocation::parse(&json!({"topic": "max300/d1/ack"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("encode(*, 'base64')"), "{err}");
        let v1 = json!({"version": "1.0", "requestContext": {"http": {}}});
        assert!(
            Invocation::parse(&v1)
                .unwrap_err()
                .to_string()
                .contains("2.0")
        );
    }

    #[test]
    fn the_metrics_line_is_embedded_metric_format() {
        let before = Totals::default();
        let after = Totals {
            late: 2,
            ingestion_succeeded: 1,
            ..Totals::default()
        };
        let line: Value = serde_json::from_str(&emf(
            &after,
            &before,
            "2026-11-29T16:00:00Z".parse().unwrap(),
        ))
        .unwrap();
        assert_eq!(line["_aws"]["Timestamp"], 1_795_968_000_000_i64);
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Namespace"], "MAX300");
        assert_eq!(line["Service"], "max300");
        assert_eq!(line["CommandsLate"], 2);
        assert_eq!(line["IngestionSucceeded"], 1);
        assert_eq!(line["CommandsExpired"], 0);
    }
}
