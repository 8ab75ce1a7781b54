//! The embedded MQTT broker (rumqttd), for one machine: loopback only.
//!
//! rumqttd cannot enforce per-device topic rules and stalls new TLS connections behind one
//! silent peer, so it is a development and single-machine default. A fleet uses a hardened
//! broker (mosquitto, EMQX or AWS IoT Core); see the README.
//!
//! It is rumqttd 0.20.0 as patched in `vendor/rumqttd` (see its `PATCH.md`): published, it
//! left Nagle's algorithm on (about 40 ms a QoS 1 round trip) and matched each new topic
//! against every filter, so 10,000 devices had not all connected after 100 s.

use max300_protocol::error::Chain;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::MqttError;

fn broker_error(what: String) -> MqttError {
    MqttError::Broker { what, cause: None }
}

fn broker_failed(what: String, cause: impl std::error::Error + Send + Sync + 'static) -> MqttError {
    MqttError::Broker {
        what,
        cause: Some(Box::new(cause)),
    }
}

/// Starts the broker on `addr` (port 0 picks a free port) and returns the bound address.
/// The broker lives on its own threads until the process exits: rumqttd has no shutdown.
pub fn start(addr: SocketAddr, max_connections: usize) -> Result<SocketAddr, MqttError> {
    if !addr.ip().is_loopback() {
        return Err(broker_error(format!(
            "the embedded broker listens on loopback only, not {addr}: it cannot enforce \
             per-device topic rules. For a fleet, run mosquitto (see README: Brokers) and \
             point --mqtt at it"
        )));
    }
    let addr = if addr.port() == 0 {
        free_port(addr)?
    } else {
        addr
    };
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 256 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let router = RouterConfig {
        max_connections: max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 10,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let config = Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Default::default()
    };
    // Fail here, with a clear message, rather than in the broker's own thread.
    drop(
        TcpListener::bind(addr)
            .map_err(|e| broker_failed(format!("cannot listen on {addr}"), e))?,
    );
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %Chain(&e), "embedded broker stopped");
            }
        })
        .map_err(|e| broker_failed("cannot start its thread".into(), e))?;
    wait_listening(addr)?;
    Ok(addr)
}

/// rumqttd cannot report a port it bound from 0, so reserve one first. Another process could
/// take it in between; the bind check in `start` then fails loudly.
fn free_port(addr: SocketAddr) -> Result<SocketAddr, MqttError> {
    TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(|e| broker_failed(format!("no free port on {}", addr.ip()), e))
}

fn wait_listening(addr: SocketAddr) -> Result<(), MqttError> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(broker_error(format!(
        "not accepting connections on {addr} after 2 s"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerUrl, Event, Inbound, Qos, Session, SessionConfig};
    use max300_protocol::clock::monotonic;
    use max300_protocol::{Channel, DeviceId, Topics};
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn url(addr: SocketAddr) -> BrokerUrl {
        format!("mqtt://{addr}").parse().unwrap()
    }

    /// Starts a session; call [`Session::first_connection`] before relying on it.
    fn session(
        addr: SocketAddr,
        client_id: &str,
        filters: Vec<String>,
        shutdown: &CancellationToken,
    ) -> (Session, mpsc::Receiver<Event>) {
        crate::connect(
            SessionConfig::new(url(addr), client_id, filters),
            shutdown.clone(),
        )
        .unwrap()
    }

    async fn next_message(events: &mut mpsc::Receiver<Event>) -> Box<Inbound> {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .expect("a message within 30 s")
                .expect("the session is open");
            if let Event::Message(message) = event {
                return message;
            }
        }
    }

    fn device(i: usize) -> DeviceId {
        DeviceId::parse(format!("max300-{i:04}")).unwrap()
    }

    /// The schedule → ack path: cloud → broker → device, device → broker → cloud, QoS 1 both
    /// ways. Without TCP_NODELAY on the broker's sockets each round waits about 40 ms (the
    /// broker's forwarded ack sits behind its own unacknowledged PUBACK until the cloud's
    /// delayed ACK); with it, about 1 ms in a debug build. The median of 20 is far from both.
    #[tokio::test]
    async fn a_message_and_its_reply_go_round_in_a_few_ms_not_in_nagles_40() {
        let addr = start("127.0.0.1:0".parse().unwrap(), 10).unwrap();
        let shutdown = CancellationToken::new();
        let topics = Topics::default();
        let unit = device(1);
        let (cloud, mut cloud_events) = session(addr, "cloud", topics.cloud_filters(), &shutdown);
        let (agent, mut agent_events) =
            session(addr, unit.as_str(), topics.device_filters(&unit), &shutdown);
        cloud.first_connection().await.unwrap();
        agent.first_connection().await.unwrap();

        let mut rounds = Vec::new();
        for i in 0..20u8 {
            let started = monotonic();
            let schedule = topics.topic(&unit, Channel::Schedule);
            cloud
                .publish(schedule, vec![i], Qos::AtLeastOnce)
                .await
                .unwrap();
            next_message(&mut agent_events).await.ack().await;
            let ack = topics.topic(&unit, Channel::Ack);
            agent.publish(ack, vec![i], Qos::AtLeastOnce).await.unwrap();
            let reply = next_message(&mut cloud_events).await;
            assert_eq!(reply.payload().as_ref(), [i]);
            reply.ack().await;
            rounds.push(monotonic() - started);
        }
        rounds.sort();
        let median = rounds[rounds.len() / 2];
        assert!(
            median < Duration::from_millis(10),
            "median round trip {median:?} (all: {rounds:?}): Nagle's algorithm on the broker's sockets?"
        );
        shutdown.cancel();
    }

    /// A fleet's worth of filters (15,000 devices' schedule topics, in 6 sessions) and a
    /// publish to each of 15,000 topics the router has not seen: each new topic is matched by
    /// a lookup, so the lot takes seconds. rumqttd 0.20.0 compared every new topic with every
    /// filter (over 10⁸ comparisons on its one router thread: minutes in a debug build).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_to_fifteen_thousand_new_topics_in_seconds_beside_as_many_filters() {
        const DEVICES: usize = 15_000;
        const FILTERS_A_SESSION: usize = 2_500;
        let addr = start("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let shutdown = CancellationToken::new();
        let topics = Topics::default();
        let ids: Vec<DeviceId> = (1..=DEVICES).map(device).collect();
        let mut listeners: Vec<_> = ids
            .chunks(FILTERS_A_SESSION)
            .enumerate()
            .map(|(n, chunk)| {
                let filters = chunk
                    .iter()
                    .map(|id| topics.topic(id, Channel::Schedule))
                    .collect();
                session(addr, &format!("listener-{n}"), filters, &shutdown)
            })
            .collect();
        for (listener, _) in &listeners {
            listener.first_connection().await.unwrap();
        }
        let (cloud, _cloud_events) = session(addr, "cloud", topics.cloud_filters(), &shutdown);
        cloud.first_connection().await.unwrap();

        let fan_out = async {
            // Receipts, which no filter here matches: the router keeps no match for such a
            // topic, so every one is matched afresh.
            for id in &ids {
                let receipt = topics.topic(id, Channel::Receipt);
                cloud
                    .publish(receipt, b"r".to_vec(), Qos::AtLeastOnce)
                    .await
                    .unwrap();
            }
            let last = ids.last().unwrap();
            let schedule = topics.topic(last, Channel::Schedule);
            cloud
                .publish(schedule, b"last".to_vec(), Qos::AtLeastOnce)
                .await
                .unwrap();
            let (_, events) = listeners.last_mut().unwrap();
            next_message(events).await
        };
        let message = tokio::time::timeout(Duration::from_secs(20), fan_out)
            .await
            .unwrap_or_else(|_| panic!("{DEVICES} publishes and one delivery took over 20 s"));
        assert_eq!(message.payload().as_ref(), b"last");
        message.ack().await;
        shutdown.cancel();
    }

    /// 1,000 devices connected and subscribed at once (each its own filters, as a fleet), and
    /// one publish to each from the cloud reaches every one of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holds_a_thousand_subscribed_devices_and_delivers_to_each() {
        const DEVICES: usize = 1_000;
        // Both ends of every connection are in this process.
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let need = 2 * DEVICES as u64 + 64;
        if soft < need {
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                need.max(soft).min(hard),
                hard,
            )
            .unwrap();
        }
        assert!(
            hard >= need,
            "needs {need} open files; `ulimit -Hn` is {hard}"
        );

        let addr = start("127.0.0.1:0".parse().unwrap(), DEVICES + 1).unwrap();
        let shutdown = CancellationToken::new();
        let topics = Topics::default();
        let ids: Vec<DeviceId> = (1..=DEVICES).map(device).collect();
        let mut devices = Vec::with_capacity(DEVICES);
        // In batches, as `max300 fleet` connects: the broker has one batch of handshakes in
        // hand at a time.
        for batch in ids.chunks(250) {
            let started: Vec<_> = batch
                .iter()
                .map(|id| session(addr, id.as_str(), topics.device_filters(id), &shutdown))
                .collect();
            for (session, _) in &started {
                session.first_connection().await.unwrap();
            }
            devices.extend(started);
        }
        let (cloud, _cloud_events) = session(addr, "cloud", topics.cloud_filters(), &shutdown);
        cloud.first_connection().await.unwrap();

        for id in &ids {
            let schedule = topics.topic(id, Channel::Schedule);
            cloud
                .publish(schedule, id.as_str().into(), Qos::AtLeastOnce)
                .await
                .unwrap();
        }
        for (id, (_, events)) in ids.iter().zip(&mut devices) {
            let message = next_message(events).await;
            assert_eq!(
                (message.topic.as_str(), message.payload().as_ref()),
                (
                    topics.topic(id, Channel::Schedule).as_str(),
                    id.as_str().as_bytes()
                )
            );
            message.ack().await;
        }
        shutdown.cancel();
    }

    #[test]
    fn refuses_a_non_loopback_address_with_advice() {
        let err = start("0.0.0.0:1883".parse().unwrap(), 10).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("loopback only") && text.contains("mosquitto"),
            "{text}"
        );
    }

    #[test]
    fn picks_a_free_port_when_given_port_zero() {
        let addr = start("127.0.0.1:0".parse().unwrap(), 10).unwrap();
        assert_ne!(addr.port(), 0);
        assert!(std::net::TcpStream::connect(addr).is_ok());
    }
}
