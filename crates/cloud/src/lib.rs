//! The MAX300 cloud service: fetch and normalize day-ahead schedules, keep the raw documents
//! for audit, turn each device's plan into a command, deliver it over MQTT, and follow every
//! command and period through acks, reports and heartbeats.
//!
//! # Layout
//! - [`config`]: the service's settings, layered from an embedded default, a file and env.
//! - [`app`]: composition: builds the parts, runs them until shutdown.
//! - [`lifecycle`]: the command lifecycle as one state machine (pure): every rule of
//!   DESIGN §6, and what each ack, report, publish, tick and cancel does.
//! - [`store`]: the [`CommandStore`] seam, which loads what the lifecycle decides on and
//!   writes what it decided; SQLite, and (feature `aws`) DynamoDB.
//! - [`ledger`]: the load, decide, write loop over a store.
//! - [`audit`]: raw documents and rejections, kept in an `object_store`.
//! - [`provider`]: the HTTP client for the schedule provider.
//! - [`ingest`]: document → audit → normalize → commit → publish.
//! - [`feasibility`]: whether a plan would run into a unit's SoC limits (pure).
//! - [`publish`]: commands and receipts out to devices.
//! - [`feedback`]: acks, reports, heartbeats and sync from devices; receipts back.
//! - [`daily`]: the daily fetch at a configured local time.
//! - [`sweeper`]: resends with backoff, and the clock-driven `late`/`expired`/`incomplete`.
//! - [`metrics`]: the Prometheus metrics.
//! - [`api`]: the HTTP API, and the dashboard's JSON.
//! - `lambda` (feature `aws`): the service as one AWS Lambda handler.

pub mod api;
pub mod app;
pub mod audit;
pub mod config;
pub mod daily;
pub mod feasibility;
pub mod feedback;
pub mod ingest;
#[cfg(feature = "aws")]
pub mod lambda;
pub mod ledger;
pub mod lifecycle;
pub mod metrics;
pub mod provider;
pub mod publish;
pub mod store;
pub mod sweeper;

mod error;

pub use app::Cloud;
pub use config::CloudConfig;
pub use error::CloudError;
pub use ingest::{CommandRef, CommandRefs, IngestReport, Listing};
pub use ledger::Ledger;
pub use lifecycle::{CommandState, PeriodStatus, Policy};
pub use store::{CommandStore, SqliteStore};
