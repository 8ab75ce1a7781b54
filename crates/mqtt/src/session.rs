//! The session task and its handle.
//!
//! ```text
//!  broker ⇄ rumqttc EventLoop ── task ──▶ bounded channel of Event ──▶ application
//!                 ▲                                                      │
//!                 └──── AsyncClient (publish, PUBACK) ◀───────────────────┘
//! ```
//!
//! The task never waits on the application: a message that finds the channel full is dropped
//! (and counted), because both directions resend what was not confirmed at the application
//! level.
//!
//! The decisions are kept out of the task, in pure types it feeds with what it sees:
//! - `window`: how many of our QoS 1 publishes may be queued or in flight;
//! - `acks`: which PUBACKs may go, in what order, and which belong to a dead connection;
//! - `subscription`: whether the connection's subscription is confirmed, refused or overdue.
//!
//! A connection counts as connected only once the broker has granted every filter. A refused
//! filter, a SUBACK that does not come within `subscribe_timeout` or a SUBSCRIBE that cannot
//! be queued drops the connection, and the session connects again after the backoff: it is
//! never connected but deaf. The reason stays readable on [`Session::subscription_error`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use max300_protocol::clock::monotonic;
use max300_protocol::{Backoff, Channel, DeviceId, Message, ProtocolError, Topics};
use rumqttc::{
    AsyncClient, ConnectionError, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS, Request,
    TlsConfiguration, Transport,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{BrokerUrl, MqttError, TlsFiles};

mod acks;
#[cfg(test)]
pub(crate) mod script;
mod subscription;
mod window;

use acks::{Acks, Done, Ticket};
use subscription::Failure;
pub(crate) use subscription::{Step, Subscription};
use window::Window;

/// The pause before connecting again: 200 ms doubling to 30 s, each spread ±50 % so a fleet
/// that lost its broker together does not return in step. Real time.
pub(crate) const RECONNECT: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(30)).jitter(0.5, 1.5);
/// How long a publish may wait for a slot in the window and room in the client's queue. Both
/// free up only while the session task runs, so an unbounded wait could deadlock with it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the DISCONNECT at shutdown may take to be written before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How to connect.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The broker.
    pub url: BrokerUrl,
    /// The client id: a device's id, or a unique id per cloud instance.
    pub client_id: String,
    /// Topic filters to (re)subscribe after every connect.
    pub subscriptions: Vec<String>,
    /// The topic layout, for decoding.
    pub topics: Topics,
    /// MQTT keep-alive (real time).
    pub keep_alive: Duration,
    /// Capacity of the event channel to the application.
    pub channel_capacity: usize,
    /// Certificates, for `mqtts://`.
    pub tls: Option<TlsFiles>,
    /// How long a SUBACK may take (real time) before the connection is dropped and made again.
    pub subscribe_timeout: Duration,
    /// What the connection's buffers are sized for.
    pub limits: SessionLimits,
}

/// What a session's buffers are sized for. rumqttc allocates some of them up front, per
/// connection, whatever the traffic: a slot per in-flight publish, and a queue of events as
/// long as the in-flight window. The defaults suit the cloud and an agent; a process that
/// holds thousands of quiet connections (the fleet simulator) sizes them to its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// QoS 1 publishes that may await the broker's PUBACK at once (rumqttc's in-flight
    /// window). Our own publishes are held to four fifths of it, so the request queue always
    /// has room for the PUBACKs of what we receive.
    pub inflight: u16,
    /// Requests (publishes, PUBACKs, the subscription) that may queue for the session task.
    pub requests: usize,
    /// The largest packet either way.
    pub max_packet_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            inflight: 100,
            requests: 256,
            // A 128 KiB payload plus topic and header, with room to spare.
            max_packet_bytes: 192 * 1024,
        }
    }
}

impl SessionLimits {
    /// Our QoS 1 publishes that may be queued or in flight at once: below the in-flight
    /// window (80 of the default 100).
    fn publish_window(&self) -> usize {
        (usize::from(self.inflight) * 4 / 5).max(1)
    }
}

impl SessionConfig {
    /// Defaults for everything but the broker, the client id and the subscriptions.
    pub fn new(url: BrokerUrl, client_id: impl Into<String>, subscriptions: Vec<String>) -> Self {
        SessionConfig {
            url,
            client_id: client_id.into(),
            subscriptions,
            topics: Topics::default(),
            keep_alive: Duration::from_secs(30),
            channel_capacity: 512,
            tls: None,
            subscribe_timeout: Duration::from_secs(10),
            limits: SessionLimits::default(),
        }
    }
}

/// Delivery guarantee of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    /// Fire and forget.
    AtMostOnce,
    /// Acknowledged by the broker.
    AtLeastOnce,
}

/// What the session tells the application.
#[derive(Debug)]
pub enum Event {
    /// Connected and subscribed: time to send `sync` and flush outboxes.
    Connected,
    /// The connection dropped; the session is reconnecting.
    Disconnected(String),
    /// A message arrived. Call [`Inbound::ack`] once it has been handled or refused.
    Message(Box<Inbound>),
}

/// One received message, decoded.
///
/// Its PUBACK goes out once it is acked (or dropped unacked: a message the broker never gets
/// a PUBACK for would hold up every later one), and only after every message that arrived
/// before it on the same connection. A message from an earlier connection is not PUBACKed at
/// all: its packet id now names another message.
#[derive(Debug)]
pub struct Inbound {
    /// The topic it arrived on.
    pub topic: String,
    /// Device and channel from the topic; `None` if the topic is not of ours.
    pub route: Option<(DeviceId, Channel)>,
    /// The decoded payload.
    pub message: Result<Message, ProtocolError>,
    publish: Publish,
    /// `None` for QoS 0 (no PUBACK) and once acked.
    ticket: Option<Ticket>,
    pubacks: Arc<Pubacks>,
}

impl Inbound {
    /// Releases the PUBACK. Call it after the message is committed, or refused for good. It
    /// never waits: the PUBACK goes out as soon as the messages before it are acked too.
    pub async fn ack(mut self) {
        self.release();
    }

    /// The raw payload.
    pub fn payload(&self) -> &Bytes {
        &self.publish.payload
    }

    fn release(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.pubacks.done(ticket, &self.topic);
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        self.release();
    }
}

/// The PUBACKs owed, shared by the session task and every [`Inbound`]. The lock also orders
/// hand-offs to rumqttc against a connection change, which drains rumqttc's queue under it:
/// a PUBACK is either drained with its connection or checked against the next one.
#[derive(Debug)]
struct Pubacks {
    acks: Mutex<Acks>,
    client: AsyncClient,
}

impl Pubacks {
    fn lock(&self) -> MutexGuard<'_, Acks> {
        // Every update leaves the queue consistent: a panic elsewhere cannot poison it.
        self.acks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn done(&self, ticket: Ticket, topic: &str) {
        let mut acks = self.lock();
        if acks.done(ticket) == Done::Stale {
            debug!(topic = %topic, stale = acks.stale(), "puback skipped: the message came on an earlier connection");
        }
        self.flush(&mut acks);
    }

    /// Hands released PUBACKs to rumqttc, in order, while its queue has room. What does not
    /// fit waits for the session task, which calls this again after each event it handles
    /// (each one frees room in the queue).
    fn flush(&self, acks: &mut Acks) {
        while let Some(pkid) = acks.next() {
            // rumqttc builds a PUBACK from a message's packet id and QoS alone.
            let mut puback = Publish::new("", QoS::AtLeastOnce, Vec::new());
            puback.pkid = pkid;
            if self.client.try_ack(&puback).is_err() {
                break;
            }
            acks.handed();
        }
    }
}

/// A handle for publishing. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Session {
    client: AsyncClient,
    status: watch::Receiver<Status>,
    dropped: Arc<AtomicU64>,
    flow: Arc<Flow>,
    pubacks: Arc<Pubacks>,
}

/// What the session task reports to every [`Session`] handle.
#[derive(Clone, Debug, Default)]
struct Status {
    /// Connected, and every filter granted.
    up: bool,
    /// The last subscription failure, until a subscription is confirmed.
    subscription_error: Option<String>,
    /// Why the last connection attempt failed or the connection was lost, until a
    /// subscription is confirmed.
    connection_error: Option<String>,
}

/// Flow control for QoS 1 publishes. rumqttc stops reading its request queue while its
/// in-flight window is full, and PUBACKs for *received* messages wait in that same queue; if
/// the broker's window towards us is full too, both sides wait for each other. Keeping our
/// own publishes (queued or in flight) below the window leaves the queue always moving.
#[derive(Debug)]
struct Flow {
    window: Mutex<Window>,
    /// Signalled once per slot freed.
    room: Notify,
}

impl Flow {
    fn new(window: usize) -> Flow {
        Flow {
            window: Mutex::new(Window::new(window)),
            room: Notify::new(),
        }
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        // Every update leaves the window consistent: a panic elsewhere cannot poison it.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a free slot. Cancel-safe: a slot is only ever held by the returned guard.
    async fn reserve(&self) -> Slot<'_> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a slot freed in between still wakes us.
            room.as_mut().enable();
            if self.window().try_take() {
                return Slot {
                    flow: self,
                    handed_off: false,
                };
            }
            room.await;
        }
    }

    fn freed(&self, slots: usize) {
        for _ in 0..slots {
            self.room.notify_one();
        }
    }

    /// rumqttc wrote one of our QoS 1 publishes on the connection.
    fn sent(&self, pkid: u16) {
        self.window().sent(pkid);
    }

    /// The broker acknowledged one of our publishes.
    fn acked(&self, pkid: u16) {
        let freed = self.window().acked(pkid);
        self.freed(usize::from(freed));
    }

    /// The connection is gone with what was in flight on it, and `drained` queued publishes.
    fn connection_lost(&self, drained: usize) {
        let freed = self.window().connection_lost(drained);
        self.freed(freed);
    }
}

/// One publish's slot in the window. Unless the publish reached rumqttc's queue, dropping it
/// (an error, a timeout, a cancelled caller) gives the slot back.
struct Slot<'a> {
    flow: &'a Flow,
    handed_off: bool,
}

impl Slot<'_> {
    /// The publish is in rumqttc's queue: the slot now follows it (sent, acked, or lost with a
    /// connection).
    fn handed_off(mut self) {
        self.handed_off = true;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.handed_off {
            self.flow.window().give_back();
            self.flow.freed(1);
        }
    }
}

impl Session {
    /// Publishes a payload.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        qos: Qos,
    ) -> Result<(), MqttError> {
        let qos = match qos {
            Qos::AtMostOnce => QoS::AtMostOnce,
            Qos::AtLeastOnce => QoS::AtLeastOnce,
        };
        let send = async {
            let slot = match qos {
                QoS::AtLeastOnce => Some(self.flow.reserve().await),
                _ => None,
            };
            self.client.publish(topic, qos, false, payload).await?;
            if let Some(slot) = slot {
                slot.handed_off();
            }
            Ok::<(), rumqttc::ClientError>(())
        };
        // A timeout drops `send`, and with it a slot not yet handed off. (If the queue takes
        // the publish in the very instant the timeout fires, rumqttc sends one the window
        // no longer counts: its slot is already back, nothing leaks, the window overshoots by
        // one until that PUBACK.)
        match tokio::time::timeout(REQUEST_TIMEOUT, send).await {
            Ok(result) => result.map_err(|e| MqttError::Client {
                what: "the request was refused".into(),
                cause: Some(Box::new(e)),
            }),
            Err(_) => Err(MqttError::Client {
                what: format!(
                    "no room in the publish window or the client queue for {} s",
                    REQUEST_TIMEOUT.as_secs()
                ),
                cause: None,
            }),
        }
    }

    /// Publishes a protocol message on `topic`.
    pub async fn send(&self, topic: String, message: &Message, qos: Qos) -> Result<(), MqttError> {
        self.publish(topic, message.encode(), qos).await
    }

    /// Whether the session is connected and subscribed right now: the broker granted every
    /// filter. A refused filter is not connected (see [`Session::subscription_error`]).
    pub fn is_connected(&self) -> bool {
        self.status.borrow().up
    }

    /// Waits until the session is connected and subscribed.
    pub async fn wait_connected(&self) {
        let mut rx = self.status.clone();
        let _ = rx.wait_for(|s| s.up).await;
    }

    /// Waits for the first outcome of connecting: connected and subscribed, or why an
    /// attempt failed (no broker, a TLS refusal, a refused filter). After a failure the
    /// session goes on trying, as always.
    pub async fn first_connection(&self) -> Result<(), String> {
        let mut rx = self.status.clone();
        let status = match rx
            .wait_for(|s| s.up || s.connection_error.is_some() || s.subscription_error.is_some())
            .await
        {
            Ok(status) => status.clone(),
            Err(_) => return Err(MqttError::Closed.to_string()),
        };
        match (
            status.up,
            status.subscription_error,
            status.connection_error,
        ) {
            (true, _, _) => Ok(()),
            (false, Some(reason), _) | (false, None, Some(reason)) => Err(reason),
            (false, None, None) => Err(MqttError::Closed.to_string()),
        }
    }

    /// Messages dropped because the application was not keeping up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Why the last subscription failed (a filter the broker refused, a SUBACK that never
    /// came); `None` once one is confirmed.
    pub fn subscription_error(&self) -> Option<String> {
        self.status.borrow().subscription_error.clone()
    }

    /// Acks that sent no PUBACK because their message came on an earlier connection.
    pub fn stale_acks(&self) -> u64 {
        self.pubacks.lock().stale()
    }
}

/// Starts a session. It runs until `shutdown` is cancelled, reconnecting as needed.
pub fn connect(
    config: SessionConfig,
    shutdown: CancellationToken,
) -> Result<(Session, mpsc::Receiver<Event>), MqttError> {
    let mut options = MqttOptions::new(&config.client_id, &config.url.host, config.url.port);
    match (&config.tls, config.url.tls) {
        (Some(files), true) => {
            let tls = files.client_config()?;
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        (None, true) => {
            return Err(MqttError::Url {
                url: config.url.to_string(),
                reason: "mqtts:// needs a CA file (--ca), and for mutual TLS --cert and --key"
                    .into(),
            });
        }
        (Some(_), false) => {
            return Err(MqttError::Url {
                url: config.url.to_string(),
                reason: "certificates are configured but the address is mqtt://; use mqtts://"
                    .into(),
            });
        }
        (None, false) => {}
    }
    // A filter rumqttc would refuse to send would fail every connection alike: refuse it here.
    if let Some(bad) = config
        .subscriptions
        .iter()
        .find(|f| !rumqttc::mqttbytes::valid_filter(f))
    {
        return Err(MqttError::Client {
            what: format!("invalid topic filter {bad:?}"),
            cause: None,
        });
    }
    let limits = config.limits;
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(limits.max_packet_bytes, limits.max_packet_bytes)
        .set_inflight(limits.inflight.max(1))
        .set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(options, limits.requests.max(1));
    // rumqttc reserves room for 100 events per connection (each the size of its largest
    // packet type); a burst is at most a window's worth of PUBACKs and publishes, and the
    // queue grows if one is ever larger.
    eventloop.state.events =
        std::collections::VecDeque::with_capacity(usize::from(limits.inflight).clamp(8, 100));
    // Every message here is small and waited for (a command, its ack, a report): Nagle's
    // algorithm would hold each one back until the peer's delayed ACK, tens of ms per hop.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (events_tx, events_rx) = mpsc::channel(config.channel_capacity.max(1));
    let (status_tx, status_rx) = watch::channel(Status::default());
    let session = Session {
        client: client.clone(),
        status: status_rx,
        dropped: Arc::new(AtomicU64::new(0)),
        flow: Arc::new(Flow::new(limits.publish_window())),
        pubacks: Arc::new(Pubacks {
            acks: Mutex::new(Acks::default()),
            client: client.clone(),
        }),
    };
    let task = Driver {
        subscription: Subscription::new(config.subscriptions.clone(), config.subscribe_timeout),
        config,
        client,
        eventloop,
        events: events_tx,
        status: status_tx,
        dropped: session.dropped.clone(),
        flow: session.flow.clone(),
        pubacks: session.pubacks.clone(),
        link_up: false,
        failures: 0,
        last_failure: None,
    };
    tokio::spawn(task.run(shutdown));
    Ok((session, events_rx))
}

struct Driver {
    config: SessionConfig,
    client: AsyncClient,
    eventloop: EventLoop,
    events: mpsc::Sender<Event>,
    status: watch::Sender<Status>,
    dropped: Arc<AtomicU64>,
    flow: Arc<Flow>,
    pubacks: Arc<Pubacks>,
    subscription: Subscription,
    /// A connection was established (CONNACK) and has not been settled as lost yet.
    link_up: bool,
    /// Connections lost since a subscription was last confirmed, the [`RECONNECT`] attempt:
    /// a broker that accepts connections but refuses the subscription is not retried every
    /// 200 ms.
    failures: u32,
    /// Logged once per kind, so a broker that stays away doesn't flood the log, but a new
    /// reason (e.g. a TLS refusal) is always seen.
    last_failure: Option<String>,
}

/// Why the connection is down and the task backs off.
enum Trouble {
    /// rumqttc lost the connection, or could not make one.
    Lost(ConnectionError),
    /// The subscription failed; the task drops the connection.
    Subscription(Failure),
}

/// What woke the session task.
enum Wake {
    Polled(Result<rumqttc::Event, ConnectionError>),
    /// The SUBACK is overdue: it was due at this instant.
    Deadline(std::time::Instant),
}

impl Driver {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let deadline = self.subscription.deadline();
            let wake = tokio::select! {
                _ = shutdown.cancelled() => break,
                // Cancelling poll() mid-way is safe only because the connection is dropped
                // right after (see Wake::Deadline).
                at = sleep_until(deadline) => Wake::Deadline(at),
                polled = self.eventloop.poll() => Wake::Polled(polled),
            };
            let failure = match wake {
                Wake::Deadline(at) => {
                    // Tokio never fires a timer early; max() makes it certain that the
                    // subscription is overdue, so the interrupted connection is dropped.
                    let step = self.subscription.tick(monotonic().max(at));
                    self.follow(step).await
                }
                Wake::Polled(Ok(event)) => {
                    // Each event may have made room in rumqttc's queue for PUBACKs that found
                    // it full.
                    self.pubacks.flush(&mut self.pubacks.lock());
                    self.handle(event).await
                }
                Wake::Polled(Err(error)) => Some(Trouble::Lost(error)),
            };
            match failure {
                None => continue,
                Some(Trouble::Subscription(failure)) => self.abandon(failure),
                Some(Trouble::Lost(error)) => self.disconnected(&error).await,
            }
            let pause = RECONNECT.jittered(self.failures, fastrand::f64());
            self.failures = self.failures.saturating_add(1);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.close().await;
        self.status.send_modify(|s| s.up = false);
    }

    /// Sends DISCONNECT on a live connection and waits, briefly, until it is written, so the
    /// broker sees a clean close rather than a dropped socket.
    async fn close(&mut self) {
        if self.client.try_disconnect().is_err() || !self.link_up {
            return;
        }
        let written = tokio::time::timeout(CLOSE_TIMEOUT, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if written.is_err() {
            debug!(client_id = %self.config.client_id, "disconnect not written in time: socket dropped");
        }
    }

    /// One event of a live connection. `Some` if the subscription failed.
    async fn handle(&mut self, event: rumqttc::Event) -> Option<Trouble> {
        match event {
            rumqttc::Event::Incoming(Packet::ConnAck(_)) => {
                self.link_up = true;
                info!(client_id = %self.config.client_id, broker = %self.config.url, "mqtt connected");
                let step = self.subscription.connected(monotonic());
                self.follow(step).await
            }
            rumqttc::Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                self.subscription.sent(pkid);
                None
            }
            rumqttc::Event::Incoming(Packet::SubAck(ack)) => {
                let step = self.subscription.suback(ack.pkid, &ack.return_codes);
                self.follow(step).await
            }
            event => {
                self.traffic(event);
                None
            }
        }
    }

    /// Carries out a subscription step. `Some` if the connection must be dropped.
    async fn follow(&mut self, step: Step) -> Option<Trouble> {
        match step {
            Step::Subscribe => {
                let filters = self
                    .subscription
                    .filters()
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                match self.client.try_subscribe_many(filters) {
                    Ok(()) => None,
                    Err(e) => match self.subscription.not_queued(e.to_string()) {
                        Step::Reconnect(failure) => Some(Trouble::Subscription(failure)),
                        _ => None,
                    },
                }
            }
            Step::Up => {
                self.failures = 0;
                self.last_failure = None;
                self.status.send_replace(Status {
                    up: true,
                    ..Status::default()
                });
                let _ = self.events.send(Event::Connected).await;
                None
            }
            Step::Wait => None,
            Step::Reconnect(failure) => Some(Trouble::Subscription(failure)),
        }
    }

    /// The subscription failed: drop the connection (the caller backs off and connects again),
    /// and say why to the log and the handles.
    fn abandon(&mut self, failure: Failure) {
        let reason = failure.to_string();
        let client_id = &self.config.client_id;
        if self.last_failure.as_deref() == Some(reason.as_str()) {
            debug!(client_id = %client_id, error = %reason, "mqtt subscription failed again: reconnecting");
        } else if let Failure::Refused(filters) = &failure {
            error!(client_id = %client_id, broker = %self.config.url, filters = %filters.join(", "), "mqtt subscription refused: reconnecting");
        } else {
            warn!(client_id = %client_id, broker = %self.config.url, error = %reason, "mqtt subscription failed: reconnecting");
        }
        self.last_failure = Some(reason.clone());
        self.status.send_replace(Status {
            up: false,
            subscription_error: Some(reason),
            connection_error: None,
        });
        self.subscription.disconnected();
        // Settles the connection like a lost one, and closes it: rumqttc connects afresh on
        // the next poll.
        self.connection_lost();
    }

    /// rumqttc reports the connection lost, or a connection attempt failed.
    async fn disconnected(&mut self, error: &ConnectionError) {
        if self.link_up {
            self.connection_lost();
        }
        self.subscription.disconnected();
        let was_up = self
            .status
            .send_if_modified(|s| std::mem::replace(&mut s.up, false));
        let reason = describe(error);
        self.status
            .send_modify(|s| s.connection_error = Some(reason.clone()));
        let client_id = &self.config.client_id;
        if was_up {
            warn!(client_id = %client_id, error = %reason, "mqtt disconnected");
            let _ = self.events.send(Event::Disconnected(reason.clone())).await;
        } else if self.last_failure.as_deref() != Some(reason.as_str()) {
            warn!(client_id = %client_id, broker = %self.config.url, error = %reason, "mqtt connect failed");
        } else {
            debug!(client_id = %client_id, error = %reason, "mqtt connect failed");
        }
        self.last_failure = Some(reason);
    }

    /// Publishes and acknowledgements, on a live connection or left over from a dead one.
    fn traffic(&mut self, event: rumqttc::Event) {
        match event {
            rumqttc::Event::Incoming(Packet::PubAck(ack)) => self.flow.acked(ack.pkid),
            rumqttc::Event::Incoming(Packet::Publish(publish)) => self.deliver(publish),
            // Packet id 0 is a QoS 0 publish, which takes no slot.
            rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => self.flow.sent(pkid),
            _ => {}
        }
    }

    /// The connection is gone. rumqttc keeps some of it for a session that resumes; ours never
    /// does (clean session), so all of it is settled here, before the next connection:
    /// - events it had read but not yet handed out (publishes received, packets sent);
    /// - requests still in its queue, drained now (some may have arrived after its own drain);
    /// - publishes it would resend, and one held back by a packet id collision.
    ///
    /// Every QoS 1 publish among them is lost, and so is its slot in the window.
    fn connection_lost(&mut self) {
        self.link_up = false;
        while let Some(event) = self.eventloop.state.events.pop_front() {
            self.traffic(event);
        }
        let mut drained = {
            // Under the PUBACK lock: one that reached the queue after rumqttc's own drain is
            // drained now, and any later one is checked against the new connection number.
            let mut acks = self.pubacks.lock();
            acks.connection_lost();
            self.eventloop.clean();
            let unsent = |p: &Publish| p.qos != QoS::AtMostOnce && p.pkid == 0;
            let drained = self
                .eventloop
                .pending
                .iter()
                .filter(|r| matches!(r, Request::Publish(p) if unsent(p)))
                .count();
            self.eventloop.pending.clear();
            drained
        };
        // A collision holds a publish that was taken from the queue but never sent; rumqttc
        // would keep it (and stop sending) across the reconnect.
        if let Some(held) = self.eventloop.state.collision.take()
            && held.qos != QoS::AtMostOnce
        {
            drained += 1;
        }
        self.flow.connection_lost(drained);
    }

    fn deliver(&self, publish: Publish) {
        let ticket =
            (publish.qos != QoS::AtMostOnce).then(|| self.pubacks.lock().arrived(publish.pkid));
        let inbound = Inbound {
            topic: publish.topic.clone(),
            route: self.config.topics.parse(&publish.topic),
            message: Message::decode(&publish.payload),
            publish,
            ticket,
            pubacks: self.pubacks.clone(),
        };
        if let Err(
            mpsc::error::TrySendError::Full(inbound) | mpsc::error::TrySendError::Closed(inbound),
        ) = self.events.try_send(Event::Message(Box::new(inbound)))
        {
            // Never stall the event loop (keep-alive, acks) on slow application work. Dropping
            // the message releases its PUBACK, after those of the messages before it.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if let Event::Message(m) = inbound {
                warn!(topic = %m.topic, "application busy: message dropped, the sender will resend");
            }
        }
    }
}

fn describe(error: &ConnectionError) -> String {
    let text = match error {
        ConnectionError::Io(e) => format!("io: {e}"),
        ConnectionError::ConnectionRefused(code) => format!("refused by broker: {code:?}"),
        other => other.to_string(),
    };
    match crate::tls::explain(&text) {
        Some(plain) => format!("{plain} ({text})"),
        None => text,
    }
}

/// Sleeps until `deadline` and returns it, or sleeps forever without one.
async fn sleep_until(deadline: Option<std::time::Instant>) -> std::time::Instant {
    match deadline {
        Some(at) => {
            tokio::time::sleep_until(at.into()).await;
            at
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::SubscribeReasonCode;

    use super::script::ScriptedBroker;
    use super::*;

    const TOPIC: &str = "max300/unit-1/report";

    /// A session subscribed to every report, and a guard that stops it.
    fn session(
        broker: &ScriptedBroker,
        channel_capacity: usize,
    ) -> (Session, mpsc::Receiver<Event>, tokio_util::sync::DropGuard) {
        let mut config = SessionConfig::new(broker.url(), "test", vec!["max300/+/report".into()]);
        config.channel_capacity = channel_capacity;
        start(config)
    }

    fn start(
        config: SessionConfig,
    ) -> (Session, mpsc::Receiver<Event>, tokio_util::sync::DropGuard) {
        let shutdown = CancellationToken::new();
        let (session, events) = connect(config, shutdown.clone()).unwrap();
        (session, events, shutdown.drop_guard())
    }

    async fn next(events: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("the session runs")
    }

    async fn next_message(events: &mut mpsc::Receiver<Event>) -> Box<Inbound> {
        match next(events).await {
            Event::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    fn text(m: &Inbound) -> &str {
        std::str::from_utf8(m.payload()).unwrap()
    }

    #[tokio::test]
    async fn pubacks_go_out_in_arrival_order_whatever_order_the_application_acks_in() {
        let broker = ScriptedBroker::start().await;
        let (_session, mut events, _stop) = session(&broker, 16);
        let mut peer = broker.accept().await;
        peer.grant().await;
        assert!(matches!(next(&mut events).await, Event::Connected));
        for pkid in 1..=3 {
            peer.publish(pkid, TOPIC, &pkid.to_string()).await;
        }
        let (m1, m2, m3) = (
            next_message(&mut events).await,
            next_message(&mut events).await,
            next_message(&mut events).await,
        );
        m3.ack().await;
        m1.ack().await;
        // Dropped unacked: PUBACKed in its turn all the same, or it would hold up the rest.
        drop(m2);
        for pkid in 1..=3 {
            assert_eq!(peer.expect_puback().await, pkid);
        }
    }

    #[tokio::test]
    async fn a_message_dropped_for_a_full_channel_is_acked_after_the_ones_before_it() {
        let broker = ScriptedBroker::start().await;
        let (session, mut events, _stop) = session(&broker, 1);
        let mut peer = broker.accept().await;
        peer.grant().await;
        assert!(matches!(next(&mut events).await, Event::Connected));
        for pkid in 1..=3 {
            peer.publish(pkid, TOPIC, &pkid.to_string()).await;
        }
        // Nothing to await: the session only counts what it drops.
        for _ in 0..1000 {
            if session.dropped() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(session.dropped(), 2, "1 fits the channel, 2 and 3 do not");
        let m1 = next_message(&mut events).await;
        assert_eq!(text(&m1), "1");
        m1.ack().await;
        for pkid in 1..=3 {
            assert_eq!(peer.expect_puback().await, pkid);
        }
    }

    #[tokio::test]
    async fn an_ack_for_a_message_of_an_earlier_connection_is_not_sent_on_the_next() {
        let broker = ScriptedBroker::start().await;
        let (session, mut events, _stop) = session(&broker, 16);
        let mut first = broker.accept().await;
        first.grant().await;
        assert!(matches!(next(&mut events).await, Event::Connected));
        first.publish(5, TOPIC, "old").await;
        let old = next_message(&mut events).await;
        drop(first);
        assert!(matches!(next(&mut events).await, Event::Disconnected(_)));
        let mut second = broker.accept().await;
        second.grant().await;
        assert!(matches!(next(&mut events).await, Event::Connected));
        second.publish(7, TOPIC, "new").await;
        let new = next_message(&mut events).await;
        // Packet id 5 means nothing on this connection (or another message): not sent.
        old.ack().await;
        new.ack().await;
        assert_eq!(second.expect_puback().await, 7);
        assert_eq!(session.stale_acks(), 1);
    }

    #[tokio::test]
    async fn a_subscription_without_a_suback_is_dropped_and_made_again() {
        let broker = ScriptedBroker::start().await;
        let mut config = SessionConfig::new(broker.url(), "test", vec!["max300/+/report".into()]);
        config.subscribe_timeout = Duration::from_millis(300);
        let (session, mut events, _stop) = start(config);
        let mut deaf = broker.accept().await;
        deaf.expect_subscribe().await;
        // No SUBACK: the session must not sit there connected and deaf.
        deaf.expect_closed().await;
        assert!(!session.is_connected());
        let error = session
            .subscription_error()
            .expect("the failure is reported");
        assert!(error.contains("no SUBACK"), "{error}");
        let mut peer = broker.accept().await;
        peer.grant().await;
        assert!(matches!(next(&mut events).await, Event::Connected));
        assert!(session.is_connected());
        assert_eq!(session.subscription_error(), None);
    }

    #[tokio::test]
    async fn a_refused_filter_is_reported_and_the_subscription_made_again() {
        let broker = ScriptedBroker::start().await;
        let filters = vec!["max300/+/ack".to_owned(), "max300/+/report".to_owned()];
        let (session, mut events, _stop) = start(SessionConfig::new(broker.url(), "test", filters));
        let mut refusing = broker.accept().await;
        let sub = refusing.expect_subscribe().await;
        let codes = vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
        ];
        refusing
            .send(Packet::SubAck(rumqttc::SubAck::new(sub.pkid, codes)))
            .await;
        refusing.expect_closed().await;
        assert!(!session.is_connected(), "half deaf is not connected");
        assert!(events.try_recv().is_err(), "no Connected event");
        let error = session
            .subscription_error()
            .expect("the refusal is reported");
        assert!(
            error.contains("max300/+/report") && !error.contains("ack"),
            "{error}"
        );
        let mut peer = broker.accept().await;
        peer.grant().await;
        assert!(matches!(next(&mut events).await, Event::Connected));
        assert_eq!(session.subscription_error(), None);
    }

    #[tokio::test]
    async fn a_broker_that_keeps_refusing_is_retried_ever_more_slowly() {
        let broker = ScriptedBroker::start().await;
        let (session, _events, _stop) = session(&broker, 16);
        let mut gaps = Vec::new();
        let mut closed_at = None;
        for _ in 0..4 {
            let mut peer = broker.accept().await;
            if let Some(at) = closed_at {
                gaps.push(monotonic().duration_since(at));
            }
            let sub = peer.expect_subscribe().await;
            let codes = vec![SubscribeReasonCode::Failure];
            peer.send(Packet::SubAck(rumqttc::SubAck::new(sub.pkid, codes)))
                .await;
            peer.expect_closed().await;
            closed_at = Some(monotonic());
        }
        assert!(!session.is_connected());
        // Pauses of 200, 400, 800 ms, each jittered by ±50 %: had each CONNACK reset the
        // backoff, the third would be at most 300 ms.
        assert!(
            gaps[2] >= Duration::from_millis(400),
            "the backoff does not grow: {gaps:?}"
        );
    }

    #[tokio::test]
    async fn the_first_connection_says_why_it_failed_or_that_it_is_up() {
        let absent = ScriptedBroker::start().await;
        let url = absent.url();
        drop(absent);
        let (lonely, _events, _stop) = start(SessionConfig::new(url, "test", vec![]));
        let error = lonely.first_connection().await.unwrap_err();
        assert!(!error.is_empty() && !lonely.is_connected(), "{error}");

        let broker = ScriptedBroker::start().await;
        let (session, _events, _stop) = session(&broker, 16);
        let mut peer = broker.accept().await;
        peer.grant().await;
        assert_eq!(session.first_connection().await, Ok(()));
    }

    #[tokio::test]
    async fn shutdown_sends_disconnect_and_then_the_session_ends() {
        let broker = ScriptedBroker::start().await;
        let (session, mut events, stop) = session(&broker, 16);
        let mut peer = broker.accept().await;
        peer.grant().await;
        assert!(matches!(next(&mut events).await, Event::Connected));
        drop(stop);
        assert!(matches!(peer.read().await, Some(Packet::Disconnect)));
        let ended = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
        assert!(
            matches!(ended, Ok(None)),
            "the session task ends: {ended:?}"
        );
        assert!(!session.is_connected());
    }

    #[test]
    fn connect_refuses_an_invalid_topic_filter() {
        let url = "mqtt://127.0.0.1:1".parse().unwrap();
        let config = SessionConfig::new(url, "test", vec!["max300/#/ack".into()]);
        let err = connect(config, CancellationToken::new()).unwrap_err();
        assert!(err.to_string().contains("max300/#/ack"), "{err}");
    }

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        for failures in 0..12 {
            let base = RECONNECT.delay(failures);
            for _ in 0..100 {
                let d = RECONNECT.jittered(failures, fastrand::f64());
                assert!(d >= base / 2 && d <= base * 3 / 2, "{d:?} around {base:?}");
            }
        }
    }

    #[test]
    fn reconnects_back_off_from_200_ms_to_30_s() {
        let pauses: Vec<u128> = (0..10).map(|n| RECONNECT.delay(n).as_millis()).collect();
        assert_eq!(
            pauses,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
    }
}
