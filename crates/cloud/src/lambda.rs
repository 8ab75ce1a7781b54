//! The service as an AWS Lambda function: one handler for every event its triggers deliver,
//! each deserialized into its `aws_lambda_events` type.
//!
//! - An EventBridge `Scheduled Event` ([`EventBridgeEvent`]) is a tick: the sweep (resends,
//!   `late`, `expired`, `incomplete`), commands left unpublished, and tomorrow's fetch once it
//!   is due.
//! - An API Gateway HTTP API request, payload format 2.0 ([`ApiGatewayV2httpRequest`]), goes
//!   through `lambda_http`'s adapter to the same axum router as the long-running service's.
//! - An IoT rule's message, `{"topic": ..., "payload": <base64>}` (rule SQL
//!   `SELECT topic() AS topic, encode(*, 'base64') AS payload FROM ...`), or an SQS batch of
//!   them ([`SqsEvent`]), is device feedback; the answer names the records to retry
//!   ([`SqsBatchResponse`]).
//!
//! Commands and receipts go out through the IoT data plane ([`crate::publish::IotDataPlane`]),
//! and every invocation's counts come back as one CloudWatch Embedded Metric Format line.
//! The runtime loop is `lambda_runtime`'s, in the binary.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::apigw::ApiGatewayV2httpRequest;
use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use axum::Router;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use lambda_http::Adapter;
use lambda_http::request::LambdaRequest;
use lambda_runtime::{Context, LambdaEvent, Service};
use max300_protocol::{Clock, Topics};
use serde::{Deserialize, Serialize};
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

/// An invocation's event, as one of the shapes the function's triggers deliver.
///
/// Untagged: serde tries the variants in order and takes the first that fits, so each must
/// require something the ones after it do not send, and the most permissive goes last:
/// - `Http` needs `requestContext.http.method`, which only API Gateway (and function URLs)
///   send;
/// - `Schedule` needs `detail-type` and `source`; its `detail` may be absent, as in the
///   scheduler's input of `deploy/template.yaml`. ([`CloudWatchEvent`] would also want `time`
///   and `resources`, which that input lacks.)
/// - `Sqs` needs only `Records`, and every field of a record is optional: any other
///   `Records` event (S3, SNS) would fit too, so each record's `eventSource` is checked;
/// - `Rule` needs only `topic`. Put before the others it would take any event with a
///   top-level `topic` key for feedback, so it comes last.
///
/// An event of none of these shapes fails the invocation with the `expecting` message.
///
/// [`CloudWatchEvent`]: aws_lambda_events::cloudwatch_events::CloudWatchEvent
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    untagged,
    expecting = "not a Scheduled Event, an API Gateway HTTP API request (payload format 2.0), \
                 an IoT rule message {\"topic\", \"payload\"} or an SQS batch of them"
)]
pub enum Event {
    /// An API Gateway HTTP API request.
    Http(Box<ApiGatewayV2httpRequest>),
    /// An EventBridge event (from EventBridge Scheduler, with our input, or a scheduled rule).
    Schedule(Box<EventBridgeEvent<Option<Value>>>),
    /// An SQS batch of IoT rule messages.
    Sqs(SqsEvent),
    /// One IoT rule message, from a rule's Lambda action.
    Rule(RuleMessage),
}

/// What an IoT rule forwards of a device message: the topic it came on and its bytes, in
/// base64 (rule SQL `SELECT topic() AS topic, encode(*, 'base64') AS payload FROM ...`).
/// The shape is ours: the rule's SQL makes it, so `aws_lambda_events` has no type for it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RuleMessage {
    /// `max300/{device_id}/{channel}`.
    pub topic: String,
    /// The MQTT payload, base64; optional here so its absence is told apart from another
    /// shape, and named in the error.
    #[serde(default)]
    pub payload: Option<String>,
}

impl RuleMessage {
    /// The topic and the payload's bytes, or why the message is unusable.
    fn decode(self) -> Result<(String, Vec<u8>), String> {
        let payload = self
            .payload
            .ok_or("no \"payload\" (rule SQL: ... encode(*, 'base64') AS payload)")?;
        let payload = STANDARD
            .decode(payload)
            .map_err(|e| format!("payload: not base64: {e}"))?;
        Ok((self.topic, payload))
    }
}

/// What an invocation asks for.
#[derive(Debug, PartialEq)]
pub enum Invocation {
    /// A scheduled tick.
    Tick,
    /// An HTTP API request.
    Http(Box<ApiGatewayV2httpRequest>),
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

impl TryFrom<Event> for Invocation {
    type Error = CloudError;

    /// What the event asks for; an event of a known shape that we do not serve, or a broken
    /// one, is an error that says what is wrong.
    fn try_from(event: Event) -> Result<Invocation, CloudError> {
        let bad = |why: String| Err(CloudError::Event(why));
        match event {
            Event::Schedule(event) if event.detail_type == "Scheduled Event" => {
                Ok(Invocation::Tick)
            }
            Event::Schedule(event) => bad(format!(
                "an EventBridge {:?} event from {:?}: only \"Scheduled Event\" is served",
                event.detail_type, event.source
            )),
            Event::Http(request) => {
                if request.version.as_deref() != Some("2.0") {
                    return bad("HTTP event: only API Gateway payload format 2.0 is served".into());
                }
                // lambda_http panics on a body that is not the base64 it claims to be.
                if request.is_base64_encoded
                    && let Some(body) = &request.body
                    && let Err(e) = STANDARD.decode(body)
                {
                    return bad(format!("HTTP event: body: not base64: {e}"));
                }
                Ok(Invocation::Http(request))
            }
            Event::Sqs(batch) => {
                // One bad record fails only itself: it goes back to the queue (and in the end
                // to the dead-letter queue), never its batch.
                let records = batch
                    .records
                    .into_iter()
                    .enumerate()
                    .map(|(i, record)| {
                        let message = if record.event_source.as_deref() != Some("aws:sqs") {
                            Err(format!("Records[{i}]: not an SQS record"))
                        } else {
                            serde_json::from_str::<RuleMessage>(
                                record.body.as_deref().unwrap_or(""),
                            )
                            .map_err(|e| e.to_string())
                            .and_then(RuleMessage::decode)
                            .map_err(|why| format!("Records[{i}].body: {why}"))
                        };
                        RuleRecord {
                            id: record.message_id,
                            message,
                        }
                    })
                    .collect();
                Ok(Invocation::Feedback(records))
            }
            Event::Rule(message) => Ok(Invocation::Feedback(vec![RuleRecord {
                id: None,
                message: Ok(message.decode().map_err(CloudError::Event)?),
            }])),
        }
    }
}

/// The API Gateway payload 2.0 response that `lambda_http`'s adapter makes of the router's
/// response. (`lambda_http` does not export the type's name; it serializes as an
/// [`aws_lambda_events::apigw::ApiGatewayV2httpResponse`].)
pub type HttpResponse = <Adapter<'static, axum::response::Response, Router> as Service<
    LambdaEvent<LambdaRequest>,
>>::Response;

/// The function's answer to an invocation.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Response {
    /// What a tick did.
    Tick(TickReport),
    /// The HTTP response, for API Gateway.
    Http(Box<HttpResponse>),
    /// What became of device feedback.
    Feedback(FeedbackReport),
}

/// What a tick did: `{"sweep": "ok", "replayed": n, "fetch": ...}`.
#[derive(Debug, Serialize)]
pub struct TickReport {
    /// Always `ok`: a failed sweep fails the invocation.
    pub sweep: &'static str,
    /// Interrupted ingestion runs settled (replayed or closed).
    pub replayed: usize,
    /// The daily fetch: `off`, `not_due`, `held` (another invocation has it) or `done`.
    pub fetch: &'static str,
}

/// What became of device feedback: `{"handled": n, "batchItemFailures": [...]}`. Lambda's SQS
/// event source reads only `batchItemFailures` (`ReportBatchItemFailures`); a direct
/// invocation's caller ignores the answer.
#[derive(Debug, Serialize)]
pub struct FeedbackReport {
    /// Messages applied, or refused and receipted: either way not to be retried.
    pub handled: usize,
    /// The SQS records to hand back to the queue.
    #[serde(flatten)]
    pub batch: SqsBatchResponse,
}

/// Serves one API Gateway request with `router`, through `lambda_http`'s adapter: the request
/// becomes an `http::Request` (path and raw query, headers, cookies, the body decoded, the
/// Lambda context as an extension) and the router's response the payload 2.0 response (text
/// or base64 by its content type, `set-cookie` as `cookies`).
pub async fn serve_http(
    router: Router,
    request: ApiGatewayV2httpRequest,
    context: Context,
) -> HttpResponse {
    let event = LambdaEvent::new(LambdaRequest::ApiGatewayV2(request), context);
    match Adapter::from(router).oneshot(event).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
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
    pub async fn handle(
        &self,
        event: LambdaEvent<Event>,
    ) -> Result<(Response, String), CloudError> {
        let (event, context) = event.into_parts();
        let before = self.metrics.totals();
        let response = match Invocation::try_from(event)? {
            Invocation::Tick => Response::Tick(self.tick().await?),
            Invocation::Http(request) => Response::Http(Box::new(
                serve_http(self.router.clone(), *request, context).await,
            )),
            Invocation::Feedback(records) => Response::Feedback(self.feedback(records).await),
        };
        let line = emf(&self.metrics.totals(), &before, self.clock.now());
        Ok((response, line))
    }

    async fn feedback(&self, records: Vec<RuleRecord>) -> FeedbackReport {
        let mut batch = SqsBatchResponse::default();
        let mut delivered = Vec::with_capacity(records.len());
        for record in records {
            match record.message {
                Ok((topic, payload)) => {
                    delivered.push((record.id, Delivered::new(&self.topics, topic, &payload)))
                }
                Err(why) => {
                    warn!(sqs_message_id = ?record.id, error = %why, "feedback record unusable: handed back");
                    if let Some(id) = record.id {
                        batch.add_failure(id);
                    }
                }
            }
        }
        let (ids, messages): (Vec<_>, Vec<_>) = delivered.into_iter().unzip();
        let applied = self.feedback.lock().await.handle_delivered(&messages).await;
        // A record the store could not take goes back to the queue for a retry; one that was
        // handled or refused (and receipted) does not.
        let mut handled = 0;
        for (id, ok) in ids.into_iter().zip(applied) {
            match (ok, id) {
                (true, _) => handled += 1,
                (false, Some(id)) => batch.add_failure(id),
                (false, None) => {}
            }
        }
        FeedbackReport { handled, batch }
    }

    async fn tick(&self) -> Result<TickReport, CloudError> {
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
        Ok(TickReport {
            sweep: "ok",
            replayed,
            fetch,
        })
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
    use aws_lambda_events::apigw::ApiGatewayV2httpResponse;
    use axum::extract::Request;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use max300_protocol::Message;

    /// The AWS documentation's example events (`tests/events/README.md`).
    fn example(name: &str) -> String {
        let path = format!("{}/tests/events/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// What the function's runtime hands the handler for `json`: the payload, as
    /// `lambda_runtime` deserializes it, in its `LambdaEvent` with a context.
    fn invocation(json: &str) -> LambdaEvent<Event> {
        let mut context = Context::default();
        context.request_id = "8476a536-e9f4-11e8-9739-2dfe598c3fcd".into();
        context.xray_trace_id = Some("Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700".into());
        LambdaEvent::new(serde_json::from_str(json).unwrap(), context)
    }

    fn what(json: &str) -> Result<Invocation, CloudError> {
        Invocation::try_from(invocation(json).payload)
    }

    #[test]
    fn a_scheduled_event_is_a_tick_from_eventbridge_or_from_our_scheduler() {
        assert_eq!(
            what(&example("eventbridge-scheduled.json")).unwrap(),
            Invocation::Tick
        );
        // What deploy/template.yaml's schedules send: no `detail`, `time` or `resources`.
        let ours = r#"{"detail-type":"Scheduled Event","source":"max300.scheduler"}"#;
        assert_eq!(what(ours).unwrap(), Invocation::Tick);
    }

    #[test]
    fn an_iot_rule_message_is_one_device_message() {
        let Invocation::Feedback(records) = what(&example("iot-rule.json")).unwrap() else {
            panic!("not feedback")
        };
        let [
            RuleRecord {
                id: None,
                message: Ok((topic, payload)),
            },
        ] = &records[..]
        else {
            panic!("{records:?}")
        };
        assert_eq!(topic, "max300/max300-0001/heartbeat");
        assert!(matches!(
            Message::decode(payload),
            Ok(Message::Heartbeat(_))
        ));
    }

    #[test]
    fn an_sqs_batch_is_feedback_record_by_record() {
        let Invocation::Feedback(records) = what(&example("sqs-event.json")).unwrap() else {
            panic!("not feedback")
        };
        let ids: Vec<_> = records.iter().map(|r| r.id.as_deref()).collect();
        assert_eq!(
            ids,
            [
                Some("059f36b4-87a3-44ab-83d2-661975830a7d"),
                Some("2e1424d4-f796-459a-8184-9c92662be6da")
            ]
        );
        let topics: Vec<_> = records
            .iter()
            .map(|r| r.message.as_ref().map(|(topic, _)| topic.as_str()))
            .collect();
        assert_eq!(
            topics,
            [
                Ok("max300/max300-0001/ack"),
                Ok("max300/max300-0001/heartbeat")
            ]
        );
        for record in &records {
            let (_, payload) = record.message.as_ref().unwrap();
            Message::decode(payload).unwrap();
        }

        // A broken record, or one from another source, fails only itself.
        let mut batch: Value = serde_json::from_str(&example("sqs-event.json")).unwrap();
        let records = batch["Records"].as_array_mut().unwrap();
        records[0]["body"] = json!("{not json");
        records[1]["eventSource"] = json!("aws:s3");
        let Invocation::Feedback(records) = what(&batch.to_string()).unwrap() else {
            panic!("not feedback")
        };
        let errors: Vec<_> = records
            .iter()
            .map(|r| r.message.as_ref().unwrap_err())
            .collect();
        assert!(
            errors[0].starts_with("Records[0].body: key must be a string"),
            "{errors:?}"
        );
        assert_eq!(errors[1], "Records[1]: not an SQS record");
    }

    #[test]
    fn an_unknown_or_broken_event_says_what_is_wrong() {
        let err = serde_json::from_str::<Event>(r#"{"hello": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("not a Scheduled Event, an API Gateway HTTP API"),
            "{err}"
        );

        let err = what(r#"{"topic": "max300/d1/ack", "payload": "%%%"}"#).unwrap_err();
        assert!(err.to_string().contains("payload: not base64"), "{err}");
        let err = what(r#"{"topic": "max300/d1/ack"}"#).unwrap_err();
        assert!(err.to_string().contains("encode(*, 'base64')"), "{err}");

        let mut request: Value = serde_json::from_str(&example("apigw-v2-request.json")).unwrap();
        request["isBase64Encoded"] = json!(true);
        let err = what(&request.to_string()).unwrap_err();
        assert!(
            err.to_string().contains("HTTP event: body: not base64"),
            "{err}"
        );
        request["version"] = json!("1.0");
        let err = what(&request.to_string()).unwrap_err();
        assert!(err.to_string().contains("payload format 2.0"), "{err}");

        let mut other: Value =
            serde_json::from_str(&example("eventbridge-scheduled.json")).unwrap();
        other["detail-type"] = json!("EC2 Instance State-change Notification");
        let err = what(&other.to_string()).unwrap_err();
        assert!(
            err.to_string().contains(r#"only "Scheduled Event""#),
            "{err}"
        );
    }

    /// Says back what reached the router, and sets a cookie.
    async fn echo(request: Request) -> impl IntoResponse {
        let (parts, body) = request.into_parts();
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let seen = json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "header2": header("header2"),
            "cookie": header("cookie"),
            "trace": header("x-amzn-trace-id"),
            "request_id": parts.extensions.get::<Context>().map(|c| c.request_id.clone()),
            "body": String::from_utf8(body.to_vec()).unwrap(),
        });
        let mut headers = HeaderMap::new();
        headers.insert(header::SET_COOKIE, "session=1; Secure".parse().unwrap());
        (StatusCode::CREATED, headers, axum::Json(seen))
    }

    async fn serve(router: Router, json: &str) -> ApiGatewayV2httpResponse {
        let (event, context) = invocation(json).into_parts();
        let Ok(Invocation::Http(request)) = Invocation::try_from(event) else {
            panic!("not an HTTP request")
        };
        let response = serve_http(router, *request, context).await;
        // As Lambda reads it.
        serde_json::from_value(serde_json::to_value(response).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn an_http_api_request_reaches_the_router_as_api_gateway_sent_it() {
        let router = Router::new().fallback(echo);
        let response = serve(router, &example("apigw-v2-request.json")).await;
        assert_eq!(response.status_code, 201);
        assert!(!response.is_base64_encoded);
        assert_eq!(response.cookies, ["session=1; Secure"]);
        assert_eq!(response.headers["content-type"], "application/json");
        let Some(aws_lambda_events::encodings::Body::Text(body)) = &response.body else {
            panic!("{:?}", response.body)
        };
        let seen: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            seen,
            json!({
                "method": "POST",
                "path": "/my/path",
                "query": "parameter1=value1&parameter1=value2&parameter2=value",
                "header2": "value1,value2",
                "cookie": "cookie1; cookie2",
                "trace": "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700",
                "request_id": "8476a536-e9f4-11e8-9739-2dfe598c3fcd",
                "body": "Hello from Lambda",
            })
        );
    }

    #[tokio::test]
    async fn a_binary_body_goes_both_ways_in_base64() {
        let router = Router::new().fallback(|body: axum::body::Bytes| async move {
            ([(header::CONTENT_TYPE, "application/octet-stream")], body)
        });
        let mut request: Value = serde_json::from_str(&example("apigw-v2-request.json")).unwrap();
        request["body"] = json!(STANDARD.encode([0u8, 159, 146, 150]));
        request["isBase64Encoded"] = json!(true);
        let response = serve(router, &request.to_string()).await;
        assert!(response.is_base64_encoded);
        let Some(aws_lambda_events::encodings::Body::Text(body)) = &response.body else {
            panic!("{:?}", response.body)
        };
        assert_eq!(STANDARD.decode(body).unwrap(), [0u8, 159, 146, 150]);
    }

    #[test]
    fn the_feedback_answer_is_an_sqs_batch_response() {
        let mut batch = SqsBatchResponse::default();
        batch.add_failure("m3");
        let answer =
            serde_json::to_value(Response::Feedback(FeedbackReport { handled: 2, batch })).unwrap();
        assert_eq!(answer["handled"], 2);
        let read: SqsBatchResponse = serde_json::from_value(answer).unwrap();
        assert_eq!(read.batch_item_failures.len(), 1);
        assert_eq!(read.batch_item_failures[0].item_identifier, "m3");
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
