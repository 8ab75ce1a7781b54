//! The HTTP API of DESIGN §8.
//!
//! Writes need `Authorization: Bearer <token>` when a token is configured; without one the
//! service only starts on a loopback listener (see `CloudConfig::validate`).

mod dashboard;
mod error;
pub mod fleet;

pub use error::ApiError;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use jiff::civil::Date;
use max300_protocol::{Clock, DeviceId, MessageId, RateKw};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::CommandStore;
use crate::ingest::{IngestReport, Ingestor, Listing};
use crate::publish::Publisher;
use crate::store::Cancel;
use crate::store::DeviceRecord;

/// What the handlers share.
#[derive(Debug)]
pub struct ApiState {
    /// The command store.
    pub store: Arc<dyn CommandStore>,
    /// The commands' lifecycle over the store (an operator's cancel).
    pub ledger: crate::ledger::Ledger,
    /// Ingestion.
    pub ingestor: Arc<Ingestor>,
    /// Publishes control messages; its transport tells readiness.
    pub publisher: Publisher,
    /// Plan time.
    pub clock: Arc<dyn Clock>,
    /// The fleet's zone.
    pub timezone: jiff::tz::TimeZone,
    /// The API token, if any.
    pub token: Option<String>,
    /// Whether reads need the token.
    pub protect_reads: bool,
    /// When devices raise alerts (and the heartbeat interval behind `online`).
    pub alerts: fleet::AlertRules,
    /// The service's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl ApiState {
    /// The fleet view at `now`.
    pub async fn fleet_view(&self) -> Result<fleet::FleetView, ApiError> {
        let now = self.clock.now();
        let (today, tomorrow, ended_by) = fleet::fleet_dates(now, &self.timezone)?;
        let rows = self.store.fleet(today, tomorrow, ended_by).await?;
        fleet::fleet_view(rows, now, self.clock.speed(), &self.timezone, &self.alerts)
    }
}

/// The router.
pub fn router(state: Arc<ApiState>, max_body: usize) -> Router {
    let writes = Router::new()
        .route("/api/ingest", post(ingest))
        .route("/api/schedules", post(schedules))
        .route("/api/devices", post(register))
        .route("/api/commands/{id}/cancel", post(cancel))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let reads = Router::new()
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}", get(device))
        .route("/api/devices/{id}/reports", get(reports))
        .route("/api/devices/{id}/day", get(fleet::day))
        .route("/api/fleet", get(fleet::fleet))
        .route("/api/commands", get(commands))
        .route("/api/commands/{id}", get(command))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_token_for_reads,
        ));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(writes)
        .merge(reads)
        // The page and its assets hold no fleet data, and a browser can't put a bearer
        // token on a navigation: they stay outside the read-token rule, the JSON doesn't.
        .merge(dashboard::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn(request_timeout))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// How long a request may take, ingestion of a large document included.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

async fn request_timeout(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request took longer than {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
    }
}

async fn require_token(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match check_token(&state, &headers) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

async fn require_token_for_reads(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if !state.protect_reads {
        return next.run(request).await;
    }
    match check_token(&state, &headers) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

fn check_token(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))
    }
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    let store = state.store.ping().await;
    let broker = state.publisher.transport().is_connected();
    // A session whose subscription was refused is not connected (it cannot hear its
    // devices), and this says why.
    let subscription = state.publisher.transport().subscription_error();
    let body = json!({
        "store": if store.is_ok() { "ok" } else { "unavailable" },
        "broker": if broker { "connected" } else { "disconnected" },
        "subscription": subscription,
    });
    let status = if store.is_ok() && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus text exposition: the counters as they are, and the fleet's gauges as the store
/// says now.
async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    use crate::metrics::Metrics;
    let m = &state.metrics;
    m.set_mqtt_dropped(state.publisher.transport().dropped());
    let by_state: std::collections::HashMap<_, _> =
        state.store.command_counts().await?.into_iter().collect();
    for st in crate::CommandState::ALL {
        let n = by_state.get(&st).copied().unwrap_or(0);
        Metrics::set(&m.commands, &[("state", st.as_str())], i64::from(n));
    }
    let view = state.fleet_view().await?;
    for alert in fleet::Alert::ALL {
        let n = view.summary.alerts.get(alert);
        Metrics::set(&m.alerts, &[("kind", alert.as_str())], i64::from(n));
    }
    let mut ages: Vec<f64> = view.ages.iter().flatten().copied().collect();
    ages.sort_by(f64::total_cmp);
    let never = view.ages.iter().filter(|a| a.is_none()).count();
    let online = view
        .ages
        .iter()
        .flatten()
        .filter(|a| **a <= 3.0 * state.alerts.heartbeat_interval_s as f64)
        .count();
    let offline = view.ages.len() - never - online;
    for (status, n) in [
        ("online", online),
        ("offline", offline),
        ("never_seen", never),
    ] {
        Metrics::set(&m.devices, &[("status", status)], n as i64);
    }
    let stat = |q: f64| {
        let i = ((ages.len() as f64 - 1.0) * q).round() as usize;
        ages.get(i).copied().unwrap_or(0.0)
    };
    for (name, q) in [("max", 1.0), ("median", 0.5)] {
        m.heartbeat_age
            .get_or_create(&vec![("stat", name.to_owned())])
            .set(stat(q));
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response())
}

#[derive(Deserialize)]
struct DateQuery {
    date: Option<String>,
}

fn parse_date(text: &str) -> Result<Date, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("date: {text:?} is not YYYY-MM-DD")))
}

async fn ingest(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<DateQuery>,
) -> Result<Json<IngestReport>, ApiError> {
    let date = match q.date.as_deref() {
        Some(text) => parse_date(text)?,
        None => {
            let today = state
                .clock
                .now()
                .to_zoned_datetime(state.timezone.clone())
                .date();
            today
                .tomorrow()
                .map_err(|e| ApiError::bad_request(e.to_string()))?
        }
    };
    if !state.ingestor.can_fetch() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no provider is configured (--provider); POST the document to /api/schedules",
        ));
    }
    Ok(Json(
        state.ingestor.fetch(date, None, Listing::Every).await?,
    ))
}

async fn schedules(
    State(state): State<Arc<ApiState>>,
    body: Bytes,
) -> Result<Json<IngestReport>, ApiError> {
    Ok(Json(state.ingestor.post(body).await?))
}

#[derive(Deserialize)]
struct NewDevice {
    device_id: String,
    #[serde(default)]
    max_rate_kw: Option<f64>,
}

async fn register(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<NewDevice>, JsonRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = DeviceId::parse(body.device_id)
        .map_err(|e| ApiError::bad_request(format!("device_id: {e}")))?;
    let max = body
        .max_rate_kw
        .map(RateKw::try_from)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("max_rate_kw: {e}")))?;
    state
        .store
        .register_device(&id, max, state.clock.now())
        .await?;
    let record = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id}")))?;
    Ok(Json(DeviceView::new(record, &state)))
}

/// A device as the API shows it.
#[derive(Serialize)]
struct DeviceView {
    #[serde(flatten)]
    record: DeviceRecord,
    online: bool,
}

impl DeviceView {
    fn new(record: DeviceRecord, state: &ApiState) -> DeviceView {
        // Three missed heartbeats (real time) make a device offline; last_seen is clock time.
        let window_s = 3.0 * state.alerts.heartbeat_interval_s as f64 * state.clock.speed();
        let online = record
            .last_seen
            .is_some_and(|seen| state.clock.now().duration_since(seen).as_secs_f64() <= window_s);
        DeviceView { record, online }
    }
}

async fn devices(State(state): State<Arc<ApiState>>) -> Result<Json<Vec<DeviceView>>, ApiError> {
    let list = state.store.devices().await?;
    Ok(Json(
        list.into_iter()
            .map(|d| DeviceView::new(d, &state))
            .collect(),
    ))
}

async fn device(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = DeviceId::parse(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let record = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id} is not registered")))?;
    let commands = state.store.commands(Some(&id), None).await?;
    let mut view = serde_json::to_value(DeviceView::new(record, &state))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    view["commands"] = json!(commands);
    Ok(Json(view))
}

async fn reports(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<DateQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let id = DeviceId::parse(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let text = q
        .date
        .ok_or_else(|| ApiError::bad_request("date: missing (?date=YYYY-MM-DD)"))?;
    let day = max300_protocol::Day::new(parse_date(&text)?, state.timezone.clone())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(
        state.store.reports(&id, day.start(), day.end()).await?,
    ))
}

#[derive(Deserialize)]
struct CommandQuery {
    device_id: Option<String>,
    date: Option<String>,
}

async fn commands(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<CommandQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let device = q
        .device_id
        .filter(|d| !d.is_empty())
        .map(DeviceId::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let date = q
        .date
        .filter(|d| !d.is_empty())
        .map(|d| parse_date(&d))
        .transpose()?;
    Ok(Json(state.store.commands(device.as_ref(), date).await?))
}

async fn command(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = MessageId::parse(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let detail = state
        .store
        .command(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("command {id} does not exist")))?;
    Ok(Json(detail))
}

async fn cancel(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = MessageId::parse(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let now = state.clock.now();
    match state
        .ledger
        .cancel(&id, MessageId::generate(now), now)
        .await?
    {
        Cancel::Cancelled(control) => {
            let control_id = control.message_id.clone();
            tracing::info!(device_id = %control.device_id, message_id = %id, control_message_id = %control_id, "command cancelled by an operator");
            // Committed first: if this publish fails, the sweeper sends it again.
            state
                .publisher
                .publish(std::slice::from_ref(&control_id))
                .await?;
            Ok(Json(json!({
                "message_id": id,
                "state": "cancelled",
                "control_message_id": control_id,
            })))
        }
        Cancel::AlreadyEnded(s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("command {id} is already {s}: nothing to cancel"),
        )),
        Cancel::NotFound => Err(ApiError::not_found(format!("command {id} does not exist"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_tokens_fully() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-123", b"secret-token-124"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
