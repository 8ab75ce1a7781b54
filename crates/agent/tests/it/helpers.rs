//! `TestApp`: starts the broker, the fake cloud and the agent, with one method per action.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use max300_agent::{AgentConfig, AgentError};
use max300_protocol::message::{AckMsg, AckStatus, ScheduleMsg};
use max300_protocol::{
    Channel, Clock, Day, DeviceId, Message, MessageId, Mode, RateKw, ScaledClock, Schedule,
    Setpoint, StoreId,
};
use max300_sim::battery::{WriteLogEntry, read_write_log};
use max300_sim::cloud::{FakeCloud, Receipts};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DEVICE: &str = "max300-0001";
pub const WAIT: Duration = Duration::from_secs(20);

/// Starts the embedded broker on a free loopback port.
pub fn start_broker() -> u16 {
    max300_mqtt::broker::start("127.0.0.1:0".parse().unwrap(), 1100)
        .expect("the embedded broker starts")
        .port()
}

pub fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

pub fn device() -> DeviceId {
    DeviceId::parse(DEVICE).unwrap()
}

pub fn setpoint(mode: Mode, kw: f64) -> Setpoint {
    Setpoint::new(mode, RateKw::try_from(kw).unwrap()).unwrap()
}

/// A plan for `date`, with `f(period)` as each period's setpoint.
pub fn plan(
    device: &DeviceId,
    date: &str,
    version: u32,
    f: impl Fn(u32) -> Setpoint,
) -> ScheduleMsg {
    let day = Day::named(date.parse().unwrap(), "Europe/London").unwrap();
    let setpoints = (1..=day.period_count()).map(f).collect();
    let schedule = Schedule::new(device.clone(), day, setpoints).unwrap();
    let at = ts("2026-11-29T16:00:00Z");
    ScheduleMsg::new(&schedule, MessageId::generate(at), version, at)
}

/// The broker, the fake cloud (receipts are the tests' own), and one agent.
pub struct TestApp {
    pub port: u16,
    cloud: FakeCloud,
    /// Every message the cloud has seen, in arrival order.
    pub seen: Vec<Message>,
    pub clock: Arc<ScaledClock>,
    pub dir: tempfile::TempDir,
    agent: Option<(CancellationToken, JoinHandle<Result<(), AgentError>>)>,
    /// TOML appended to the agent's config file (tables such as `[safety]` and `[sim]`).
    extra: String,
}

impl TestApp {
    /// A broker, a subscribed cloud client, and an agent whose clock reads `start` now.
    pub async fn start(start: &str, speed: f64) -> TestApp {
        TestApp::start_with(start, speed, "").await
    }

    /// As [`TestApp::start`], with `extra` TOML appended to the agent's config.
    pub async fn start_with(start: &str, speed: f64, extra: &str) -> TestApp {
        let port = start_broker();
        let url = format!("mqtt://127.0.0.1:{port}").parse().unwrap();
        let shutdown = CancellationToken::new();
        let cloud = FakeCloud::connect(url, "cloud-test", Receipts::Manual, WAIT, shutdown)
            .await
            .unwrap();
        let mut app = TestApp {
            port,
            cloud,
            seen: Vec::new(),
            clock: Arc::new(ScaledClock::starting_now(ts(start), speed)),
            dir: tempfile::tempdir().unwrap(),
            agent: None,
            extra: extra.to_owned(),
        };
        app.start_agent();
        app
    }

    pub fn config(&self) -> AgentConfig {
        // The revert timer is short (re-asserts every 2 s), so the wait for the power to
        // settle must be under 2 s; a test with its own `[safety]` table sets `settle_s`.
        let safety = if self.extra.contains("[safety]") {
            ""
        } else {
            "[safety]\nsettle_s = 1\n"
        };
        let file = format!(
            "device_id = \"{DEVICE}\"\nmqtt = \"mqtt://127.0.0.1:{}\"\ndata_dir = {:?}\n\
             heartbeat_interval_s = 1\nresend_after_s = 2\nrevert_timeout_s = 4\n{}{safety}",
            self.port,
            self.dir.path().display().to_string(),
            self.extra
        );
        AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, Some(&file), &[]).unwrap()
    }

    pub fn start_agent(&mut self) {
        let shutdown = CancellationToken::new();
        let clock: Arc<dyn Clock> = self.clock.clone();
        let task = tokio::spawn(max300_sim::run_agent(
            self.config(),
            clock,
            shutdown.clone(),
        ));
        self.agent = Some((shutdown, task));
    }

    /// Stops the agent and checks it returned `Ok`.
    pub async fn stop_agent(&mut self) {
        let (shutdown, task) = self.agent.take().expect("an agent is running");
        shutdown.cancel();
        let result = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        assert!(result.is_ok(), "{result:?}");
    }

    /// Restarts the agent on the same store, with a clock that reads `start` now.
    pub async fn restart_agent(&mut self, start: &str, speed: f64) {
        self.stop_agent().await;
        self.clock = Arc::new(ScaledClock::starting_now(ts(start), speed));
        self.start_agent();
    }

    /// The simulated battery's own record of every write (kept in the data dir).
    pub fn write_log(&self) -> Vec<WriteLogEntry> {
        read_write_log(self.dir.path().join("battery-writes.jsonl")).unwrap()
    }

    /// The net energy (kWh, charge positive) the simulated unit ran from `start` to `end`,
    /// from its own write log: each setpoint runs until the next line. Exact for a unit
    /// without a ramp (the default), whose power follows each write at once.
    pub fn logged_kwh(&self, start: Timestamp, end: Timestamp) -> f64 {
        let log = self.write_log();
        let mut kwh = 0.0;
        for (i, w) in log.iter().enumerate() {
            let until = log.get(i + 1).map_or(end, |n| n.at);
            let (from, to) = (w.at.max(start), until.min(end));
            if to > from {
                let kw = w.setpoint().map_or(0.0, |s| s.signed_kw());
                kwh += kw * to.duration_since(from).as_secs_f64() / 3600.0;
            }
        }
        kwh
    }

    pub async fn publish(&self, channel: Channel, payload: Vec<u8>) {
        self.cloud
            .publish(&device(), channel, payload)
            .await
            .unwrap();
    }

    pub async fn send(&self, msg: Message) {
        self.cloud.send(&device(), &msg).await.unwrap();
    }

    pub async fn receipt(&self, store_id: &StoreId, seqs: Vec<u64>) {
        self.cloud.receipt(&device(), store_id, seqs).await.unwrap();
    }

    /// Waits for the first message that `pick` takes.
    pub async fn next<T>(&mut self, what: &str, pick: impl Fn(&Message) -> Option<T>) -> T {
        let deadline = max300_protocol::clock::monotonic() + WAIT;
        loop {
            let msg = match self.cloud.next_before(deadline).await {
                Ok(msg) => msg,
                Err(e) => panic!("{e} while waiting for {what}; seen: {:#?}", self.seen),
            };
            self.seen.push(msg.clone());
            if let Some(found) = pick(&msg) {
                return found;
            }
        }
    }
}

/// Picks the ack of message `id` (for [`TestApp::next`]).
pub fn ack_of(id: MessageId) -> impl Fn(&Message) -> Option<AckMsg> {
    move |m: &Message| match m {
        Message::Ack(a) if a.message_id == id => Some(a.clone()),
        _ => None,
    }
}

/// Once the agent is subscribed (its first `sync`), sends today's plan (`f(period)` each
/// period) and waits for its ack, which must accept it.
pub async fn follow(app: &mut TestApp, f: impl Fn(u32) -> Setpoint) -> AckMsg {
    app.next("sync", |m| matches!(m, Message::Sync(_)).then_some(()))
        .await;
    let today = plan(&device(), "2026-11-30", 1, f);
    app.send(Message::Schedule(today.clone())).await;
    let ack = app.next("the ack", ack_of(today.message_id.clone())).await;
    assert_eq!(ack.status, AckStatus::Accepted, "{ack:?}");
    ack
}
