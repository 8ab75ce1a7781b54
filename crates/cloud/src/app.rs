//! Composition: build every part from the config, run them until shutdown.

use max300_protocol::error::Chain;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use max300_mqtt::{BrokerUrl, Session, SessionConfig};
use max300_protocol::day::time_zone;
use max300_protocol::{Clock, RateKw, Topics};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::fleet::AlertRules;
use crate::api::{ApiState, router};
use crate::audit::Audit;
use crate::daily::{DailyFetch, replay_interrupted};
use crate::feedback::Feedback;
use crate::ingest::Ingestor;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::provider::ProviderClient;
use crate::publish::{Publisher, Transport};
use crate::sweeper::Sweeper;
use crate::{CloudConfig, CloudError, CommandStore, SqliteStore};

/// A running cloud service.
#[derive(Debug)]
pub struct Cloud {
    /// The address the HTTP API listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The command store.
    pub store: Arc<dyn CommandStore>,
    /// Ingestion, for in-process runs (`max300 ingest`).
    pub ingestor: Arc<Ingestor>,
    /// The service's metrics.
    pub metrics: Arc<Metrics>,
    /// The MQTT session.
    pub session: Session,
    tasks: JoinSet<()>,
}

impl Cloud {
    /// Validates the config, opens the stores, connects to the broker, binds the API and
    /// starts every task. Returns once everything is listening.
    pub async fn start(
        config: CloudConfig,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Result<Cloud, CloudError> {
        config.validate()?;
        let store = store_of(&config).await?;
        let topics = Topics::new(config.topic_root.clone());
        let url: BrokerUrl = config
            .mqtt
            .parse()
            .map_err(|e| CloudError::config_because("mqtt", e))?;
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("max300-cloud-{:08x}", fastrand::u32(..)));
        let filters = topics
            .cloud_filters()
            .into_iter()
            .map(|f| match &config.shared_group {
                // The broker hands each message to one member of the group.
                Some(group) => format!("$share/{group}/{f}"),
                None => f,
            })
            .collect();
        let mut session_config = SessionConfig::new(url.clone(), client_id.clone(), filters);
        session_config.topics = topics;
        // A boundary's reports arrive within about a second: the queue holds a 10,000-unit
        // fleet's while they are committed, rather than dropping them for the units to
        // resend 10 s later (`bench day`: 2,000 dropped a boundary with 4,096).
        session_config.channel_capacity = 16_384;
        session_config.tls = config.tls();
        let (session, events) = max300_mqtt::connect(session_config, shutdown.clone())?;
        // Leases only matter between instances that share the work.
        let owner = config.shared_group.is_some().then(|| client_id.clone());
        let core = Core::build(
            &config,
            &clock,
            Arc::new(session.clone()),
            store,
            owner.clone(),
        )
        .await?;
        let sweeper = core.sweeper(&clock, owner.clone());
        let Core {
            ledger,
            publisher,
            ingestor,
            metrics,
            timezone,
            state,
            max_bytes,
        } = core;
        let store = ledger.store().clone();

        let listener = tokio::net::TcpListener::bind(config.http_addr()?)
            .await
            .map_err(|cause| CloudError::Io {
                what: format!("http: cannot listen on {}", config.http),
                cause,
            })?;
        let addr = listener.local_addr().map_err(|cause| CloudError::Io {
            what: "http: the listener has no address".into(),
            cause,
        })?;
        let mut tasks = JoinSet::new();
        let app = router(state, max_bytes);
        let http_shutdown = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                warn!(error = %Chain(&e), "http server stopped");
            }
        });
        let feedback = Feedback::new(
            ledger.clone(),
            publisher.clone(),
            clock.clone(),
            timezone.clone(),
            config.auto_register,
            metrics.clone(),
        );
        tasks.spawn(feedback.run(events, shutdown.clone()));
        tasks.spawn(sweeper.run(shutdown.clone()));
        // Runs interrupted by a crash are run again, from their raw documents.
        let (replayer, replay_store, replay_clock, replay_zone, replay_owner) = (
            ingestor.clone(),
            store.clone(),
            clock.clone(),
            timezone.clone(),
            owner.clone(),
        );
        tasks.spawn(async move {
            let replayed = replay_interrupted(
                &replayer,
                &replay_store,
                &replay_clock,
                &replay_zone,
                replay_owner.as_deref(),
            )
            .await;
            if let Err(e) = replayed {
                warn!(error = %Chain(&e), "interrupted ingestions not replayed");
            }
        });
        if ingestor.can_fetch() && config.daily_fetch {
            let daily = DailyFetch {
                timezone,
                at: config.fetch_time()?,
                owner: owner.clone(),
            };
            tasks.spawn(daily.run(ingestor.clone(), store.clone(), clock, shutdown.clone()));
        }
        info!(http = %addr, mqtt = %url, client_id = %client_id, "cloud service started");
        Ok(Cloud {
            addr,
            store,
            ingestor,
            metrics,
            session,
            tasks,
        })
    }

    /// Only what one ingestion needs (`max300 ingest`): the stores, a publishing MQTT
    /// session that subscribes to nothing (so it takes no device's feedback from the service),
    /// and the ingestor. No HTTP API, feedback consumer, sweeper, replay or daily fetch.
    pub async fn ingestion(
        config: CloudConfig,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Result<(Arc<Ingestor>, Session), CloudError> {
        config.validate()?;
        let store = store_of(&config).await?;
        let url: BrokerUrl = config
            .mqtt
            .parse()
            .map_err(|e| CloudError::config_because("mqtt", e))?;
        let client_id = format!("max300-ingest-{:08x}", fastrand::u32(..));
        let mut session_config = SessionConfig::new(url, client_id, Vec::new());
        session_config.topics = Topics::new(config.topic_root.clone());
        session_config.tls = config.tls();
        // Nothing is received: the events say only connected or not, which `Session` tells.
        let (session, _events) = max300_mqtt::connect(session_config, shutdown)?;
        let owner = config.shared_group.as_ref().map(|_| session_owner());
        let core = Core::build(&config, &clock, Arc::new(session.clone()), store, owner).await?;
        Ok((core.ingestor, session))
    }

    /// Waits for every task to end (after shutdown).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// A lease holder's name for a process that is no long-running instance.
fn session_owner() -> String {
    format!("max300-ingest-{:08x}", fastrand::u32(..))
}

/// What the long-running service and the Lambda function share: the stores, publishing,
/// ingestion and the API's state, built from one config.
pub(crate) struct Core {
    pub ledger: Ledger,
    pub publisher: Publisher,
    pub ingestor: Arc<Ingestor>,
    pub metrics: Arc<Metrics>,
    pub timezone: TimeZone,
    pub state: Arc<ApiState>,
    pub max_bytes: usize,
}

impl Core {
    /// Registers the config's devices in `store` and builds the rest around it; `owner` is
    /// this instance as a lease holder, when several share the work.
    pub async fn build(
        config: &CloudConfig,
        clock: &Arc<dyn Clock>,
        transport: Arc<dyn Transport>,
        store: Arc<dyn CommandStore>,
        owner: Option<String>,
    ) -> Result<Core, CloudError> {
        let timezone =
            time_zone(&config.timezone).map_err(|e| CloudError::config_because("timezone", e))?;
        let audit = Audit::open(&config.audit_url())?;
        let now = clock.now();
        for d in &config.devices {
            let max = d.max_rate_kw.map(RateKw::try_from).transpose()?;
            store.register_device(&d.device_id, max, now).await?;
        }
        let metrics = Arc::new(Metrics::new());
        let ledger = Ledger::new(store.clone(), config.policy(&**clock));
        let publisher = Publisher::new(
            transport,
            Topics::new(config.topic_root.clone()),
            ledger.clone(),
            clock.clone(),
            metrics.clone(),
        );
        let max_bytes = usize::try_from(config.max_document_mib * 1024 * 1024)
            .map_err(|_| CloudError::config("max_document_mib: too large"))?;
        let provider = config
            .provider
            .as_deref()
            .map(|url| {
                ProviderClient::new(
                    url,
                    max_bytes,
                    Duration::from_secs(config.provider_timeout_s),
                )
            })
            .transpose()?;
        let ingestor = Arc::new(Ingestor::new(
            ledger.clone(),
            audit,
            publisher.clone(),
            clock.clone(),
            timezone.clone(),
            config.default_max_rate()?,
            max_bytes,
            provider,
            config.pack()?,
            metrics.clone(),
            owner,
        ));
        let state = Arc::new(ApiState {
            store: store.clone(),
            ledger: ledger.clone(),
            ingestor: ingestor.clone(),
            publisher: publisher.clone(),
            clock: clock.clone(),
            timezone: timezone.clone(),
            token: config.api_token.clone(),
            protect_reads: config.protect_reads,
            alerts: AlertRules {
                heartbeat_interval_s: config.heartbeat_interval_s,
                offline_alert_s: config.offline_alert_s,
                plan_due_at: config.plan_due_time()?,
            },
            metrics: metrics.clone(),
        });
        Ok(Core {
            ledger,
            publisher,
            ingestor,
            metrics,
            timezone,
            state,
            max_bytes,
        })
    }

    /// The sweeper over these parts, holding its lease as `owner` (if it shares the work).
    pub fn sweeper(&self, clock: &Arc<dyn Clock>, owner: Option<String>) -> Sweeper {
        Sweeper {
            ledger: self.ledger.clone(),
            publisher: self.publisher.clone(),
            clock: clock.clone(),
            metrics: self.metrics.clone(),
            owner,
        }
    }
}

/// Opens the command store the config names. A DynamoDB table must exist, unless
/// `create_resources` is set: then a missing one is created with the template's schema.
pub async fn store_of(config: &CloudConfig) -> Result<Arc<dyn CommandStore>, CloudError> {
    let url = config.store_url();
    #[cfg(feature = "aws")]
    if url.starts_with("dynamodb://") {
        let store = crate::store::DynamoStore::open(&url).await?;
        store.ensure_table(config.create_resources).await?;
        return Ok(Arc::new(store));
    }
    open_store(&url).await
}

/// Opens the command store its URL names: `sqlite://PATH`, or `dynamodb://TABLE` with the
/// `aws` feature.
pub async fn open_store(url: &str) -> Result<Arc<dyn CommandStore>, CloudError> {
    match url.split_once("://") {
        Some(("sqlite", path)) => Ok(Arc::new(SqliteStore::open(&PathBuf::from(path))?)),
        #[cfg(feature = "aws")]
        Some(("dynamodb", _)) => Ok(Arc::new(crate::store::DynamoStore::open(url).await?)),
        _ => Err(CloudError::config(format!(
            "store: {url:?} is not supported by this build; use sqlite://PATH{}",
            if cfg!(feature = "aws") {
                " or dynamodb://TABLE"
            } else {
                ""
            }
        ))),
    }
}
