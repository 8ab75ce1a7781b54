//! A lean MQTT 3.1.1 connection, for a process that holds thousands of quiet ones (the fleet
//! simulator), where a [`Session`](crate::Session) would cost more than the device it serves:
//! rumqttc allocates about 24 KB per connection up front, whatever the traffic (an 8 KiB codec
//! buffer each way, and an 8 KiB bitset of the packet ids it may receive), and a session adds a
//! task and two channels.
//!
//! A [`Link`] has no task and no buffer of its own between packets. The one task that owns it
//! drives it with [`Link::next`] and writes through it, so a message is handled, and its
//! PUBACK written, before the next one is read. It reads into a buffer sized to the packet at
//! hand (from the length in its fixed header), and lets the buffer go once it is empty: a quiet
//! link holds its socket and a few hundred bytes.
//!
//! It keeps the session's rules: connected only once the broker has granted every filter (the
//! same [`Subscription`]), a lost connection is made again after the same backoff and
//! resubscribed, PUBACKs go in arrival order and never on a later connection, and closing
//! sends DISCONNECT. It leaves out TLS and a window on its own QoS 1 publishes: its owner sends
//! a few at a time, and resends at the application level what gets no receipt.
//!
//! ```text
//!  down ──backoff──▶ TCP, CONNECT ──CONNACK──▶ SUBSCRIBE ──SUBACK, all granted──▶ up: Connected
//!  up: PUBLISH in ──▶ Message ──the owner handles it, then ack()──▶ PUBACK out
//!      nothing written for keep_alive ──▶ PINGREQ; no PINGRESP by the next one ──▶ down
//! ```

use std::time::{Duration, Instant};

use bytes::BytesMut;
use max300_protocol::clock::monotonic;
use max300_protocol::{Channel, DeviceId, Message, ProtocolError, Topics};
use rumqttc::{
    ConnectReturnCode, Packet, PubAck, Publish, QoS, Subscribe, SubscribeFilter, mqttbytes,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::session::{RECONNECT, Step, Subscription};
use crate::{BrokerUrl, MqttError, Qos};

/// How long the TCP connect and the CONNACK may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one packet may take to be written: a broker that reads nothing for this long is
/// treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// What an empty buffer reserves for the next packet: a PUBACK, a receipt or a SUBACK fit,
/// and a larger packet's header says how much more to reserve.
const FIRST_READ: usize = 256;

/// How to connect.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The broker (plain `mqtt://` only).
    pub url: BrokerUrl,
    /// The client id: a device's id.
    pub client_id: String,
    /// Topic filters to (re)subscribe after every connect, at QoS 1.
    pub subscriptions: Vec<String>,
    /// The topic layout, for decoding.
    pub topics: Topics,
    /// MQTT keep-alive (real time), at least a second.
    pub keep_alive: Duration,
    /// How long a SUBACK may take before the connection is dropped and made again.
    pub subscribe_timeout: Duration,
    /// The largest packet either way.
    pub max_packet_bytes: usize,
}

impl LinkConfig {
    /// Defaults for everything but the broker, the client id and the subscriptions.
    pub fn new(url: BrokerUrl, client_id: impl Into<String>, subscriptions: Vec<String>) -> Self {
        LinkConfig {
            url,
            client_id: client_id.into(),
            subscriptions,
            topics: Topics::default(),
            keep_alive: Duration::from_secs(60),
            subscribe_timeout: Duration::from_secs(10),
            max_packet_bytes: 64 * 1024,
        }
    }
}

/// What [`Link::next`] hands its owner.
#[derive(Debug)]
pub enum LinkEvent {
    /// A connection was made again and its subscription granted (not sent for the first
    /// connection, which [`Link::connect`] returns).
    Connected,
    /// A message; PUBACKed once the owner passes it to [`Link::ack`].
    Message(Box<Delivery>),
}

/// A message received, decoded.
#[derive(Debug)]
pub struct Delivery {
    /// The topic it came on.
    pub topic: String,
    /// The device and channel its topic names, if it is one of ours.
    pub route: Option<(DeviceId, Channel)>,
    /// The decoded message, or why it could not be decoded.
    pub message: Result<Message, ProtocolError>,
    /// Its packet id, for a QoS 1 message.
    pkid: Option<u16>,
    /// The connection it came on.
    connection: u64,
}

/// One connection to the broker, made again whenever it is lost. See the module docs.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    subscription: Subscription,
    conn: Option<Conn>,
    /// Connections made so far: a PUBACK goes only on the connection its message came on.
    connection: u64,
    /// Connections lost or refused since one was last up, the [`RECONNECT`] attempt.
    failures: u32,
    /// When to connect again, while down.
    retry_at: Instant,
}

/// A live connection.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    /// What has been read of the next packet; empty (no allocation) between packets.
    read: BytesMut,
    last_pkid: u16,
    last_write: Instant,
    awaiting_pingresp: bool,
}

impl Link {
    /// Connects, subscribes and waits for every filter to be granted: the first connection,
    /// whose failure the caller hears about rather than a retry.
    pub async fn connect(mut config: LinkConfig) -> Result<Link, MqttError> {
        if config.url.tls {
            return Err(MqttError::Url {
                url: config.url.to_string(),
                reason: "a link connects with plain mqtt:// only".into(),
            });
        }
        if let Some(bad) = config
            .subscriptions
            .iter()
            .find(|f| !mqttbytes::valid_filter(f))
        {
            return Err(MqttError::Client {
                what: format!("invalid topic filter {bad:?}"),
                cause: None,
            });
        }
        // The subscription keeps the filters; a link holds each once.
        let filters = std::mem::take(&mut config.subscriptions);
        let mut subscription = Subscription::new(filters, config.subscribe_timeout);
        match open(&config, &mut subscription).await {
            Ok(conn) => Ok(Link {
                config,
                subscription,
                conn: Some(conn),
                connection: 1,
                failures: 0,
                retry_at: monotonic(),
            }),
            Err(reason) => Err(MqttError::Connect {
                url: config.url.to_string(),
                reason,
            }),
        }
    }

    /// Whether the connection is up (its subscription granted).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Bytes held for a packet not yet read whole: 0 between packets.
    pub fn buffered(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.read.capacity())
    }

    /// The next message, or news that the connection was made again. Meanwhile it answers
    /// the broker, sends the keep-alive, and reconnects after the backoff when the connection
    /// is lost. Cancel-safe: nothing read is lost; a connection being made when it is
    /// cancelled is dropped and made again at the next call.
    pub async fn next(&mut self) -> LinkEvent {
        loop {
            let Some(conn) = &mut self.conn else {
                tokio::time::sleep_until(self.retry_at.into()).await;
                // Boxed: a connection is made seldom, and its future would otherwise be part
                // of every link's owner for good.
                match Box::pin(open(&self.config, &mut self.subscription)).await {
                    Ok(conn) => {
                        self.conn = Some(conn);
                        self.connection += 1;
                        self.failures = 0;
                        info!(client_id = %self.config.client_id, broker = %self.config.url, "mqtt connected");
                        return LinkEvent::Connected;
                    }
                    Err(reason) => {
                        debug!(client_id = %self.config.client_id, error = %reason, "mqtt connect failed");
                        self.back_off();
                        continue;
                    }
                }
            };
            let ping_at = conn.last_write + self.config.keep_alive;
            let packet = tokio::select! {
                packet = conn.read_packet(self.config.max_packet_bytes) => packet,
                _ = tokio::time::sleep_until(ping_at.into()) => {
                    if let Err(reason) = conn.ping() {
                        self.lost(&reason);
                    }
                    continue;
                }
            };
            match packet {
                Ok(Packet::Publish(publish)) => {
                    return LinkEvent::Message(Box::new(self.deliver(publish)));
                }
                Ok(Packet::PingResp) => conn.awaiting_pingresp = false,
                // Our own publishes are confirmed at the application level (a receipt).
                Ok(_) => {}
                Err(reason) => self.lost(&reason),
            }
        }
    }

    /// Publishes `message` on `topic`. A failed write drops the connection.
    pub async fn send(
        &mut self,
        topic: &str,
        message: &Message,
        qos: Qos,
    ) -> Result<(), MqttError> {
        self.publish(topic, message.encode(), qos).await
    }

    /// Publishes `payload` on `topic`. A failed write drops the connection.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        qos: Qos,
    ) -> Result<(), MqttError> {
        let Some(conn) = &mut self.conn else {
            return Err(MqttError::Client {
                what: "not connected".into(),
                cause: None,
            });
        };
        let mut publish = match qos {
            Qos::AtMostOnce => Publish::new(topic, QoS::AtMostOnce, payload),
            Qos::AtLeastOnce => Publish::new(topic, QoS::AtLeastOnce, payload),
        };
        if qos == Qos::AtLeastOnce {
            publish.pkid = conn.next_pkid();
        }
        let written = conn
            .write(&Packet::Publish(publish), self.config.max_packet_bytes)
            .await;
        written.map_err(|reason| {
            self.lost(&reason);
            MqttError::Client {
                what: reason,
                cause: None,
            }
        })
    }

    /// PUBACKs `delivery` if it came at QoS 1 on the live connection (a PUBACK on a later
    /// connection would confirm some other message). A failed write drops the connection.
    pub async fn ack(&mut self, delivery: &Delivery) {
        let Some(pkid) = delivery.pkid else { return };
        let Some(conn) = &mut self.conn else { return };
        if delivery.connection != self.connection {
            debug!(client_id = %self.config.client_id, pkid, "puback skipped: the message came on an earlier connection");
            return;
        }
        let written = conn
            .write(
                &Packet::PubAck(PubAck::new(pkid)),
                self.config.max_packet_bytes,
            )
            .await;
        if let Err(reason) = written {
            self.lost(&reason);
        }
    }

    /// Sends DISCONNECT and closes the connection, so the broker sees a clean close.
    pub async fn close(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = conn
                .write(&Packet::Disconnect, self.config.max_packet_bytes)
                .await;
            let _ = conn.stream.shutdown().await;
        }
    }

    fn deliver(&self, publish: Publish) -> Delivery {
        Delivery {
            route: self.config.topics.parse(&publish.topic),
            message: Message::decode(&publish.payload),
            pkid: (publish.qos != QoS::AtMostOnce).then_some(publish.pkid),
            topic: publish.topic,
            connection: self.connection,
        }
    }

    fn lost(&mut self, reason: &str) {
        if self.conn.take().is_some() {
            warn!(client_id = %self.config.client_id, error = %reason, "mqtt disconnected");
        }
        self.subscription.disconnected();
        self.back_off();
    }

    fn back_off(&mut self) {
        self.retry_at = monotonic() + RECONNECT.jittered(self.failures, fastrand::f64());
        self.failures = self.failures.saturating_add(1);
    }
}

/// Makes a connection: TCP, CONNECT, CONNACK, SUBSCRIBE and a SUBACK granting every filter.
async fn open(config: &LinkConfig, subscription: &mut Subscription) -> Result<Conn, String> {
    let max = config.max_packet_bytes;
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let address = (config.url.host.as_str(), config.url.port);
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("io: {e}"))?;
        // Every message here is small and waited for: Nagle's algorithm would hold each one
        // back until the peer's delayed ACK.
        stream.set_nodelay(true).map_err(|e| format!("io: {e}"))?;
        let mut conn = Conn {
            stream,
            read: BytesMut::new(),
            last_pkid: 0,
            last_write: monotonic(),
            awaiting_pingresp: false,
        };
        let mut connect = rumqttc::Connect::new(config.client_id.as_str());
        connect.keep_alive = u16::try_from(config.keep_alive.as_secs().max(1)).unwrap_or(u16::MAX);
        connect.clean_session = true;
        conn.write(&Packet::Connect(connect), max).await?;
        match conn.read_packet(max).await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(conn),
            Packet::ConnAck(ack) => Err(format!("refused by broker: {:?}", ack.code)),
            other => Err(format!("expected CONNACK, got {other:?}")),
        }
    })
    .await;
    let mut conn = connected
        .unwrap_or_else(|_| Err(format!("no CONNACK within {} s", CONNECT_TIMEOUT.as_secs())))?;
    let mut step = subscription.connected(monotonic());
    loop {
        match step {
            Step::Up => return Ok(conn),
            Step::Reconnect(failure) => return Err(failure.to_string()),
            Step::Subscribe => {
                let filters = subscription
                    .filters()
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                let mut subscribe = Subscribe::new_many(filters);
                subscribe.pkid = conn.next_pkid();
                conn.write(&Packet::Subscribe(subscribe.clone()), max)
                    .await?;
                subscription.sent(subscribe.pkid);
                step = Step::Wait;
            }
            Step::Wait => {
                let deadline = subscription.deadline().unwrap_or_else(monotonic);
                step = match tokio::time::timeout_at(deadline.into(), conn.read_packet(max)).await {
                    Ok(Ok(Packet::SubAck(ack))) => subscription.suback(ack.pkid, &ack.return_codes),
                    // Nothing else is due before the SUBACK on a clean session.
                    Ok(Ok(_)) => Step::Wait,
                    Ok(Err(reason)) => return Err(reason),
                    Err(_) => subscription.tick(monotonic().max(deadline)),
                };
            }
        }
    }
}

impl Conn {
    /// The next packet. Cancel-safe: what was read stays in the buffer. No room is taken for
    /// a packet until its first bytes come, so a link waiting for one holds no buffer.
    async fn read_packet(&mut self, max: usize) -> Result<Packet, String> {
        loop {
            let more = match Packet::read(&mut self.read, max) {
                Ok(packet) => {
                    if self.read.is_empty() {
                        // Lets the packet's allocation go with the packet.
                        self.read = BytesMut::new();
                    }
                    return Ok(packet);
                }
                Err(mqttbytes::Error::InsufficientBytes(more)) => more,
                Err(e) => return Err(format!("undecodable packet from the broker: {e}")),
            };
            self.stream
                .readable()
                .await
                .map_err(|e| format!("io: {e}"))?;
            let empty = self.read.is_empty();
            self.read
                .reserve(if empty { more.max(FIRST_READ) } else { more });
            match self.stream.try_read_buf(&mut self.read) {
                Ok(0) => return Err("closed by the broker".into()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if empty {
                        self.read = BytesMut::new();
                    }
                }
                Err(e) => return Err(format!("io: {e}")),
            }
        }
    }

    async fn write(&mut self, packet: &Packet, max: usize) -> Result<(), String> {
        let mut out = BytesMut::with_capacity(packet.size() + 5);
        packet
            .write(&mut out, max)
            .map_err(|e| format!("cannot encode a packet: {e}"))?;
        match tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&out)).await {
            Ok(Ok(())) => {
                self.last_write = monotonic();
                Ok(())
            }
            Ok(Err(e)) => Err(format!("io: {e}")),
            Err(_) => Err(format!(
                "the broker took nothing for {} s",
                WRITE_TIMEOUT.as_secs()
            )),
        }
    }

    /// Sends a PINGREQ, without waiting (so that cancelling [`Link::next`] cannot leave half a
    /// packet written); fails if the last one is still unanswered.
    fn ping(&mut self) -> Result<(), String> {
        if self.awaiting_pingresp {
            return Err("no PINGRESP within the keep-alive".into());
        }
        const PINGREQ: [u8; 2] = [0xC0, 0x00];
        match self.stream.try_write(&PINGREQ) {
            Ok(2) => {
                self.last_write = monotonic();
                self.awaiting_pingresp = true;
                Ok(())
            }
            Ok(_) => Err("the broker took no PINGREQ: its socket is full".into()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err("the broker took no PINGREQ: its socket is full".into())
            }
            Err(e) => Err(format!("io: {e}")),
        }
    }

    /// Packet ids 1 to 65,535, in turn; 0 is not one.
    fn next_pkid(&mut self) -> u16 {
        self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
        self.last_pkid
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::{SubAck, SubscribeReasonCode};

    use super::*;
    use crate::session::script::{Peer, ScriptedBroker};

    const FILTER: &str = "max300/unit-1/+";
    const TOPIC: &str = "max300/unit-1/receipt";

    fn config(broker: &ScriptedBroker) -> LinkConfig {
        LinkConfig::new(broker.url(), "unit-1", vec![FILTER.into()])
    }

    /// A link whose first connection the broker accepts and grants.
    async fn up(config: LinkConfig, broker: &ScriptedBroker) -> (Link, Peer) {
        let link = tokio::spawn(Link::connect(config));
        let mut peer = broker.accept().await;
        peer.grant().await;
        (link.await.unwrap().unwrap(), peer)
    }

    async fn next(link: &mut Link) -> LinkEvent {
        tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .expect("an event within 10 s")
    }

    /// Waits until the link has connected again, to the broker's next connection (granted).
    async fn reconnected(link: &mut Link, broker: &ScriptedBroker) -> Peer {
        let accept = async {
            let mut peer = broker.accept().await;
            peer.grant().await;
            peer
        };
        let (event, peer) = tokio::join!(next(link), accept);
        assert!(matches!(event, LinkEvent::Connected), "{event:?}");
        peer
    }

    async fn message(link: &mut Link) -> Box<Delivery> {
        match next(link).await {
            LinkEvent::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_message_is_decoded_and_pubacked_and_a_quiet_link_holds_no_buffer() {
        let broker = ScriptedBroker::start().await;
        let (mut link, mut peer) = up(config(&broker), &broker).await;
        assert!(link.is_connected());
        // Larger than the first read: the header says how much more to reserve.
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(3000));
        peer.publish(9, TOPIC, &big).await;
        let delivery = message(&mut link).await;
        assert_eq!(delivery.topic, TOPIC);
        let (device, channel) = delivery.route.clone().expect("one of ours");
        assert_eq!((device.as_str(), channel), ("unit-1", Channel::Receipt));
        assert!(delivery.message.is_err(), "not a receipt: decoded, refused");
        link.ack(&delivery).await;
        assert_eq!(peer.expect_puback().await, 9);
        assert_eq!(link.buffered(), 0, "the 3 KB packet's buffer went with it");
        // Waiting for the next packet (polled until it waits, then put aside).
        tokio::select! {
            biased;
            event = link.next() => panic!("nothing was sent: {event:?}"),
            () = std::future::ready(()) => {}
        }
        assert_eq!(
            link.buffered(),
            0,
            "no room is taken for a packet not yet begun"
        );
    }

    #[tokio::test]
    async fn a_publish_goes_out_with_its_own_packet_id_and_close_sends_disconnect() {
        let broker = ScriptedBroker::start().await;
        let (mut link, mut peer) = up(config(&broker), &broker).await;
        let topic = "max300/unit-1/ack";
        link.publish(topic, b"one".to_vec(), Qos::AtLeastOnce)
            .await
            .unwrap();
        link.publish(topic, b"two".to_vec(), Qos::AtMostOnce)
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            match peer.read().await {
                Some(Packet::Publish(p)) => seen.push((p.qos, p.pkid, p.payload.to_vec())),
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        // Packet id 1 went to the SUBSCRIBE.
        assert_eq!(
            seen,
            vec![
                (QoS::AtLeastOnce, 2, b"one".to_vec()),
                (QoS::AtMostOnce, 0, b"two".to_vec())
            ]
        );
        link.close().await;
        assert!(matches!(peer.read().await, Some(Packet::Disconnect)));
        peer.expect_closed().await;
        assert!(!link.is_connected());
    }

    #[tokio::test]
    async fn a_refused_filter_fails_the_first_connection_and_names_it() {
        let broker = ScriptedBroker::start().await;
        let link = tokio::spawn(Link::connect(config(&broker)));
        let mut peer = broker.accept().await;
        let sub = peer.expect_subscribe().await;
        let refused = vec![SubscribeReasonCode::Failure];
        peer.send(Packet::SubAck(SubAck::new(sub.pkid, refused)))
            .await;
        let error = link.await.unwrap().unwrap_err().to_string();
        assert!(
            error.contains("refused") && error.contains(FILTER),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_lost_connection_is_made_again_and_an_old_message_is_not_pubacked_on_it() {
        let broker = ScriptedBroker::start().await;
        let (mut link, mut first) = up(config(&broker), &broker).await;
        first.publish(5, TOPIC, "old").await;
        let old = message(&mut link).await;
        drop(first);
        let mut second = reconnected(&mut link, &broker).await;
        second.publish(7, TOPIC, "new").await;
        let new = message(&mut link).await;
        // Packet id 5 means nothing on this connection (or another message): not sent.
        link.ack(&old).await;
        link.ack(&new).await;
        assert_eq!(second.expect_puback().await, 7);
    }

    #[tokio::test]
    async fn a_broker_that_stops_answering_pings_is_left_and_connected_to_again() {
        let broker = ScriptedBroker::start().await;
        let mut config = config(&broker);
        config.keep_alive = Duration::from_millis(200);
        let (mut link, deaf) = up(config, &broker).await;
        // `deaf` reads nothing, so no PINGRESP: a PINGREQ at 200 ms, given up at 400 ms.
        reconnected(&mut link, &broker).await;
        drop(deaf);
    }

    #[tokio::test]
    async fn a_packet_larger_than_the_limit_drops_the_connection() {
        let broker = ScriptedBroker::start().await;
        let mut config = config(&broker);
        config.max_packet_bytes = 1024;
        let (mut link, mut peer) = up(config, &broker).await;
        peer.publish(3, TOPIC, &"x".repeat(2000)).await;
        reconnected(&mut link, &broker).await;
        peer.expect_closed().await;
    }
}
