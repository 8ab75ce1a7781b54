//! The sample schedule provider: a plausible day-ahead plan per device, deterministic for a
//! seed. Charge in the cheap night hours, a little midday solar for some, discharge at the
//! 16:00–19:00 peak. Some devices get periods by number, others spans by instant, so both
//! forms of the contract are exercised.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use max300_protocol::{Clock, Day, ProtocolError};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::SimError;

/// The provider's settings.
#[derive(Clone, Debug)]
pub struct SampleProvider {
    /// Device ids, in order.
    pub devices: Vec<String>,
    /// Seed for the variety between devices and days.
    pub seed: u64,
    /// The fleet's zone.
    pub timezone: TimeZone,
}

impl SampleProvider {
    /// Ids `max300-0001` … for `n` devices.
    pub fn numbered(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("max300-{i:04}")).collect()
    }

    /// The document for `date`.
    pub fn document(&self, date: Date, generated_at: jiff::Timestamp) -> Result<Value, SimError> {
        let day = Day::new(date, self.timezone.clone())?;
        let tz_name = day.tz_name().to_owned();
        let schedules = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, id)| self.device_plan(&day, i, id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(json!({
            "schedule_date": date.to_string(),
            "timezone": tz_name,
            "generated_at": generated_at.to_string(),
            "schedules": schedules,
        }))
    }

    /// The same document as [`SampleProvider::document`], serialized one device at a time,
    /// so a large fleet's document never exists as a JSON tree in memory (the benchmarks
    /// measure the service, not this).
    pub fn document_bytes(
        &self,
        date: Date,
        generated_at: jiff::Timestamp,
    ) -> Result<Vec<u8>, SimError> {
        self.shaped_bytes(date, generated_at, Shape::Compact)
    }

    /// The same plans in the [rich](Shape::Rich) shape, serialized one device at a time.
    pub fn rich_document_bytes(
        &self,
        date: Date,
        generated_at: jiff::Timestamp,
    ) -> Result<Vec<u8>, SimError> {
        self.shaped_bytes(date, generated_at, Shape::Rich)
    }

    fn shaped_bytes(
        &self,
        date: Date,
        generated_at: jiff::Timestamp,
        shape: Shape,
    ) -> Result<Vec<u8>, SimError> {
        let mut out = Vec::new();
        self.write_document(&mut out, date, generated_at, shape)?;
        Ok(out)
    }

    /// Writes the document for `date` in `shape`, one device at a time: a large fleet's
    /// document can go straight to a file, never held.
    pub fn write_document(
        &self,
        out: &mut dyn std::io::Write,
        date: Date,
        generated_at: jiff::Timestamp,
        shape: Shape,
    ) -> Result<(), SimError> {
        let day = Day::new(date, self.timezone.clone())?;
        let head = json!({
            "schedule_date": date.to_string(),
            "timezone": day.tz_name(),
            "generated_at": generated_at.to_string(),
        });
        let mut head = serde_json::to_vec(&head)?;
        // `{...}` becomes `{..., "schedules": [` followed by each plan.
        head.pop();
        out.write_all(&head)?;
        out.write_all(b",\"schedules\":[")?;
        for (i, id) in self.devices.iter().enumerate() {
            if i > 0 {
                out.write_all(b",")?;
            }
            let plan = match shape {
                Shape::Compact => self.device_plan(&day, i, id)?,
                Shape::Rich => self.rich_plan(&day, i, id)?,
            };
            serde_json::to_writer(&mut *out, &plan)?;
        }
        out.write_all(b"]}")?;
        Ok(())
    }

    /// A device's plan in the rich shape: every period listed, for even devices by number
    /// and for odd ones as `start`/`end` spans (each run of one setpoint, idle included) with
    /// the start written at +01:00; modes in mixed case.
    fn rich_plan(&self, day: &Day, index: usize, id: &str) -> Result<Value, SimError> {
        let compact = self.device_plan(day, index, id)?;
        let fleet = max300_protocol::document::Fleet::new(self.timezone.clone());
        let doc = json!({
            "schedule_date": day.date().to_string(),
            "timezone": day.tz_name(),
            "schedules": [compact],
        });
        let normalized = max300_protocol::document::normalize(doc.to_string().as_bytes(), &fleet)?;
        let schedule = &normalized
            .schedules
            .first()
            .ok_or_else(|| ProtocolError::Plan(format!("{id}: the sample plan was refused")))?
            .schedule;
        let mode = |m: max300_protocol::Mode, p: u32| match (m, p % 3) {
            (max300_protocol::Mode::Charge, 0) => "CHARGE",
            (max300_protocol::Mode::Charge, 1) => "Charge",
            (max300_protocol::Mode::Charge, _) => "charge",
            (max300_protocol::Mode::Discharge, 0) => "Discharge",
            (max300_protocol::Mode::Discharge, _) => "DISCHARGE",
            (max300_protocol::Mode::Idle, 0) => "IDLE",
            (max300_protocol::Mode::Idle, _) => "Idle",
        };
        let plus_one = jiff::tz::TimeZone::fixed(jiff::tz::offset(1));
        let mut intervals = Vec::new();
        let periods: Vec<_> = schedule.periods().collect();
        if index.is_multiple_of(2) {
            for p in &periods {
                intervals.push(json!({"period": p.period, "mode": mode(p.setpoint.mode(), p.period), "rate_kw": p.setpoint.rate().kw()}));
            }
        } else {
            for run in periods.chunk_by(|a, b| a.setpoint == b.setpoint) {
                let (first, last) = (run[0], run[run.len() - 1]);
                let end = day.period_start(last.period + 1);
                intervals.push(json!({
                    "start": first.start.to_zoned_datetime(plus_one.clone()).strftime("%Y-%m-%dT%H:%M:%S%:z").to_string(),
                    "end": end.to_string(),
                    "mode": mode(first.setpoint.mode(), first.period),
                    "rate_kw": first.setpoint.rate().kw(),
                }));
            }
        }
        Ok(json!({"device_id": id, "intervals": intervals}))
    }

    fn device_plan(&self, day: &Day, index: usize, id: &str) -> Result<Value, SimError> {
        let mut rng = fastrand::Rng::with_seed(
            self.seed
                ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (day.date().day_of_year() as u64) << 40
                ^ (day.date().year() as u64) << 50,
        );
        let charge_start = rng.i8(0..=2) + 1; // 01:00–03:00
        let charge_kw = f64::from(rng.u32(20..=30));
        let charge_hours = 3.0;
        let solar_kw = if rng.bool() {
            f64::from(rng.u32(2..=10))
        } else {
            0.0
        };
        // Give back what was stored, less losses, over the three peak hours.
        let discharge_kw =
            ((charge_kw * charge_hours + solar_kw) * 0.9 / 3.0 * 10.0).round() / 10.0;
        let blocks = [
            (
                Time::constant(charge_start, 0, 0, 0),
                6,
                "charge",
                charge_kw,
            ),
            (Time::constant(12, 0, 0, 0), 2, "charge", solar_kw),
            (Time::constant(16, 0, 0, 0), 6, "discharge", discharge_kw),
        ];
        let by_period = index.is_multiple_of(2);
        let mut intervals = Vec::new();
        for (at, periods, mode, kw) in blocks {
            if kw == 0.0 {
                continue;
            }
            let start = day
                .date()
                .to_datetime(at)
                .to_zoned_datetime(self.timezone.clone())?
                .timestamp();
            let first = day.period_at(start).ok_or_else(|| {
                ProtocolError::InvalidDate(
                    day.date().to_string(),
                    format!("a block at {at} starts outside the day"),
                )
            })?;
            if by_period {
                for p in first..first + periods {
                    intervals.push(json!({"period": p, "mode": mode, "rate_kw": kw}));
                }
            } else {
                let end = day.period_start(first + periods);
                intervals.push(json!({
                    "start": start.to_zoned_datetime(self.timezone.clone()).strftime("%Y-%m-%dT%H:%M:%S%:z").to_string(),
                    "end": end.to_string(),
                    "mode": mode,
                    "rate_kw": kw,
                }));
            }
        }
        Ok(json!({"device_id": id, "intervals": intervals}))
    }
}

/// How a document is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Only the busy periods: numbered for even devices, spans for odd ones.
    Compact,
    /// Every period, mixed-case modes, spans with offsets: about 1.2 KB a device, the shape
    /// the issue 16 benchmarks use.
    Rich,
}

#[derive(Deserialize)]
struct DateQuery {
    date: Option<String>,
}

struct ProviderState {
    provider: SampleProvider,
    clock: Arc<dyn Clock>,
}

async fn tomorrow(State(state): State<Arc<ProviderState>>, Query(q): Query<DateQuery>) -> Response {
    let now = state.clock.now();
    let date = match q.date.as_deref() {
        Some(text) => match text.parse::<Date>() {
            Ok(d) => d,
            Err(_) => {
                let body = json!({"error": format!("date: {text:?} is not YYYY-MM-DD")});
                return (StatusCode::BAD_REQUEST, Json(body)).into_response();
            }
        },
        None => match now
            .to_zoned_datetime(state.provider.timezone.clone())
            .date()
            .tomorrow()
        {
            Ok(d) => d,
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        },
    };
    match state.provider.document(date, now) {
        Ok(doc) => Json(doc).into_response(),
        Err(e) => {
            let body = json!({"error": e.to_string()});
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
    }
}

/// Serves `GET /tomorrow[?date=D]` on `addr` until shutdown; returns the bound address.
pub async fn serve(
    provider: SampleProvider,
    clock: Arc<dyn Clock>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), SimError> {
    let state = Arc::new(ProviderState { provider, clock });
    let app = Router::new()
        .route("/tomorrow", get(tomorrow))
        .with_state(state);
    let listen = |source| SimError::Listen {
        what: "provider",
        addr,
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use max300_protocol::document::{Fleet, normalize};

    fn provider() -> SampleProvider {
        SampleProvider {
            devices: SampleProvider::numbered(6),
            seed: 7,
            timezone: TimeZone::get("Europe/London").unwrap(),
        }
    }

    #[test]
    fn its_documents_normalize_cleanly_on_ordinary_and_clock_change_days() {
        for (date, periods) in [("2026-11-30", 48), ("2026-10-25", 50), ("2027-03-28", 46)] {
            let doc = provider()
                .document(
                    date.parse().unwrap(),
                    "2026-01-01T00:00:00Z".parse().unwrap(),
                )
                .unwrap();
            let fleet = Fleet::new(TimeZone::get("Europe/London").unwrap());
            let out = normalize(doc.to_string().as_bytes(), &fleet).unwrap();
            assert!(out.rejected.is_empty(), "{date}: {:?}", out.rejected);
            assert_eq!(out.schedules.len(), 6);
            for s in &out.schedules {
                assert_eq!(s.schedule.setpoints().len(), periods);
                let (charged, discharged) = s.schedule.energy_kwh();
                assert!(charged > 0.0 && discharged > 0.0 && discharged < charged);
                // Stays inside a 10–90 % window from 50 % on a 300 kWh unit.
                assert!(charged < 0.4 * 300.0, "{charged}");
            }
        }
    }

    #[test]
    fn is_deterministic_for_a_seed_and_varies_between_devices() {
        let t = "2026-01-01T00:00:00Z".parse().unwrap();
        let date = "2026-11-30".parse().unwrap();
        let a = provider().document(date, t).unwrap();
        let streamed: Value =
            serde_json::from_slice(&provider().document_bytes(date, t).unwrap()).unwrap();
        assert_eq!(streamed, a, "the streamed document is the same document");
        let b = provider().document(date, t).unwrap();
        assert_eq!(a, b);
        assert_ne!(
            a["schedules"][0]["intervals"],
            a["schedules"][2]["intervals"]
        );
        let rich = provider().rich_document_bytes(date, t).unwrap();
        let fleet = Fleet::new(TimeZone::get("Europe/London").unwrap());
        let (a_plans, rich_plans) = (
            normalize(a.to_string().as_bytes(), &fleet).unwrap(),
            normalize(&rich, &fleet).unwrap(),
        );
        assert!(rich_plans.rejected.is_empty(), "{:?}", rich_plans.rejected);
        for (x, y) in a_plans.schedules.iter().zip(&rich_plans.schedules) {
            assert_eq!(x.schedule, y.schedule, "the rich shape says the same");
            assert_eq!(y.filled, 0, "every period is listed");
        }
        let mut other = provider();
        other.seed = 8;
        assert_ne!(other.document(date, t).unwrap(), a);
    }
}
